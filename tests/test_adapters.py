"""Tests for osrm_lora.adapters: PEFT round trips, scaling, clear errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from osrm_lora.adapters import (
    LoraAdapter,
    LoraModule,
    check_compatible,
    load_adapter,
    save_adapter,
)
from osrm_lora.errors import AdapterError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100)
    return BertForSequenceClassification(cfg).eval()


def peft_adapter_dir(tmp_path: Path, name: str = "a", seed: int = 1, **kw) -> tuple[Path, object]:
    from peft import LoraConfig, get_peft_model

    base = tiny_bert(0)
    kw.setdefault("target_modules", ["query", "value"])
    cfg = LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    d = tmp_path / name
    pm.save_pretrained(str(d))
    return d, pm.eval()


def test_load_matches_peft_delta(tmp_path):
    d, pm = peft_adapter_dir(tmp_path, rank_pattern={"bert.encoder.layer.0.attention.self.query": 2},
                             alpha_pattern={"bert.encoder.layer.1.attention.self.value": 3})
    ad = load_adapter(d)
    assert ad.name == "a"
    assert set(ad.modules) == {f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")}
    q0 = ad.modules["bert.encoder.layer.0.attention.self.query"]
    assert q0.rank == 2 and q0.scaling == pytest.approx(4.0)
    assert ad.modules["bert.encoder.layer.1.attention.self.value"].scaling == pytest.approx(3 / 4)
    assert ad.modules["bert.encoder.layer.0.attention.self.value"].scaling == pytest.approx(2.0)
    for key, mod in ad.modules.items():
        layer = pm.get_submodule("base_model.model." + key)
        torch.testing.assert_close(mod.delta(), layer.get_delta_weight("default"))
        assert mod.in_features == 32 and mod.out_features == 32


def test_rslora_scaling(tmp_path):
    d, pm = peft_adapter_dir(tmp_path, use_rslora=True, r=4, lora_alpha=6)
    ad = load_adapter(d)
    for key, mod in ad.modules.items():
        assert mod.scaling == pytest.approx(6 / math.sqrt(4))
        torch.testing.assert_close(mod.delta(), pm.get_submodule("base_model.model." + key).get_delta_weight("default"))


def test_round_trip_with_per_module_ranks_loads_in_plain_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(3)
    mods = {
        "bert.encoder.layer.0.attention.self.query": LoraModule(torch.randn(3, 32), torch.randn(32, 3), 0.5),
        "bert.encoder.layer.0.attention.self.value": LoraModule(torch.randn(5, 32), torch.randn(32, 5), 0.25),
        "bert.encoder.layer.1.attention.self.query": LoraModule(torch.randn(3, 32), torch.randn(32, 3), 0.5),
        "bert.encoder.layer.1.intermediate.dense": LoraModule(torch.randn(2, 32), torch.randn(37, 2), 1.7),
    }
    ad = LoraAdapter(mods, {"peft_type": "LORA", "base_model_name_or_path": "tiny"}, name="x")
    out = tmp_path / "saved"
    save_adapter(ad, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["r"] == 3
    back = load_adapter(out)
    for k, m in mods.items():
        torch.testing.assert_close(back.modules[k].A, m.A)
        torch.testing.assert_close(back.modules[k].B, m.B)
        assert back.modules[k].scaling == pytest.approx(m.scaling)
    # plain PEFT reproduces the deltas
    base = tiny_bert(0)
    ids = torch.randint(0, 100, (2, 7))
    ref = tiny_bert(0)
    with torch.no_grad():
        for k, m in mods.items():
            ref.get_submodule(k).weight += m.delta()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_dora_bias_modules_to_save_loaded_faithfully(tmp_path):
    d, _ = peft_adapter_dir(tmp_path, "dora", use_dora=True, modules_to_save=["classifier"])
    ad = load_adapter(d)
    assert ad.uses_dora and ad.has_modules_to_save
    assert "classifier.weight" in ad.extra
    assert any(k.endswith("lora_magnitude_vector") for k in ad.extra)
    out = tmp_path / "dora2"
    save_adapter(ad, out)
    back = load_adapter(out)
    assert set(back.extra) == set(ad.extra)
    for k in ad.extra:
        torch.testing.assert_close(back.extra[k], ad.extra[k])
    d2, _ = peft_adapter_dir(tmp_path, "bias", lora_bias=True)
    ad2 = load_adapter(d2)
    assert ad2.uses_lora_bias and not ad2.uses_dora
    assert sum(k.endswith("lora_B.bias") for k in ad2.extra) == 4


def test_bin_loaded_with_weights_only(tmp_path):
    d, _ = peft_adapter_dir(tmp_path)
    ref = load_adapter(d)
    from safetensors.torch import load_file

    sd = load_file(str(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    torch.save(sd, d / "adapter_model.bin")
    ad = load_adapter(d)
    for k in ref.modules:
        torch.testing.assert_close(ad.modules[k].delta(), ref.modules[k].delta())
    torch.save({"x": object()}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only"):
        load_adapter(d)


def _msg_one_line(exc: pytest.ExceptionInfo) -> str:
    s = str(exc.value)
    assert "\n" not in s
    return s


def test_errors(tmp_path):
    with pytest.raises(AdapterError, match="does not exist") as e:
        load_adapter(tmp_path / "nope")
    _msg_one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(tmp_path / "empty")
    d, _ = peft_adapter_dir(tmp_path)
    # corrupt safetensors
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(d)
    # non-LoRA peft type
    d2, _ = peft_adapter_dir(tmp_path, "b")
    cfg = json.loads((d2 / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d2 / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="not LORA"):
        load_adapter(d2)
    # NaN and shape mismatch
    d3, _ = peft_adapter_dir(tmp_path, "c")
    sd = {"base_model.model.m.lora_A.weight": torch.randn(4, 8), "base_model.model.m.lora_B.weight": torch.randn(8, 4)}
    sd["base_model.model.m.lora_A.weight"][0, 0] = float("nan")
    save_file(sd, str(d3 / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(d3)
    sd = {"base_model.model.m.lora_A.weight": torch.randn(4, 8), "base_model.model.m.lora_B.weight": torch.randn(8, 3)}
    save_file(sd, str(d3 / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="different ranks") as e:
        load_adapter(d3)
    _msg_one_line(e)


def _ad(mods: dict[str, tuple[int, int, int]], base: str = "b", seed: int = 0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({k: LoraModule(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 1.0)
                        for k, (m, r, n) in mods.items()}, {"base_model_name_or_path": base})


def test_check_compatible():
    a = _ad({"x": (4, 2, 5), "y": (3, 2, 3)})
    b = _ad({"x": (4, 3, 5), "y": (3, 1, 3)})  # ranks may differ
    check_compatible([a, b])
    with pytest.raises(AdapterError, match="no adapters"):
        check_compatible([])
    with pytest.raises(AdapterError, match="base model"):
        check_compatible([a, _ad({"x": (4, 2, 5), "y": (3, 2, 3)}, base="other")])
    with pytest.raises(AdapterError, match="different modules"):
        check_compatible([a, _ad({"x": (4, 2, 5)})])
    with pytest.raises(AdapterError, match="shape"):
        check_compatible([a, _ad({"x": (4, 2, 6), "y": (3, 2, 3)})])
    c = _ad({"x": (4, 2, 5), "y": (3, 2, 3)})
    c.modules["x"].B[0, 0] = float("inf")
    with pytest.raises(AdapterError, match="NaN/Inf"):
        check_compatible([a, c])
