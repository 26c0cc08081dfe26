"""OSRM initialisation modes against NumPy/SciPy references, PEFT application, post-hoc projection."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import scipy.linalg
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from osrm_lora.adapters import LoraAdapter, LoraModule, load_adapter, save_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.osrm import (
    A_drift,
    adapter_A_drift,
    apply_A_to_peft,
    code_mode_A,
    compute_osrm_A,
    lora_energy,
    own_mode_A,
    paper_mode_A,
    project_adapter,
    project_lora,
    run_project,
    standard_A,
)
from osrm_lora.stats import StatsStore, collect_statistics, stats_from_samples

N, T, DIM_TASK = 16, 3, 4
WORDS = [f"w{i}" for i in range(60)]


def projector(rows: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(np.asarray(rows, dtype=np.float64).T)
    return q @ q.T


def assert_same_subspace(A: np.ndarray, B: np.ndarray, tol: float = 1e-8) -> None:
    """Principal angles ~ 0  <=>  equal orthogonal projectors."""
    cos = scipy.linalg.svdvals(scipy.linalg.orth(np.asarray(A).T).T @ scipy.linalg.orth(np.asarray(B).T))
    assert cos.min() > 1 - tol, f"largest principal angle cos={cos.min()}"
    np.testing.assert_allclose(projector(A), projector(B), atol=np.sqrt(tol) * 10)


def synthetic(noise: float = 0.0, seed: int = 0):
    """Each task's features live (up to ``noise``) in its own random DIM_TASK-dim subspace of R^N."""
    g = torch.Generator().manual_seed(seed)
    bases = {f"t{j}": torch.linalg.qr(torch.randn(N, DIM_TASK, generator=g, dtype=torch.float64))[0].T
             for j in range(T)}
    samples = {}
    for t, U in bases.items():
        xs = []
        for _ in range(6):
            k = int(torch.randint(3, 9, (1,), generator=g))
            coef = torch.randn(k, DIM_TASK, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5])
            # offset inside the subspace so task means are not zero
            xs.append(coef @ U + U.sum(0) + noise * torch.randn(k, N, generator=g, dtype=torch.float64))
        samples[t] = {"m": xs}
    return bases, samples, stats_from_samples(samples)


def H(samples, task):
    return torch.cat(samples[task]["m"]).numpy()


@pytest.mark.parametrize("mode", ["code", "paper", "own"])
def test_modes_orthonormal_and_orthogonal_to_other_tasks(mode):
    _, samples, store = synthetic()
    r = 4
    A_all = compute_osrm_A(store, store.tasks, r, mode)
    for i in store.tasks:
        A = A_all[i]["m"].double().numpy()
        assert A.shape == (r, N)
        np.testing.assert_allclose(A @ A.T, np.eye(r), atol=1e-6)
        for j in store.tasks:
            Hj = H(samples, j)
            if j == i:
                continue
            if mode == "code":  # only the other tasks' MEAN vectors are annihilated
                mean_j = np.mean([x.mean(0).numpy() for x in samples[j]["m"]], axis=0)
                assert np.linalg.norm(A @ mean_j) < 1e-6 * np.linalg.norm(mean_j)
            else:
                rel = np.linalg.norm(A @ Hj.T) ** 2 / np.linalg.norm(Hj) ** 2
                assert rel < 1e-5, (i, j, rel)


def test_code_mode_matches_numpy_reference():
    rng = np.random.default_rng(0)
    # unique subspace when the null space has exactly r dimensions
    X = rng.normal(size=(5, 9))
    A = code_mode_A(torch.tensor(X), 4).numpy()
    Vt = np.linalg.svd(X, full_matrices=True)[2]
    assert_same_subspace(A, Vt[-4:])
    np.testing.assert_allclose(A @ A.T, np.eye(4), atol=1e-10)
    # larger null space: rows still lie in it, and the whole null space agrees with NumPy's
    A2 = code_mode_A(torch.tensor(X[:2]), 3).numpy()
    assert np.abs(A2 @ X[:2].T).max() < 1e-10
    assert_same_subspace(code_mode_A(torch.tensor(X[:2]), 7).numpy(), np.linalg.svd(X[:2])[2][-7:])
    # sign convention: largest-magnitude entry of each row is positive
    assert all(row[np.argmax(np.abs(row))] > 0 for row in A)


