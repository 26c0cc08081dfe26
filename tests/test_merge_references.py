"""OPCM and KnOTS-TIES against their authors' own code.

``fixtures/merge_references.json`` holds outputs of FusionBench 0.2.33's ``OPCMForCLIP.run`` and of
the official KnOTS ``SVDMerger`` (github.com/gstoica27/KnOTS at baa35e8) on fixed small task
vectors, computed once in a separate venv by ``scripts/make_merge_references.py`` (its docstring
says how to regenerate them); neither reference is imported here. Each method is also checked
against an independent float64 NumPy re-derivation of the authors' algorithm, and each deviation
of the former implementation is shown to be visible to these checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.errors import OsrmError
from osrm_lora.merge import MergeContext, get_method, merge
from osrm_lora.merge.methods.dense_misc import opcm_rescale, opcm_running, principal_rank, sq_norm

FIXTURE = Path(__file__).parent / "fixtures" / "merge_references.json"
Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def refs() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def case_of(refs: dict[str, Any], method: str, name: str) -> dict[str, Any]:
    return next(c for c in refs[method] if c["name"] == name)


def adapters(case: dict[str, Any]) -> list[LoraAdapter]:
    """float32 LoRA adapters (scaling 1) with the fixture's factors: ``delta_t = B_t A_t``."""
    out = []
    for t, f in enumerate(case["factors"]):
        mods = {k: LoraModule(torch.tensor(v["A"], dtype=torch.float32), torch.tensor(v["B"], dtype=torch.float32), 1.0)
                for k, v in f.items()}
        out.append(LoraAdapter(mods, {"peft_type": "LORA", "base_model_name_or_path": "tiny"}, name=f"t{t}"))
    return out


def task_vectors(case: dict[str, Any]) -> list[Arrays]:
    return [{k: np.array(v["B"]) @ np.array(v["A"]) for k, v in f.items()} for f in case["factors"]]


def reference(case: dict[str, Any]) -> Arrays:
    return {k: np.array(v) for k, v in case["output"].items()}


