"""Metrics against hand-computed values and independent references (scikit-learn, SciPy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from osrm_lora.data.metrics import METRICS, compute_metric, higher_is_better
from osrm_lora.errors import DataError, OsrmError

PRED = [1, 0, 1, 1, 0, 1, 0, 0]
GOLD = [1, 0, 0, 1, 0, 1, 1, 0]
# TP=3 (idx 0,3,5), TN=3 (1,4,7), FP=1 (2), FN=1 (6)


def test_accuracy_hand() -> None:
    assert compute_metric("accuracy", PRED, GOLD) == pytest.approx(75.0)


def test_binary_f1_hand() -> None:
    # precision 3/4, recall 3/4 -> F1 0.75
    assert compute_metric("f1", PRED, GOLD) == pytest.approx(75.0)
    # positive class is 1: all-zero predictions give F1 0
    assert compute_metric("f1", [0, 0, 0], [1, 0, 1]) == 0.0


def test_matthews_hand() -> None:
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9-1)/sqrt(4*4*4*4) = 0.5
    assert compute_metric("matthews", PRED, GOLD) == pytest.approx(50.0)
    assert compute_metric("matthews", [1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction


def test_acc_f1_hand() -> None:
    # accuracy 4/6, F1: TP=2 FP=1 FN=1 -> 4/6
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0]
    assert compute_metric("acc_f1", pred, gold) == pytest.approx((4 / 6 * 100 + 4 / 6 * 100) / 2)


def test_macro_f1_hand() -> None:
    pred, gold = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0]
    # class 0: F1 1; class 1: TP1 FP1 FN1 -> 0.5; class 2: TP1 FP1 FN1 -> 0.5
    assert compute_metric("macro_f1", pred, gold) == pytest.approx(100 * 2 / 3)


def test_pearson_spearman_hand() -> None:
    # perfectly monotone but not linear: spearman 1, pearson from scipy
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]
    r = stats.pearsonr(x, y)[0]
    assert compute_metric("pearson_spearman", x, y) == pytest.approx((r + 1.0) / 2 * 100)
    assert compute_metric("pearson_spearman", [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_and_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.8, gold, 1 - gold)
    assert compute_metric("accuracy", pred, gold) == pytest.approx(100 * skm.accuracy_score(gold, pred))
    assert compute_metric("f1", pred, gold) == pytest.approx(100 * skm.f1_score(gold, pred))
    assert compute_metric("matthews", pred, gold) == pytest.approx(100 * skm.matthews_corrcoef(gold, pred))
    assert compute_metric("acc_f1", pred, gold) == pytest.approx(
        50 * (skm.accuracy_score(gold, pred) + skm.f1_score(gold, pred))
    )
    gold3 = rng.integers(0, 4, 300)
    pred3 = np.where(rng.random(300) < 0.6, gold3, rng.integers(0, 5, 300))  # class 4 only predicted
    assert compute_metric("macro_f1", pred3, gold3) == pytest.approx(100 * skm.f1_score(gold3, pred3, average="macro"))
    assert compute_metric("matthews", pred3, gold3) == pytest.approx(100 * skm.matthews_corrcoef(gold3, pred3))
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.5, size=100)
    expected = 50 * (stats.pearsonr(p, y)[0] + stats.spearmanr(p, y)[0])
    assert compute_metric("pearson_spearman", p, y) == pytest.approx(expected)


def test_logits_and_column_inputs() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.4]])
    assert compute_metric("accuracy", logits, [1, 0, 0]) == pytest.approx(200 / 3)
    assert compute_metric("pearson_spearman", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 3.5]) > 99
    assert compute_metric("accuracy", np.array([1.0, 0.0]), np.array([1, 0])) == 100.0


def test_errors() -> None:
    with pytest.raises(OsrmError) as err:
        compute_metric("bleu", [1], [1])
    for name in ("accuracy", "macro_f1", "f1", "matthews", "acc_f1", "pearson_spearman"):
        assert name in str(err.value)
    with pytest.raises(DataError, match="2 predictions but 3 labels"):
        compute_metric("accuracy", [1, 0], [1, 0, 1])
    with pytest.raises(DataError, match="zero examples"):
        compute_metric("accuracy", [], [])
    with pytest.raises(DataError, match="non-integer"):
        compute_metric("accuracy", [0.5, 1.0], [0, 1])


def test_registry() -> None:
    assert set(METRICS) == {"accuracy", "macro_f1", "f1", "matthews", "acc_f1", "pearson_spearman"}
    assert all(higher_is_better(n) for n in METRICS)
    assert METRICS["pearson_spearman"].problem_type == "regression"
    with pytest.raises(OsrmError):
        higher_is_better("nope")
