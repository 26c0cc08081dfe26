"""DOGE (``doge``) against FusionBench's DOGE-TA, a NumPy re-derivation, and its invariants.

``fixtures/doge_references.json`` holds outputs of FusionBench 0.2.33's
``DOGE_TA_Algorithm.run`` on fixed small task vectors, computed once in a separate venv by
``scripts/make_doge_references.py`` (its docstring says how to regenerate them); FusionBench is not
imported here. Measured agreement of the float32 implementation: relative Frobenius error at most
6.1e-6 over the four cases (FusionBench in float64; 9.8e-7 against FusionBench in float32), where
leaving the optimisation out changes the output by 40-92%. The remaining difference is float32
rounding: the float64 NumPy re-derivation below agrees with FusionBench-float64 to 1.6e-10 (the
fixture's 10 significant digits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from osrm_lora.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import MergeContext, get_method, merge
from osrm_lora.merge.methods.doge import (
    project_off,
    row_products,
    shared_basis,
    surrogate_gradient,
    task_coefficients,
)

FIXTURE = Path(__file__).parent / "fixtures" / "doge_references.json"
Arrays = dict[str, np.ndarray]
TOL_FUSION_BENCH = 2e-5  # measured <= 6.1e-6 (float32 here, float64 there)


@pytest.fixture(scope="module")
def refs() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def case_of(refs: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in refs["cases"] if c["name"] == name)


def module_of(entry: dict[str, Any], refs: dict[str, Any]) -> LoraModule:
    """float32 LoRA module holding the fixture's task vector exactly (dense: ``B = tau, A = I``)."""
    if "tau" in entry:
        B = torch.tensor(entry["tau"], dtype=torch.float32) * 2.0 ** -refs["tau_bits"]
        return LoraModule(torch.eye(B.shape[1]), B, 1.0)
    s = 2.0 ** -refs["factor_bits"]
    A = torch.tensor(entry["A"], dtype=torch.float32) * s
    return LoraModule(A, torch.tensor(entry["B"], dtype=torch.float32) * s, 1.0)


def adapters(case: dict[str, Any], refs: dict[str, Any]) -> list[LoraAdapter]:
    return [LoraAdapter({k: module_of(e, refs) for k, e in task.items()},
                        {"peft_type": "LORA", "base_model_name_or_path": "tiny"}, name=f"t{t}")
            for t, task in enumerate(case["inputs"])]


def n_entries(ads: list[LoraAdapter]) -> int:
    return sum(m.delta().numel() for m in ads[0].modules.values())


def official_params(case: dict[str, Any], ads: list[LoraAdapter]) -> dict[str, Any]:
    """The case's FusionBench settings as ``doge`` parameters. FusionBench's top-K keeps
    ``int(K N) + 1`` entries per task (``kthvalue(N - int(K N))`` with ``>=``); this density gives
    ``int(density N)`` equal to that."""
    n = n_entries(ads)
    return {"coef": case["lamda"], "subspace": float(case["subspace"]),
            "density": (int(case["K"] / 100 * n) + 1.5) / n}


def reference(case: dict[str, Any]) -> Arrays:
    return {k: np.array(v) for k, v in case["output"].items()}


