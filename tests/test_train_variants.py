"""LoRI-style sparse B and the interference penalty: the maths against independent references and
their effect on a real (tiny) training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import keyword_task

from osrm_lora.config import InitSettings, LoraSettings, TrainSettings
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.train import interference_ratio, output_energy, sparsity_masks, train_task

FAST = TrainSettings(epochs=2, batch_size=16, lr=5e-3, max_length=16, eval_batch_size=64)
LORA = LoraSettings(rank=4, alpha=8, target_modules=["query", "value"])


def test_sparsity_masks_keep_the_global_top_share() -> None:
    g = torch.Generator().manual_seed(0)
    small = torch.randn(8, 4, generator=g) * 1e-3  # every entry below every entry of `large`
    large = torch.randn(8, 4, generator=g).sign() * (1 + torch.rand(8, 4, generator=g))
    masks = sparsity_masks({"small": small, "large": large}, 0.5)
    assert masks["large"].all() and not masks["small"].any(), "one ranking over all tensors, not per tensor"
    masks = sparsity_masks({"small": small, "large": large}, 0.9)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == math.ceil(0.1 * 64)
    flat = torch.cat([small.abs().flatten(), large.abs().flatten()])
    chosen = torch.cat([masks["small"].flatten(), masks["large"].flatten()])
    assert flat[chosen].min() >= flat[~chosen].max()
    with pytest.raises(ValueError):
        sparsity_masks({"x": small}, 1.0)


def test_interference_ratio_matches_sampled_output_shifts() -> None:
    g = torch.Generator().manual_seed(1)
    factors, own_sum, other_sum = [], 0.0, 0.0
    for n, r, m in ((6, 2, 5), (9, 3, 4)):
        A, B = torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)
        X_own = torch.randn(200, n, generator=g, dtype=torch.float64) + 1.0
        X_other = torch.randn(300, n, generator=g, dtype=torch.float64) * 2.0
        S_own, S_other = X_own.T @ X_own / 200, X_other.T @ X_other / 300
        # independent reference: the mean squared output shift over the samples themselves
        own_sum += float(((X_own @ A.T @ B.T) ** 2).sum(1).mean())
        other_sum += float(((X_other @ A.T @ B.T) ** 2).sum(1).mean())
        assert float(output_energy(A, B, S_own)) == pytest.approx(float(((X_own @ A.T @ B.T) ** 2).sum(1).mean()),
                                                                  rel=1e-10)
        factors.append((A, B, S_own, S_other))
    assert float(interference_ratio(factors)) == pytest.approx(other_sum / own_sum, rel=1e-10)
    zero = [(A, torch.zeros_like(B), So, Sx) for A, B, So, Sx in factors]
    assert float(interference_ratio(zero)) == 0.0


def test_lori_training_keeps_a_frozen_and_b_exactly_sparse(tiny_bert: Path, tmp_path: Path) -> None:
    task = keyword_task("kw", ["red", "green"], n=64)
    out = tmp_path / "lori"
    train_task(task, out, model=str(tiny_bert), train=FAST, lora=LORA, seed=2, freeze_A=True, b_sparsity=0.75,
               calibration_epochs=1)
    saved = load_file(str(out / "adapter_model.safetensors"))
    Bs = [v for k, v in saved.items() if ".lora_B." in k]
    total = sum(b.numel() for b in Bs)
    nonzero = sum(int((b != 0).sum()) for b in Bs)
    assert 0 < nonzero <= math.ceil(0.25 * total)
    metrics = read_json(out / "metrics.json")
    assert metrics["b_sparsity"] == 0.75 and metrics["calibration_epochs"] == 1
    assert metrics["a_drift_mean"] == 0.0, "A stays the frozen random projection"
    # the dense run from the same seed differs: the mask is really applied during training
    dense = tmp_path / "dense"
    train_task(task, dense, model=str(tiny_bert), train=FAST, lora=LORA, seed=2, freeze_A=True)
    dense_B = [v for k, v in load_file(str(dense / "adapter_model.safetensors")).items() if ".lora_B." in k]
    assert sum(int((b != 0).sum()) for b in dense_B) > nonzero


def _grams(n: int, own_scale: float, other_direction: int):
    own = torch.eye(n) * own_scale
    others = torch.zeros(n, n)
    others[other_direction, other_direction] = 50.0  # the other tasks live on one direction

    def lookup(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return own, others

    return lookup


def test_interference_penalty_lowers_the_ratio_it_records(tiny_bert: Path, tmp_path: Path) -> None:
    task = keyword_task("kw", ["red", "green"], n=64)
    hidden = 32  # tinymodels' hidden size
    ratios = {}
    for weight in (0.0, 5.0):
        out = tmp_path / f"w{weight}"
        train_task(task, out, model=str(tiny_bert), train=FAST, lora=LORA, seed=4,
                   interference_grams=_grams(hidden, 1.0, 0), interference_penalty=weight)
        hist = read_json(out / "metrics.json")["history"]
        assert all("interference_ratio" in h for h in hist)
        ratios[weight] = hist[-1]["interference_ratio"]
    assert ratios[5.0] < 0.5 * ratios[0.0]


def test_penalty_without_statistics_and_bad_settings_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    task = keyword_task("kw", ["red", "green"], n=32)
    with pytest.raises(OsrmError, match="interference_grams"):
        train_task(task, tmp_path / "x", model=str(tiny_bert), train=FAST, lora=LORA, interference_penalty=1.0)
    with pytest.raises(ValueError, match="b_sparsity masks B"):
        InitSettings(name="bad", freeze_B=True, b_sparsity=0.9)
    with pytest.raises(ValueError):
        InitSettings(name="bad", b_sparsity=1.0)


def test_pipeline_trains_lori_and_penalised_inits(tmp_path: Path) -> None:
    from tinymodels import write_keyword_tasks

    from osrm_lora.config import parse_config
    from osrm_lora.pipeline import run_pipeline

    tasks = write_keyword_tasks(tmp_path, [("colours", ["red", "green", "blue"], 1), ("polar", ["good", "bad"], 2)],
                                n=64)
    raw = {"name": "variants", "model": "default", "tasks": tasks, "diagnose": False,
           "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value", "intermediate.dense"]},
           "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 16},
           "inits": [{"name": "lori", "freeze_A": True, "b_sparsity": 0.9},
                     {"name": "pen", "mode": "own", "interference_penalty": 1.0},
                     {"name": "split", "mode": "own", "frozen_rank": 2}],
           "profile": {"n_samples": 16},
           "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]}}
    results = run_pipeline(parse_config(raw), tmp_path / "run")
    assert set(results["single_task"]) == {"lori", "pen", "split"}
    # the rank split: the best 2 OSRM directions held in A, the other 2 rows trained
    from osrm_lora.adapters import load_adapter
    from osrm_lora.osrm import compute_osrm_A
    from osrm_lora.stats import StatsStore

    osrm_A = compute_osrm_A(StatsStore.load(tmp_path / "run" / "stats"), ["colours", "polar"], 4, "own")
    for task in ("colours", "polar"):
        split = load_adapter(tmp_path / "run" / "adapters" / "split" / task)
        assert read_json(tmp_path / "run" / "adapters" / "split" / task / "metrics.json")["frozen_rows"] == 2
        for key, mod in split.modules.items():
            torch.testing.assert_close(mod.A[:2], osrm_A[task][key][:2], rtol=0, atol=1e-6)
            assert not torch.allclose(mod.A[2:], osrm_A[task][key][2:], atol=1e-3)
    pen = read_json(tmp_path / "run" / "adapters" / "pen" / "colours" / "metrics.json")
    assert pen["interference_penalty"] == 1.0 and "interference_ratio" in pen["history"][0]
    lori = read_json(tmp_path / "run" / "adapters" / "lori" / "polar" / "metrics.json")
    assert lori["b_sparsity"] == 0.9


def test_rank_split_holds_the_given_rows_and_trains_the_others(tiny_bert: Path, tmp_path: Path) -> None:
    """A_frozen_rows: the first k rows of every A are exactly the given ones after training (even with
    AdamW weight decay), the other rows move from PEFT's initialisation, B trains."""
    task = keyword_task("kw", ["red", "green"], n=64)
    hidden = 32  # tinymodels' hidden size
    g = torch.Generator().manual_seed(3)
    keys = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    rows = {k: torch.linalg.qr(torch.randn(hidden, 2, generator=g))[0].T.contiguous() for k in keys}  # 2 x 32
    train = TrainSettings(epochs=2, batch_size=16, lr=5e-3, max_length=16, eval_batch_size=64, weight_decay=0.1)
    out, free = tmp_path / "split", tmp_path / "free"
    train_task(task, out, model=str(tiny_bert), train=train, lora=LORA, seed=5, A_frozen_rows=rows)
    train_task(task, free, model=str(tiny_bert), train=train, lora=LORA, seed=5)
    split_A = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if ".lora_A." in k}
    free_A = {k: v for k, v in load_file(str(free / "adapter_model.safetensors")).items() if ".lora_A." in k}
    assert len(split_A) == len(keys)
    for name, A in split_A.items():
        key = next(k for k in keys if k in name)
        assert torch.equal(A[:2], rows[key]), name  # held exactly
        assert not torch.equal(A[2:], free_A[name][2:]), name  # the free rows trained as without the split
    metrics = read_json(out / "metrics.json")
    assert metrics["frozen_rows"] == 2 and metrics["a_drift_mean"] > 0  # the free rows trained
    assert any(".lora_B." in k and bool(v.abs().sum() > 0)
               for k, v in load_file(str(out / "adapter_model.safetensors")).items())


