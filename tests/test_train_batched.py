"""Batched multi-adapter training (train_batched) against training one adapter at a time (train_task).

The equivalence tests use the tiny BERT of tinymodels with dropout switched off: dropout draws other
random masks in a batched pass, so only a dropout-free model can agree step for step.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import WORDS, keyword_task, tiny_config, write_keyword_tasks, write_tokenizer

from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.data.task import Split, Task
from osrm_lora.encoding import collate
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.train import initial_peft_model, set_factors, set_seed, train_task
from osrm_lora.train_batched import AdapterJob, BatchingUnsupported, MultiAdapterModel, train_tasks_batched

LORA = LoraSettings(rank=4, alpha=8)
FAST = TrainSettings(epochs=3, batch_size=8, lr=2e-2, max_length=16, eval_batch_size=64)


@pytest.fixture(scope="module")
def nodrop_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tinymodels' tiny BERT without dropout (saved like a real model directory)."""
    from transformers import AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("nodrop-bert")
    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(str(path), safe_serialization=True)
    write_tokenizer(path)
    return path


def colour_task(name: str, n: int, seed: int = 0) -> Task:
    """Three classes: which of red / green / blue the sentence contains."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue"]
    pool = [w for w in WORDS if w not in colours]

    def make(count: int) -> Split:
        texts, labels = [], []
        for i in range(count):
            words = [rng.choice(pool) for _ in range(rng.randint(2, 7))]
            words.insert(rng.randrange(len(words) + 1), colours[i % 3])
            texts.append(" ".join(words))
            labels.append(i % 3)
        return Split(tuple(texts), tuple(labels))

    return Task(name, "classification", "accuracy", tuple(colours), make(n), make(n // 2), make(n // 2), source="toy")


def count_task(name: str, n: int, seed: int = 0) -> Task:
    """Regression: how many of red / good the sentence contains (0, 1 or 2)."""
    rng = random.Random(seed)
    pool = [w for w in WORDS if w not in ("red", "good")]

    def make(count: int) -> Split:
        texts, labels = [], []
        for i in range(count):
            words = [rng.choice(pool) for _ in range(rng.randint(2, 7))]
            for w in ("red", "good")[: i % 3]:
                words.insert(rng.randrange(len(words) + 1), w)
            texts.append(" ".join(words))
            labels.append(float(i % 3))
        return Split(tuple(texts), tuple(labels))

    return Task(name, "regression", "pearson_spearman", (), make(n), make(n // 2), make(n // 2), source="toy")


def _solo_model(model: Path, job: AdapterJob, train: TrainSettings):
    """The model train_task starts from for ``job``."""
    from osrm_lora.backbone import load_tokenizer

    set_seed(job.seed)
    tok = load_tokenizer(str(model))
    peft_model = initial_peft_model(str(model), job.task.num_labels, job.task.problem_type, LORA, train, job.seed,
                                    torch.device("cpu"), tok.pad_token_id)
    set_factors(peft_model, job.init_A, freeze_A=job.freeze_A, freeze_B=job.freeze_B)
    return peft_model, tok


def _module_keys(model: Path) -> list[str]:
    from osrm_lora.backbone import load_classifier

    return [n for n, _ in load_classifier(str(model), 2).named_modules() if n.endswith((".query", ".value"))]


def _saved(path: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(path / "adapter_model.safetensors")), **load_file(str(path / "head.safetensors"))}


def _assert_same_adapter(solo: Path, batched: Path, atol: float = 1e-5) -> None:
    assert sorted(p.name for p in solo.iterdir()) == sorted(p.name for p in batched.iterdir())
    for name in ("adapter_config.json", "head.json"):
        assert (solo / name).read_text() == (batched / name).read_text(), name
    a, b = _saved(solo), _saved(batched)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    ma, mb = read_json(solo / "metrics.json"), read_json(batched / "metrics.json")
    assert ma.keys() == mb.keys()
    assert {k: v for k, v in ma["train"].items() if k != "batched"} == \
        {k: v for k, v in mb["train"].items() if k != "batched"}
    for key in ("best_epoch", "lora", "freeze_A", "freeze_B", "seed", "init", "task", "metric",
                "b_sparsity", "calibration_epochs", "interference_penalty", "n_train", "world_size", "task_spec"):
        assert ma[key] == mb[key], key
    # scores on the 0..100 scale: a rank metric (Spearman) may swap two nearly tied predictions
    for key in ("validation", "test"):
        assert ma[key] == pytest.approx(mb[key], abs=0.1), key
    for ha, hb in zip(ma["history"], mb["history"]):
        assert ha.keys() == hb.keys()
        for key in ha:
            assert ha[key] == pytest.approx(hb[key], abs=0.1 if key == "validation" else 1e-6, rel=1e-4), key
    assert ma["a_drift_mean"] == pytest.approx(mb["a_drift_mean"], rel=1e-4, abs=1e-7)


def test_one_batched_step_gives_each_adapter_its_solo_loss_and_gradients(nodrop_bert: Path) -> None:
    keys = _module_keys(nodrop_bert)
    g = torch.Generator().manual_seed(5)
    init_A = {k: torch.randn(LORA.rank, 32, generator=g) * 0.2 for k in keys}
    jobs = [AdapterJob(keyword_task("kw", ["red"], n=32, seed=0), "unused/a", seed=0),
            AdapterJob(colour_task("col", n=30, seed=1), "unused/b", seed=1, freeze_A=True),
            AdapterJob(keyword_task("pol", ["good", "bad"], n=24, seed=2), "unused/c", seed=3, init_A=init_A)]
    multi = MultiAdapterModel.build(jobs, model=str(nodrop_bert), lora=LORA, train=FAST, device="cpu")
    multi.inner.train()
    for picks in ([list(range(8)), list(range(3, 8)), list(range(6))],  # groups of unequal sizes (padded)
                  [list(range(4)), list(range(4, 8)), list(range(8, 12))]):  # equal sizes
        for slot in multi.slots:
            for p in slot.params.values():
                p.grad = None
        losses = multi.batch_losses(list(enumerate(picks)))
        torch.stack(losses).sum().backward()
        for slot, idx, loss in zip(multi.slots, picks, losses):
            solo, tok = _solo_model(nodrop_bert, slot.job, FAST)
            solo.train()
            batch = collate(tok, [slot.enc_train.features[i] for i in idx])
            ref = torch.nn.functional.cross_entropy(solo(**batch).logits, slot.enc_train.labels[idx])
            ref.backward()
            assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
            named = dict(solo.named_parameters())
            assert list(slot.params) == [n for n, p in named.items() if ".lora_" in n or n in slot.params]
            checked = 0
            for name, p in slot.params.items():
                ref_p = named[name]
                assert p.requires_grad == ref_p.requires_grad, name
                if ref_p.grad is None:
                    assert p.grad is None, name
                    continue
                assert p.grad is not None, name
                assert torch.allclose(p.grad, ref_p.grad, atol=1e-7, rtol=1e-5), (name, float((p.grad - ref_p.grad).abs().max()))
                checked += 1
            assert checked >= 4
        assert multi.slots[1].params[next(n for n in multi.slots[1].params if ".lora_A." in n)].grad is None, \
            "frozen A gets no gradient"


def test_batched_training_matches_one_at_a_time(nodrop_bert: Path, tmp_path: Path) -> None:
    """Three adapters of other tasks, label counts, seeds, batch sizes and epoch counts: the same weights,
    best epochs and metrics as training each alone; each is written as soon as it is done."""
    short = TrainSettings(epochs=2, batch_size=6, lr=1e-2, head_lr=3e-2, max_length=16, eval_batch_size=64)
    jobs = [AdapterJob(keyword_task("kw", ["red", "green"], n=48, seed=0), tmp_path / "b" / "kw", seed=0),
            AdapterJob(colour_task("col", n=36, seed=1), tmp_path / "b" / "col", seed=1, train=short),
            AdapterJob(keyword_task("pol", ["good", "bad"], n=40, seed=2), tmp_path / "b" / "pol", seed=2,
                       init_name="other"),
            AdapterJob(count_task("count", n=44, seed=3), tmp_path / "b" / "count", seed=3)]
    for job in jobs:
        train_task(job.task, tmp_path / "s" / job.task.name, model=str(nodrop_bert), lora=LORA,
                   train=job.train or FAST, seed=job.seed, init_name=job.init_name)
    order: list[int] = []
    results = train_tasks_batched(jobs, model=str(nodrop_bert), lora=LORA, train=FAST, device="cpu",
                                  on_result=lambda i, r: order.append(i))
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3], "the 2-epoch adapter is written first"
    assert [r.task for r in results] == ["kw", "col", "pol", "count"]
    for job, res in zip(jobs, results):
        _assert_same_adapter(tmp_path / "s" / job.task.name, Path(job.out_dir))
        assert res.best_epoch == read_json(Path(job.out_dir) / "metrics.json")["best_epoch"]
    history = [h["validation"] for h in read_json(tmp_path / "b" / "count" / "metrics.json")["history"]]
    assert len(set(history)) == len(history), "the best epoch is a real choice"
    # in groups of at most two adapters: the same again
    again = [AdapterJob(j.task, tmp_path / "g" / j.task.name, seed=j.seed, train=j.train, init_name=j.init_name)
             for j in jobs]
    train_tasks_batched(again, model=str(nodrop_bert), lora=LORA, train=FAST, device="cpu", max_adapters=2)
    for job in jobs:
        _assert_same_adapter(tmp_path / "s" / job.task.name, tmp_path / "g" / job.task.name)


def _grams(n: int):
    own = torch.eye(n)
    others = torch.zeros(n, n)
    others[0, 0] = 50.0

    def lookup(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return own, others

    return lookup


def test_frozen_A_subspace_lori_and_penalty_match_one_at_a_time(nodrop_bert: Path, tmp_path: Path) -> None:
    keys = _module_keys(nodrop_bert)
    U = torch.linalg.qr(torch.randn(32, 6, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
    task = keyword_task("kw", ["red", "green"], n=40, seed=0)
    other = keyword_task("pol", ["good", "bad"], n=32, seed=3)
    variants = {
        "frozen": dict(freeze_A=True, init_A={k: U[:4].contiguous() for k in keys}),
        "subspace": dict(init_A={k: U[:4].contiguous() for k in keys}, A_subspace={k: U for k in keys}),
        "lori": dict(freeze_A=True, b_sparsity=0.75, calibration_epochs=2),
        "penalty": dict(interference_grams=_grams(32), interference_penalty=2.0),
        "frozenB": dict(freeze_B=True),
    }
    jobs = []
    for i, (name, opts) in enumerate(variants.items()):
        t = task if i % 2 == 0 else other
        jobs.append(AdapterJob(t, tmp_path / "b" / name, seed=i, init_name=name, **opts))
        train_task(t, tmp_path / "s" / name, model=str(nodrop_bert), lora=LORA, train=FAST, seed=i, init_name=name,
                   **opts)
    train_tasks_batched(jobs, model=str(nodrop_bert), lora=LORA, train=FAST, device="cpu")
    for name in variants:
        _assert_same_adapter(tmp_path / "s" / name, tmp_path / "b" / name)
    saved = {n: load_file(str(tmp_path / "b" / n / "adapter_model.safetensors")) for n in variants}
    assert read_json(tmp_path / "b" / "frozen" / "metrics.json")["a_drift_mean"] == 0.0
    for k, v in saved["frozen"].items():
        if ".lora_A." in k:
            assert torch.equal(v, U[:4]), "frozen A stays the given A"
    for k, v in saved["subspace"].items():
        if ".lora_A." in k:
            assert torch.allclose(v, v @ U.T @ U, atol=1e-5), "A stays inside its subspace"
    Bs = [v for k, v in saved["lori"].items() if ".lora_B." in k]
    assert 0 < sum(int((b != 0).sum()) for b in Bs) <= math.ceil(0.25 * sum(b.numel() for b in Bs))
    assert "interference_ratio" in read_json(tmp_path / "b" / "penalty" / "metrics.json")["history"][0]
    assert all(not v.any() for k, v in saved["frozenB"].items() if ".lora_B." in k), "frozen B stays 0"


def test_unsupported_combinations_are_refused_in_one_line(nodrop_bert: Path, tmp_path: Path) -> None:
    task = keyword_task("kw", ["red"], n=16)
    cases = [
        ([AdapterJob(task, tmp_path / "a"), AdapterJob(task, tmp_path / "b", lora=LoraSettings(rank=2, alpha=4))],
         LORA, BatchingUnsupported, "one LoRA shape"),
        ([AdapterJob(task, tmp_path / "a"), AdapterJob(task, tmp_path / "b")],
         LoraSettings(rank=2, alpha=4, target_modules=["query", "dense"]), BatchingUnsupported, "part of the task head"),
        ([AdapterJob(task, tmp_path / "a"), AdapterJob(task, tmp_path / "a")], LORA, OsrmError, "same|its own directory"),
        ([AdapterJob(task, tmp_path / "a", freeze_A=True, freeze_B=True)], LORA, OsrmError, "nothing to train"),
        ([AdapterJob(task, tmp_path / "a", interference_penalty=1.0)], LORA, OsrmError, "interference_grams"),
        ([], LORA, OsrmError, "no adapters"),
    ]
    for jobs, lora, error, match in cases:
        with pytest.raises(error, match=match) as info:
            train_tasks_batched(jobs, model=str(nodrop_bert), lora=lora, train=FAST, device="cpu")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "nothing written"
    assert issubclass(BatchingUnsupported, OsrmError)


def test_pipeline_batched_writes_the_same_run(nodrop_bert: Path, tmp_path: Path) -> None:
    from osrm_lora.config import parse_config
    from osrm_lora.pipeline import run_pipeline

    tasks = write_keyword_tasks(tmp_path, [("colours", ["red", "green", "blue"], 1), ("polar", ["good", "bad"], 2)],
                                n=32)
    raw = {"name": "batched", "model": str(nodrop_bert), "tasks": tasks, "diagnose": False,
           "lora": {"rank": 4, "alpha": 8},
           "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "max_length": 16},
           "inits": [{"name": "standard"}, {"name": "lori", "freeze_A": True, "b_sparsity": 0.8}],
           "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]}}
    solo = run_pipeline(parse_config(raw), tmp_path / "solo")
    raw["train"]["batched"] = True
    batched = run_pipeline(parse_config(raw), tmp_path / "batched")
    for init in ("standard", "lori"):
        for task in ("colours", "polar"):
            rel = Path("adapters") / init / task
            _assert_same_adapter(tmp_path / "solo" / rel, tmp_path / "batched" / rel)
            assert (tmp_path / "batched" / ".stages" / f"train__{init}__{task}.json").is_file()
    assert read_json(tmp_path / "batched" / "adapters" / "lori" / "polar" / "metrics.json")["train"]["batched"] is True
    assert batched["single_task"].keys() == solo["single_task"].keys()
    for init in solo["single_task"]:
        for task, rec in solo["single_task"][init].items():
            assert batched["single_task"][init][task]["best_epoch"] == rec["best_epoch"]
            assert batched["single_task"][init][task]["validation"] == rec["validation"]
    # a rerun skips every finished adapter (nothing is rewritten)
    marker = tmp_path / "batched" / "adapters" / "standard" / "polar" / "metrics.json"
    before = marker.stat().st_mtime_ns
    run_pipeline(parse_config(raw), tmp_path / "batched")
    assert marker.stat().st_mtime_ns == before
    manifest = json.loads((tmp_path / "batched" / "manifest.json").read_text())
    assert "train/lori/polar" in manifest["stage_seconds"]


def test_pipeline_falls_back_to_one_at_a_time_when_batching_is_refused(
        nodrop_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import osrm_lora.train_batched as tb
    from osrm_lora.config import parse_config
    from osrm_lora.pipeline import run_pipeline

    def refuse(*args: object, **kwargs: object) -> None:
        raise BatchingUnsupported("this layout cannot be batched")

    monkeypatch.setattr(tb, "train_tasks_batched", refuse)
    tasks = write_keyword_tasks(tmp_path, [("a", ["red"], 1), ("b", ["good"], 2)], n=24)
    raw = {"name": "fallback", "model": str(nodrop_bert), "tasks": tasks, "diagnose": False,
           "lora": {"rank": 2, "alpha": 4},
           "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "max_length": 16, "batched": True},
           "inits": ["standard"], "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]}}
    with caplog.at_level("WARNING", logger="osrm_lora"):
        results = run_pipeline(parse_config(raw), tmp_path / "run")
    assert "one at a time" in caplog.text
    assert set(results["single_task"]["standard"]) == {"a", "b"}
    for task in ("a", "b"):
        assert (tmp_path / "run" / ".stages" / f"train__standard__{task}.json").is_file()