def rel(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Whole-model relative Frobenius difference ``||a - b|| / ||b||``."""
    keys = sorted(b)
    num = sum(np.linalg.norm(np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64)) ** 2
              for k in keys)
    return float(np.sqrt(num / sum(np.linalg.norm(np.asarray(b[k], dtype=np.float64)) ** 2 for k in keys)))


def as_numpy(deltas: dict[str, torch.Tensor]) -> Arrays:
    return {k: v.double().numpy() for k, v in deltas.items()}


def task_vectors(ads: list[LoraAdapter]) -> list[Arrays]:
    return [{k: m.delta().double().numpy() for k, m in ad.modules.items()} for ad in ads]


def np_doge(taus: list[Arrays], coef: float, subspace: float, keep: int, steps: int = 400,
            lr: float = 1e-4) -> Arrays:
    """Float64 NumPy re-derivation of DOGE-TA from the algorithm, on dense task vectors: per module
    dense SVDs (nonzero singular values only), the loss residuals written as FusionBench's
    ``rowsum(-tau_j S - tau_j Lambda Delta + tau_j^2)``, textbook Adam, a task-wide top-``keep``
    magnitude mask."""
    T = len(taus)
    thresholds = [np.sort(np.concatenate([np.abs(t[k]).ravel() for k in sorted(t)]))[-keep] for t in taus]
    out = {}
    for key in sorted(taus[0]):
        tk = [t[key] for t in taus]
        m, n = tk[0].shape
        lam = np.array([coef / np.linalg.norm(x) for x in tk])
        cols = []
        for x in tk:
            U, s, _ = np.linalg.svd(x, full_matrices=False)
            cols.append(U[:, :int((s > 1e-6 * s[0]).sum())][:, :int(min(m, n) / T)])
        Ub, sb, _ = np.linalg.svd(np.concatenate(cols, axis=1), full_matrices=False)
        Q = Ub[:, :min(int(min(m, n) / subspace), int((sb > 1e-10 * sb[0]).sum()))]
        S, Lam = sum(lam[t] * tk[t] for t in range(T)), lam.sum()
        D, mom, vel = np.zeros((m, n)), np.zeros((m, n)), np.zeros((m, n))
        for step in range(1, steps + 1):
            g = np.zeros((m, n))
            for x in tk:
                e = (-x * S - x * (Lam * D) + x * x).sum(axis=1)
                g += 2 * e[:, None] * (-x) * Lam
            g = g - Q @ (Q.T @ g)
            mom = 0.9 * mom + 0.1 * g
            vel = 0.999 * vel + 0.001 * g * g
            D = D - lr * (mom / (1 - 0.9 ** step)) / (np.sqrt(vel / (1 - 0.999 ** step)) + 1e-8)
        out[key] = sum(lam[t] * (tk[t] + D) * (np.abs(tk[t]) >= thresholds[t]) for t in range(T))
    return out


def lora_adapters(ranks: tuple[int, ...] = (2, 3, 2), shapes: dict[str, tuple[int, int]] | None = None,
                  seed: int = 0, scale: float = 0.02) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"enc.q": (12, 10), "enc.v": (9, 14)}
    out = []
    for t, r in enumerate(ranks):
        mods = {k: LoraModule(torch.randn(r, n, generator=g), scale * torch.randn(m, r, generator=g), 0.5 + 0.25 * t)
                for k, (m, n) in shapes.items()}
        out.append(LoraAdapter(mods, {"peft_type": "LORA", "base_model_name_or_path": "tiny"}, name=f"t{t}"))
    return out


# ------------------------------------------------------------------------------------- FusionBench


CASES = ["dense", "dense_float32", "params", "lowrank"]


@pytest.mark.parametrize("name", CASES)
def test_matches_fusion_bench(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, name)
    ads = adapters(case, refs)
    params = official_params(case, ads)
    res = merge(ads, "doge", params)
    assert rel(as_numpy(res.deltas), reference(case)) < TOL_FUSION_BENCH
    # the optimised modification is a large part of the output, so the comparison sees it
    assert rel(as_numpy(merge(ads, "doge", {**params, "steps": 0}).deltas), reference(case)) > 0.3


@pytest.mark.parametrize("name", CASES)
def test_numpy_rederivation_matches_fusion_bench(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, name)
    ads = adapters(case, refs)
    keep = int(case["K"] / 100 * n_entries(ads)) + 1
    got = np_doge(task_vectors(ads), case["lamda"], case["subspace"], keep)
    assert rel(got, reference(case)) < (2e-6 if case["dtype"] == "float32" else 1e-9)


@pytest.mark.parametrize("change", [{"subspace": 1000.0}, {"steps": 200}, {"lr": 1.2e-4}, {"coef": 0.075},
                                    {"density": 0.3}, {"threshold": "matrix"}])
def test_deviations_are_detected(refs: dict[str, Any], change: dict[str, Any]) -> None:
    """Each of these departures from FusionBench (no projection, fewer steps, another learning rate or
    coefficient, FusionBench's top-K count taken literally, a per-matrix mask) misses the reference."""
    case = case_of(refs, "dense")
    ads = adapters(case, refs)
    res = merge(ads, "doge", {**official_params(case, ads), **change})
    assert rel(as_numpy(res.deltas), reference(case)) > 50 * TOL_FUSION_BENCH


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("ranks", [(2, 3, 2), (1, 4)])
def test_low_rank_lora_equals_numpy_rederivation(ranks: tuple[int, ...]) -> None:
    """Ranks below ``int(min(m, n) / T)``: FusionBench would use singular vectors of the null space
    (arbitrary); here only the nonzero ones, as the re-derivation does."""
    ads = lora_adapters(ranks)
    params = {"density": 0.4, "steps": 150}
    res = merge(ads, "doge", params)
    got = np_doge(task_vectors(ads), 0.07, 6.0, int(0.4 * n_entries(ads)), steps=150)
    assert rel(as_numpy(res.deltas), got) < 2e-5  # measured <= 1.2e-6
    assert all(d <= sum(ranks) for d in res.info["doge_subspace"].values())


def test_gradient_is_that_of_fusion_bench_loss() -> None:
    g = torch.Generator().manual_seed(3)
    m, n, rs = 7, 9, (2, 3)
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in rs]
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in rs]
    taus = [b @ a for b, a in zip(Bs, As)]
    lams = torch.tensor([0.3, 0.7], dtype=torch.float64)
    delta = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    S = sum(lams[t] * taus[t] for t in range(2))
    loss = sum((((-x * S) - x * (lams.sum() * delta) + x * x).sum(dim=1) ** 2).sum() for x in taus)
    loss.backward()
    B, A = torch.cat(Bs, 1), torch.cat(As, 0)
    task_of = torch.tensor([0, 0, 1, 1, 1])
    const = torch.stack([(x * (x - S)).sum(1) for x in taus], 1)
    resid = const - lams.sum() * row_products(B, A, task_of, 2, delta.detach())
    assert torch.allclose((resid ** 2).sum(), loss.detach(), rtol=1e-12)
    assert torch.allclose(surrogate_gradient(B, A, task_of, resid, float(lams.sum())), delta.grad, rtol=1e-10)