def rel(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Whole-model relative Frobenius difference ``||a - b|| / ||b||``."""
    keys = sorted(b)
    x = {k: np.asarray(a[k], dtype=np.float64) for k in keys}
    y = {k: np.asarray(b[k], dtype=np.float64) for k in keys}
    num = sum(np.linalg.norm(x[k] - y[k]) ** 2 for k in keys)
    return float(np.sqrt(num / sum(np.linalg.norm(y[k]) ** 2 for k in keys)))


def as_numpy(deltas: dict[str, torch.Tensor]) -> Arrays:
    return {k: v.double().numpy() for k, v in deltas.items()}


# ------------------------------------------------------------------------------------------------ OPCM


def np_opcm(taus: list[Arrays], alpha: float, *, diag: bool = True, block_extra: int = 0,
            norm: str = "model") -> Arrays:
    """FusionBench's OPCM loop re-derived in float64 NumPy, with its bookkeeping as written there:
    the merged task vector is renormalised after every step to the running mean task norm, and the
    next step adds ``lambda_{t-1}`` times it back. Full SVDs; ``P = U^T tau V`` has its diagonal
    (over the nonzero singular values) and its ``split x split`` block zeroed, ``split`` = index of
    the first cumulative singular-value share above ``alpha``. The keywords switch off one part each
    (``diag=False``, ``block_extra=1``, ``norm="module"``: the former implementation's choices)."""
    keys = sorted(taus[0])
    merged = {k: taus[0][k].copy() for k in keys}
    prev_lambda = {k: 1.0 for k in keys}
    norms = {k: [np.linalg.norm(taus[0][k])] for k in keys}
    model_norms = [np.sqrt(sum(np.linalg.norm(taus[0][k]) ** 2 for k in keys))]
    for tau in taus[1:]:
        new = {}
        for k in keys:
            u, s, vh = np.linalg.svd(merged[k], full_matrices=True)
            split = int((np.cumsum(s) / s.sum() > alpha).argmax()) + block_extra
            P = u.T @ tau[k] @ vh.T
            if diag:
                r = np.linalg.matrix_rank(merged[k])
                P[np.arange(r), np.arange(r)] = 0.0
            P[:split, :split] = 0.0
            new[k] = prev_lambda[k] * merged[k] + u @ P @ vh
            norms[k].append(np.linalg.norm(tau[k]))
        model_norms.append(np.sqrt(sum(np.linalg.norm(tau[k]) ** 2 for k in keys)))
        if norm == "model":
            total = np.sqrt(sum(np.linalg.norm(new[k]) ** 2 for k in keys))
            lam = {k: total / np.mean(model_norms) for k in keys}
        else:
            lam = {k: np.linalg.norm(new[k]) / np.mean(norms[k]) for k in keys}
        merged = {k: new[k] / lam[k] for k in keys}
        prev_lambda = lam
    return merged


DENSE = ("dense", "dense_alpha")


@pytest.mark.parametrize("name", DENSE)
def test_opcm_matches_fusion_bench(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, "opcm", name)
    ours = as_numpy(merge(adapters(case), "opcm", {"alpha": case["alpha"]}).deltas_for())
    assert rel(ours, reference(case)) < 1e-5


@pytest.mark.parametrize("name", DENSE)
def test_opcm_float64_core_matches_fusion_bench(refs: dict[str, Any], name: str) -> None:
    """The method's building blocks in float64 agree with FusionBench (float64 models) to rounding."""
    case = case_of(refs, "opcm", name)
    taus = task_vectors(case)
    keys = sorted(taus[0])
    running = {k: opcm_running([torch.tensor(t[k]) for t in taus], case["alpha"]) for k in keys}
    scale = opcm_rescale([sum(np.linalg.norm(t[k]) ** 2 for k in keys) for t in taus],
                         sum(sq_norm(running[k]) for k in keys))
    assert rel({k: scale * running[k].numpy() for k in keys}, reference(case)) < 1e-10


@pytest.mark.parametrize("name", DENSE)
def test_opcm_numpy_rederivation_matches_fusion_bench(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, "opcm", name)
    assert rel(np_opcm(task_vectors(case), case["alpha"]), reference(case)) < 1e-10


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("deviation", [{"diag": False}, {"block_extra": 1}, {"norm": "module"},
                                       {"diag": False, "block_extra": 1, "norm": "module"}])
def test_opcm_former_deviations_are_detected(refs: dict[str, Any], name: str, deviation: dict[str, Any]) -> None:
    """Each choice of the former implementation (no diagonal zeroing, a block one larger, per-module
    norms) moves the output far beyond the tolerance of the checks above."""
    case = case_of(refs, "opcm", name)
    assert rel(np_opcm(task_vectors(case), case["alpha"], **deviation), reference(case)) > 1e-3


@pytest.mark.parametrize("name", DENSE + ("lora",))
@pytest.mark.parametrize("norm", ["model", "module"])
def test_opcm_equals_numpy_rederivation(refs: dict[str, Any], name: str, norm: str) -> None:
    case = case_of(refs, "opcm", name)
    ours = as_numpy(merge(adapters(case), "opcm", {"alpha": case["alpha"], "norm": norm, "scaling": 0.7}).deltas_for())
    want = np_opcm(task_vectors(case), case["alpha"], norm=norm)
    assert rel(ours, {k: 0.7 * v for k, v in want.items()}) < 1e-5


def test_opcm_lora_reference_is_undefined_in_the_null_space(refs: dict[str, Any]) -> None:
    """With rank-deficient running sums (LoRA) FusionBench also zeroes diagonal entries of null-space
    singular vectors whose basis is set by rounding: the same task vectors merged over another
    base model give another result. Ours depends on the task vectors only and stays within that
    spread of both runs."""
    a, b = (case_of(refs, "opcm", n) for n in ("lora", "lora_zero_base"))
    assert a["factors"] == b["factors"]
    spread = rel(reference(a), reference(b))
    assert spread > 0.1
    ours = as_numpy(merge(adapters(a), "opcm", {"alpha": a["alpha"]}).deltas_for())
    assert rel(ours, reference(a)) < spread and rel(ours, reference(b)) < spread


def test_opcm_norm_is_model_wide_by_default(refs: dict[str, Any]) -> None:
    case = case_of(refs, "opcm", "dense")
    ads = adapters(case)
    res = merge(ads, "opcm", {"alpha": case["alpha"]})
    scales = set(res.info["opcm_scale"].values())
    assert len(scales) == 1  # one factor for the whole model
    per_module = merge(ads, "opcm", {"alpha": case["alpha"], "norm": "module"}).info["opcm_scale"]
    assert len(set(per_module.values())) == len(per_module)


def test_opcm_streaming_needs_module_norm(refs: dict[str, Any]) -> None:
    ads = adapters(case_of(refs, "opcm", "dense"))
    with pytest.raises(OsrmError, match="norm=module"):
        merge(ads, "opcm", {}, context=MergeContext(streaming=True))
    streamed = merge(ads, "opcm", {"norm": "module"}, context=MergeContext(streaming=True)).deltas_for()
    whole = merge(ads, "opcm", {"norm": "module"}).deltas_for()
    for k in whole:
        torch.testing.assert_close(streamed[k], whole[k])


def test_principal_rank_is_fusion_bench_split() -> None:
    # cumulative shares 0.5, 0.75, 0.875, 1.0: the first share above alpha sits at index split
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert [principal_rank(S, a) for a in (0.1, 0.5, 0.6, 0.75, 0.8, 0.9)] == [0, 1, 1, 2, 2, 3]
    assert principal_rank(torch.zeros(3), 0.5) == 0


def test_opcm_alpha_range() -> None:
    ads = [LoraAdapter({"w": LoraModule(torch.ones(1, 3), torch.ones(2, 1), 1.0)}, {"peft_type": "LORA"})] * 2
    for bad in (0.0, 1.0):
        with pytest.raises(OsrmError, match="alpha"):
            merge(ads, "opcm", {"alpha": bad})


# ------------------------------------------------------------------------------------------------ KnOTS


def knots_rank(cat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(cat, full_matrices=False)
    keep = S > 1e-6 * S[0]
    return U[:, keep], S[keep], Vh[keep]


def coordinate_count(taus: list[Arrays]) -> int:
    """Coordinates per task over all modules: ``sum_modules rank([tau_1..tau_T]) * n``."""
    return sum(knots_rank(np.concatenate([t[k] for t in taus], 1))[1].size * taus[0][k].shape[1] for k in taus[0])


def official_density(case: dict[str, Any]) -> float:
    """A density whose ``int(density * N)`` equals what the official top-K keeps per task,
    ``int(K * N) + 1`` (its ``kthvalue(N - int(K N))`` threshold with ``>=`` keeps one more)."""
    n = coordinate_count(task_vectors(case))
    return (int(case["topK"] / 100 * n) + 1.5) / n


def np_knots_ties(taus: list[Arrays], density: float, scaling: float, s_on_v: bool) -> Arrays:
    """KnOTS-TIES in float64 NumPy: SVD of ``[tau_1..tau_T]`` per module, per-task coordinates
    ``S V_t^T`` (``s_on_v``) or ``V_t^T``, each task's top ``int(density N)`` coordinates by magnitude
    over all modules, sign election by the sum of values, disjoint mean, times ``U`` (and ``S``)."""
    keys, T = sorted(taus[0]), len(taus)
    bases, coords = {}, {}
    for k in keys:
        n = taus[0][k].shape[1]
        U, S, Vh = knots_rank(np.concatenate([t[k] for t in taus], 1))
        blocks = [Vh[:, t * n:(t + 1) * n] for t in range(T)]
        bases[k], coords[k] = (U, [S[:, None] * b for b in blocks]) if s_on_v else (U * S, blocks)
    kept = {k: [] for k in keys}
    for t in range(T):
        flat = np.concatenate([coords[k][t].ravel() for k in keys])
        thr = np.sort(np.abs(flat))[::-1][int(density * flat.size) - 1]
        for k in keys:
            kept[k].append(np.where(np.abs(coords[k][t]) >= thr, coords[k][t], 0.0))
    out = {}
    for k in keys:
        s = np.stack(kept[k])
        agree = np.sign(s) == np.where(s.sum(0) >= 0, 1.0, -1.0)
        out[k] = scaling * bases[k] @ ((s * agree).sum(0) / np.maximum(agree.sum(0), 1))
    return out


KNOTS = ("ties", "ties_dense")


@pytest.mark.parametrize("name", KNOTS)
def test_knots_matches_official(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, "knots", name)
    params = {"variant": "ties", "density": official_density(case), "scaling": case["scaling"]}
    ours = as_numpy(merge(adapters(case), "knots", params).deltas_for())
    assert rel(ours, reference(case)) < 1e-5
    unscaled = as_numpy(merge(adapters(case), "knots", {**params, "s_on_v": False}).deltas_for())
    assert rel(unscaled, reference(case)) > 0.1  # the former default trims V, not S V


@pytest.mark.parametrize("name", KNOTS)
def test_knots_numpy_rederivation_matches_official(refs: dict[str, Any], name: str) -> None:
    case = case_of(refs, "knots", name)
    want = np_knots_ties(task_vectors(case), official_density(case), case["scaling"], True)
    assert rel(want, reference(case)) < 1e-5


@pytest.mark.parametrize("name", KNOTS)
@pytest.mark.parametrize("s_on_v", [True, False])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_knots_equals_numpy_rederivation(refs: dict[str, Any], name: str, s_on_v: bool, density: float) -> None:
    case = case_of(refs, "knots", name)
    params = {"variant": "ties", "density": density, "scaling": 0.8, "s_on_v": s_on_v}
    ours = as_numpy(merge(adapters(case), "knots", params).deltas_for())
    assert rel(ours, np_knots_ties(task_vectors(case), density, 0.8, s_on_v)) < 1e-5


def test_knots_s_on_v_is_a_documented_parameter() -> None:
    info = get_method("knots")
    p = info.param("s_on_v")
    assert p.type == "bool" and p.default is True
    assert "official" in p.help and "s_on_v" in info.description
    assert {m.name for m in info.params} >= {"variant", "density", "s_on_v"}


def test_knots_ta_is_task_arithmetic_either_way(refs: dict[str, Any]) -> None:
    case = case_of(refs, "knots", "ties")
    ads = adapters(case)
    ta = merge(ads, "task_arithmetic", {"scaling": 0.6}).deltas_for()
    for s_on_v in (True, False):
        out = merge(ads, "knots", {"variant": "ta", "scaling": 0.6, "s_on_v": s_on_v}).deltas_for()
        for k in ta:
            torch.testing.assert_close(out[k], ta[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("params", [{"variant": "dare_ties", "p": 0.4, "seed": 2}, {"variant": "ties", "density": 1.0},
                                    {"variant": "ties", "density": 0.3, "sign_method": "frequency"}])
def test_knots_s_on_v_only_changes_the_magnitude_trim(refs: dict[str, Any], params: dict[str, Any]) -> None:
    """S scales a row of every task alike: without a magnitude trim (or with DARE's random one) both
    settings agree; with a trim they differ."""
    ads = adapters(case_of(refs, "knots", "ties"))
    a, b = (merge(ads, "knots", {**params, "s_on_v": s}).deltas_for() for s in (True, False))
    if params.get("density", 1.0) < 1.0:
        assert rel(as_numpy(a), as_numpy(b)) > 0.05
    else:
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
