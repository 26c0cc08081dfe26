"""Canonical task data: columnar examples, source data before splitting, and the jsonl.gz format.

A canonical file ``<stem>.jsonl.gz`` holds one JSON record per line (``text``, ``label``, optional
``text_pair``, optional ``split`` for sources with their own splits) and a sidecar ``<stem>.json``
with the label names, problem type, metric and the SHA-256 of the uncompressed records, which is
the content hash that keys the stored splits. The sidecar also records ``meta_sha256``, the hash
of its own other fields, so an edited or corrupted sidecar is detected too (:func:`meta_checksum`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osrm_lora.data.task import SPLITS, ProblemType, Split
from osrm_lora.errors import DataError, OsrmError
from osrm_lora.fsutil import atomic_file, read_json, sha256_json, write_json

logger = logging.getLogger(__name__)


@dataclass
class Examples:
    """Columnar examples (mutable lists) used while loading; converted to a frozen :class:`Split`."""

    texts: list[str]
    labels: list[Any]
    text_pairs: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError("text_pairs and texts differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in indices],
        )

    def to_split(self) -> Split:
        return Split(
            texts=tuple(self.texts),
            labels=tuple(self.labels),
            text_pairs=None if self.text_pairs is None else tuple(self.text_pairs),
        )


@dataclass
class SourceData:
    """A task's data as its source provides it, before the fixed split.

    ``given`` maps split names to examples; ``train`` is required (the pool to split). A source
    with its own test split (e.g. foods, GLUE) also gives ``test``; the missing splits are carved
    out of ``train``.
    """

    name: str
    problem_type: ProblemType
    metric: str
    label_names: tuple[str, ...]
    given: dict[str, Examples]
    content_hash: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.given) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split names {sorted(unknown)}")
        if "train" not in self.given:
            raise DataError(f"task {self.name} has no training data; provide a train split")


def hash_records(records: Iterable[dict[str, Any]]) -> str:
    """SHA-256 over the records' canonical JSON lines (order-sensitive)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(_record_line(rec))
    return h.hexdigest()


def _record_line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def canonical_paths(stem: Path) -> tuple[Path, Path]:
    """``(records, meta)`` paths for a canonical stem such as ``<cache>/canonical/mr.v1``."""
    return stem.with_name(stem.name + ".jsonl.gz"), stem.with_name(stem.name + ".json")


def write_canonical(stem: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Atomically write records (gzip, mtime 0 so the bytes are reproducible) then the sidecar meta.

    Returns the meta with ``content_hash`` and ``num_records`` added. The meta file is written
    last, so a canonical file without its meta is treated as absent.
    """
    data_path, meta_path = canonical_paths(stem)
    h = hashlib.sha256()
    with atomic_file(data_path, "wb") as fh:
        with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
            for rec in records:
                line = _record_line(rec)
                h.update(line)
                gz.write(line)
    full_meta = dict(meta, content_hash=h.hexdigest(), num_records=len(records))
    full_meta.pop(META_CHECKSUM, None)
    write_json(meta_path, {**full_meta, META_CHECKSUM: meta_checksum(full_meta)})
    return full_meta


META_CHECKSUM = "meta_sha256"


def meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of a canonical sidecar's fields other than :data:`META_CHECKSUM` itself."""
    return sha256_json({k: v for k, v in meta.items() if k != META_CHECKSUM})


def read_canonical(stem: Path) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """Read a canonical file and verify its content hash; ``None`` if it (or its meta) is absent.

    A hash mismatch or an unreadable file (a corrupted or edited file) raises :class:`DataError`.
    """
    data_path, meta_path = canonical_paths(stem)
    if not data_path.exists() or not meta_path.exists():
        return None
    try:
        meta = read_json(meta_path)
    except OsrmError as exc:
        raise DataError(f"{meta_path} is corrupt ({exc}); delete it and {data_path.name} to rebuild them") from exc
    if not isinstance(meta, dict) or (META_CHECKSUM in meta and meta[META_CHECKSUM] != meta_checksum(meta)):
        raise DataError(f"{meta_path} does not match its own {META_CHECKSUM} (corrupted or edited); "
                        f"delete it and {data_path.name} to rebuild them")
    meta = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    h = hashlib.sha256()
    records: list[dict[str, Any]] = []
    try:
        with gzip.open(data_path, "rb") as gz:
            for line in gz:
                h.update(line)
                records.append(json.loads(line))
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise DataError(f"{data_path} is corrupt ({exc}); delete it to rebuild it from the raw source") from exc
    if h.hexdigest() != meta.get("content_hash"):
        raise DataError(f"{data_path} does not match the hash in {meta_path.name}; delete both files to rebuild them")
    return records, meta


def records_to_source_data(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> SourceData:
    """Group canonical records by their ``split`` field (default ``train``) into :class:`SourceData`."""
    has_pair = any("text_pair" in r for r in records)
    groups: dict[str, Examples] = {}
    for rec in records:
        split = rec.get("split", "train")
        ex = groups.get(split)
        if ex is None:
            ex = groups[split] = Examples([], [], [] if has_pair else None)
        ex.texts.append(rec["text"])
        ex.labels.append(rec["label"])
        if ex.text_pairs is not None:
            ex.text_pairs.append(rec.get("text_pair", ""))
    return SourceData(
        name=meta["name"],
        problem_type=meta["problem_type"],
        metric=meta["metric"],
        label_names=tuple(meta.get("label_names", ())),
        given=groups,
        content_hash=meta["content_hash"],
        source=meta.get("source", ""),
        meta={k: v for k, v in meta.items() if k in ("terms", "package", "source", "num_records", "dropped_duplicates")},
    )


def dedupe_records(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Drop repeated examples (same text and text_pair) so no example can sit in two splits.

    Keeps the first occurrence of repeats with one label; drops every copy of a text whose copies
    disagree on the label. Returns ``(kept, dropped_count)``.
    """
    labels_of: dict[tuple[str, str | None], set[Any]] = {}
    for rec in records:
        labels_of.setdefault((rec["text"], rec.get("text_pair")), set()).add(rec["label"])
    seen: set[tuple[str, str | None]] = set()
    kept: list[dict[str, Any]] = []
    for rec in records:
        key = (rec["text"], rec.get("text_pair"))
        if key in seen or len(labels_of[key]) > 1:
            continue
        seen.add(key)
        kept.append(rec)
    return kept, len(records) - len(kept)
