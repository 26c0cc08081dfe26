"""Local task files: JSONL (or a JSON array), CSV, TSV and parquet.

Columns ``text`` (optional ``text_pair``) and ``label`` by default, renamable in the task spec.
Either one file per split (``train_file``, ``validation_file``, ``test_file``; missing splits are
carved from train) or one ``path`` that is split with seeded stratification.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osrm_lora.data.canonical import Examples, SourceData, hash_records
from osrm_lora.data.labels import build_label_mapping, check_given_label_sets, label_key, regression_value
from osrm_lora.errors import DataError

if TYPE_CHECKING:
    from osrm_lora.data.spec import TaskSpec

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
             ".parquet": "parquet", ".pq": "parquet"}


def infer_format(path: Path, declared: str | None = None) -> str:
    """The file format from ``declared`` or the file suffix; DataError if neither says."""
    if declared:
        return declared
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path} from its suffix; name it .jsonl/.csv/.tsv/.parquet or set format in the task spec")
    return fmt


def _decode(path: Path, data: bytes, encoding: str) -> str:
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise DataError(
            f"cannot decode {path} as {encoding} (byte 0x{bad} at offset {exc.start}); re-save the file as UTF-8 "
            f"or set encoding (e.g. encoding: latin-1) in the task spec"
        ) from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r} for {path}; use a Python codec name such as utf-8 or latin-1") from None


def read_rows(path: str | Path, fmt: str | None = None, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    """Read a table file into ``(rows, columns)``; clear DataErrors for missing/empty/undecodable files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the file path in the task spec")
    if path.is_dir():
        raise DataError(f"{path} is a directory; point the task spec at a data file")
    fmt = infer_format(path, fmt)
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; add examples or point the task spec at another file")
    if fmt == "parquet":
        rows, columns = _read_parquet(path)
    elif fmt in ("jsonl", "json"):
        rows, columns = _read_json(path, _decode(path, path.read_bytes(), encoding), fmt)
    else:
        rows, columns = _read_delimited(path, _decode(path, path.read_bytes(), encoding), "\t" if fmt == "tsv" else ",")
    if not rows:
        raise DataError(f"{path} has no examples (only a header or blank lines); add examples or point the task spec at another file")
    return rows, columns


def _read_json(path: Path, text: str, fmt: str) -> tuple[list[dict[str, Any]], list[str]]:
    stripped = text.lstrip()
    rows: list[dict[str, Any]] = []
    if fmt == "json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); fix the file") from None
        rows = list(data)
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix it (one JSON object per line)") from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {i} is a {type(row).__name__}, not an object; write one JSON object per line")
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    return rows, columns


def _read_delimited(path: Path, text: str, sep: str) -> tuple[list[dict[str, Any]], list[str]]:
    import io

    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; add a header row and examples") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path} is not valid {'TSV' if sep == chr(9) else 'CSV'} ({' '.join(str(exc).split())}); fix the file") from None
    columns = [str(c) for c in frame.columns]
    return frame.to_dict(orient="records"), columns


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several error types for non-parquet input
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc}); fix or re-export it") from None
    columns = [str(c) for c in frame.columns]
    return frame.to_dict(orient="records"), columns


def _column(rows: list[dict[str, Any]], columns: list[str], name: str, path: Path, option: str) -> list[Any]:
    if name not in columns:
        raise DataError(f"{path} has no column {name!r} (columns found: {', '.join(columns) or 'none'}); set {option} in the task spec")
    return [row.get(name) for row in rows]


def _texts(values: list[Any], path: Path, column: str) -> list[str]:
    out = []
    for i, v in enumerate(values, start=1):
        if v is None or (isinstance(v, float) and v != v):
            raise DataError(f"{path} row {i} has no {column!r}; fill it in or drop the row")
        out.append(str(v))
    return out


def load_local_source(spec: TaskSpec) -> SourceData:
    """Read a local task described by ``spec`` into :class:`SourceData` (labels mapped, hashed)."""
    files: dict[str, Path] = {}
    if spec.path:
        files["train"] = Path(spec.path).expanduser()
    for split, value in (("train", spec.train_file), ("validation", spec.validation_file), ("test", spec.test_file)):
        if value:
            files[split] = Path(value).expanduser()
    problem_type = spec.problem_type or "classification"
    raw: dict[str, tuple[list[str], list[Any], list[str] | None]] = {}
    for split, path in files.items():
        rows, columns = read_rows(path, spec.format, spec.encoding)
        texts = _texts(_column(rows, columns, spec.text_column, path, "text_column"), path, spec.text_column)
        pairs = None
        if spec.text_pair_column:
            pairs = _texts(_column(rows, columns, spec.text_pair_column, path, "text_pair_column"), path, spec.text_pair_column)
        labels = _column(rows, columns, spec.label_column, path, "label_column")
        if problem_type == "regression":
            labels = [regression_value(v, f"{path} row {i}") for i, v in enumerate(labels, start=1)]
        else:
            labels = [label_key(v, f"{path} row {i}") for i, v in enumerate(labels, start=1)]
        raw[split] = (texts, labels, pairs)

    label_names: tuple[str, ...] = ()
    given: dict[str, Examples] = {}
    if problem_type == "classification":
        if len(raw) > 1:
            check_given_label_sets({s: set(v[1]) for s, v in raw.items()}, f"task {spec.name}")
        all_keys = [k for v in raw.values() for k in v[1]]
        mapping, label_names = build_label_mapping(all_keys, spec.label_names, f"task {spec.name}")
        for split, (texts, labels, pairs) in raw.items():
            given[split] = Examples(texts, [mapping[k] for k in labels], pairs)
    else:
        for split, (texts, labels, pairs) in raw.items():
            given[split] = Examples(texts, labels, pairs)

    content_hash = hash_records(
        {"split": s, "text": ex.texts[i], "label": ex.labels[i], **({"text_pair": ex.text_pairs[i]} if ex.text_pairs is not None else {})}
        for s, ex in sorted(given.items())
        for i in range(len(ex))
    )
    metric = spec.metric or ("pearson_spearman" if problem_type == "regression" else "accuracy")
    return SourceData(
        name=spec.name,
        problem_type=problem_type,
        metric=metric,
        label_names=label_names,
        given=given,
        content_hash=content_hash,
        source="local:" + ",".join(f"{s}={p}" for s, p in files.items()),
        meta={"files": {s: str(p) for s, p in files.items()}},
    )
