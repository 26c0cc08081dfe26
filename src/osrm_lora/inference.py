"""Use trained or merged adapters: evaluate on task splits, predict labels, export standalone models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osrm_lora.backbone import (
    HeadInfo,
    load_classifier,
    load_head,
    load_tokenizer,
    resolve_model_path,
    select_device,
    set_head,
)
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_dir, read_json

logger = logging.getLogger(__name__)


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Dense per-module updates (scaling included) of a PEFT LoRA adapter directory."""
    from osrm_lora.adapters import load_adapter

    return load_adapter(adapter_dir).deltas()


def _base_path(model: str | None, info: HeadInfo) -> str:
    if model in (None, "", "default") and info.base_model and Path(info.base_model).exists():
        return info.base_model
    return resolve_model_path(model)


def load_task_model(
    adapter_dir: str | Path,
    *,
    merged: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
) -> tuple[nn.Module, Any, HeadInfo]:
    """A plain sequence classifier for the adapter's task: base + (own or merged) update + task head."""
    state, info = load_head(adapter_dir)
    path = _base_path(model, info)
    tokenizer = load_tokenizer(path)
    net = load_classifier(path, info.num_labels, info.problem_type, device=select_device(device), pad_token_id=tokenizer.pad_token_id)
    set_head(net, state, info.num_labels, info.problem_type)
    from osrm_lora.backbone import apply_deltas

    apply_deltas(net, adapter_deltas(merged if merged is not None else adapter_dir))
    net.eval()
    return net, tokenizer, info


def _task_for(adapter_dir: str | Path, info: HeadInfo) -> Any:
    from osrm_lora.data import load_task

    metrics_path = Path(adapter_dir) / "metrics.json"
    spec = read_json(metrics_path).get("task_spec") if metrics_path.exists() else None
    return load_task(spec if spec else info.task)


def evaluate_adapters(
    adapter_dirs: Sequence[str],
    *,
    merged: str | None = None,
    split: str = "test",
    model: str | None = None,
    max_length: int = 128,
    device: str | None = None,
) -> dict[str, float]:
    """Score each adapter (own update, or the merged one) on its task's ``split``."""
    from osrm_lora.encoding import encode_split
    from osrm_lora.evaluate import evaluate

    if split not in ("train", "validation", "test"):
        raise OsrmError(f"unknown split {split!r}; use validation or test")
    scores: dict[str, float] = {}
    for adir in adapter_dirs:
        net, tok, info = load_task_model(adir, merged=merged, model=model, device=device)
        task = _task_for(adir, info)
        enc = encode_split(tok, task.split(split), max_length, task.problem_type == "regression")
        scores[task.name] = evaluate(net, tok, task, enc)
    return scores


@torch.no_grad()
def predict_texts(
    adapter_dir: str,
    texts: Sequence[str],
    *,
    merged: str | None = None,
    model: str | None = None,
    max_length: int = 128,
) -> list[str]:
    """Predicted label names (or regression values) for ``texts``."""
    if not texts:
        raise OsrmError("no texts to label; pass texts as arguments or '-' to read stdin")
    net, tok, info = load_task_model(adapter_dir, merged=merged, model=model)
    dev = next(net.parameters()).device
    batch = tok(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    logits = net(**{k: v.to(dev) for k, v in batch.items()}).logits.float().cpu()
    if info.problem_type == "regression":
        return [f"{v:.4f}" for v in logits[:, 0].tolist()]
    names = info.label_names or tuple(str(i) for i in range(info.num_labels))
    return [names[i] for i in logits.argmax(-1).tolist()]


def export_models(
    adapter_dirs: Sequence[str],
    out_dir: str,
    *,
    merged: str | None = None,
    model: str | None = None,
) -> list[Path]:
    """Per task: a standalone HF model dir that ``AutoModelForSequenceClassification`` loads."""
    paths: list[Path] = []
    for adir in adapter_dirs:
        net, tok, info = load_task_model(adir, merged=merged, model=model, device="cpu")
        names = info.label_names or tuple(str(i) for i in range(info.num_labels))
        net.config.id2label = {i: n for i, n in enumerate(names)} if info.problem_type != "regression" else {0: "score"}
        net.config.label2id = {n: i for i, n in net.config.id2label.items()}
        target = Path(out_dir) / info.task
        with atomic_dir(target) as tmp:
            net.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        logger.info("exported %s to %s", info.task, target)
        paths.append(target)
    return paths


def _read_text_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise OsrmError(f"text file {p} does not exist; check the path")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise OsrmError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    lines = [line for line in lines if line]
    if not lines:
        raise OsrmError(f"text file {p} is empty; give one text per line")
    return lines


@torch.no_grad()
def causal_lm_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512,
                   batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``texts`` under ``model``."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = ids[:, 1:]
        tmask = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        total += float(nll[tmask].sum())
        count += int(tmask.sum())
    if count == 0:
        raise OsrmError("the texts have no token to predict (each needs at least two tokens)")
    return total / count


def evaluate_causal_lm(
    text_files: Sequence[str],
    *,
    model: str,
    adapter: str | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Per text file: loss and perplexity of a causal LM with an (own or merged) LoRA update folded in.

    For adapters without classification heads (e.g. causal-LM adapters): merging never needs a head,
    and evaluation is the per-task loss / perplexity on the given text files (one text per line).
    """
    import math

    from transformers import AutoModelForCausalLM

    from osrm_lora.backbone import apply_deltas

    path = resolve_model_path(model)
    tok = load_tokenizer(path)
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                   use_safetensors=True if Path(path).exists() else None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise OsrmError(f"cannot load causal LM {path}: {str(exc).splitlines()[0]}; check the model path or id") from exc
    net.to(select_device(device))
    if adapter is not None:
        apply_deltas(net, adapter_deltas(adapter))
    out: dict[str, dict[str, float]] = {}
    for f in text_files:
        loss = causal_lm_loss(net, tok, _read_text_file(f), max_length=max_length, batch_size=batch_size)
        out[str(f)] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return out
