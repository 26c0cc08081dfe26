from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodels import keyword_task

from osrm_lora.backbone import load_classifier, load_head, load_tokenizer, set_head
from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import read_json
from osrm_lora.train import build_peft_model, train_task

FAST = TrainSettings(epochs=2, batch_size=16, lr=5e-3, max_length=16, eval_batch_size=64)


def _logits(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_training_changes_only_lora_and_head_and_round_trips(tiny_bert: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    task = keyword_task("kw", ["red", "green"], n=64)
    out = tmp_path / "adapter"
    res = train_task(task, out, model=str(tiny_bert), train=FAST, lora=LoraSettings(rank=4, alpha=8), seed=3)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "head.safetensors").exists() and (out / "head.json").exists()
    metrics = read_json(out / "metrics.json")
    assert metrics["best_epoch"] in (1, 2) and len(metrics["history"]) == 2
    assert metrics["validation"] == max(h["validation"] for h in metrics["history"])
    assert res.test is not None and 0 <= res.test <= 100

    # The base weights are untouched: compare the saved adapter's base to the checkpoint.
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), "only LoRA tensors in the adapter"
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k), "B was trained"

    # Round trip with plain PEFT + the saved head reproduces the evaluation logits exactly.
    tok = load_tokenizer(str(tiny_bert))
    head, info = load_head(out)
    base = load_classifier(str(tiny_bert), info.num_labels)
    set_head(base, head, info.num_labels, info.problem_type)
    reference = load_classifier(str(tiny_bert), info.num_labels)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    texts = list(task.test.texts[:8])
    lora_logits = _logits(peft_model, tok, texts)
    # evaluating through our folded-delta path gives the same numbers
    from osrm_lora.inference import load_task_model

    folded, _, _ = load_task_model(out, model=str(tiny_bert))
    assert torch.allclose(lora_logits, _logits(folded, tok, texts), atol=1e-5)
    # and the base model itself differs (the adapter does something)
    set_head(reference, head, info.num_labels, info.problem_type)
    assert not torch.allclose(_logits(reference.eval(), tok, texts), lora_logits, atol=1e-6)


def test_only_trainable_parameters_change(tiny_bert: Path) -> None:
    model = load_classifier(str(tiny_bert), 2)
    peft_model = build_peft_model(model, LoraSettings(rank=2, alpha=4), "bert")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all((".lora_" in n) or (".classifier." in n) or (".pooler." in n) for n in trainable)
    assert any(".classifier." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    tok = load_tokenizer(str(tiny_bert))
    batch = tok(["alpha red", "bravo"], padding=True, return_tensors="pt")
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(peft_model(**batch).logits, torch.tensor([1, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in peft_model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n in trainable and ".lora_A." not in n:
            assert changed, n
        if n not in trainable:
            assert not changed, n


def test_seeded_training_is_bit_identical(tiny_bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    task = keyword_task("kw", ["red"], n=32)
    cfg = TrainSettings(epochs=1, batch_size=8, lr=1e-3, max_length=16)
    for name in ("a", "b"):
        train_task(task, tmp_path / name, model=str(tiny_bert), train=cfg, lora=LoraSettings(rank=2, alpha=4), seed=7)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(tmp_path / "a" / "metrics.json")["validation"] == read_json(tmp_path / "b" / "metrics.json")["validation"]


def test_frozen_A_stays_put_and_drift_is_recorded(tiny_bert: Path, tmp_path: Path) -> None:
    task = keyword_task("kw", ["red"], n=32)
    cfg = TrainSettings(epochs=1, batch_size=8, lr=1e-2, max_length=16)
    train_task(task, tmp_path / "frozen", model=str(tiny_bert), train=cfg, lora=LoraSettings(rank=2, alpha=4), freeze_A=True)
    train_task(task, tmp_path / "free", model=str(tiny_bert), train=cfg, lora=LoraSettings(rank=2, alpha=4))
    assert read_json(tmp_path / "frozen" / "metrics.json")["a_drift_mean"] == 0.0
    assert read_json(tmp_path / "free" / "metrics.json")["a_drift_mean"] > 0.0
    with pytest.raises(OsrmError, match="nothing to train"):
        train_task(task, tmp_path / "x", model=str(tiny_bert), train=cfg, freeze_A=True, freeze_B=True)
    assert not (tmp_path / "x").exists()


def test_learns_a_separable_task_with_the_embedded_model(tmp_path: Path) -> None:
    """A real (small) pre-trained model learns a keyword task well above chance in one short run."""
    task = keyword_task("kw", ["red", "green"], n=96)
    cfg = TrainSettings(epochs=2, batch_size=16, lr=2e-3, max_length=16)
    res = train_task(task, tmp_path / "a", model="default", train=cfg, lora=LoraSettings(rank=4, alpha=8), seed=0)
    assert res.validation >= 80.0, res.history


def test_A_constrained_to_a_subspace_stays_inside_it(tiny_bert: Path, tmp_path: Path) -> None:
    from osrm_lora.adapters import load_adapter

    task = keyword_task("kw", ["red"], n=32)
    cfg = TrainSettings(epochs=1, batch_size=8, lr=1e-2, max_length=16)
    model = load_classifier(str(tiny_bert), 2)
    keys = [n for n, m in model.named_modules() if n.endswith((".query", ".value"))]
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(32, 6, generator=g))[0].T.contiguous()  # 6 x 32, orthonormal rows
    basis = {k: U for k in keys}
    init = {k: U[:2].contiguous() for k in keys}
    train_task(task, tmp_path / "a", model=str(tiny_bert), train=cfg, lora=LoraSettings(rank=2, alpha=4),
               init_A=init, A_subspace=basis)
    adapter = load_adapter(tmp_path / "a")
    moved = False
    for key, mod in adapter.modules.items():
        A = mod.A
        assert torch.allclose(A, A @ U.T @ U, atol=1e-5), key  # inside span(U)
        moved |= not torch.allclose(A, U[:2], atol=1e-4)
    assert moved, "A trained within the subspace"
