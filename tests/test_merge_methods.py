"""Merge methods against independent references (PEFT merge_utils, NumPy worked examples) and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.errors import AdapterError, OsrmError
from osrm_lora.merge import MergeContext, get_method, list_methods, merge

SHAPES = {"enc.q": (6, 5), "enc.v": (4, 7)}


def make_adapter(seed: int, rank: int = 2, scaling: float = 0.5, shapes=SHAPES, name: str = "") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {k: LoraModule(torch.randn(rank, n, generator=g, dtype=torch.float64).float(),
                          torch.randn(m, rank, generator=g, dtype=torch.float64).float(), scaling)
            for k, (m, n) in shapes.items()}
    return LoraAdapter(mods, {"peft_type": "LORA", "base_model_name_or_path": "tiny"}, name=name or f"t{seed}")


def three(ranks=(2, 3, 2)):
    return [make_adapter(10 + i, r, 0.5 + 0.25 * i) for i, r in enumerate(ranks)]


def dense(ads):
    return [{k: m.delta().double().numpy() for k, m in ad.modules.items()} for ad in ads]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_all_methods_with_papers():
    names = {m.name for m in list_methods()}
    assert {"task_arithmetic", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "emr", "fisher",
            "regmean", "knots", "tsv_m", "iso_c", "iso_cts", "core_space", "do_merging", "opcm",
            "adamerging"} <= names
    for m in list_methods():
        assert m.paper.startswith("https://") and m.description and m.fn.__doc__ and m.paper in m.fn.__doc__


def test_parameter_errors():
    ads = three()
    with pytest.raises(OsrmError, match="valid methods: .*task_arithmetic"):
        merge(ads, "nope")
    with pytest.raises(OsrmError, match="valid parameters: scaling, density"):
        merge(ads, "ties", {"densty": 0.3})
    with pytest.raises(OsrmError, match=r"out of range.*\(0,1\]"):
        merge(ads, "ties", {"density": 0.0})
    with pytest.raises(OsrmError, match=r"\[0,1\)"):
        merge(ads, "dare_linear", {"p": 1.0})
    with pytest.raises(OsrmError, match="out of range"):
        merge(ads, "task_arithmetic", {"scaling": -1})
    with pytest.raises(OsrmError, match="3 adapters"):
        merge(ads, "task_arithmetic", {"weights": [1.0, 2.0]})
    with pytest.raises(OsrmError, match="choose one of"):
        merge(ads, "ties", {"threshold": "layer"})
    with pytest.raises(OsrmError, match="needs grams"):
        merge(ads, "regmean")
    with pytest.raises(AdapterError, match="no adapters"):
        merge([], "ties")


def test_extras_refused_or_dropped():
    ads = three()
    ads[1].extra["classifier.weight"] = torch.zeros(2, 5)
    with pytest.raises(AdapterError, match="ignore_extra"):
        merge(ads, "task_arithmetic")
    res = merge(ads, "task_arithmetic", ignore_extra=True)
    assert res.info["dropped_extra"] == ["classifier.weight"]
    ads[1].extra = {"enc.q.lora_magnitude_vector": torch.ones(6)}
    ads[1].config["use_dora"] = True
    with pytest.raises(AdapterError, match="DoRA"):
        merge(ads, "ties", ignore_extra=True)


# ---------------------------------------------------------------------------------------------- exact methods


def test_task_arithmetic_exact_in_factor_space():
    ads = three()
    res = merge(ads, "task_arithmetic", {"scaling": 0.4, "weights": [1.0, 2.0, 0.5]})
    ref = dense(ads)
    for k in SHAPES:
        mod = res.adapter.modules[k]
        assert mod.rank == 7 and res.deltas is None
        close(res.deltas_for()[k], 0.4 * (ref[0][k] + 2 * ref[1][k] + 0.5 * ref[2][k]))
    cat = merge(ads, "cat", {"weights": [1.0, 2.0, 0.5]})
    for k in SHAPES:
        close(cat.deltas_for()[k], ref[0][k] + 2 * ref[1][k] + 0.5 * ref[2][k])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.floats(0.0, 2.0), st.integers(0, 1000))
def test_ta_equals_dense_sum_property(ranks, lam, seed):
    ads = [make_adapter(seed + i, r) for i, r in enumerate(ranks)]
    res = merge(ads, "task_arithmetic", {"scaling": lam})
    ref = dense(ads)
    for k in SHAPES:
        close(res.deltas_for()[k], lam * sum(r[k] for r in ref), 1e-4)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("cat", {}), ("ties", {"density": 1.0}), ("dare_linear", {"p": 0.0}),
    ("dare_ties", {"p": 0.0}), ("magnitude_prune", {"density": 1.0}), ("emr", {}), ("knots", {"variant": "ta"}),
    ("knots", {"variant": "ties", "density": 1.0}), ("core_space", {"variant": "ta"}),
    ("core_space", {"variant": "ties", "density": 1.0}), ("tsv_m", {}), ("do_merging", {}), ("opcm", {}),
])
def test_single_adapter_comes_back(method, params):
    ad = make_adapter(3, 2, 0.5)
    res = merge([ad], method, params)
    for k, m in ad.modules.items():
        close(res.deltas_for(0)[k], m.delta(), 1e-4)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("ties", {"density": 0.3}), ("magnitude_prune", {"density": 0.4}), ("iso_c", {}),
    ("iso_cts", {}), ("tsv_m", {}), ("core_space", {"variant": "ta"}), ("knots", {"variant": "ta"}),
    ("do_merging", {"base": "ties", "density": 0.5}),
])
def test_permutation_invariance(method, params):
    ads = three((2, 2, 2))
    a = merge(ads, method, params).deltas_for()
    b = merge(ads[::-1], method, params).deltas_for()
    for k in SHAPES:
        close(a[k], b[k], 1e-4)


LINEAR_IN_SCALING = sorted(i.name for i in list_methods() if i.linear_in_scaling)


def test_every_data_free_method_with_a_scaling_is_declared_linear_or_not():
    """A new method with a scaling must be considered for the merge-once sweep: the data-free ones
    with a scaling are all final-factor methods today; the data-aware ones (regmean, fisher,
    adamerging) are not declared and are merged at every lambda."""
    with_scaling = {i.name for i in list_methods() if "scaling" in {p.name for p in i.params} and not i.needs}
    assert set(LINEAR_IN_SCALING) == with_scaling
    assert not {"regmean", "fisher", "adamerging"} & set(LINEAR_IN_SCALING)


@pytest.mark.parametrize("method", LINEAR_IN_SCALING)
@pytest.mark.parametrize("lam", [0.0, 0.35, 2.5])
def test_linear_in_scaling_methods_scale(method, lam):
    """merge(scaling=lam) equals merge(scaling=1).scaled(lam): what the lambda sweep relies on."""
    ads = three()
    direct = merge(ads, method, {"scaling": lam})
    scaled = merge(ads, method, {"scaling": 1.0}).scaled(lam)
    assert scaled.params["scaling"] == pytest.approx(lam) and scaled.info["scaled_from"] == 1.0
    tasks = range(len(ads)) if direct.per_task_deltas is not None else [None]
    assert (scaled.adapter is None) == (direct.adapter is None)
    for t in tasks:
        d, s = direct.deltas_for(t), scaled.deltas_for(t)
        for k in SHAPES:
            close(s[k], d[k], 1e-5)


def test_scaled_leaves_the_original_unchanged():
    base = merge(three(), "task_arithmetic", {"scaling": 1.0})
    before = {k: m.B.clone() for k, m in base.adapter.modules.items()}
    base.scaled(3.0)
    assert all(torch.equal(base.adapter.modules[k].B, b) for k, b in before.items())
    assert base.params["scaling"] == 1.0 and "scaled_from" not in base.info


def test_core_space_and_knots_ta_equal_task_arithmetic():
    ads = three()
    ta = merge(ads, "task_arithmetic", {"scaling": 0.7}).deltas_for()
    for method in ("core_space", "knots"):
        res = merge(ads, method, {"variant": "ta", "scaling": 0.7})
        assert res.adapter is not None
        for k in SHAPES:
            close(res.deltas_for()[k], ta[k], 1e-4)
            assert res.adapter.modules[k].rank <= 7


# ---------------------------------------------------------------------------------------------- PEFT parity


def test_ties_magnitude_prune_match_peft_per_matrix():
    from peft.utils import merge_utils as mu

    ads = three((2, 2, 2))
    w = [1.0, 0.5, 2.0]
    for density in (0.3, 0.7):
        ties = merge(ads, "ties", {"density": density, "threshold": "matrix", "weights": w}).deltas
        mp = merge(ads, "magnitude_prune", {"density": density, "threshold": "matrix", "weights": w}).deltas
        for sm in ("total", "frequency"):
            t2 = merge(ads, "ties", {"density": density, "threshold": "matrix", "weights": w, "sign_method": sm}).deltas
            for k in SHAPES:
                taus = [ad.modules[k].delta() for ad in ads]
                torch.testing.assert_close(t2[k], mu.ties(taus, torch.tensor(w), density, sm))
        for k in SHAPES:
            taus = [ad.modules[k].delta() for ad in ads]
            torch.testing.assert_close(ties[k], mu.ties(taus, torch.tensor(w), density))
            torch.testing.assert_close(mp[k], mu.magnitude_prune(taus, torch.tensor(w), density))


def test_ties_task_threshold_is_global_per_task():
    ads = three((2, 2, 2))
    density = 0.3
    res = merge(ads, "ties", {"density": density}).deltas
    ref = dense(ads)
    trimmed = []
    for r in ref:
        allv = np.concatenate([np.abs(r[k]).ravel() for k in sorted(SHAPES)])
        thr = np.sort(allv)[::-1][int(density * allv.size) - 1]
        trimmed.append({k: np.where(np.abs(r[k]) >= thr, r[k], 0.0) for k in SHAPES})
    for k in SHAPES:
        s = np.stack([t[k] for t in trimmed])
        sign = np.where(s.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(s) == sign
        close(res[k], (s * agree).sum(0) / np.maximum(agree.sum(0), 1))


def test_dare_matches_peft_with_same_seed():
    from peft.utils import merge_utils as mu

    ads = [make_adapter(20 + i, 2, 1.0, shapes={"only": (8, 9)}) for i in range(3)]
    w = [1.0, 0.5, 2.0]
    taus = [ad.modules["only"].delta() for ad in ads]
    for p in (0.5, 0.75):
        ours = merge(ads, "dare_linear", {"p": p, "seed": 7, "weights": w}).deltas["only"]
        torch.manual_seed(7)
        torch.testing.assert_close(ours, mu.dare_linear(taus, torch.tensor(w), 1 - p))
        ours = merge(ads, "dare_ties", {"p": p, "seed": 7, "weights": w}).deltas["only"]
        torch.manual_seed(7)
        torch.testing.assert_close(ours, mu.dare_ties(taus, torch.tensor(w), 1 - p))
    a = merge(ads, "dare_linear", {"p": 0.5}, context=MergeContext(seed=3)).deltas["only"]
    b = merge(ads, "dare_linear", {"p": 0.5, "seed": 3}).deltas["only"]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- NumPy worked examples


def test_emr_numpy():
    ads = three()
    res = merge(ads, "emr", {"scaling": 1.0})
    ref = dense(ads)
    uni, masks = {}, {}
    num, den = np.zeros(3), np.zeros(3)
    for k in sorted(SHAPES):
        s = np.stack([r[k] for r in ref])
        sign = np.where(s.sum(0) >= 0, 1.0, -1.0)
        agree = (np.sign(s) == sign)
        uni[k] = sign * np.max(np.abs(s) * agree, axis=0)
        masks[k] = agree
        num += np.abs(s).reshape(3, -1).sum(1)
        den += (agree * np.abs(uni[k])).reshape(3, -1).sum(1)
    for t in range(3):
        for k in SHAPES:
            close(res.deltas_for(t)[k], num[t] / den[t] * masks[k][t] * uni[k])
    with pytest.raises(OsrmError, match="task index"):
        res.deltas_for()


def test_knots_ties_numpy():
    ads = three()
    # the variant that trims the unscaled V blocks; the official S*V trim is checked against the
    # authors' code in test_merge_references.py
    res = merge(ads, "knots", {"variant": "ties", "density": 0.5, "threshold": "matrix", "scaling": 1.0,
                               "s_on_v": False})
    ref = dense(ads)
    for k, (_m, n) in SHAPES.items():
        cat = np.concatenate([r[k] for r in ref], axis=1)
        U, S, Vh = np.linalg.svd(cat, full_matrices=False)
        keep = S > 1e-6 * S[0]
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
        vs = []
        for t in range(3):
            v = Vh[:, t * n:(t + 1) * n]
            kk = int(0.5 * v.size)
            thr = np.sort(np.abs(v).ravel())[::-1][kk - 1]
            vs.append(np.where(np.abs(v) >= thr, v, 0.0))
        s = np.stack(vs)
        sign = np.where(s.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(s) == sign
        vm = (s * agree).sum(0) / np.maximum(agree.sum(0), 1)
        close(res.deltas_for()[k], (U * S) @ vm, 1e-4)


def _polar(x):
    p, _, q = np.linalg.svd(x, full_matrices=False)
    return p @ q


def test_tsv_m_numpy():
    ads = three((2, 2, 2))
    res = merge(ads, "tsv_m", {"rank_fraction": 0.2, "scaling": 0.9})
    for k, (m, n) in SHAPES.items():
        keep = max(1, int(0.2 * min(m, n)))
        us, ss, vs = [], [], []
        for r in dense(ads):
            U, S, Vh = np.linalg.svd(r[k], full_matrices=False)
            us.append(U[:, :keep]), ss.append(S[:keep]), vs.append(Vh[:keep].T)
        out = 0.9 * _polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ _polar(np.concatenate(vs, 1)).T
        close(res.deltas_for()[k], out, 1e-4)


def test_iso_c_numpy():
    ads = three()
    res = merge(ads, "iso_c", {"scaling": 1.3})
    for k in SHAPES:
        total = sum(r[k] for r in dense(ads))
        U, S, Vh = np.linalg.svd(total, full_matrices=False)
        keep = S > 1e-6 * S[0]
        close(res.deltas_for()[k], 1.3 * S[keep].mean() * U[:, keep] @ Vh[keep], 1e-4)


def test_iso_cts_numpy():
    ads = [make_adapter(40 + i, 1, 1.0, shapes={"w": (9, 8)}) for i in range(3)]
    res = merge(ads, "iso_cts", {"common_fraction": 0.34, "scaling": 1.0})
    taus = [r["w"] for r in dense(ads)]
    R, T = 3, 3
    k = int(0.34 * R)  # 1
    U, S, Vh = np.linalg.svd(sum(taus), full_matrices=False)
    Uc, Sc, Vc = U[:, :k], S[:k], Vh[:k]
    s = (R - k) // T  # 0 -> only the common subspace
    assert s == 0
    close(res.deltas_for()["w"], Sc.mean() * Uc @ Vc, 1e-4)
    ads2 = [make_adapter(50 + i, 2, 1.0, shapes={"w": (9, 8)}) for i in range(2)]
    res2 = merge(ads2, "iso_cts", {"common_fraction": 0.5})
    taus = [r["w"] for r in dense(ads2)]
    R, k = 4, 2
    U, S, Vh = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [U[:, :k]], [S[:k]], [Vh[:k].T]
    for tau in taus:
        proj = tau - U[:, :k] @ (U[:, :k].T @ tau)
        u, sv, vh = np.linalg.svd(proj, full_matrices=False)
        us.append(u[:, :1]), ss.append(sv[:1]), vs.append(vh[:1].T)
    out = np.concatenate(ss).mean() * _polar(np.concatenate(us, 1)) @ _polar(np.concatenate(vs, 1)).T
    close(res2.deltas_for()["w"], out, 1e-4)


def test_do_merging_numpy():
    ads = three()
    w = [1.0, 2.0, 0.5]
    res = merge(ads, "do_merging", {"weights": w, "scaling": 0.8})
    for k in SHAPES:
        taus = [r[k] for r in dense(ads)]
        mags = [np.linalg.norm(t, axis=1) for t in taus]
        dirs = [t / m[:, None] for t, m in zip(taus, mags)]
        d = sum(wi * di for wi, di in zip(w, dirs))
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        m = sum(wi * mi for wi, mi in zip(w, mags)) / sum(w)
        close(res.deltas_for()[k], 0.8 * m[:, None] * d, 1e-4)


def test_regmean_numpy():
    ads = three()
    g = torch.Generator().manual_seed(5)
    grams = []
    for _ in ads:
        gd = {}
        for k, (_m, n) in SHAPES.items():
            X = torch.randn(20, n, generator=g)
            gd[k] = X.T @ X
        grams.append(gd)
    res = merge(ads, "regmean", {"alpha": 0.8, "ridge": 0.0}, context=MergeContext(grams=grams))
    for k, (m, n) in SHAPES.items():
        W0 = np.random.default_rng(0).normal(size=(m, n))
        Gs = [gd[k].double().numpy() for gd in grams]
        Gs = [0.8 * G + 0.2 * np.diag(np.diag(G)) for G in Gs]
        Ws = [W0 + r[k] for r in dense(ads)]
        # RegMean in (in, out) orientation: W^T = (sum G)^-1 sum G W_t^T
        merged_T = np.linalg.solve(sum(Gs), sum(G @ W.T for G, W in zip(Gs, Ws)))
        close(res.deltas_for()[k], merged_T.T - W0, 1e-4)
    single = merge(ads[:1], "regmean", context=MergeContext(grams=grams[:1]))
    for k, mod in ads[0].modules.items():
        close(single.deltas_for()[k], mod.delta(), 1e-4)
    with pytest.raises(OsrmError, match="no Gram"):
        merge(ads, "regmean", context=MergeContext(grams=[{}, {}, {}]))


def test_fisher_dense_and_factor():
    ads = three((2, 2, 2))
    g = torch.Generator().manual_seed(1)
    fis = [{k: torch.rand(m, n, generator=g) for k, (m, n) in SHAPES.items()} for _ in ads]
    res = merge(ads, "fisher", {"scaling": 1.0}, context=MergeContext(fisher=fis))
    for k in SHAPES:
        F = [f[k].double().numpy() + 1e-8 for f in fis]
        close(res.deltas[k], sum(f * r[k] for f, r in zip(F, dense(ads))) / sum(F), 1e-4)
    fis2 = [{f"{k}.lora_A": torch.ones(2, n), f"{k}.lora_B": torch.ones(m, 2)} for k, (m, n) in SHAPES.items()
            for _ in [0]]
    fis2 = [{**fis2[0], **fis2[1]}] * 3
    res2 = merge(ads, "fisher", context=MergeContext(fisher=fis2))
    for k in SHAPES:
        B = sum(ad.modules[k].scaling * ad.modules[k].B.double().numpy() for ad in ads) / 3
        A = sum(ad.modules[k].A.double().numpy() for ad in ads) / 3
        close(res2.deltas[k], B @ A, 1e-4)


def test_adamerging_minimises_toy_entropy():
    ads = three((2, 2, 2))
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(16, n, generator=g) for k, (m, n) in SHAPES.items()}

    def entropy_fn(deltas):
        ent = 0.0
        for k, d in deltas.items():
            p = torch.softmax(x[k] @ d.T, dim=-1)
            ent = ent + -(p * torch.log(p + 1e-12)).sum(-1).mean()
        return ent

    res = merge(ads, "adamerging", {"mode": "layer", "steps": 30, "lr": 0.05},
                context=MergeContext(entropy_fn=entropy_fn))
    c = torch.tensor(res.info["coefficients"])
    assert c.shape == (3, 2) and (c >= 0).all() and (c <= 1).all()
    assert res.info["entropy_last"] < res.info["entropy_first"]
    # the result is exactly TA with the learned coefficients
    ref = dense(ads)
    for j, k in enumerate(res.info["modules"]):
        close(res.deltas_for()[k], sum(float(c[t, j]) * ref[t][k] for t in range(3)), 1e-4)
    res_t = merge(ads, "adamerging", {"mode": "task", "steps": 3}, context=MergeContext(entropy_fn=entropy_fn))
    assert torch.tensor(res_t.info["coefficients"]).shape == (3, 1)


def test_get_method_flags():
    assert get_method("task_arithmetic").exact_in_factor_space
    assert get_method("emr").per_task
    assert get_method("regmean").needs == {"grams"}
    assert get_method("adamerging").needs == {"adamerging_eval"}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 400), st.booleans())
def test_radix_selection_equals_sorting(seed, k, with_ties):
    """The two-pass radix selection (large inputs, or with a reducer) returns exactly the k-th
    largest |x|, also with repeated values, zeros and tensors of different sizes."""
    from osrm_lora.merge import ops

    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) * 10 ** float(torch.randint(-6, 3, (1,), generator=g))
               for n in (7, 130, 64, 1)]
    if with_ties:
        tensors.append(torch.tensor([0.5, -0.5, 0.5, 0.0, 0.0, 2.0]))
    flat = torch.cat([t.abs() for t in tensors])
    k = min(k, flat.numel())
    want = float(torch.sort(flat, descending=True).values[k - 1])
    # an identity reducer forces the radix path (the concatenating path is for small, local inputs)
    assert ops.kth_largest_abs(lambda: iter(tensors), k, reduce=lambda h: h) == want
    assert ops.kth_largest_abs(lambda: iter(tensors), k) == want
    # a reducer that sums the counts of two "processes" holding the same tensors: the 2k-th largest
    double = torch.cat([flat, flat])
    want2 = float(torch.sort(double, descending=True).values[2 * k - 1])
    assert ops.kth_largest_abs(lambda: iter(tensors), 2 * k, reduce=lambda h: 2 * h) == want2


@pytest.mark.parametrize("case", ["normal", "heavy_tail", "mostly_zero", "ties"])
@pytest.mark.parametrize("k_frac", [1e-6, 0.2, 0.5, 0.97, 1.0])
def test_kth_largest_equals_sorting_on_the_sampled_path(case, k_frac):
    """kth_largest is exact on inputs large enough for its sampled bracket, including inputs whose
    sample misrepresents them (mostly zeros: the bracket misses and it falls back) and ties."""
    from osrm_lora.merge import ops

    g = torch.Generator().manual_seed(3)
    n = 4 * ops.SAMPLE + 12_345
    a = {"normal": torch.randn(n, generator=g),
         "heavy_tail": torch.randn(n, generator=g) ** 5,
         "mostly_zero": torch.where(torch.rand(n, generator=g) < 0.999, 0.0, torch.randn(n, generator=g)),
         "ties": torch.randint(-3, 4, (n,), generator=g).float()}[case].abs()
    k = max(1, int(k_frac * n))
    want = torch.sort(a, descending=True).values[k - 1]
    assert ops.kth_largest(a, k) == want
    with pytest.raises(ValueError, match="out of range"):
        ops.kth_largest(a, n + 1)


def test_topk_mask_is_topks_set_and_keeps_k_under_ties():
    from osrm_lora.merge import ops

    g = torch.Generator().manual_seed(4)
    t = torch.randn(700, 500, generator=g)  # above 4 * SAMPLE entries: the sampled selection
    for density in (0.01, 0.2, 0.9):
        k = int(density * t.numel())
        want = torch.zeros(t.numel(), dtype=torch.bool)
        want[torch.topk(t.abs().reshape(-1), k).indices] = True
        assert torch.equal(ops.topk_mask(t, density), want.reshape(t.shape))
    tied = torch.ones(10, 10)  # every entry ties: no threshold keeps exactly k, topk chooses
    assert ops.matrix_threshold(tied, 0.3) is None
    assert int(ops.topk_mask(tied, 0.3).sum()) == 30


@pytest.mark.parametrize("consensus", ["sum", "ties"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_chunked_combine_equals_whole_stack_bitwise(consensus, sign_method):
    """ops.combine works through the entries in chunks; its values equal trimming and stacking
    the whole tensors (the unchunked formulas), bit for bit."""
    from osrm_lora.merge import ops

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(37, 29, generator=g) for _ in range(4)]
    w = torch.tensor([1.0, 0.5, 2.0, 0.3])
    thr = [0.5, None, 1.2, float("inf")]
    trimmed = torch.stack([x if v is None else x * (x.abs() >= v) for x, v in zip(xs, thr)])
    want = ops.weighted_sum(trimmed, w) if consensus == "sum" else ops.ties_consensus(trimmed, w, sign_method)
    for chunk in (1, 7, 100, 10_000):
        got = ops.combine(xs, w, consensus, thresholds=thr, sign_method=sign_method, chunk=chunk)
        assert got.shape == xs[0].shape
        assert torch.equal(got, want)


def test_ties_matches_peft_bitwise_on_large_matrices():
    """At shapes where the sampled threshold selection and several chunks are used, ties and
    magnitude_prune with threshold=matrix still equal PEFT's merge_utils exactly."""
    from peft.utils import merge_utils as mu

    shapes = {"big": (600, 480)}
    ads = [make_adapter(30 + i, 4, 1.0, shapes=shapes) for i in range(3)]
    w = [1.0, 0.5, 2.0]
    taus = [ad.modules["big"].delta() for ad in ads]
    for density in (0.05, 0.5):
        ties = merge(ads, "ties", {"density": density, "threshold": "matrix", "weights": w}).deltas["big"]
        mp = merge(ads, "magnitude_prune", {"density": density, "threshold": "matrix", "weights": w}).deltas["big"]
        assert torch.equal(ties, mu.ties(taus, torch.tensor(w), density))
        assert torch.equal(mp, mu.magnitude_prune(taus, torch.tensor(w), density))


