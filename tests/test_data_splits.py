"""Fixed, seeded, stratified splits: proportions, determinism (also across processes), storage, caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from osrm_lora.data import splits
from osrm_lora.data.canonical import Examples, SourceData
from osrm_lora.errors import DataError

LABELS = ["b"] * 50 + ["a"] * 30 + ["c"] * 20


def _data(labels: list, given_test: list | None = None, problem_type: str = "classification") -> SourceData:
    given = {"train": Examples([f"t{i}" for i in range(len(labels))], list(labels))}
    if given_test is not None:
        given["test"] = Examples([f"x{i}" for i in range(len(given_test))], list(given_test))
    return SourceData("toy", problem_type, "accuracy" if problem_type == "classification" else "pearson_spearman",
                      ("0", "1", "2"), given, content_hash="h" * 64)


def test_allocate_largest_remainder() -> None:
    assert splits.allocate(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
    assert splits.allocate(5, [0.8, 0.1, 0.1]) == [4, 1, 0]  # tie on remainder -> earlier part
    assert sum(splits.allocate(997, [0.7, 0.2, 0.1])) == 997


def test_partition_is_stratified_disjoint_and_complete() -> None:
    parts = splits.stratified_partition(LABELS, [0.8, 0.1, 0.1], seed=3)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(LABELS)))
    assert [Counter(LABELS[i] for i in p) for p in parts] == [
        Counter(b=40, a=24, c=16), Counter(b=5, a=3, c=2), Counter(b=5, a=3, c=2)]
    assert parts == splits.stratified_partition(LABELS, [0.8, 0.1, 0.1], seed=3)
    assert parts != splits.stratified_partition(LABELS, [0.8, 0.1, 0.1], seed=4)


def test_small_class_gets_one_per_split_or_error() -> None:
    parts = splits.stratified_partition([0] * 20 + [1] * 3, [0.8, 0.1, 0.1], seed=0)
    assert all(1 in [([0] * 20 + [1] * 3)[i] for i in p] for p in parts)
    with pytest.raises(DataError, match=r"class '1' occurs in .* but not in"):
        splits.make_splits(_data([0] * 20 + [1] * 2))


_CHILD = """
import json, sys
from osrm_lora.data import splits
labels = json.loads(sys.argv[1])
print(json.dumps(splits.stratified_partition(labels, [0.8, 0.1, 0.1], seed=11)))
print(json.dumps(splits.stratified_subsample(labels, 17, splits.derive_seed(11, "cap:test"))))
"""


def test_deterministic_across_processes_and_hash_seeds() -> None:
    expected = [
        json.dumps(splits.stratified_partition(LABELS, [0.8, 0.1, 0.1], seed=11)),
        json.dumps(splits.stratified_subsample(LABELS, 17, splits.derive_seed(11, "cap:test"))),
    ]
    for hash_seed in ("1", "987"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(LABELS)], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split("\n")[:2] == expected


def test_splits_are_stored_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data([0, 1] * 30)
    first, info = splits.make_splits(data, seed=5, cache_root=tmp_path)
    stored = list((tmp_path / "splits" / "toy").glob("*.json"))
    assert len(stored) == 1 and info["split_key"]

    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(splits, "stratified_partition", fail)
    again, _ = splits.make_splits(data, seed=5, cache_root=tmp_path)
    assert again["test"].texts == first["test"].texts
    # other settings (seed, content) get their own stored split
    monkeypatch.undo()
    splits.make_splits(data, seed=6, cache_root=tmp_path)
    other = _data([0, 1] * 30)
    other.content_hash = "g" * 64
    splits.make_splits(other, seed=5, cache_root=tmp_path)
    assert len(list((tmp_path / "splits" / "toy").glob("*.json"))) == 3


def test_source_test_split_is_kept() -> None:
    out, info = splits.make_splits(_data([0] * 45 + [1] * 45, given_test=[0, 1, 1, 0]))
    assert out["test"].texts == ["x0", "x1", "x2", "x3"]
    assert len(out["train"]) == 80 and len(out["validation"]) == 10  # 0.1/(0.8+0.1) of 90
    assert info["carved_splits"] == ["validation"]
    with pytest.raises(DataError, match="occurs in .* but not in test"):
        splits.make_splits(_data([0] * 45 + [1] * 45 + [2] * 9, given_test=[0, 1]))


def test_regression_split_not_stratified() -> None:
    out, _ = splits.make_splits(_data([float(i) / 7 for i in range(50)], problem_type="regression"))
    assert [len(out[s]) for s in ("train", "validation", "test")] == [40, 5, 5]


def test_caps_are_stable_stratified_subsets() -> None:
    full, _ = splits.make_splits(_data(LABELS), seed=1)
    capped = splits.apply_caps(full, max_train=20, max_eval=5, seed=1, stratify=True)
    assert len(capped["train"]) == 20 and len(capped["test"]) == 5 and len(capped["validation"]) == 5
    assert set(capped["test"].texts) <= set(full["test"].texts)
    assert Counter(capped["train"].labels) == Counter(b=10, a=6, c=4)
    again = splits.apply_caps(full, max_train=20, max_eval=5, seed=1, stratify=True)
    assert again["test"].texts == capped["test"].texts
    bigger = splits.apply_caps(full, max_train=40, max_eval=8, seed=1, stratify=True)
    assert set(capped["train"].texts) <= set(bigger["train"].texts)
    assert splits.apply_caps(full, None, 10**6, 1, True)["test"].texts == full["test"].texts
