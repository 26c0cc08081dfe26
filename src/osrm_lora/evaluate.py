"""Evaluation: logits, predictions, per-task metrics, averages and normalised scores."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from osrm_lora.data.metrics import compute_metric
from osrm_lora.data.task import Task
from osrm_lora.encoding import Encoded, collate, sorted_batches

logger = logging.getLogger(__name__)


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (fp32 master weights), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Logits for every example of ``encoded`` in the original order (float32, CPU)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: torch.Tensor | None = None
    try:
        for idx in sorted_batches(encoded, batch_size):
            batch = {k: v.to(device) for k, v in collate(tokenizer, [encoded.features[i] for i in idx]).items()}
            with autocast_context(device):
                logits = model(**batch).logits.float().cpu()
            if out is None:
                out = torch.empty((len(encoded), logits.shape[-1]), dtype=torch.float32)
            out[idx] = logits
    finally:
        model.train(was_training)
    if out is None:
        return torch.empty((0, 1))
    return out


def logits_to_predictions(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    if problem_type == "regression":
        return logits[:, 0]
    return logits.argmax(dim=-1)


def score(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The task's metric (0..100 scale) of ``logits`` against ``labels``."""
    preds = logits_to_predictions(logits, task.problem_type)
    return float(compute_metric(task.metric, preds.numpy(), labels.numpy()))


def predict_logits_sharded(model: nn.Module, tokenizer: Any, encoded: Encoded, batch_size: int = 64) -> torch.Tensor:
    """:func:`predict_logits` with the examples split over the processes (round robin) and the logits
    gathered: every rank returns the logits of all examples, in order. One process: the same as
    :func:`predict_logits`.

    Every rank predicts the same number of examples (shares are topped up with repeats of example
    0, dropped afterwards), so every rank runs the same number of forward passes, as a sharded
    (FSDP) model requires."""
    from osrm_lora.distributed import all_gather_objects, get_env, shard

    env = get_env()
    if not env.active or len(encoded) == 0:
        return predict_logits(model, tokenizer, encoded, batch_size)
    mine = shard(range(len(encoded)), env)
    per_rank = -(-len(encoded) // env.world_size)
    padded = mine + [0] * (per_rank - len(mine))
    part = Encoded(features=tuple(encoded.features[i] for i in padded), labels=encoded.labels[padded])
    logits = predict_logits(model, tokenizer, part, batch_size)[: len(mine)]
    pieces = all_gather_objects((mine, logits))
    out = torch.empty((len(encoded), logits.shape[-1]), dtype=torch.float32)
    for idx, lg in pieces:
        if idx:
            out[idx] = lg
    return out


def evaluate(model: nn.Module, tokenizer: Any, task: Task, encoded: Encoded, batch_size: int = 64,
             distributed: bool = False) -> float:
    """Score ``model`` (with ``task``'s head installed) on an encoded split of ``task``.

    ``distributed``: every process of the group predicts its share of the examples (the same model
    on every rank, as under DDP) and all get the same score."""
    predict = predict_logits_sharded if distributed else predict_logits
    return score(task, predict(model, tokenizer, encoded, batch_size), encoded.labels)


def normalised(merged: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """Per task: merged score / single-task score (as a percentage). Undefined (<= 0 single) -> nan."""
    out: dict[str, float] = {}
    for name, value in merged.items():
        ref = single.get(name)
        out[name] = float("nan") if ref is None or ref <= 0 else 100.0 * value / ref
    return out


def mean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")
