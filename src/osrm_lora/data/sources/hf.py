"""Hugging Face datasets (online users) and the eight GLUE tasks as presets.

GLUE's test labels are hidden, so a GLUE task's ``test`` is GLUE's validation split
(``validation_matched`` for MNLI) and its ``validation`` is a seeded, stratified held-out part of
GLUE's train (carved by :func:`osrm_lora.data.splits.make_splits`). The loader is injectable:
tests pass a function returning a local ``datasets.DatasetDict`` with GLUE's columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from osrm_lora.data.canonical import Examples, SourceData, hash_records
from osrm_lora.data.labels import build_label_mapping, label_key, regression_value
from osrm_lora.errors import DataError, OsrmError, SourceUnavailableError

if TYPE_CHECKING:
    from osrm_lora.data.spec import TaskSpec

logger = logging.getLogger(__name__)

GLUE_DATASET = "nyu-mll/glue"

#: ``loader(dataset, config) -> mapping of split name -> dataset`` (``datasets.load_dataset`` by default).
HFLoader = Callable[[str, "str | None"], Mapping[str, Any]]


@dataclass(frozen=True)
class GluePreset:
    """Columns, metric and problem type of one GLUE task, and the GLUE split used as our test."""

    text_column: str
    text_pair_column: str | None
    metric: str
    problem_type: str
    test_split: str = "validation"


GLUE_TASKS: dict[str, GluePreset] = {
    "cola": GluePreset("sentence", None, "matthews", "classification"),
    "sst2": GluePreset("sentence", None, "accuracy", "classification"),
    "mrpc": GluePreset("sentence1", "sentence2", "acc_f1", "classification"),
    "qqp": GluePreset("question1", "question2", "acc_f1", "classification"),
    "stsb": GluePreset("sentence1", "sentence2", "pearson_spearman", "regression"),
    "mnli": GluePreset("premise", "hypothesis", "accuracy", "classification", "validation_matched"),
    "qnli": GluePreset("question", "sentence", "accuracy", "classification"),
    "rte": GluePreset("sentence1", "sentence2", "accuracy", "classification"),
}


def glue_preset(task: str) -> GluePreset:
    try:
        return GLUE_TASKS[task]
    except KeyError:
        raise OsrmError(f"unknown GLUE task {task!r}; known: {', '.join('glue/' + t for t in GLUE_TASKS)}") from None


def default_loader(dataset: str, config: str | None) -> Mapping[str, Any]:
    """``datasets.load_dataset(dataset, config)``; network failures become SourceUnavailableError."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise SourceUnavailableError(f"Hugging Face dataset {dataset} needs the 'datasets' package; pip install datasets") from None
    try:
        return cast("Mapping[str, Any]", datasets.load_dataset(dataset, config))
    except (ConnectionError, OSError) as exc:
        raise SourceUnavailableError(
            f"cannot load Hugging Face dataset {dataset}{'/' + config if config else ''} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); go online once to cache it, or use local files (source: local)"
        ) from None


def _columns(ds: Any) -> list[str]:
    return list(getattr(ds, "column_names", None) or list(ds.features))


def _label_names_from_features(ds: Any, column: str) -> tuple[str, ...] | None:
    feats = getattr(ds, "features", None)
    feat = feats.get(column) if feats is not None else None
    names = getattr(feat, "names", None)
    return tuple(str(n) for n in names) if names else None


def _get(ds: Any, column: str, split: str, where: str, option: str) -> list[Any]:
    cols = _columns(ds)
    if column not in cols:
        raise DataError(f"{where} split {split!r} has no column {column!r} (columns found: {', '.join(cols)}); set {option} in the task spec")
    return list(ds[column])


