"""Task data model: a task is named data with fixed train/validation/test splits and a metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ProblemType = Literal["classification", "regression"]
SPLITS: tuple[str, str, str] = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """One split of a task. ``labels`` are class indices (classification) or floats (regression)."""

    texts: tuple[str, ...]
    labels: tuple[float, ...] | tuple[int, ...]
    text_pairs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError("text_pairs and texts differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int] | tuple[int, ...]) -> Split:
        return Split(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            text_pairs=None if self.text_pairs is None else tuple(self.text_pairs[i] for i in indices),
        )


@dataclass(frozen=True)
class Task:
    """A named task with its splits.

    ``metric`` names an entry of :mod:`osrm_lora.data.metrics` (e.g. ``accuracy``, ``matthews``,
    ``acc_f1``, ``pearson_spearman``, ``macro_f1``). ``label_names`` is empty for regression.
    """

    name: str
    problem_type: ProblemType
    metric: str
    label_names: tuple[str, ...]
    train: Split
    validation: Split
    test: Split
    source: str = ""
    meta: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.train.text_pairs is not None

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        split: Split = getattr(self, name)
        return split