def test_rank_split_settings_are_checked(tiny_bert: Path, tmp_path: Path) -> None:
    from osrm_lora.config import parse_config
    from osrm_lora.errors import ConfigError

    task = keyword_task("kw", ["red", "green"], n=32)
    with pytest.raises(OsrmError, match="cannot be combined with freeze_A"):
        train_task(task, tmp_path / "x", model=str(tiny_bert), train=FAST, lora=LORA, freeze_A=True,
                   A_frozen_rows={"bert.encoder.layer.0.attention.self.query": torch.zeros(1, 32)})
    with pytest.raises(OsrmError, match=r"A_frozen_rows of .* give k x 32 with 0 < k < rank"):
        train_task(task, tmp_path / "y", model=str(tiny_bert), train=FAST, lora=LORA,
                   A_frozen_rows={"bert.encoder.layer.0.attention.self.query": torch.zeros(4, 32)})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="frozen_rank needs an OSRM mode"):
        InitSettings(name="bad", frozen_rank=2)
    with pytest.raises(ValueError, match="drop freeze_A"):
        InitSettings(name="bad", mode="own", frozen_rank=2, freeze_A=True)
    raw = {"name": "s", "model": "default", "tasks": ["mr"], "lora": {"rank": 4},
           "inits": [{"name": "split", "mode": "own", "frozen_rank": 4}]}
    with pytest.raises(ConfigError, match="frozen_rank 4 leaves no free rows of the LoRA rank 4"):
        parse_config(raw)


def test_batched_training_refuses_a_rank_split(tiny_bert: Path, tmp_path: Path) -> None:
    """train.batched leaves a rank split to the one-at-a-time path (the pipeline falls back to it)."""
    from osrm_lora.train_batched import AdapterJob, BatchingUnsupported, train_tasks_batched

    task = keyword_task("kw", ["red", "green"], n=32)
    job = AdapterJob(task, tmp_path / "a", train=FAST, init_name="split",
                     A_frozen_rows={"bert.encoder.layer.0.attention.self.query": torch.zeros(1, 32)})
    with pytest.raises(BatchingUnsupported, match="rank split of split"):
        train_tasks_batched([job], model=str(tiny_bert), lora=LORA, train=FAST)
    assert not (tmp_path / "a").exists()


def test_a_rank_split_enters_the_train_stage_inputs_only_when_set() -> None:
    """Runs made before frozen_rank existed keep their finished train stages (same stage inputs)."""
    from osrm_lora.pipeline.stages import init_payload

    plain = init_payload(InitSettings(name="own", mode="own"))
    assert "frozen_rank" not in plain and "solver" not in plain
    assert init_payload(InitSettings(name="split", mode="own", frozen_rank=2))["frozen_rank"] == 2
