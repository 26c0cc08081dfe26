from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodels import write_tiny_model

from osrm_lora.backbone import (
    HeadInfo,
    default_target_modules,
    head_module_name,
    head_state,
    load_classifier,
    load_head,
    load_tokenizer,
    resolve_model_path,
    resolve_module_key,
    save_head,
    set_head,
)
from osrm_lora.errors import OsrmError
from osrm_lora.model.keys import linear_targets


@pytest.mark.parametrize(
    "arch, expected_targets, expected_head",
    [("bert", ["query", "value"], "classifier"), ("roberta", ["query", "value"], "classifier"),
     ("t5", ["q", "v"], "classification_head"), ("llama", ["q_proj", "v_proj"], "score")],
)
def test_target_modules_resolve_per_architecture(tmp_path: Path, arch: str, expected_targets: list[str], expected_head: str) -> None:
    path = write_tiny_model(tmp_path / arch, arch)
    tok = load_tokenizer(str(path))
    model = load_classifier(str(path), 3, pad_token_id=tok.pad_token_id)
    assert default_target_modules(model.config.model_type) == expected_targets
    keys = list(linear_targets(model, expected_targets))
    # two layers x two targets (T5: encoder and decoder self/cross attention all have q and v)
    assert len(keys) >= 4 and all(k.rsplit(".", 1)[-1] in expected_targets for k in keys)
    assert head_module_name(model) == expected_head
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_architecture_and_missing_targets_are_clear(tiny_bert: Path) -> None:
    with pytest.raises(OsrmError, match="pass target_modules explicitly"):
        default_target_modules("my-new-arch")
    model = load_classifier(str(tiny_bert), 2)
    with pytest.raises(OsrmError, match="no linear module named"):
        linear_targets(model, ["q_proj"])


def test_resolve_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(OsrmError, match="does not exist"):
        resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OsrmError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")
    assert resolve_model_path("someorg/some-model") == "someorg/some-model"  # Hub ids pass through


def test_embedded_default_resolves() -> None:
    path = Path(resolve_model_path("default"))
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


def test_head_swap_round_trip_gives_identical_logits(tiny_bert: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_bert))
    torch.manual_seed(1)
    m5 = load_classifier(str(tiny_bert), 5).eval()
    state = head_state(m5)
    info = HeadInfo("t", "classification", "accuracy", tuple("abcde"), 5, "classifier", str(tiny_bert))
    save_head(tmp_path, state, info)
    loaded, info2 = load_head(tmp_path)
    assert info2 == info
    m2 = load_classifier(str(tiny_bert), 2).eval()  # a different head shape, swapped in
    set_head(m2, loaded, 5, "classification")
    batch = tok(["alpha bravo", "red green blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(m5(**batch).logits, m2(**batch).logits)


def test_head_from_another_model_is_refused(tiny_bert: Path) -> None:
    m = load_classifier(str(tiny_bert), 2)
    with pytest.raises(OsrmError, match="does not fit"):
        set_head(m, {"classifier.weight": torch.zeros(2, 7), "classifier.bias": torch.zeros(2)}, 2, "classification")


def test_module_key_prefix_resolution(tiny_bert: Path) -> None:
    m = load_classifier(str(tiny_bert), 2)
    full = "bert.encoder.layer.0.attention.self.query"
    assert resolve_module_key(m, full) == full
    assert resolve_module_key(m, "encoder.layer.0.attention.self.query") == full
    with pytest.raises(OsrmError, match="another base model"):
        resolve_module_key(m, "model.layers.0.self_attn.q_proj")