def test_shared_basis_and_projection() -> None:
    g = torch.Generator().manual_seed(4)
    us = [torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))[0] for _ in range(3)]
    Q = shared_basis(us, keep=2, size=4)
    assert Q.shape == (10, 4) and torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    span = torch.linalg.qr(torch.cat([u[:, :2] for u in us], 1))[0]  # the stacked top-2 vectors span 6 dims
    assert torch.allclose(span @ (span.T @ Q), Q, atol=1e-12)  # Q lies in that span
    assert shared_basis(us, keep=2, size=50).shape[1] == 6  # at most the stack's rank
    assert shared_basis(us, keep=2, size=0).shape[1] == 0
    assert torch.equal(shared_basis(us[:1], keep=3, size=2), us[0][:, :2])  # one task: its own top vectors
    grad = torch.randn(10, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(Q.T @ project_off(grad, Q), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12)
    assert torch.equal(project_off(grad, Q[:, :0]), grad)


# ------------------------------------------------------------------------------------- invariants


def test_no_steps_and_full_density_is_normalised_task_arithmetic() -> None:
    ads = lora_adapters()
    res = merge(ads, "doge", {"steps": 0, "density": 1.0, "coef": 0.2, "scaling": 1.5})
    for key, got in res.deltas.items():
        taus = [ad.modules[key].delta() for ad in ads]
        want = 1.5 * sum(0.2 / torch.linalg.norm(t) * t for t in taus)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_scaling_is_a_plain_factor_and_the_merge_deterministic() -> None:
    ads = lora_adapters()
    one = merge(ads, "doge", {"steps": 50})
    again = merge(ads, "doge", {"steps": 50})
    two = merge(ads, "doge", {"steps": 50, "scaling": 2.0})
    for key in one.deltas:
        assert torch.equal(one.deltas[key], again.deltas[key])
        assert torch.allclose(two.deltas[key], 2 * one.deltas[key], rtol=1e-6, atol=0)


def test_one_task_learns_to_reproduce_its_model() -> None:
    """With one task the surrogate is zero when the merged update ``lambda (tau + Delta)`` has the
    task's row-wise inner products; without projection Adam drives it there, and with the default
    projection the loss still falls."""
    ads = lora_adapters((3,))
    free = merge(ads, "doge", {"density": 1.0, "subspace": 100.0, "steps": 1500, "lr": 1e-3})
    for first, last in free.info["doge_loss"].values():
        assert last < 1e-3 * first
    for key, got in free.deltas.items():
        tau = ads[0].modules[key].delta()
        rows = (tau * tau).sum(1)
        assert torch.allclose((tau * got).sum(1), rows, rtol=0.05, atol=1e-3 * float(rows.max()))
    default = merge(ads, "doge", {"density": 1.0})
    assert all(last < first for first, last in default.info["doge_loss"].values())


def test_modification_only_where_a_task_keeps_entries() -> None:
    ads = lora_adapters()
    res = merge(ads, "doge", {"density": 0.1, "threshold": "matrix"})
    for key, got in res.deltas.items():
        kept = torch.zeros_like(got, dtype=torch.bool)
        for ad in ads:
            tau = ad.modules[key].delta()
            kept |= tau.abs() >= torch.topk(tau.abs().reshape(-1), int(0.1 * tau.numel())).values[-1]
        assert torch.all(got[~kept] == 0) and torch.any(got[kept] != 0)


def test_zero_update_gets_no_coefficient() -> None:
    ads = lora_adapters()
    ads[1].modules["enc.q"].B.zero_()
    assert torch.equal(task_coefficients(torch.tensor([2.0, 0.0]), 0.1), torch.tensor([0.05, 0.0]))
    res = merge(ads, "doge", {"steps": 20})
    assert all(torch.isfinite(d).all() for d in res.deltas.values())


# ------------------------------------------------------------------------------ registry, errors, CLI


def test_registry_entry_has_the_authors_defaults() -> None:
    info = get_method("doge")
    assert info.paper == "https://arxiv.org/abs/2501.01230" and "Wei et al., ICML 2025" in info.description
    assert info.defaults() == {"scaling": 1.0, "coef": 0.07, "subspace": 6.0, "density": 0.3, "threshold": "task",
                               "steps": 400, "lr": 1e-4}
    assert all(p.help for p in info.params)


@pytest.mark.parametrize("params, match", [
    ({"subspace": 0.5}, r"subspace=0.5 is out of range.*\[1,inf\)"),
    ({"steps": -1}, "out of range"), ({"steps": 1.5}, "must be an integer"), ({"lr": 0.0}, "out of range"),
    ({"coef": 0.0}, "out of range"), ({"density": 0.0}, "out of range"), ({"density": 1.5}, "out of range"),
    ({"threshold": "layer"}, "choose one of"), ({"scaling": -1.0}, "out of range"), ({"seed": 1}, "no parameter"),
])
def test_bad_parameters(params: dict[str, Any], match: str) -> None:
    with pytest.raises(OsrmError, match=match):
        merge(lora_adapters(), "doge", params)


def test_partial_merges_need_the_task_thresholds() -> None:
    ads = lora_adapters()
    with pytest.raises(OsrmError, match="threshold=matrix"):
        merge(ads, "doge", {"steps": 5}, context=MergeContext(streaming=True))
    whole = merge(ads, "doge", {"steps": 5})
    seen: list[tuple[int, tuple[int, ...]]] = []
    probe = MergeContext(magnitude_probe=lambda t, x: seen.append((t, tuple(x.shape))))
    probed = merge(ads, "doge", {"steps": 5}, context=probe)
    assert len(seen) == 3 * 2 and all(torch.all(d == 0) for d in probed.deltas.values())
    thresholds = [float(torch.cat([m.delta().abs().reshape(-1) for m in ad.modules.values()])
                        .topk(int(0.3 * n_entries(ads))).values[-1]) for ad in ads]
    for key in sorted(ads[0].modules):  # one module at a time, with the task-wide thresholds given
        part = [LoraAdapter({key: ad.modules[key]}, ad.config, name=ad.name) for ad in ads]
        got = merge(part, "doge", {"steps": 5}, context=MergeContext(streaming=True, task_thresholds=thresholds))
        assert torch.equal(got.deltas[key], whole.deltas[key])
    matrix = merge(ads[:2], "doge", {"threshold": "matrix", "steps": 5}, context=MergeContext(streaming=True))
    assert set(matrix.deltas) == set(ads[0].modules)


def test_cli_merges_with_doge(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from osrm_lora.cli import main

    ads = lora_adapters((2, 3))
    dirs = []
    for i, ad in enumerate(ads):
        save_adapter(ad, tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    assert main(["merge", "--method", "doge", "-p", "steps=30", "-p", "coef=0.5", *dirs,
                 "--out", str(tmp_path / "m")]) == 0
    want = merge([load_adapter(d) for d in dirs], "doge", {"steps": 30, "coef": 0.5}).deltas
    saved = load_adapter(tmp_path / "m")
    assert rel({k: m.delta().double().numpy() for k, m in saved.modules.items()}, as_numpy(want)) < 1e-3


def test_streamed_merge(tmp_path: Path) -> None:
    """``osrm-lora merge --stream`` gives the in-memory output: per-matrix masks directly, the
    task-wide mask (the default) from the thresholds of the streamed pre-pass."""
    pytest.importorskip("safetensors")
    from osrm_lora.merge import save_merge_result, stream_merge

    dirs = []
    for i, ad in enumerate(lora_adapters((2, 3))):
        save_adapter(ad, tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    params = {"threshold": "matrix", "steps": 20}
    save_merge_result(merge([load_adapter(d) for d in dirs], "doge", params), tmp_path / "ref")
    stream_merge(dirs, "doge", params, tmp_path / "s", modules_per_step=1)
    ref, got = load_adapter(tmp_path / "ref"), load_adapter(tmp_path / "s")
    for key, mod in ref.modules.items():
        torch.testing.assert_close(got.modules[key].delta(), mod.delta(), atol=1e-6, rtol=1e-6)
    save_merge_result(merge([load_adapter(d) for d in dirs], "doge", {"steps": 20}), tmp_path / "ref-task")
    stream_merge(dirs, "doge", {"steps": 20}, tmp_path / "t", modules_per_step=1)
    ref, got = load_adapter(tmp_path / "ref-task"), load_adapter(tmp_path / "t")
    for key, mod in ref.modules.items():
        torch.testing.assert_close(got.modules[key].delta(), mod.delta(), atol=1e-6, rtol=1e-6)
