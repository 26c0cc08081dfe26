"""Tokenisation once per split, dynamic padding per batch, length-sorted inference batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from osrm_lora.data.task import Split


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: one feature dict per example (no padding) and the label tensor."""

    features: tuple[dict[str, list[int]], ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.features)


def encode_split(tokenizer: Any, split: Split, max_length: int, regression: bool = False) -> Encoded:
    """Tokenise texts (and pairs) with truncation; padding happens per batch."""
    if split.text_pairs is None:
        enc = tokenizer(list(split.texts), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(split.texts), list(split.text_pairs), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    feats = tuple({k: enc[k][i] for k in keys} for i in range(len(split)))
    dtype = torch.float32 if regression else torch.long
    return Encoded(features=feats, labels=torch.tensor(list(split.labels), dtype=dtype))


def collate(tokenizer: Any, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member (right padding)."""
    length = max(len(f["input_ids"]) for f in features)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        rows = [list(f[key]) + [fill] * (length - len(f[key])) for f in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    if "attention_mask" not in batch:
        rows = [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        batch["attention_mask"] = torch.tensor(rows, dtype=torch.long)
    return batch


def train_batches(encoded: Encoded, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled index batches of similar length (seeded generator).

    Examples are shuffled, cut into pools of ``50 * batch_size``, sorted by length inside each pool
    and batched; the batch order is shuffled again. Far less padding than random batches, still
    random across epochs.
    """
    order = torch.randperm(len(encoded), generator=generator).tolist()
    pool = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(encoded.features[i]["input_ids"]))
        batches.extend(chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size))
    for b in torch.randperm(len(batches), generator=generator).tolist():
        yield batches[b]


def sorted_batches(encoded: Encoded, batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length (inference only; callers restore order by index)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
