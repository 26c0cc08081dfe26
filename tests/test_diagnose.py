"""Interference diagnostics from Gram matrices vs. shifts measured on real module inputs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from osrm_lora.adapters import LoraAdapter, LoraModule, save_adapter
from osrm_lora.diagnose import interference_matrix, run_diagnose, save_interference, shift_energy
from osrm_lora.errors import OsrmError
from osrm_lora.stats import collect_statistics

WORDS = [f"w{i}" for i in range(60)]
KEYS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = BertForSequenceClassification(cfg).double().eval()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    rnd = random.Random(0)
    texts = {t: [" ".join(rnd.choice(WORDS[lo:lo + 20]) for _ in range(rnd.randint(2, 9))) for _ in range(6)]
             for t, lo in (("a", 0), ("b", 20), ("c", 40))}
    store = collect_statistics(model, tok, texts, ["query", "value"], n_samples=100, batch_size=4,
                               dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    adapters = {
        t: LoraAdapter({k: LoraModule(torch.randn(4, 32, generator=g, dtype=torch.float64),
                                      torch.randn(32, 4, generator=g, dtype=torch.float64), 2.0) for k in KEYS},
                       {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}, name=t)
        for t in texts
    }
    return model, tok, texts, store, adapters


def captured_inputs(model, tok, texts):
    """Real non-padding inputs of every target module, captured with the test's own hooks."""
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
    handles = []
    for k in KEYS:
        def hook(mod, args, k=k):
            inputs[k].append(args[0].detach())
        handles.append(model.get_submodule(k).register_forward_pre_hook(hook))
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    mask = enc["attention_mask"].bool()
    return {k: v[0][mask] for k, v in inputs.items()}


def test_interference_from_gram_equals_measured_shifts(setup):
    model, tok, texts, store, adapters = setup
    result = interference_matrix(adapters, store)
    tasks = result["tasks"]
    assert tasks == ["a", "b", "c"] and result["modules"] == sorted(KEYS)
    measured = {t: captured_inputs(model, tok, texts[t]) for t in tasks}
    raw = torch.zeros(3, 3, dtype=torch.float64)
    for i, ti in enumerate(tasks):
        for j, tj in enumerate(tasks):
            for k in KEYS:
                mod = adapters[ti].modules[k]
                Hj = measured[tj][k]
                shift = mod.scaling * (Hj @ mod.A.T) @ mod.B.T  # dW_i h for every token of task j
                e = float((shift ** 2).sum(1).mean())
                assert result["per_module"][k]["raw"][i][j] == pytest.approx(e, rel=1e-9)
                raw[i, j] += e
    torch.testing.assert_close(torch.tensor(result["raw"], dtype=torch.float64), raw, rtol=1e-9, atol=0)
    ratio = raw / raw.diagonal().unsqueeze(0)
    torch.testing.assert_close(torch.tensor(result["ratio"], dtype=torch.float64), ratio, rtol=1e-9, atol=0)
    assert all(result["ratio"][i][i] == pytest.approx(1.0) for i in range(3))


def test_shift_energy_factor_form_equals_dense():
    g = torch.Generator().manual_seed(0)
    mod = LoraModule(torch.randn(3, 12, generator=g), torch.randn(20, 3, generator=g), 1.5)
    M = torch.randn(50, 12, generator=g, dtype=torch.float64)
    S = M.T @ M / 50
    dW = mod.scaling * mod.B.double() @ mod.A.double()
    assert shift_energy(mod, S) == pytest.approx(float(torch.trace(dW @ S @ dW.T)), rel=1e-10)
    with pytest.raises(OsrmError, match="does not fit"):
        shift_energy(mod, torch.eye(5))


def test_osrm_adapters_do_not_interfere(setup):
    """Adapters whose A reads only directions the other tasks do not use have ~0 off-diagonal ratio."""
    _, _, _, store, adapters = setup
    from osrm_lora.osrm import compute_osrm_A

    A_all = compute_osrm_A(store, store.tasks, 4, "paper")
    osrm = {t: LoraAdapter({k: LoraModule(A_all[t][k].double(), m.B, m.scaling) for k, m in ad.modules.items()},
                           ad.config, t) for t, ad in adapters.items()}
    res_osrm, res_std = interference_matrix(osrm, store), interference_matrix(adapters, store)
    assert res_osrm["mean_offdiag_ratio"] < 0.1 * res_std["mean_offdiag_ratio"]


def test_save_and_run_diagnose(setup, tmp_path):
    _, _, _, store, adapters = setup
    store.save(tmp_path / "stats")
    dirs = []
    for t, ad in adapters.items():
        save_adapter(ad.to(dtype=torch.float32), tmp_path / "paper_frozen" / t)
        dirs.append(str(tmp_path / "paper_frozen" / t))
    res = run_diagnose(dirs, str(tmp_path / "stats"), str(tmp_path / "diag"))
    data = json.loads((tmp_path / "diag" / "interference.json").read_text())
    assert data["tasks"] == ["a", "b", "c"] and data["label"] == "paper_frozen"
    png = (tmp_path / "diag" / "interference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ref = interference_matrix(adapters, store)
    torch.testing.assert_close(torch.tensor(res["ratio"]), torch.tensor(ref["ratio"]), rtol=1e-4, atol=1e-6)
    (tmp_path / "diag" / "keep.txt").write_text("x")
    save_interference(res, tmp_path / "diag", title="own, A frozen")  # does not wipe other files
    assert (tmp_path / "diag" / "keep.txt").exists()
    with pytest.raises(OsrmError, match="not in the statistics store"):
        interference_matrix({"zzz": adapters["a"]}, store)
