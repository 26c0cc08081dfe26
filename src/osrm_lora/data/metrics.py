"""Task metrics on a 0..100 scale, implemented with NumPy/SciPy.

Every metric takes ``predictions`` and ``labels`` (sequences or arrays) and returns a float where
higher is better. Classification metrics accept either class indices or a 2-D array of scores
(logits/probabilities), which is reduced with ``argmax`` over the last axis. Regression metrics
accept a 1-D array or an ``(n, 1)`` array.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from osrm_lora.errors import DataError, OsrmError

logger = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its function, direction and the problem type it applies to."""

    name: str
    fn: MetricFn
    problem_type: str  # "classification" | "regression"
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricSpec] = {}


def _register(name: str, problem_type: str, description: str) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = MetricSpec(name, fn, problem_type, True, description)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------
# pure helpers


def _as_class_indices(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2:
        arr = arr.argmax(axis=-1)
    if arr.ndim != 1:
        raise DataError(f"{what} must be 1-D class indices or 2-D scores, got shape {arr.shape}; pass one value per example")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{what} contain non-integer values; pass class indices (or logits as a 2-D array)")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.int64)
    else:
        raise DataError(f"{what} have dtype {arr.dtype}; pass integer class indices")
    return arr


def _as_floats(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{what} must be 1-D (or (n, 1)) for a regression metric, got shape {arr.shape}")
    return arr


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(classes, C)`` with ``C[i, j]`` = #examples of true class ``classes[i]`` predicted ``classes[j]``.

    ``classes`` is the sorted union of the classes seen in labels and predictions.
    """
    classes = np.union1d(labels, predictions)
    t = np.searchsorted(classes, labels)
    p = np.searchsorted(classes, predictions)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return classes, cm


def _binary_f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = float(np.sum((predictions == positive) & (labels == positive)))
    fp = float(np.sum((predictions == positive) & (labels != positive)))
    fn = float(np.sum((predictions != positive) & (labels == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


# ----------------------------------------------------------------------------------------------
# metrics (each returns a value on 0..100; matthews and correlations range -100..100)


@_register("accuracy", "classification", "fraction of exact matches x 100")
def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels) * 100.0)


@_register("macro_f1", "classification", "unweighted mean of per-class F1 over classes in labels or predictions x 100")
def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    _, cm = confusion_matrix(predictions, labels)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.mean() * 100.0)


@_register("f1", "classification", "binary F1 of the positive class 1 x 100")
def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    return _binary_f1(predictions, labels, positive=1) * 100.0


@_register("matthews", "classification", "Matthews correlation coefficient x 100 (multi-class form)")
def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    _, cm = confusion_matrix(predictions, labels)
    cm = cm.astype(np.float64)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n_correct = np.trace(cm)
    n = cm.sum()
    cov_ytyp = n_correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp) * 100.0)


@_register("acc_f1", "classification", "mean of accuracy and binary F1 (positive class 1) x 100 (MRPC/QQP)")
def acc_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    return (accuracy(predictions, labels) + f1(predictions, labels)) / 2.0


@_register("pearson_spearman", "regression", "mean of Pearson and Spearman correlation x 100 (STS-B)")
def pearson_spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    from scipy import stats

    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        logger.warning("pearson_spearman is undefined for constant or single-element inputs; returning 0")
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = float(stats.pearsonr(predictions, labels)[0])
        spearman = float(stats.spearmanr(predictions, labels)[0])
    return (pearson + spearman) / 2.0 * 100.0


# ----------------------------------------------------------------------------------------------
# public API


def _spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise OsrmError(f"unknown metric {name!r}; use one of: {', '.join(sorted(METRICS))}") from None


def compute_metric(name: str, predictions: Any, labels: Any) -> float:
    """Compute metric ``name`` on a 0..100 scale (correlations: -100..100).

    Raises :class:`OsrmError` for an unknown metric and :class:`DataError` for mismatched or empty
    inputs.
    """
    spec = _spec(name)
    if spec.problem_type == "regression":
        preds, labs = _as_floats(predictions, "predictions"), _as_floats(labels, "labels")
    else:
        preds, labs = _as_class_indices(predictions, "predictions"), _as_class_indices(labels, "labels")
    if len(preds) != len(labs):
        raise DataError(f"{len(preds)} predictions but {len(labs)} labels for metric {name}; pass one prediction per example")
    if len(labs) == 0:
        raise DataError(f"cannot compute {name} on zero examples; evaluate on a non-empty split")
    return float(spec.fn(preds, labs))


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (true for every built-in metric)."""
    return _spec(name).higher_is_better


def metric_problem_type(name: str) -> str:
    """``classification`` or ``regression``: the kind of task metric ``name`` applies to."""
    return _spec(name).problem_type
