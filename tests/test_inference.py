"""predict / evaluate / export on a trained toy adapter (tiny random BERT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodels import keyword_task

from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.errors import OsrmError
from osrm_lora.inference import export_models, load_task_model, predict_texts
from osrm_lora.train import train_task


@pytest.fixture(scope="module")
def adapters(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    cfg = TrainSettings(epochs=1, batch_size=16, lr=5e-3, max_length=16)
    out = []
    for name, kws, _labels in (("kw", ["red"], 2), ("kw3", ["blue"], 2)):
        t = keyword_task(name, kws, n=48)
        train_task(t, root / name, model=str(tiny_bert), train=cfg, lora=LoraSettings(rank=2, alpha=4), seed=1)
        out.append(root / name)
    return out


def test_export_loads_with_plain_transformers_and_matches(tiny_bert: Path, adapters: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    paths = export_models([str(a) for a in adapters], str(tmp_path / "exp"), model=str(tiny_bert))
    texts = ["alpha red golf", "bravo", "blue blue zulu"]
    for adir, path in zip(adapters, paths):
        ours, tok, _ = load_task_model(adir, model=str(tiny_bert))
        plain = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        plain_tok = AutoTokenizer.from_pretrained(str(path))
        with torch.no_grad():
            a = ours(**tok(texts, padding=True, return_tensors="pt")).logits
            b = plain(**plain_tok(texts, padding=True, return_tensors="pt")).logits
        assert torch.allclose(a, b, atol=1e-6)
        assert plain.config.id2label == {0: "no", 1: "yes"}


def test_export_with_merged_adapter_uses_merged_update(tiny_bert: Path, adapters: list[Path], tmp_path: Path) -> None:
    from osrm_lora.merge import run_merge

    run_merge([str(a) for a in adapters], "task_arithmetic", ["scaling=1.0"], str(tmp_path / "merged"))
    own, tok, _ = load_task_model(adapters[0], model=str(tiny_bert))
    merged, _, _ = load_task_model(adapters[0], merged=tmp_path / "merged", model=str(tiny_bert))
    batch = tok(["red alpha", "golf"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(own(**batch).logits, merged(**batch).logits)
    # merged = base + both deltas: equals folding the two adapters by hand
    from osrm_lora.adapters import load_adapter
    from osrm_lora.backbone import apply_deltas

    by_hand, _, _ = load_task_model(adapters[0], model=str(tiny_bert))
    apply_deltas(by_hand, load_adapter(adapters[1]).deltas())
    with torch.no_grad():
        assert torch.allclose(by_hand(**batch).logits, merged(**batch).logits, atol=1e-5)


def test_predict_returns_label_names(tiny_bert: Path, adapters: list[Path]) -> None:
    labels = predict_texts(str(adapters[0]), ["red alpha", "golf hotel"], model=str(tiny_bert))
    assert len(labels) == 2 and set(labels) <= {"no", "yes"}
    with pytest.raises(OsrmError, match="no texts"):
        predict_texts(str(adapters[0]), [], model=str(tiny_bert))


def test_adapter_dir_without_head_is_clear(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(OsrmError, match="no task head"):
        load_task_model(tmp_path / "a")


def test_merge_writes_a_card_that_names_inputs_and_hashes(adapters: list[Path], tmp_path: Path) -> None:
    from osrm_lora.fsutil import sha256_file
    from osrm_lora.merge import run_merge

    run_merge([str(a) for a in adapters], "ties", ["density=0.5", "scaling=0.8"], str(tmp_path / "m"))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "# Merged LoRA: ties" in card and '"density": 0.5' in card and '"scaling": 0.8' in card
    for a in adapters:
        assert sha256_file(a / "adapter_model.safetensors") in card
        assert str(a) in card
    assert "osrm-lora merge --method ties" in card