def test_code_mode_reference_on_bert_with_padding_included():
    """Reference pipeline: samples padded to max_length, hook averages over ALL positions and samples;
    other tasks' means stacked; full SVD; last r right singular vectors. With r = n - (T-1) the
    subspace is determined by the data, so it can be compared exactly."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = BertForSequenceClassification(cfg).double().eval()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    rnd = random.Random(0)
    texts = {t: [" ".join(rnd.choice(WORDS[lo:lo + 20]) for _ in range(rnd.randint(2, 9))) for _ in range(5)]
             for t, lo in (("a", 0), ("b", 20), ("c", 40))}
    store = collect_statistics(model, tok, texts, ["query", "value"], n_samples=5, max_length=16, batch_size=2,
                               include_padding=True, pad_to_max_length=True, dtype=torch.float64)
    r = 32 - (len(texts) - 1)
    A_all = compute_osrm_A(store, list(texts), r, "code")
    for layer in range(2):
        means = {}
        for t, tx in texts.items():  # independent: batch of 1, padded to max_length, as the reference
            per_sample = []
            for s in tx:
                enc = tok([s], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
                with torch.no_grad():
                    hs = model(**enc, output_hidden_states=True).hidden_states[layer]
                per_sample.append(hs[0].mean(0).numpy())
            means[t] = np.mean(per_sample, axis=0)
        for i in texts:
            X = np.stack([means[j] for j in texts if j != i])
            ref = np.linalg.svd(X, full_matrices=True)[2][-r:]
            key = f"bert.encoder.layer.{layer}.attention.self.value"
            assert_same_subspace(A_all[i][key].double().numpy(), ref, tol=1e-6)
            assert A_all[i][key] is A_all[i][key.replace("value", "query")]  # one input group, one A


def test_paper_mode_matches_scipy_smallest_eigenvectors():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(40, 12))
    S = M.T @ M / 40
    A = paper_mode_A(torch.tensor(S), 5).numpy()
    w, V = scipy.linalg.eigh(S)
    assert_same_subspace(A, V[:, :5].T)
    np.testing.assert_allclose(A @ A.T, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(np.trace(A @ S @ A.T), w[:5].sum(), rtol=1e-10)
    # in compute_osrm_A, S_{-i} is the sum of the other tasks' per-task second moments
    _, samples, store = synthetic(noise=0.05)
    A_all = compute_osrm_A(store, store.tasks, 3, "paper")
    S_other = sum(H(samples, j).T @ H(samples, j) / len(H(samples, j)) for j in ("t1", "t2"))
    assert_same_subspace(A_all["t0"]["m"].double().numpy(), scipy.linalg.eigh(S_other)[1][:, :3].T, tol=1e-6)


def test_own_mode_matches_scipy_generalised_eigh_and_beats_paper():
    _, samples, store = synthetic(noise=0.05)
    r, ridge = 3, 1e-3
    for i in store.tasks:
        S_own = H(samples, i).T @ H(samples, i) / len(H(samples, i))
        S_oth = sum(H(samples, j).T @ H(samples, j) / len(H(samples, j)) for j in store.tasks if j != i)
        eps = ridge * np.trace(S_oth) / N
        w, V = scipy.linalg.eigh(S_own, S_oth + eps * np.eye(N))
        A_own = compute_osrm_A(store, store.tasks, r, "own", ridge=ridge)[i]["m"].double().numpy()
        np.testing.assert_allclose(A_own @ A_own.T, np.eye(r), atol=1e-6)
        assert_same_subspace(A_own, V[:, -r:].T, tol=1e-6)
        direct = own_mode_A(torch.tensor(S_own), torch.tensor(S_oth), r, ridge=ridge).numpy()
        assert_same_subspace(direct, V[:, -r:].T, tol=1e-10)
        A_pap = compute_osrm_A(store, store.tasks, r, "paper")[i]["m"].double().numpy()

        def ratio(A):
            return np.trace(A @ S_own @ A.T) / np.trace(A @ S_oth @ A.T)

        assert ratio(A_own) > 1.2 * ratio(A_pap)
        assert np.trace(A_own @ S_own @ A_own.T) > np.trace(A_pap @ S_own @ A_pap.T)


def test_standard_and_errors():
    g = torch.Generator().manual_seed(0)
    A = standard_A(8, 100, g)
    assert A.shape == (8, 100) and A.abs().max() <= 0.1 and A.std() > 0.04
    _, _, store = synthetic()
    with pytest.raises(OsrmError, match="rank"):
        compute_osrm_A(store, store.tasks, 17, "paper")
    with pytest.raises(OsrmError, match="unknown init mode"):
        compute_osrm_A(store, store.tasks, 2, "magic")
    with pytest.raises(OsrmError, match="at least two tasks"):
        compute_osrm_A(store, ["t0"], 2, "own")
    with pytest.raises(OsrmError, match="not in the statistics store"):
        compute_osrm_A(store, ["t0", "zz"], 2, "own")
    std = compute_osrm_A(store, ["t0"], 2, "standard", seed=3)
    assert std["t0"]["m"].shape == (2, N)


def test_apply_A_to_peft_sets_A_keeps_outputs_and_freezes():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    base = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    keys = [f"bert.encoder.layer.{l}.attention.self.{m}" for l in range(2) for m in ("query", "value")]
    g = torch.Generator().manual_seed(1)
    A_map = {k: torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T.contiguous() for k in keys}
    done = apply_A_to_peft(peft_model, A_map, freeze_A=True)
    assert sorted(done) == sorted(keys)
    for k in keys:
        layer = peft_model.get_submodule("base_model.model." + k)
        torch.testing.assert_close(layer.lora_A["default"].weight, A_map[k])
        assert not layer.lora_A["default"].weight.requires_grad
        assert layer.lora_B["default"].weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ref)
    with pytest.raises(OsrmError, match="no A given"):
        apply_A_to_peft(peft_model, {keys[0]: A_map[keys[0]]})
    with torch.no_grad():
        peft_model.get_submodule("base_model.model." + keys[0]).lora_B["default"].weight.fill_(1.0)
    with pytest.raises(OsrmError, match="not zero"):
        apply_A_to_peft(peft_model, A_map)


def test_A_drift():
    A0 = torch.ones(2, 4)
    assert A_drift(A0, A0) == 0.0
    assert A_drift(A0, 1.1 * A0) == pytest.approx(0.1)
    a0 = LoraAdapter({"x": LoraModule(A0, torch.zeros(3, 2), 2.0)}, {})
    a1 = LoraAdapter({"x": LoraModule(0.5 * A0, torch.ones(3, 2), 2.0)}, {})
    assert adapter_A_drift(a0, a1) == {"x": pytest.approx(0.5), "mean": pytest.approx(0.5)}


def random_module(m=10, n=N, r=3, seed=0, s=2.0):
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(r, n, generator=g, dtype=torch.float64),
                      torch.randn(m, r, generator=g, dtype=torch.float64), s)


def dense(mod) -> torch.Tensor:
    return mod.scaling * (mod.B.double() @ mod.A.double())


def test_projection_identity_on_row_space_and_exact_removal_otherwise():
    mod = random_module()
    dW = dense(mod)
    row_basis = torch.linalg.qr(mod.A.T)[0].T  # orthonormal rows spanning the update's row space
    same = project_lora(mod, row_basis)
    torch.testing.assert_close(dense(same), dW)
    assert same.scaling == mod.scaling and same.B is not mod.B
    torch.testing.assert_close(same.B, mod.B)
    g = torch.Generator().manual_seed(5)
    sub = torch.linalg.qr(torch.randn(N, 5, generator=g, dtype=torch.float64))[0].T
    proj = project_lora(mod, sub)
    P = sub.T @ sub
    torch.testing.assert_close(dense(proj), dW @ P)
    removed = dW - dense(proj)
    torch.testing.assert_close(removed @ sub.T, torch.zeros(10, 5, dtype=torch.float64), atol=1e-10, rtol=0)
    # an update whose row space is orthogonal to the basis is removed entirely
    ortho = torch.linalg.qr(torch.cat([row_basis.T, torch.randn(N, 4, generator=g, dtype=torch.float64)], 1))[0].T[3:]
    torch.testing.assert_close(dense(project_lora(mod, ortho)), torch.zeros_like(dW), atol=1e-10, rtol=0)
    # energy report in factor form equals the dense one
    adapter = LoraAdapter({"m": mod}, {"r": 3, "lora_alpha": 6})
    projected, report = project_adapter(adapter, {"m": sub})
    kept = float((dW @ P).norm() ** 2 / dW.norm() ** 2)
    assert report["modules"]["m"] == pytest.approx(kept, rel=1e-9)
    assert report["energy_kept"] == pytest.approx(kept, rel=1e-9)
    assert lora_energy(mod) == pytest.approx(float(dW.norm() ** 2), rel=1e-9)
    # the reference script's bug applies s * dW'
    bug = project_lora(mod, sub, reference_scaling_bug=True)
    torch.testing.assert_close(dense(bug), mod.scaling * (dW @ P))


def test_run_project_end_to_end(tmp_path):
    bases, samples, store = synthetic(noise=0.05)
    store.save(tmp_path / "stats")
    dirs = []
    for k, t in enumerate(store.tasks):
        mod = random_module(seed=k)
        ad = LoraAdapter({"m": LoraModule(mod.A.float(), mod.B.float(), 2.0)},
                         {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["m"]}, name=t)
        d = tmp_path / "runs" / t
        save_adapter(ad, d)
        (d / "head.json").write_text(json.dumps({"task": t}))
        (d / "head.safetensors").write_bytes(b"head-" + t.encode())
        dirs.append(str(d))
    report = run_project(dirs, str(tmp_path / "stats"), str(tmp_path / "proj"), rank=4, mode="paper")
    A_all = compute_osrm_A(StatsStore.load(tmp_path / "stats"), store.tasks, 4, "paper")
    for t in store.tasks:
        out = tmp_path / "proj" / t
        assert (out / "head.safetensors").read_bytes() == b"head-" + t.encode()
        assert json.loads((out / "head.json").read_text())["task"] == t
        src, got = load_adapter(tmp_path / "runs" / t), load_adapter(out)
        P = A_all[t]["m"].double().T @ A_all[t]["m"].double()
        torch.testing.assert_close(got.modules["m"].delta().double(), src.modules["m"].delta().double() @ P,
                                   atol=1e-5, rtol=1e-4)
        assert 0 < report["tasks"][t]["energy_kept"] < 1
    assert json.loads((tmp_path / "proj" / "projection.json").read_text())["mode"] == "paper"
    bad = tmp_path / "runs" / "unknown_task"
    save_adapter(load_adapter(dirs[0]), bad)
    with pytest.raises(OsrmError, match="name the adapter directory"):
        run_project([dirs[0], str(bad)], str(tmp_path / "stats"), str(tmp_path / "p2"), rank=4, mode="paper")
    assert not (tmp_path / "p2").exists()


def test_explicit_device_gives_the_same_subspaces() -> None:
    """The eigensolves may run on another device (GPU); on CPU an explicit device changes nothing."""
    from osrm_lora.osrm import compute_osrm_A
    from osrm_lora.stats import stats_from_samples

    g = torch.Generator().manual_seed(0)
    samples = {t: {"m": [torch.randn(7, 12, generator=g, dtype=torch.float64) for _ in range(4)]} for t in ("a", "b", "c")}
    store = stats_from_samples(samples)
    for mode in ("paper", "own"):
        ref = compute_osrm_A(store, ["a", "b", "c"], 3, mode)
        dev = compute_osrm_A(store, ["a", "b", "c"], 3, mode, device="cpu")
        for t in ref:
            for k in ref[t]:
                assert dev[t][k].device.type == "cpu" and torch.allclose(ref[t][k], dev[t][k])