def resolve_hf_splits(available: list[str], requested: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """Our split name -> the dataset's split name. Default: train, validation, test where present."""
    if requested:
        bad = {ours: theirs for ours, theirs in requested.items() if theirs not in available}
        if bad:
            raise DataError(f"{where} has no split(s) {sorted(bad.values())} (splits found: {', '.join(available)}); fix hf_splits in the task spec")
        if "train" not in requested:
            raise DataError(f"{where}: hf_splits must map 'train'; e.g. {{train: train, test: validation}}")
        return dict(requested)
    if "train" not in available:
        raise DataError(f"{where} has no 'train' split (splits found: {', '.join(available)}); set hf_splits in the task spec")
    return {s: s for s in ("train", "validation", "test") if s in available}


def load_hf_source(spec: TaskSpec, loader: HFLoader | None = None) -> SourceData:
    """Load a ``source: hf`` or ``source: glue`` task into :class:`SourceData`."""
    loader = loader or default_loader
    config: str | None
    if spec.source == "glue":
        task = spec.dataset or spec.name.removeprefix("glue/")
        preset = glue_preset(task)
        dataset, config = GLUE_DATASET, task
        text_col, pair_col, label_col = preset.text_column, preset.text_pair_column, "label"
        problem_type = preset.problem_type
        metric = spec.metric or preset.metric
        requested: Mapping[str, str] | None = {"train": "train", "test": preset.test_split}
    else:
        if not spec.dataset:
            raise DataError(f"task {spec.name}: source hf needs dataset (a Hugging Face dataset name); set it in the task spec")
        dataset, config = spec.dataset, spec.config
        text_col, pair_col, label_col = spec.text_column, spec.text_pair_column, spec.label_column
        problem_type = spec.problem_type or "classification"
        metric = spec.metric or ("pearson_spearman" if problem_type == "regression" else "accuracy")
        requested = spec.hf_splits
    where = f"dataset {dataset}{'/' + config if config else ''}"
    dsdict = loader(dataset, config)
    available = list(dsdict.keys())
    mapping = resolve_hf_splits(available, requested, where)

    raw: dict[str, tuple[list[str], list[Any], list[str] | None]] = {}
    feature_names: tuple[str, ...] | None = None
    for ours, theirs in mapping.items():
        ds = dsdict[theirs]
        texts = [str(t) for t in _get(ds, text_col, theirs, where, "text_column")]
        pairs = [str(t) for t in _get(ds, pair_col, theirs, where, "text_pair_column")] if pair_col else None
        labels_raw = _get(ds, label_col, theirs, where, "label_column")
        if problem_type == "classification":
            feature_names = feature_names or _label_names_from_features(ds, label_col)
            keys = [label_key(v, f"{where} split {theirs} row {i}") for i, v in enumerate(labels_raw, start=1)]
            if keys and all(k == -1 for k in keys):
                if ours == "train":
                    raise DataError(f"{where} split {theirs!r} has hidden labels (all -1); map train to a labelled split in hf_splits")
                logger.info("%s split %s has hidden labels (all -1); carving %s from train instead", where, theirs, ours)
                continue
            labels: list[Any] = keys
        else:
            labels = [regression_value(v, f"{where} split {theirs} row {i}") for i, v in enumerate(labels_raw, start=1)]
        raw[ours] = (texts, labels, pairs)

    label_names: tuple[str, ...] = ()
    given: dict[str, Examples] = {}
    if problem_type == "classification":
        keys_all = [k for v in raw.values() for k in v[1]]
        names = list(spec.label_names) if spec.label_names else (list(feature_names) if feature_names else None)
        label_map, label_names = build_label_mapping(keys_all, names, f"task {spec.name}")
        for ours, (texts, labels, pairs) in raw.items():
            given[ours] = Examples(texts, [label_map[k] for k in labels], pairs)
    else:
        for ours, (texts, labels, pairs) in raw.items():
            given[ours] = Examples(texts, labels, pairs)

    content_hash = hash_records(
        {"split": s, "text": ex.texts[i], "label": ex.labels[i], **({"text_pair": ex.text_pairs[i]} if ex.text_pairs is not None else {})}
        for s, ex in sorted(given.items())
        for i in range(len(ex))
    )
    return SourceData(
        name=spec.name,
        problem_type=problem_type,  # type: ignore[arg-type]
        metric=metric,
        label_names=label_names,
        given=given,
        content_hash=content_hash,
        source=f"hf:{dataset}{'/' + config if config else ''}",
        meta={"hf_splits": mapping},
    )
