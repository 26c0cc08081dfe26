"""Property-based tests (hypothesis) of the merge methods, the OSRM projection and statistics accumulation,
each checked against a NumPy reference or an algebraic identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.merge import merge
from osrm_lora.osrm import lora_energy, project_lora
from osrm_lora.stats import collect_statistics, stats_from_samples

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ("enc.0.q", "enc.1.v")


@st.composite
def adapter_sets(draw: st.DrawFn, min_n: int = 1, max_n: int = 4) -> list[LoraAdapter]:
    """1-4 compatible adapters: same modules and shapes, their own ranks, scalings and random factors."""
    n_adapters = draw(st.integers(min_n, max_n))
    shapes = {k: (draw(st.integers(2, 6)), draw(st.integers(2, 6))) for k in KEYS}
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_adapters):
        mods = {}
        for k, (m, n) in shapes.items():
            r = draw(st.integers(1, 3))
            scaling = draw(st.sampled_from([0.5, 1.0, 2.0]))
            mods[k] = LoraModule(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), scaling)
        out.append(LoraAdapter(mods, {"base_model_name_or_path": "base", "peft_type": "LORA"}, name=f"t{t}"))
    return out


def _np_deltas(adapters: list[LoraAdapter], key: str) -> np.ndarray:
    """(T, m, n) float64 dense updates ``s B A`` computed in NumPy."""
    return np.stack([m.scaling * (m.B.double().numpy() @ m.A.double().numpy()) for m in (a.modules[key] for a in adapters)])


def _dense(result, key: str) -> np.ndarray:  # noqa: ANN001
    return result.deltas_for()[key].double().numpy()


weights_st = st.lists(st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 3)), min_size=4, max_size=4)
lam_st = st.floats(0, 2).map(lambda x: round(x, 3))


@SETTINGS
@given(adapter_sets(), weights_st, lam_st)
def test_task_arithmetic_is_linear(adapters: list[LoraAdapter], w: list[float], lam: float) -> None:
    w = w[: len(adapters)]
    res = merge(adapters, "task_arithmetic", {"scaling": lam, "weights": w})
    for key in KEYS:
        ref = lam * np.tensordot(np.array(w), _np_deltas(adapters, key), axes=1)
        np.testing.assert_allclose(_dense(res, key), ref, atol=1e-4, rtol=1e-4)
    # exact in factor space: the merged rank is the sum of the ranks
    assert all(res.adapter.modules[k].rank == sum(a.modules[k].rank for a in adapters) for k in KEYS)


@SETTINGS
@given(adapter_sets(min_n=2), st.randoms(use_true_random=False), st.sampled_from(["task_arithmetic", "ties", "magnitude_prune", "cat"]))
def test_merges_are_permutation_invariant(adapters: list[LoraAdapter], rnd, method: str) -> None:  # noqa: ANN001
    params = {"density": 0.5} if method in ("ties", "magnitude_prune") else {}
    perm = list(range(len(adapters)))
    rnd.shuffle(perm)
    a = merge(adapters, method, params)
    b = merge([adapters[i] for i in perm], method, params)
    for key in KEYS:
        np.testing.assert_allclose(_dense(a, key), _dense(b, key), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(adapter_sets(max_n=1), lam_st, st.sampled_from(["task", "matrix"]))
def test_ties_of_one_adapter_at_density_one_is_scaled_task_vector(adapters: list[LoraAdapter], lam: float, threshold: str) -> None:
    res = merge(adapters, "ties", {"density": 1.0, "scaling": lam, "threshold": threshold})
    for key in KEYS:
        np.testing.assert_allclose(_dense(res, key), lam * _np_deltas(adapters, key)[0], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(adapter_sets(min_n=2), lam_st)
def test_ties_at_density_one_matches_numpy_sign_election(adapters: list[LoraAdapter], lam: float) -> None:
    res = merge(adapters, "ties", {"density": 1.0, "scaling": lam})
    for key in KEYS:
        X = _np_deltas(adapters, key)
        sign = np.where(X.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(X) == sign
        ref = lam * (X * agree).sum(0) / np.maximum(agree.sum(0), 1)
        np.testing.assert_allclose(_dense(res, key), ref, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(adapter_sets(), lam_st, st.integers(0, 1000))
def test_dare_with_p_zero_equals_task_arithmetic(adapters: list[LoraAdapter], lam: float, seed: int) -> None:
    dare = merge(adapters, "dare_linear", {"p": 0.0, "scaling": lam, "seed": seed})
    ta = merge(adapters, "task_arithmetic", {"scaling": lam})
    for key in KEYS:
        np.testing.assert_allclose(_dense(dare, key), _dense(ta, key), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(adapter_sets(), st.floats(0.05, 0.95), st.integers(0, 1000))
def test_dare_is_seeded_and_unbiased_in_support(adapters: list[LoraAdapter], p: float, seed: int) -> None:
    a = merge(adapters[:1], "dare_linear", {"p": p, "seed": seed})
    b = merge(adapters[:1], "dare_linear", {"p": p, "seed": seed})
    for key in KEYS:
        da, ref = _dense(a, key), _np_deltas(adapters[:1], key)[0]
        np.testing.assert_array_equal(da, _dense(b, key))  # same seed, same masks
        kept = da != 0
        np.testing.assert_allclose(da[kept], ref[kept] / (1 - p), rtol=1e-4, atol=1e-5)  # survivors rescaled


@SETTINGS
@given(adapter_sets(), weights_st)
def test_cat_is_exact(adapters: list[LoraAdapter], w: list[float]) -> None:
    w = w[: len(adapters)]
    res = merge(adapters, "cat", {"weights": w})
    for key in KEYS:
        mod = res.adapter.modules[key]
        ref = np.tensordot(np.array(w), _np_deltas(adapters, key), axes=1)
        got = mod.scaling * (mod.B.double().numpy() @ mod.A.double().numpy())
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert mod.rank == sum(a.modules[key].rank for a in adapters)


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 8), st.integers(1, 4), st.integers(1, 8), st.integers(0, 10_000))
def test_projection_is_idempotent_and_lands_in_the_subspace(n: int, k: int, r: int, m: int, seed: int) -> None:
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    P = Q.T.float().contiguous()  # k x n, orthonormal rows
    mod = LoraModule(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 1.5)
    once = project_lora(mod, P)
    twice = project_lora(once, P)
    torch.testing.assert_close(twice.A, once.A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(once.B, mod.B)
    assert once.scaling == mod.scaling
    # dW' = dW P^T P, computed independently in NumPy
    Pn = P.double().numpy()
    ref = mod.delta().double().numpy() @ Pn.T @ Pn
    np.testing.assert_allclose(once.delta().double().numpy(), ref, atol=1e-4, rtol=1e-4)
    assert lora_energy(once) <= lora_energy(mod) * (1 + 1e-6) + 1e-9  # a projection never adds energy
    if k == n:  # projecting onto the whole space changes nothing
        torch.testing.assert_close(once.A, mod.A, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- statistics
@st.composite
def sample_sets(draw: st.DrawFn) -> tuple[list[torch.Tensor], int]:
    n = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    return [torch.randn(t, n, generator=g, dtype=torch.float64) for t in lengths], n


@SETTINGS
@given(sample_sets(), st.randoms(use_true_random=False))
def test_statistics_accumulate_over_any_split_of_the_samples(data: tuple[list[torch.Tensor], int], rnd) -> None:  # noqa: ANN001
    samples, n = data
    whole = stats_from_samples({"t": {"m": samples}})
    X = np.concatenate([s.numpy() for s in samples])
    np.testing.assert_allclose(whole.gram("t", "m").numpy(), X.T @ X, atol=1e-10)
    np.testing.assert_allclose(whole.sum("t", "m").numpy(), X.sum(0), atol=1e-10)
    assert whole.count("t", "m") == X.shape[0]
    np.testing.assert_allclose(whole.second_moment("t", "m").numpy(), X.T @ X / X.shape[0], atol=1e-10)
    # a random split into two batches (in shuffled order) accumulates to the same statistics
    order = list(range(len(samples)))
    rnd.shuffle(order)
    cut = rnd.randint(0, len(order))
    parts = stats_from_samples({"p1": {"m": [samples[i] for i in order[:cut]] or [torch.zeros(0, n, dtype=torch.float64)]},
                                "p2": {"m": [samples[i] for i in order[cut:]] or [torch.zeros(0, n, dtype=torch.float64)]}})
    torch.testing.assert_close(parts.gram("p1", "m") + parts.gram("p2", "m"), whole.gram("t", "m"))
    torch.testing.assert_close(parts.sum("p1", "m") + parts.sum("p2", "m"), whole.sum("t", "m"))
    assert parts.count("p1", "m") + parts.count("p2", "m") == whole.count("t", "m")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tinymodels import write_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = write_tiny_model(tmp_path_factory.mktemp("tiny"), "bert")
    return AutoModelForSequenceClassification.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


TEXTS = ["alpha bravo red", "charlie", "delta echo foxtrot golf hotel", "india juliet", "kilo lima mike november oscar papa",
         "quebec", "romeo sierra tango", "uniform victor whiskey xray"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.integers(1, 8), st.booleans())
def test_streaming_statistics_do_not_depend_on_the_batch_size(tiny, batch_size: int, include_padding: bool) -> None:  # noqa: ANN001
    """Accumulating batch by batch gives the one-batch statistics. Counting padding is only batch-independent
    with fixed-length padding (the reference's setting); the float32 forward pass itself differs by ~1e-6
    between padded shapes, hence the tolerance."""
    model, tok = tiny
    kw = dict(n_samples=8, max_length=12, include_padding=include_padding, pad_to_max_length=include_padding,
              dtype=torch.float64)
    one = collect_statistics(model, tok, {"a": TEXTS}, ["query", "value"], batch_size=8, **kw)
    streamed = collect_statistics(model, tok, {"a": TEXTS}, ["query", "value"], batch_size=batch_size, **kw)
    for group in one.groups:
        assert streamed.count("a", group) == one.count("a", group)
        assert one.count("a", group) == (8 * 12 if include_padding else sum(min(len(tok(t)["input_ids"]), 12) for t in TEXTS))
        for kind in ("gram", "sum", "sample_means"):
            torch.testing.assert_close(getattr(streamed, kind)("a", group), getattr(one, kind)("a", group), atol=1e-5, rtol=1e-4)
