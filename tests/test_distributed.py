"""Distributed paths with 2 CPU processes (torchrun, gloo) against one process doing the same work.

Two launches only (each costs seconds of start-up): tests/dist_worker.py (DDP training, sharded
profiling, failure propagation) and ``python -m osrm_lora run`` (the whole pipeline).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dist_worker import LORA, TRAIN, ddp_task, stats_texts
from distutil import torchrun
from safetensors.torch import load_file
from tinymodels import write_keyword_tasks

from osrm_lora import distributed as D
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.stats import StatsStore
from osrm_lora.train import local_share, train_task

HERE = Path(__file__).parent


# ------------------------------------------------------------------ single-process behaviour
def test_shard_round_robin_and_owner() -> None:
    items = list(range(7))
    parts = [D.shard(items, D.DistEnv(r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items
    assert [D.owner(i, D.DistEnv(0, 3)) for i in items] == [0, 1, 2, 0, 1, 2, 0]
    assert D.shard(items) == items  # one process owns everything


def test_local_share_weights_reproduce_the_global_mean() -> None:
    # sum over ranks of weight_r * mean_r / W == global mean, for any split of the batch
    idx = list(range(5))
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    W = 2
    total = 0.0
    for r in range(W):
        local, w = local_share(idx, D.DistEnv(r, W))
        total += w * float(values[local].mean()) / W
    assert total == pytest.approx(float(values.mean()))
    # a rank left without examples runs one with weight 0
    assert local_share([3], D.DistEnv(1, 2)) == ([3], 0.0)
    assert local_share([3, 4], D.DistEnv(0, 1)) == ([3, 4], 1.0)


def test_collectives_are_no_ops_in_one_process() -> None:
    t = torch.arange(3.0)
    assert D.all_reduce_sum(t) is t
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object(5) == 5
    D.barrier()
    D.check_same("x", "anything")
    assert not D.get_env().active and D.get_env().is_main
    with pytest.raises(OsrmError, match="boom"):
        D.raise_if_any_failed(OsrmError("boom"))
    assert D.from_rank0(lambda: 7) == 7
    D.raise_if_any_failed(None)


def test_no_launcher_means_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not D.launched_distributed()
    assert D.init_distributed("cpu") == D.DistEnv()


# ------------------------------------------------------------------ 2 processes vs 1
@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bert without dropout: with dropout, ranks draw other masks than one process would."""
    import shutil

    out = tmp_path_factory.mktemp("bert-nodrop") / "model"
    shutil.copytree(tiny_bert, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def worker_run(no_dropout_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")

    def reset() -> None:
        shutil.rmtree(out)
        out.mkdir()

    proc = torchrun([str(HERE / "dist_worker.py"), str(no_dropout_bert), str(out)], nproc=2, reset=reset)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def single_adapter(no_dropout_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    single = tmp_path_factory.mktemp("single") / "adapter"
    train_task(ddp_task(), single, model=str(no_dropout_bert), lora=LORA, train=TRAIN, seed=7, device="cpu")
    return single


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_training_matches_one_process_with_the_same_global_batch(
        worker_run: Path, single_adapter: Path, strategy: str) -> None:
    single = single_adapter
    m1, m2 = read_json(single / "metrics.json"), read_json(worker_run / f"{strategy}_adapter" / "metrics.json")
    assert m2["world_size"] == 2 and m1["world_size"] == 1 and m2["train"]["strategy"] == strategy
    assert m2["best_epoch"] == m1["best_epoch"]
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4)
        assert h2["validation"] == pytest.approx(h1["validation"])
    assert m2["test"] == pytest.approx(m1["test"])
    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(worker_run / f"{strategy}_adapter" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-3, msg=f"{name}:{k}")
    trained = load_file(str(single / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)


def test_sharded_statistics_equal_the_single_process_store(worker_run: Path, no_dropout_bert: Path) -> None:
    from osrm_lora.backbone import load_classifier, load_tokenizer
    from osrm_lora.stats import collect_statistics

    tok = load_tokenizer(str(no_dropout_bert))
    m = load_classifier(str(no_dropout_bert), 2, device="cpu")
    ref = collect_statistics(m, tok, stats_texts(), ["query", "value"], n_samples=40, batch_size=6,
                             max_length=16, dtype=torch.float64, seed=3)
    got = StatsStore.load(worker_run / "stats")
    assert got.meta["per_task"] == ref.meta["per_task"]
    assert got.meta["groups"] == ref.meta["groups"]
    assert set(got.tensors) == set(ref.tensors)
    for k, v in ref.tensors.items():
        torch.testing.assert_close(got.tensors[k], v, atol=1e-10, rtol=1e-12, msg=k)


def test_a_finished_rank_leaves_the_group_only_with_every_rank(worker_run: Path) -> None:
    """shutdown(synchronize=True), as the CLI calls it after a finished command: rank 0 leaves after
    the late rank 1 finished (leaving first made gloo abort the peer at exit)."""
    assert (worker_run / "rank0_left_after_rank1.txt").read_text() == "True"


def test_a_failure_on_one_rank_is_raised_on_every_rank(worker_run: Path) -> None:
    assert (worker_run / "error_rank1.txt").read_text() == "job 1 broke"
    other = (worker_run / "error_rank0.txt").read_text()
    assert "rank 1 failed" in other and "job 1 broke" in other
    # the same for work done on rank 0 alone and broadcast (distributed.from_rank0)
    assert (worker_run / "from_rank0_rank0.txt").read_text() == "rank 0 broke"
    assert "rank 0 failed (OsrmError: rank 0 broke)" in (worker_run / "from_rank0_rank1.txt").read_text()


def _one_and_two_processes(raw: dict, tmp_path: Path) -> tuple[dict, dict]:
    """The pipeline of ``raw`` run by ``torchrun -m osrm_lora run`` with 2 processes (into run2) and in
    this process (into run1); their results."""
    from osrm_lora.config import parse_config
    from osrm_lora.pipeline import run_pipeline

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = torchrun(["osrm_lora", "-q", "run", str(cfg_path), "--out", str(tmp_path / "run2")], nproc=2,
                    module=True, reset=lambda: shutil.rmtree(tmp_path / "run2", ignore_errors=True))
    assert proc.returncode == 0, proc.stdout[-4000:]
    two = read_json(tmp_path / "run2" / "results.json")
    one = run_pipeline(parse_config(raw), tmp_path / "run1")
    return one, two


def test_pipeline_on_two_processes_equals_one_process(tiny_bert: Path, tmp_path: Path) -> None:
    raw = {
        "name": "dist", "model": str(tiny_bert), "device": "cpu",
        "tasks": write_keyword_tasks(tmp_path, [("colours", ["red", "green"], 1), ("polar", ["good", "bad"], 2),
                                                ("x", ["xray"], 3)], n=48),
        "lora": {"rank": 2, "alpha": 4}, "parallel": "tasks",
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 16},
        "inits": ["standard", {"name": "osrm-paper", "mode": "paper"}],
        "profile": {"n_samples": 20, "batch_size": 4, "dtype": "float64"},
        "merge": {"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]},
    }
    one, two = _one_and_two_processes(raw, tmp_path)
    assert two["manifest"]["processes"] == 2 and one["manifest"]["processes"] == 1
    # every training job ran exactly once, on one of the ranks; stage timings of both ranks are kept
    assert sum(k.startswith("train/") for k in two["manifest"]["stage_seconds"]) == 6
    # standard adapters do not depend on the statistics: bit-identical
    h1, h2 = one["manifest"]["output_hashes"], two["manifest"]["output_hashes"]
    std = [k for k in h1 if k.startswith("adapters/standard/")]
    assert std and all(h1[k] == h2[k] for k in std)
    # OSRM adapters come from the sharded store: equal up to summation order
    for task in ("colours", "polar", "x"):
        a = load_file(str(tmp_path / "run1/adapters/osrm-paper" / task / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "run2/adapters/osrm-paper" / task / "adapter_model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
    for init in ("standard", "osrm-paper"):
        for task, s in one["single_task"][init].items():
            assert two["single_task"][init][task]["test"] == pytest.approx(s["test"])
    for r1, r2 in zip(one["merged"], two["merged"]):
        assert (r1["init"], r1["method"], r1["lambda"]) == (r2["init"], r2["method"], r2["lambda"])
        assert r2["avg_test"] == pytest.approx(r1["avg_test"])
    assert (tmp_path / "run2" / "report.html").exists()
    assert not list((tmp_path / "run2").rglob("*.tmp*"))


def test_parallel_auto_prefers_tasks_when_there_are_enough() -> None:
    from osrm_lora.config import parse_config
    from osrm_lora.pipeline import _parallel_mode

    cfg = parse_config({"suite": "demo"})
    assert _parallel_mode(cfg, n_tasks=4, world_size=2) == "tasks"
    assert _parallel_mode(cfg, n_tasks=4, world_size=8) == "data"
    forced = parse_config({"suite": "demo", "parallel": "data"})
    assert _parallel_mode(forced, n_tasks=4, world_size=2) == "data"


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("must not join a group"))
    with pytest.raises(OsrmError, match=r"LOCAL_RANK 1 has no GPU \(1 visible\).*--nproc_per_node 1"):
        D.init_distributed("auto")


def test_pipeline_data_parallel_equals_one_process(no_dropout_bert: Path, tmp_path: Path) -> None:
    """parallel: data — every adapter trained by both processes (DDP), the same global batch."""
    raw = {
        "name": "ddp", "model": str(no_dropout_bert), "device": "cpu", "parallel": "data", "diagnose": False,
        "tasks": write_keyword_tasks(tmp_path, [("colours", ["red", "green"], 1), ("polar", ["good", "bad"], 2)],
                                     n=48),
        "lora": {"rank": 2, "alpha": 4}, "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 16},
        # an OSRM init with a trainable A kept in a 4-dimensional subspace: rank 0's subspace is broadcast
        "inits": ["standard", {"name": "own-k4", "mode": "own", "subspace_dim": 4}],
        "profile": {"n_samples": 16, "batch_size": 4, "dtype": "float64"},
        "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]},
    }
    one, two = _one_and_two_processes(raw, tmp_path)
    for init in ("standard", "own-k4"):
        for task in ("colours", "polar"):
            m2 = read_json(tmp_path / "run2" / "adapters" / init / task / "metrics.json")
            assert m2["world_size"] == 2
            got, want = two["single_task"][init][task]["test"], one["single_task"][init][task]["test"]
            assert got == pytest.approx(want)
            a = load_file(str(tmp_path / "run1/adapters" / init / task / "adapter_model.safetensors"))
            b = load_file(str(tmp_path / "run2/adapters" / init / task / "adapter_model.safetensors"))
            for k in a:
                torch.testing.assert_close(b[k], a[k], atol=5e-5, rtol=1e-3)
    for r1, r2 in zip(one["merged"], two["merged"]):
        assert r2["avg_test"] == pytest.approx(r1["avg_test"])
