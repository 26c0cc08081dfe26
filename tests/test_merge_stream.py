"""Streamed merging (merge.stream) against the in-memory merge + save_merge_result: same outputs,
bounded memory, lazy reads, two processes (one torchrun launch), errors that leave nothing behind."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from distutil import torchrun
from safetensors.torch import load_file

from osrm_lora.adapters import PREFIX, AdapterReader, LoraAdapter, LoraModule, load_adapter, save_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.merge import MergeContext, list_methods, merge, ops, save_merge_result
from osrm_lora.merge import registry as R
from osrm_lora.merge.cli import run_stream_merge
from osrm_lora.merge.stream import stream_merge, stream_requirements

RANKS = (2, 3, 2)


def bert_shapes() -> dict[str, tuple[int, int]]:
    """Adapted modules of tinymodels' bert (hidden 32, intermediate 37), (out, in)."""
    shapes = {}
    for layer in range(2):
        pre = f"bert.encoder.layer.{layer}."
        shapes.update({pre + "attention.self.query": (32, 32), pre + "attention.self.value": (32, 32),
                       pre + "intermediate.dense": (37, 32), pre + "output.dense": (32, 37)})
    return shapes


def make_adapter(seed: int, rank: int, base: str, shapes: dict[str, tuple[int, int]] | None = None) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {k: LoraModule(0.2 * torch.randn(rank, n, generator=g), 0.2 * torch.randn(m, rank, generator=g),
                          (2.0 * rank) / rank)
            for k, (m, n) in (shapes or bert_shapes()).items()}
    return LoraAdapter(mods, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": base},
                       name=f"task{seed}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodels import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("stream-base") / "bert", "bert")


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> list[str]:
    root = tmp_path_factory.mktemp("stream-ads")
    dirs = []
    for i, r in enumerate(RANKS):
        save_adapter(make_adapter(i, r, str(base_dir)), root / f"task{i}")
        dirs.append(str(root / f"task{i}"))
    return dirs


def out_dirs(info: dict) -> list[str]:
    return [e["dir"] for e in info["per_task"]] if "per_task" in info else [""]


def assert_same_peft(ref: Path, got: Path, tol: float = 1e-6) -> None:
    """Both merge outputs hold the same adapters (deltas to ``tol``, configs and output info equal)."""
    ri = json.loads((ref / "merge_info.json").read_text())
    gi = json.loads((got / "merge_info.json").read_text())
    for k in ("method", "params", "format", "tasks", "output", "svd_rank"):
        assert ri.get(k) == gi.get(k), k
    assert out_dirs(ri) == out_dirs(gi)
    for i, d in enumerate(out_dirs(ri)):
        if d:
            assert {k: v for k, v in ri["per_task"][i].items() if "error" not in k} == \
                   {k: v for k, v in gi["per_task"][i].items() if "error" not in k}
        assert json.loads((ref / d / "adapter_config.json").read_text()) == \
               json.loads((got / d / "adapter_config.json").read_text())
        a, b = load_adapter(ref / d), load_adapter(got / d)
        assert list(a.modules) == list(b.modules)
        for k, m in a.modules.items():
            torch.testing.assert_close(b.modules[k].delta(), m.delta(), atol=tol, rtol=tol)
    if "rescalers" in ri["info"]:
        assert gi["info"]["rescalers"] == pytest.approx(ri["info"]["rescalers"], rel=1e-12)


def full_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        part = load_file(str(path / f))
        assert all(index["weight_map"][n] == f for n in part)
        out.update(part)
    assert set(out) == set(index["weight_map"])
    return out


def nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not list(out.parent.glob(f".{out.name}.*")), "temporary directory left behind"


# ------------------------------------------------------------------------------- single process == in memory

CASES = [
    ("task_arithmetic", {"scaling": 0.7, "weights": [1.0, 0.5, 2.0]}, {}),
    ("task_arithmetic", {}, {"svd_rank": 3}),
    ("cat", {}, {}),
    ("ties", {}, {}),  # threshold=task: global per-task thresholds
    ("ties", {"density": 0.5, "threshold": "matrix"}, {}),
    ("ties", {"density": 0.6}, {"svd_rank": 2}),
    ("magnitude_prune", {"density": 0.4}, {}),
    ("dare_linear", {"seed": 3}, {}),
    ("dare_ties", {"p": 0.3}, {}),
    ("emr", {}, {}),
    ("emr", {"rescale": "matrix"}, {}),
    ("knots", {}, {}),  # variant ties, threshold task over the V blocks
    ("knots", {"variant": "dare_ties"}, {}),
    ("core_space", {}, {}),
    ("core_space", {"variant": "ties"}, {}),
    ("core_space", {"variant": "tsv"}, {}),
    ("ctm", {}, {}),
    ("ctm", {"variant": "ties", "rank": 3}, {}),  # threshold=task from the pre-pass on the compressed cores
    ("ctm", {"variant": "dare_ties", "rank": 2}, {}),
    ("tsv_m", {}, {}),
    ("iso_c", {}, {}),
    ("iso_cts", {}, {}),
    ("do_merging", {}, {}),
    ("do_merging", {"base": "ties", "density": 0.5}, {}),
    ("opcm", {"norm": "module"}, {}),  # norm=model needs the whole model: refused when streamed
    ("doge", {"steps": 20}, {}),
]
NOT_STREAMED_HERE = {"adamerging", "regmean", "fisher"}  # refused / tested with a context below


def test_every_registered_method_is_covered() -> None:
    assert {c[0] for c in CASES} | NOT_STREAMED_HERE == {m.name for m in list_methods()}


@pytest.mark.parametrize("idx", range(len(CASES)), ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_stream_equals_in_memory(tmp_path: Path, adapter_dirs: list[str], idx: int) -> None:
    method, params, kw = CASES[idx]
    ads = [load_adapter(d) for d in adapter_dirs]
    res = merge(ads, method, params, context=MergeContext(per_module_seed=True))
    ref = save_merge_result(res, tmp_path / "ref", **kw)
    mps = (1, 3)[idx % 2]  # the output must not depend on how modules are grouped into steps
    info = stream_merge(adapter_dirs, method, params, tmp_path / "stream", modules_per_step=mps, **kw)
    assert_same_peft(ref, tmp_path / "stream")
    assert info == json.loads((tmp_path / "stream" / "merge_info.json").read_text())
    assert (tmp_path / "stream" / "README.md").exists() and not (tmp_path / "stream" / ".stream-parts").exists()
    needs = stream_requirements(method, res.params)
    assert ("task_thresholds" in info["stream"]) == ("task_thresholds" in needs)
    assert ("dare_seeding" in info["stream"]) == ("per_module_seed" in needs)


def test_task_thresholds_are_exact(tmp_path: Path, adapter_dirs: list[str]) -> None:
    ads = [load_adapter(d) for d in adapter_dirs]
    total = sum(m.delta().numel() for m in ads[0].modules.values())
    for density in (0.5 / total, 0.013, 0.2, 0.999):  # the first keeps nothing: threshold +inf
        info = stream_merge(adapter_dirs, "magnitude_prune", {"density": density}, tmp_path / "o", modules_per_step=2)
        want = [ops.kth_largest_abs(lambda ad=ad: (m.delta() for m in ad.modules.values()), int(density * total))
                for ad in ads]
        assert info["stream"]["task_thresholds"] == want
    assert want[0] < float("inf") and info["stream"]["task_thresholds"]


def test_coupled_method_without_pre_pass_raises(tmp_path: Path, adapter_dirs: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A task-wide statistic is never computed over one step's subset of the modules."""
    import dataclasses

    from osrm_lora.merge.types import _REGISTRY

    # a method that does not declare its task-wide trim (task_wide) is refused, not merged per step
    monkeypatch.setitem(_REGISTRY, "ties", dataclasses.replace(_REGISTRY["ties"], task_wide=lambda _p: frozenset()))
    with pytest.raises(OsrmError, match="task-wide magnitude threshold is needed"):
        stream_merge(adapter_dirs, "ties", {}, tmp_path / "o")
    nothing_left(tmp_path / "o")


def test_regmean_and_fisher_with_context(tmp_path: Path, adapter_dirs: list[str]) -> None:
    ads = [load_adapter(d) for d in adapter_dirs]
    g = torch.Generator().manual_seed(4)
    grams, fisher = [], []
    for ad in ads:
        xs = {k: torch.randn(40, m.in_features, generator=g) for k, m in ad.modules.items()}
        grams.append({k: x.T @ x for k, x in xs.items()})
        fisher.append({k: torch.rand(m.out_features, m.in_features, generator=g) for k, m in ad.modules.items()})
    for method, ctx in (("regmean", MergeContext(grams=grams)), ("fisher", MergeContext(fisher=fisher))):
        ref = save_merge_result(merge(ads, method, context=ctx), tmp_path / f"ref-{method}")
        stream_merge(adapter_dirs, method, {}, tmp_path / method, context=ctx, modules_per_step=3)
        assert_same_peft(ref, tmp_path / method, tol=1e-5)


def test_bounded_memory_and_lazy_reads(tmp_path: Path, adapter_dirs: list[str], base_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read loads only the requested modules' lora_A/lora_B, never more than modules_per_step,
    and every module read before by that adapter has been freed, as has the previous step's merge
    result (so at most modules_per_step modules per task are materialised at once)."""
    original = AdapterReader.read
    calls: list[tuple[list[str], set[str], int]] = []
    live: dict[int, list[weakref.ref]] = {}

    def spy(self: AdapterReader, keys, device=None) -> LoraAdapter:  # noqa: ANN001
        keys = list(keys)
        alive = sum(r() is not None for r in live.get(id(self), []))
        ad = original(self, keys, device)
        calls.append((keys, set(self.last_read), alive))
        live[id(self)] = [weakref.ref(t) for m in ad.modules.values() for t in (m.A, m.B)]
        return ad

    monkeypatch.setattr(AdapterReader, "read", spy)
    merge_original = R.merge
    results: list[weakref.ref] = []
    results_alive: list[int] = []

    def merge_spy(*args, **kwargs) -> R.MergeResult:  # noqa: ANN002, ANN003
        results_alive.append(sum(r() is not None for r in results))
        res = merge_original(*args, **kwargs)
        tensors = [d for ds in (res.per_task_deltas or []) + [res.deltas or {}] for d in ds.values()]
        tensors += [t for m in (res.adapter.modules.values() if res.adapter else []) for t in (m.A, m.B)]
        results[:] = [weakref.ref(t) for t in tensors]
        return res

    monkeypatch.setattr(R, "merge", merge_spy)
    n_mod = len(bert_shapes())
    # passes over the modules: thresholds take two counting passes, emr rescalers one, then the merge
    for method, params, mps, passes, kw in (
            ("ties", {}, 2, 3, {}), ("emr", {}, 3, 2, {}), ("knots", {}, 1, 3, {}),
            ("ties", {"threshold": "matrix"}, 3, 1, {"format": "full", "max_shard_bytes": 9000})):
        calls.clear()
        stream_merge(adapter_dirs, method, params, tmp_path / f"{method}{mps}", modules_per_step=mps, **kw)
        steps = -(-n_mod // mps)
        assert len(calls) == passes * steps * len(RANKS)
        for keys, read, alive in calls:
            assert 1 <= len(keys) <= mps
            assert read == {PREFIX + k + s for k in keys for s in (".lora_A.weight", ".lora_B.weight")}
            assert alive == 0, "the previous step's modules were still in memory"
        assert results_alive and not any(results_alive), "the previous step's merge result was still in memory"
        results_alive.clear()
        assert sorted(k for keys, _, _ in calls[-steps * len(RANKS):] for k in keys) == \
            sorted(list(bert_shapes()) * len(RANKS))


# ------------------------------------------------------------------------------- format=full


def test_full_format_matches_in_memory(tmp_path: Path, adapter_dirs: list[str], base_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    ads = [load_adapter(d) for d in adapter_dirs]
    ids = torch.randint(5, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    base_names = set(load_file(str(base_dir / "model.safetensors")))
    for method in ("ties", "emr"):
        ref = save_merge_result(merge(ads, method), tmp_path / f"ref-{method}", format="full",
                                base_model_path=str(base_dir))
        info = stream_merge(adapter_dirs, method, {}, tmp_path / method, format="full", max_shard_bytes=12000,
                            modules_per_step=2)  # base path from the adapters' config
        for entry in info.get("per_task", [info]):
            d = entry.get("dir", "")
            got = tmp_path / method / d
            assert entry["shards"] > 1 and (got / f"model-00001-of-{entry['shards']:05d}.safetensors").exists()
            assert set(full_tensors(got)) == base_names
            assert (got / "config.json").exists() and (got / "tokenizer.json").exists()
            with torch.no_grad():
                a = AutoModelForSequenceClassification.from_pretrained(str(ref / d)).eval()(input_ids=ids).logits
                b = AutoModelForSequenceClassification.from_pretrained(str(got)).eval()(input_ids=ids).logits
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------- two processes (one launch)

SCRIPT = '''
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from osrm_lora import distributed as D
from osrm_lora.adapters import AdapterReader
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.merge.cli import run_stream_merge
from osrm_lora.merge.stream import stream_merge

spec = json.loads(Path(sys.argv[1]).read_text())
out, dirs = Path(spec["out"]), spec["dirs"]
run_stream_merge(dirs, "task_arithmetic", ["scaling=0.7"], str(out / "task_arithmetic"), device="cpu")
env = D.get_env()
assert env.world_size == 2, env
for name, method, params, kw in spec["cases"]:
    info = stream_merge(dirs, method, params, out / name, device="cpu", **kw)
    assert info["stream"]["world_size"] == 2
errors = []
original = AdapterReader.read
if env.rank == 1:  # a failure on one rank only: every rank raises, nobody hangs, nothing is left
    def broken(self, keys, device=None):
        raise RuntimeError("injected read failure")
    AdapterReader.read = broken
try:
    stream_merge(dirs, "ties", {}, out / "failed", device="cpu")
except (OsrmError, RuntimeError) as exc:
    errors.append(str(exc))
AdapterReader.read = original
(out / "afile").write_text("x")
D.barrier()
try:  # only rank 0 opens the output directory: the others must hear of its failure
    stream_merge(dirs, "task_arithmetic", {}, out / "afile" / "merged", device="cpu")
except OsrmError as exc:
    errors.append(str(exc))
(out / f"errors-{env.rank}.json").write_text(json.dumps(errors))
D.shutdown(synchronize=True)
'''

DIST_CASES = [
    ("ties_task", "ties", {"density": 0.3}, {}),
    ("emr", "emr", {}, {"modules_per_step": 3}),
    ("dare_ties", "dare_ties", {"p": 0.3}, {"modules_per_step": 2}),
    ("full", "ties", {}, {"format": "full", "max_shard_bytes": 12000}),
]


def test_two_processes_equal_one(tmp_path: Path, adapter_dirs: list[str]) -> None:
    out2 = tmp_path / "w2"
    out2.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(out2), "dirs": adapter_dirs, "cases": DIST_CASES}))
    script = tmp_path / "stream_worker.py"
    script.write_text(SCRIPT)

    def reset() -> None:
        shutil.rmtree(out2)
        out2.mkdir()

    proc = torchrun([str(script), str(spec)], nproc=2, reset=reset)
    assert proc.returncode == 0, proc.stdout[-4000:]

    out1 = tmp_path / "w1"
    run_stream_merge(adapter_dirs, "task_arithmetic", ["scaling=0.7"], str(out1 / "task_arithmetic"), device="cpu")
    assert_same_peft(out1 / "task_arithmetic", out2 / "task_arithmetic", tol=0)
    for name, method, params, kw in DIST_CASES:
        kw1 = {**kw, "modules_per_step": 1}
        info1 = stream_merge(adapter_dirs, method, params, out1 / name, device="cpu", **kw1)
        info2 = json.loads((out2 / name / "merge_info.json").read_text())
        assert info2["stream"]["world_size"] == 2 and info1["stream"]["world_size"] == 1
        assert info2["stream"].get("task_thresholds") == info1["stream"].get("task_thresholds")
        if kw.get("format") == "full":
            a, b = full_tensors(out1 / name), full_tensors(out2 / name)
            assert set(a) == set(b)
            for k in a:
                assert torch.equal(a[k], b[k]), k
        else:
            assert_same_peft(out1 / name, out2 / name, tol=0)
    err0 = json.loads((out2 / "errors-0.json").read_text())
    err1 = json.loads((out2 / "errors-1.json").read_text())
    assert "rank 1 failed" in err0[0] and "injected read failure" in err0[0] and err1[0] == "injected read failure"
    assert "is a file" in err0[1] and "rank 0 failed" in err1[1]
    nothing_left(out2 / "failed")
    assert sorted(p.name for p in out2.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------- errors


def test_cli_function(tmp_path: Path, adapter_dirs: list[str]) -> None:
    info = run_stream_merge(adapter_dirs, "ties", ["density=0.4"], str(tmp_path / "m"), weights=[1.0, 2.0, 1.0],
                            modules_per_step=2)
    assert info["params"]["density"] == 0.4 and info["params"]["weights"] == [1.0, 2.0, 1.0]
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()
    with pytest.raises(OsrmError, match="needs grams"):
        run_stream_merge(adapter_dirs, "regmean", [], str(tmp_path / "z"))
    with pytest.raises(OsrmError, match="cannot be streamed"):
        run_stream_merge(adapter_dirs, "adamerging", [], str(tmp_path / "z"))
    with pytest.raises(OsrmError, match="not a valid float"):
        run_stream_merge(adapter_dirs, "ties", ["density=abc"], str(tmp_path / "z"))
    nothing_left(tmp_path / "z")


def _bad_adapters(root: Path, base: str) -> dict[str, list[str]]:
    good = str(root / "good")
    save_adapter(make_adapter(0, 2, base), good)
    other = {k: (m + 1, n) for k, (m, n) in bert_shapes().items()}
    save_adapter(make_adapter(1, 2, base, other), root / "shape")
    ranks = make_adapter(2, 2, base)
    key = sorted(ranks.modules)[1]
    ranks.modules[key].B = torch.zeros(ranks.modules[key].out_features, 3)
    save_adapter(ranks, root / "ranks")
    nan = make_adapter(3, 2, base)
    nan.modules[sorted(nan.modules)[-1]].A[0, 0] = float("nan")  # found only when that module is read
    save_adapter(nan, root / "nan")
    return {"shape": [good, str(root / "shape")], "ranks": [good, str(root / "ranks")],
            "missing": [good, str(root / "nope")], "nan": [good, str(root / "nan")], "good": [good, good]}


@pytest.mark.parametrize("case,match", [
    ("unknown", "unknown merge method 'nope'; valid methods:"),
    ("adamerging", "adamerging .* cannot be streamed; merge it in memory"),
    ("regmean", "needs grams computed from task data; pass context"),
    ("shape", r"has shape \(33, 32\) but good has \(32, 32\); merge only adapters of the same base model"),
    ("ranks", "with different ranks; re-export the adapter"),
    ("missing", "does not exist; check the path"),
    ("nan", "contains NaN/Inf; retrain"),
    ("under_file", "is a file, not a directory; choose another output path"),
    ("modules_per_step", "modules_per_step must be a positive integer"),
    ("format", "unknown output format 'gguf'; use peft or full"),
    ("no_base", "has no tensor bert.nope.weight; use the base model"),
])
def test_errors_are_one_line_and_leave_nothing(tmp_path: Path, base_dir: Path, case: str, match: str) -> None:
    dirs = _bad_adapters(tmp_path / "ads", str(base_dir))
    out = tmp_path / "out" / "merged"
    method, kw, use = "ties", {}, dirs["good"]
    if case in ("unknown", "adamerging", "regmean"):
        method = {"unknown": "nope"}.get(case, case)
    elif case in dirs:
        use = dirs[case]
    elif case == "under_file":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "afile").write_text("x")
        out = tmp_path / "out" / "afile" / "merged"
    elif case == "modules_per_step":
        kw = {"modules_per_step": 0}
    elif case == "format":
        kw = {"format": "gguf"}
    elif case == "no_base":
        ad = make_adapter(5, 2, str(base_dir), {"bert.nope": (32, 32)})
        save_adapter(ad, tmp_path / "ads" / "nope-module")
        use, kw = [str(tmp_path / "ads" / "nope-module")], {"format": "full"}
    with pytest.raises(OsrmError, match=match) as exc_info:
        stream_merge(use, method, {}, out, **kw)
    assert "\n" not in str(exc_info.value)
    nothing_left(out)


def test_command_line_stream_option_equals_in_memory(tmp_path: Path, adapter_dirs: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from osrm_lora.cli import main

    common = ["--method", "ties", "-p", "density=0.3", *adapter_dirs]
    assert main(["merge", *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["merge", "--stream", "--modules-per-step", "2", "--device", "cpu", *common,
                 "--out", str(tmp_path / "str")]) == 0
    assert "merged 3 adapters with ties" in capsys.readouterr().out
    assert_same_peft(tmp_path / "mem", tmp_path / "str")
    assert read_json(tmp_path / "str" / "merge_info.json")["stream"]["modules_per_step"] == 2
