"""Task specifications (pydantic) and :func:`load_task`, the one entry point that builds a :class:`Task`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from osrm_lora.data.metrics import METRICS
from osrm_lora.data.task import SPLITS, Task
from osrm_lora.errors import ConfigError, OsrmError

logger = logging.getLogger(__name__)

SourceKind = Literal["builtin", "local", "hf", "glue"]

_LOCAL_FIELDS = ("path", "train_file", "validation_file", "test_file", "format", "encoding")
_HF_FIELDS = ("config", "hf_splits")
_COLUMN_FIELDS = ("text_column", "text_pair_column", "label_column")


class TaskSpec(BaseModel):
    """What a task is and where its data comes from.

    - ``builtin``: ``dataset`` (default: ``name``) is one of :data:`BUILTIN_TASKS`.
    - ``local``: ``path`` (one file, split here) or ``train_file`` (+ optional ``validation_file``,
      ``test_file``); ``format`` inferred from the suffix; columns renamable.
    - ``hf``: ``dataset`` (+ ``config``) for ``datasets.load_dataset``; ``hf_splits`` maps our
      split names to the dataset's.
    - ``glue``: ``dataset`` (default: ``name`` without ``glue/``) is a GLUE task.

    ``split_ratios`` (train, validation, test) and ``seed`` define the fixed split; ``max_train``
    and ``max_eval`` are seeded, stratified caps applied after it (``max_eval`` caps validation
    and test).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    source: SourceKind = "builtin"
    dataset: str | None = None
    config: str | None = None
    path: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    format: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = None
    encoding: str = "utf-8"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    hf_splits: dict[str, str] | None = None
    problem_type: Literal["classification", "regression"] | None = None
    metric: str | None = None
    label_names: tuple[str, ...] | None = None
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    max_train: int | None = Field(default=None, gt=0)
    max_eval: int | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if v != v.strip() or any(c in v for c in "\n\r\t"):
            raise ValueError("task name must not contain surrounding spaces or control characters")
        return v

    @field_validator("metric")
    @classmethod
    def _metric_known(cls, v: str | None) -> str | None:
        if v is not None and v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; use one of: {', '.join(sorted(METRICS))}")
        return v

    @field_validator("split_ratios")
    @classmethod
    def _ratios_ok(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or v[0] <= 0 or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_ratios {list(v)} must be three non-negative numbers summing to 1 with train > 0")
        return v

    @field_validator("hf_splits")
    @classmethod
    def _hf_splits_ok(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            bad = sorted(set(v) - set(SPLITS))
            if bad:
                raise ValueError(f"hf_splits keys {bad} are not split names; use {list(SPLITS)}")
        return v

    @model_validator(mode="after")
    def _source_fields(self) -> TaskSpec:
        set_fields = self.model_fields_set
        def misplaced(names: Iterable[str]) -> list[str]:
            return [n for n in names if n in set_fields and getattr(self, n) is not None]
        if self.source == "local":
            if not self.path and not self.train_file:
                raise ValueError("a local task needs path (one file) or train_file (one file per split)")
            if self.path and (self.train_file or self.validation_file or self.test_file):
                raise ValueError("give either path (one file, split here) or train_file/validation_file/test_file, not both")
            wrong = misplaced(("dataset", *_HF_FIELDS))
        elif self.source == "hf":
            wrong = misplaced(_LOCAL_FIELDS)
        else:  # builtin, glue: data layout is fixed
            wrong = misplaced((*_LOCAL_FIELDS, *_HF_FIELDS, *_COLUMN_FIELDS, "problem_type", "label_names"))
        if wrong:
            raise ValueError(f"field(s) {wrong} do not apply to source {self.source!r}; remove them")
        if self.metric and self.problem_type:
            kind = METRICS[self.metric].problem_type
            if kind != self.problem_type:
                raise ValueError(f"metric {self.metric} is for {kind}, but problem_type is {self.problem_type}")
        return self

    # ------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, obj: str | TaskSpec | Mapping[str, Any]) -> TaskSpec:
        """A spec from a built-in name, ``glue/<task>``, a mapping (YAML/JSON) or a spec; ConfigError if invalid."""
        if isinstance(obj, TaskSpec):
            return obj
        if isinstance(obj, str):
            return spec_from_name(obj)
        if isinstance(obj, Mapping):
            try:
                return cls.model_validate(dict(obj))
            except ValidationError as exc:
                raise ConfigError(f"invalid task spec {dict(obj).get('name', '?')!r}: {_one_line(exc)}") from None
        raise ConfigError(f"a task must be a name or a mapping, got {type(obj).__name__}; write e.g. 'mr' or {{name: mr}}")

    @property
    def data_name(self) -> str:
        """The name of the underlying data (built-in task, GLUE task), which keys caches and splits."""
        if self.source == "builtin":
            return self.dataset or self.name
        if self.source == "glue":
            return "glue/" + (self.dataset or self.name.removeprefix("glue/"))
        return self.name


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def known_task_names() -> list[str]:
    from osrm_lora.data.sources.builtin import BUILTIN_TASKS
    from osrm_lora.data.sources.hf import GLUE_TASKS

    return sorted(BUILTIN_TASKS) + [f"glue/{t}" for t in GLUE_TASKS]


def spec_from_name(name: str) -> TaskSpec:
    """A default spec for a built-in task name or ``glue/<task>``; OsrmError listing known names."""
    from osrm_lora.data.sources.builtin import BUILTIN_TASKS
    from osrm_lora.data.sources.hf import GLUE_TASKS

    if name in BUILTIN_TASKS:
        return TaskSpec(name=name, source="builtin")
    if name.startswith("glue/") and name.removeprefix("glue/") in GLUE_TASKS:
        return TaskSpec(name=name, source="glue")
    from osrm_lora.data.sources.local import _SUFFIXES

    path = Path(name).expanduser()
    if path.suffix.lower() in _SUFFIXES:  # a local data file given as a task (`train --task data.jsonl`)
        if not path.exists():
            raise OsrmError(f"task file {name} does not exist; check the path (or name a built-in task)")
        # absolute, so that the spec recorded with an adapter (metrics.json) finds the file from anywhere
        return TaskSpec(name=path.stem, source="local", path=str(path.resolve()))
    raise OsrmError(f"unknown task {name!r}; known tasks: {', '.join(known_task_names())} (or a local/hf task spec)")


def resolve_specs(items: Iterable[str | TaskSpec | Mapping[str, Any]]) -> list[TaskSpec]:
    """Parse a list of task entries; ConfigError on duplicate task names."""
    specs = [TaskSpec.parse(item) for item in items]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"task {spec.name!r} is listed twice; give each task a unique name")
        seen.add(spec.name)
    return specs


def load_task(
    spec: str | TaskSpec | Mapping[str, Any],
    cache: str | Path | None = None,
    *,
    hf_loader: Any = None,
    downloader: Any = None,
) -> Task:
    """Build a :class:`Task` with fixed, stored splits (and seeded caps) from a spec.

    ``spec`` is a built-in name (``"mr"``), ``"glue/<task>"``, a mapping or a :class:`TaskSpec`.
    ``cache`` overrides the cache root (default :func:`osrm_lora.fsutil.cache_dir`).
    ``hf_loader`` replaces ``datasets.load_dataset`` and ``downloader`` the registry clients
    (both for tests and offline stand-ins).
    """
    from osrm_lora.data import splits as splitting
    from osrm_lora.fsutil import cache_dir

    spec = TaskSpec.parse(spec)
    root = cache_dir(cache)
    if spec.source == "builtin":
        from osrm_lora.data.sources.builtin import builtin_task, ensure_canonical

        bt = builtin_task(spec.data_name)
        data = ensure_canonical(bt, root, downloader)
    elif spec.source == "local":
        from osrm_lora.data.sources.local import load_local_source

        data = load_local_source(spec)
    else:
        from osrm_lora.data.sources.hf import load_hf_source

        data = load_hf_source(spec, hf_loader)
        data.name = spec.data_name
    metric = spec.metric or data.metric
    if METRICS[metric].problem_type != data.problem_type:
        raise ConfigError(f"task {spec.name}: metric {metric} is for {METRICS[metric].problem_type} but the task is {data.problem_type}; choose another metric")
    full, info = splitting.make_splits(data, spec.split_ratios, spec.seed, root)
    capped = splitting.apply_caps(full, spec.max_train, spec.max_eval, spec.seed, data.problem_type == "classification")
    meta: dict[str, Any] = dict(data.meta)
    meta.update(
        spec=spec.model_dump(exclude_defaults=True),
        content_hash=data.content_hash,
        split=info,
        full_sizes={s: len(full[s]) for s in SPLITS},
        sizes={s: len(capped[s]) for s in SPLITS},
    )
    return Task(
        name=spec.name,
        problem_type=data.problem_type,
        metric=metric,
        label_names=data.label_names,
        train=capped["train"].to_split(),
        validation=capped["validation"].to_split(),
        test=capped["test"].to_split(),
        source=data.source,
        meta=meta,
    )


def load_tasks(specs: Iterable[str | TaskSpec | Mapping[str, Any]], cache: str | Path | None = None, **kwargs: Any) -> list[Task]:
    """:func:`load_task` for each entry, after checking names are unique."""
    return [load_task(s, cache, **kwargs) for s in resolve_specs(specs)]
