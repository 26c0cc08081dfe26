"""Fixed, seeded, stratified splits and subsamples.

Splits are computed once from a task's content (keyed by task name, content hash and split
settings) and stored in the cache, so a task's train/validation/test never change between runs or
processes. Randomness comes only from ``numpy.random.default_rng`` seeded with integers (never
Python's ``hash``), so results do not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osrm_lora.data.canonical import Examples, SourceData
from osrm_lora.data.task import SPLITS
from osrm_lora.errors import DataError, OsrmError
from osrm_lora.fsutil import read_json, sha256_json, write_json

logger = logging.getLogger(__name__)

SPLIT_FORMAT_VERSION = 1
DEFAULT_RATIOS: tuple[float, float, float] = (0.8, 0.1, 0.1)


# ----------------------------------------------------------------------------------------------
# pure functions


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split the integer ``total`` proportionally to ``weights`` (largest-remainder rounding).

    The result sums to ``total``; ties in the remainders go to the earlier weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("allocate needs total >= 0 and non-negative weights with a positive sum")
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = int(total - counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return [int(c) for c in counts]


def _class_groups(labels: Sequence[Any], stratify: bool) -> list[np.ndarray]:
    """Indices grouped by label value, groups in sorted label order (one group if not stratified)."""
    n = len(labels)
    if not stratify:
        return [np.arange(n)]
    arr = np.asarray(labels)
    classes = np.unique(arr)
    return [np.flatnonzero(arr == c) for c in classes]


def stratified_partition(
    labels: Sequence[Any], fractions: Sequence[float], seed: int, stratify: bool = True
) -> list[list[int]]:
    """Partition ``range(len(labels))`` into ``len(fractions)`` parts, per class in proportion.

    Each class is shuffled with one seeded generator (classes visited in sorted order) and cut by
    :func:`allocate`. A class with at least as many examples as there are non-empty parts gets at
    least one example in every part. Returns sorted index lists.
    """
    rng = np.random.default_rng(seed)
    k = len(fractions)
    active = [i for i, f in enumerate(fractions) if f > 0]
    parts: list[list[int]] = [[] for _ in range(k)]
    for group in _class_groups(labels, stratify):
        counts = allocate(len(group), fractions)
        if len(group) >= len(active):
            for i in active:  # every part gets at least one example of this class
                if counts[i] == 0:
                    donor = max(active, key=lambda j: (counts[j], -j))
                    counts[donor] -= 1
                    counts[i] += 1
        perm = group[rng.permutation(len(group))]
        start = 0
        for i, c in enumerate(counts):
            parts[i].extend(int(x) for x in perm[start : start + c])
            start += c
    return [sorted(p) for p in parts]


def stratified_subsample(labels: Sequence[Any], size: int, seed: int, stratify: bool = True) -> list[int]:
    """A seeded, class-proportional subsample of ``size`` indices (sorted); all indices if ``size >= n``.

    Each class keeps a prefix of its own seeded permutation, so a smaller cap with the same seed
    gives (nearly always) a subset of a larger cap's sample.
    """
    n = len(labels)
    if size >= n:
        return list(range(n))
    groups = _class_groups(labels, stratify)
    counts = allocate(size, [len(g) for g in groups])
    if size >= len(groups):
        for i in range(len(groups)):  # keep every class represented
            if counts[i] == 0:
                donor = max(range(len(groups)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for group, c in zip(groups, counts):
        perm = group[rng.permutation(len(group))]
        chosen.extend(int(x) for x in perm[:c])
    return sorted(chosen)


def derive_seed(seed: int, purpose: str) -> int:
    """A per-purpose seed that is stable across processes (CRC32, not Python's salted ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode("utf-8"))) % (2**63)


def check_several_classes(data: SourceData) -> None:
    """Raise :class:`DataError` if classification data holds one class only: a classifier trained on
    it learns nothing and scores 100% (the error names the task and its file or source)."""
    if data.problem_type != "classification":
        return
    present = {label for ex in data.given.values() for label in ex.labels}
    if len(present) >= 2 or not any(len(ex) for ex in data.given.values()):
        return
    label = next(iter(present))
    name = data.label_names[label] if isinstance(label, int) and 0 <= label < len(data.label_names) else label
    files = data.meta.get("files") if isinstance(data.meta, dict) else None
    where = ", ".join(str(f) for f in dict.fromkeys(files.values())) if isinstance(files, dict) and files else data.source
    raise DataError(
        f"task {data.name}: {where or 'its data'} has only one class ({name!r}); a classifier needs examples of at "
        f"least two classes - add examples of another class, or set problem_type: regression for numeric targets"
    )


def check_label_sets(task: str, splits: dict[str, Examples], label_names: Sequence[str] = ()) -> None:
    """Raise :class:`DataError` if a class occurs in one split but not in another."""
    sets = {name: set(ex.labels) for name, ex in splits.items()}
    union = set().union(*sets.values())

    def show(label: Any) -> str:
        if isinstance(label, int) and 0 <= label < len(label_names):
            return repr(label_names[label])
        return repr(label)

    for name, present in sets.items():
        missing = sorted(union - present, key=str)
        if missing:
            where = sorted(s for s, p in sets.items() if missing[0] in p)
            raise DataError(
                f"task {task}: class {show(missing[0])} occurs in {'/'.join(where)} but not in {name}; "
                f"every class needs examples in train, validation and test - add examples of that class or drop it"
            )


# ----------------------------------------------------------------------------------------------
# stored splits


def _validate_stored(parts: Any, n: int, k: int) -> bool:
    if not isinstance(parts, list) or len(parts) != k:
        return False
    flat = [i for p in parts for i in p]
    return len(flat) == n and sorted(flat) == list(range(n))


def stored_partition(
    cache_root: Path,
    task: str,
    content_hash: str,
    labels: Sequence[Any],
    fractions: Sequence[float],
    seed: int,
    stratify: bool,
    purpose: str,
) -> tuple[list[list[int]], str]:
    """:func:`stratified_partition`, computed once and stored under ``<cache>/splits/<task>/``.

    The key covers the task name, the content hash, the fractions, the seed, stratification and
    ``purpose`` (which splits are carved). Returns ``(parts, key)``.
    """
    settings = {
        "version": SPLIT_FORMAT_VERSION,
        "task": task,
        "content_hash": content_hash,
        "n": len(labels),
        "fractions": [round(float(f), 10) for f in fractions],
        "seed": int(seed),
        "stratify": bool(stratify),
        "purpose": purpose,
    }
    key = sha256_json(settings)
    path = Path(cache_root) / "splits" / _safe_name(task) / f"{key[:24]}.json"
    if path.exists():
        stored = _read_stored(path)
        if stored is not None and stored.get("key") == key and _stored_checksum_ok(stored) \
                and _validate_stored(stored.get("parts"), len(labels), len(fractions)):
            return [list(map(int, p)) for p in stored["parts"]], key
        logger.warning("stored split %s is corrupt or invalid; recomputing it", path)
    parts = stratified_partition(labels, fractions, seed, stratify)
    parts = [[int(i) for i in p] for p in parts]
    write_json(path, {"key": key, "settings": settings, "parts": parts, "parts_sha256": sha256_json(parts)})
    logger.info("stored split for %s at %s (sizes %s)", task, path, [len(p) for p in parts])
    return parts, key


def _read_stored(path: Path) -> dict[str, Any] | None:
    """A stored split file's content, or ``None`` if it is not a readable JSON object."""
    try:
        stored = read_json(path)
    except OsrmError:
        return None
    return stored if isinstance(stored, dict) else None


def _stored_checksum_ok(stored: dict[str, Any]) -> bool:
    """The stored parts match their recorded sha256 (files from before it was recorded: no check)."""
    return "parts_sha256" not in stored or stored["parts_sha256"] == sha256_json(stored.get("parts"))


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "task"


def make_splits(
    data: SourceData,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 42,
    cache_root: Path | None = None,
) -> tuple[dict[str, Examples], dict[str, Any]]:
    """Turn a source's data into fixed train/validation/test examples.

    Splits the source gives are kept; the missing ones are carved out of ``train`` in proportion
    to ``ratios`` (train, validation, test), stratified by class for classification. With
    ``cache_root`` the carved indices are stored and reused. Returns ``(splits, info)``.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or ratios[0] <= 0:
        raise DataError(f"split ratios {list(ratios)} are invalid; give three non-negative numbers (train > 0), e.g. [0.8, 0.1, 0.1]")
    check_several_classes(data)
    given = data.given
    missing = [s for s in SPLITS if s not in given]
    stratify = data.problem_type == "classification"
    info: dict[str, Any] = {"given_splits": sorted(given), "carved_splits": missing, "seed": int(seed), "ratios": list(ratios)}
    out: dict[str, Examples] = {s: given[s] for s in SPLITS if s in given}
    if missing:
        carve = ["train", *missing]
        fractions = [ratios[SPLITS.index(s)] for s in carve]
        if any(f <= 0 for f in fractions):
            raise DataError(
                f"task {data.name}: split ratios {list(ratios)} leave {', '.join(s for s, f in zip(carve, fractions) if f <= 0)} empty; "
                "give every split a positive ratio"
            )
        pool = given["train"]
        purpose = "train->" + ",".join(carve)
        if cache_root is not None:
            parts, key = stored_partition(cache_root, data.name, data.content_hash, pool.labels, fractions, seed, stratify, purpose)
        else:
            parts = stratified_partition(pool.labels, fractions, seed, stratify)
            key = None
        info["split_key"] = key
        for name, idx in zip(carve, parts):
            out[name] = pool.subset(idx)
    for name in SPLITS:
        if len(out[name]) == 0:
            raise DataError(f"task {data.name}: the {name} split is empty; provide more examples or change the split ratios")
    if stratify:
        check_label_sets(data.name, out, data.label_names)
    return {s: out[s] for s in SPLITS}, info


def apply_caps(
    splits: dict[str, Examples], max_train: int | None, max_eval: int | None, seed: int, stratify: bool
) -> dict[str, Examples]:
    """Seeded, stratified subsamples: ``max_train`` for train, ``max_eval`` for validation and test.

    Applied after the fixed split, so the capped test set is a stable subset of the full one.
    """
    out = dict(splits)
    for name, cap in (("train", max_train), ("validation", max_eval), ("test", max_eval)):
        if cap is not None and len(out[name]) > cap:
            idx = stratified_subsample(out[name].labels, cap, derive_seed(seed, f"cap:{name}"), stratify)
            out[name] = out[name].subset(idx)
    return out