# ------------------------------------------------------------------------------------ Compress-then-Merge


def _ctm_adapters(ranks: tuple[int, ...] = (3, 4, 2), seed: int = 11) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (20, 16), "ffn": (30, 16)}
    return [LoraAdapter({k: LoraModule(torch.randn(r, n, generator=g, dtype=torch.float64),
                                       torch.randn(m, r, generator=g, dtype=torch.float64), 0.5)
                         for k, (m, n) in shapes.items()},
                        {"peft_type": "LORA", "r": r, "lora_alpha": r}, name=f"t{i}")
            for i, r in enumerate(ranks)]


def _numpy_ctm_ta(deltas: list[np.ndarray], rank: int, weights: list[float], lam: float) -> np.ndarray:
    """Compress-then-Merge with task arithmetic from its definition, on dense float64 updates."""
    U, _, _ = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    _, _, Vh = np.linalg.svd(np.concatenate(deltas, axis=0), full_matrices=False)
    Ur, Vr = U[:, :rank], Vh[:rank].T
    core = sum(w * (Ur.T @ d @ Vr) for w, d in zip(weights, deltas))
    return lam * Ur @ core @ Vr.T


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_ctm_matches_its_definition_and_reports_its_error(rank: int) -> None:
    ads = _ctm_adapters()
    weights, lam = [1.0, 0.5, 2.0], 0.8
    res = merge(ads, "ctm", {"rank": rank, "scaling": lam, "weights": weights})
    for key, mod in res.adapter.modules.items():
        deltas = [ad.modules[key].delta().numpy() for ad in ads]
        want = _numpy_ctm_ta(deltas, rank, weights, lam)
        scale = np.abs(want).max()  # the merge computes in float32
        np.testing.assert_allclose(mod.delta().double().numpy(), want, rtol=0, atol=2e-5 * scale)
        assert mod.rank == rank and np.linalg.matrix_rank(mod.delta().double().numpy(), tol=1e-4 * scale) <= rank
        ta = lam * sum(w * d for w, d in zip(weights, deltas))
        assert res.info["relative_error"][key] == pytest.approx(
            np.linalg.norm(want - ta) / np.linalg.norm(ta), rel=1e-3, abs=1e-5)
        total = sum(np.square(d).sum() for d in deltas)
        U, _, _ = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
        _, _, Vh = np.linalg.svd(np.concatenate(deltas, axis=0), full_matrices=False)
        kept = sum(np.square(U[:, :rank].T @ d @ Vh[:rank].T).sum() for d in deltas) / total
        assert res.info["kept_energy"][key] == pytest.approx(kept, rel=1e-5)


def test_ctm_at_the_full_core_rank_is_lossless_task_arithmetic() -> None:
    ads = _ctm_adapters()
    res = merge(ads, "ctm", {"rank": 9})  # 3 + 4 + 2: the whole core space
    ta = merge(ads, "task_arithmetic", {})
    for key, mod in res.adapter.modules.items():
        torch.testing.assert_close(mod.delta(), ta.deltas_for()[key], rtol=1e-5, atol=1e-5)
    assert res.info["max_relative_error"] < 1e-5


def test_ctm_default_rank_and_sparse_variants() -> None:
    ads = _ctm_adapters()
    res = merge(ads, "ctm", {})
    assert set(res.info["rank"].values()) == {4}  # the largest input rank
    for variant in ("ties", "dare_ties"):
        out = merge(ads, "ctm", {"variant": variant, "rank": 3, "density": 0.5, "seed": 1})
        assert set(out.info["rank"].values()) == {3}
        assert all(0 < e < 1.5 for e in out.info["relative_error"].values())
        assert all(0 < k <= 1 for k in out.info["kept_energy"].values())
