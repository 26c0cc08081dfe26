"""``osrm-lora run CONFIG --check``: the config's tasks, model, LoRA targets, inits and merge methods
resolved and described without the network and without writing anything."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from osrm_lora.backbone import default_target_modules, resolve_model_path
from osrm_lora.config import MERGE_SEARCHES, MergeSettings, PipelineConfig, RMMSettings, SearchSettings
from osrm_lora.constraints import Constraint, check_constraint_tasks
from osrm_lora.data import load_suite
from osrm_lora.data.canonical import canonical_paths
from osrm_lora.data.metrics import METRICS
from osrm_lora.data.sources.builtin import builtin_task, canonical_stem
from osrm_lora.data.sources.hf import GLUE_DATASET, glue_preset
from osrm_lora.data.sources.local import load_local_source
from osrm_lora.data.spec import TaskSpec
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.fsutil import cache_dir
from osrm_lora.merge.registry import get_method, resolve_params
from osrm_lora.pipeline.ledger import validate_force
from osrm_lora.pipeline.merging import lambda_grid


def check_merge_constraints(cfg: PipelineConfig, names: Sequence[str]) -> None:
    try:
        check_constraint_tasks([Constraint.parse(c) for c in cfg.merge.constraints], names)
    except OsrmError as exc:
        raise ConfigError(f"merge.constraints: {exc}; fix merge.constraints in the config") from None


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
"""The form of a Hugging Face Hub model id (``name`` or ``owner/name``)."""


def _model_type(config_json: Path) -> str | None:
    try:
        value = json.loads(config_json.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_model(name: str) -> tuple[str, str | None]:
    """Resolve the config's model without the network: ``(description, model_type or None)``.

    A local directory (or the embedded default) must exist and hold a ``config.json``; a Hub id is
    looked up in the local Hugging Face cache only. An id that is not cached is checked for its form
    (``owner/name``) alone: whether it exists on the Hub is learnt on the first run.
    """
    path = resolve_model_path(name)  # OsrmError for a missing path or a directory without config.json
    if Path(path).is_dir():
        return f"{path} (local directory)", _model_type(Path(path) / "config.json")
    if not HUB_ID.fullmatch(path) or ".." in path or "--" in path:
        raise ConfigError(f"model {name!r} is neither an existing model directory nor a Hugging Face Hub id "
                          "(owner/name); fix model in the config")
    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return f"{path} (Hugging Face Hub id, in the local cache)", _model_type(Path(cached))
    return f"{path} (Hugging Face Hub id, not cached: downloaded on the first run, not checked offline)", None


def _metric_for(spec: TaskSpec, default: str, problem_type: str) -> str:
    metric = spec.metric or default
    if METRICS[metric].problem_type != problem_type:
        raise ConfigError(f"task {spec.name}: metric {metric} is for {METRICS[metric].problem_type} but the task is "
                          f"{problem_type}; choose another metric")
    return metric


def check_task(spec: TaskSpec, cache_root: Path) -> str:
    """Describe one task without fetching anything: built-in tasks are looked up in the data cache,
    local files are read (and their columns and labels checked), HF/GLUE tasks are named only."""
    if spec.source == "builtin":
        bt = builtin_task(spec.data_name)
        data_path, meta_path = canonical_paths(canonical_stem(cache_root, bt.name))
        state = ("in the data cache" if data_path.is_file() and meta_path.is_file() else
                 f"not cached: fetched on the first run ({bt.source.registry} package {bt.source.package})")
        metric = _metric_for(spec, bt.metric, bt.problem_type)
        return f"{spec.name}: built-in {bt.name}, {bt.problem_type}, metric {metric}; {state}"
    if spec.source == "local":
        data = load_local_source(spec)
        metric = _metric_for(spec, data.metric, data.problem_type)
        files = spec.path or ", ".join(f for f in (spec.train_file, spec.validation_file, spec.test_file) if f)
        sizes = ", ".join(f"{split} {len(ex.texts)}" for split, ex in data.given.items())
        labels = f", labels {list(data.label_names)}" if data.label_names else ""
        return f"{spec.name}: local {files}, {data.problem_type}{labels}, metric {metric}; {sizes} examples"
    if spec.source == "glue":
        task = spec.dataset or spec.name.removeprefix("glue/")
        preset = glue_preset(task)
        metric = _metric_for(spec, preset.metric, preset.problem_type)
        return (f"{spec.name}: GLUE {task} ({GLUE_DATASET}), {preset.problem_type}, metric {metric}; "
                "loaded from Hugging Face at run time, not checked offline")
    if not spec.dataset:
        raise ConfigError(f"task {spec.name}: source hf needs dataset (a Hugging Face dataset name); set it in the task spec")
    where = spec.dataset + (f"/{spec.config}" if spec.config else "")
    return f"{spec.name}: Hugging Face dataset {where}; loaded at run time, not checked offline"


def task_specs(cfg: PipelineConfig) -> list[TaskSpec]:
    """The suite's and the listed task specs, in run order; ConfigError on duplicate names."""
    specs = (list(load_suite(cfg.suite)) if cfg.suite else []) + [TaskSpec.parse(t) for t in cfg.tasks]
    names = [s.name for s in specs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"duplicate task names {dups}; give each task a unique name")
    return specs


def describe_merge(merge: MergeSettings, n_tasks: int) -> list[str]:
    """One line per merge method: its resolved parameters and the scalings it is merged at."""
    lines = []
    for method in merge.methods:
        info = get_method(method)
        given = merge.params.get(method, {})
        resolved = resolve_params(info, given, n_tasks)
        grid, source = lambda_grid(info, given, merge.lambdas)
        how = {"validation": f"lambda chosen on validation from {grid}",
               "config": f"scaling {grid[0]:g} from merge.params (no lambda sweep)",
               None: "no scaling (one merge)"}[source]
        shown = ", ".join(f"{k}={v}" for k, v in resolved.items() if k != "scaling" and v is not None) or "defaults"
        needs = f"; needs {', '.join(sorted(info.needs))}" if info.needs else ""
        lines.append(f"{method}: {shown}; {how}{needs}")
    if merge.rmm is not None:
        lines.append(f"rmm: {describe_rmm(merge.rmm)}")
    if merge.search is not None:
        lines.append(f"search: {describe_search(merge.search)}")
    return lines


def _seed_text(seed: int | None) -> str:
    return "the run's seed" if seed is None else f"seed {seed}"


def describe_rmm(rmm: RMMSettings) -> str:
    """One line: what merge.rmm searches and with which budget."""
    cands = "each task's adapter" + (f" and the merges by {', '.join(rmm.methods)}" if rmm.methods else "")
    params = "; ".join(f"{m}: {', '.join(f'{k}={v}' for k, v in p.items())}" for m, p in rmm.params.items())
    return (f"Reinforced Model Merging per init after the sweeps; candidates {cands}"
            + (f" ({params})" if params else "") + f"; up to {rmm.episodes} episodes and {rmm.budget} evaluations on "
            f"validation ({rmm.subset_size} examples per task per reward, {rmm.rescore} re-scored on the whole "
            f"split); {_seed_text(rmm.seed)}")


def describe_search(search: SearchSettings) -> str:
    """One line: what merge.search searches and with which budget."""
    b = search.budget
    limits = [f"{b.evaluations:g} full-validation evaluations" if b.evaluations is not None else "",
              f"{b.seconds:g} s" if b.seconds is not None else "", f"{b.trials} trials" if b.trials is not None else ""]
    groups = "one group per layer" if search.n_groups is None else f"{search.n_groups} layer groups"
    return (f"multi-fidelity merge search per init after the sweeps; methods {', '.join(search.methods)}; {groups}"
            f"{' with adapter masks' if search.masks else ''}; objective {search.objective}, sampler "
            f"{search.sampler}, pruner {search.pruner}, {search.rungs} fidelities (eta {search.eta}) on validation; "
            f"budget {', '.join(x for x in limits if x)}; {_seed_text(search.seed)}")


def check_run(cfg: PipelineConfig, *, force: Sequence[str] = (), cache: str | None = None) -> list[str]:
    """What ``osrm-lora run CONFIG --check`` prints: the resolved tasks, model, LoRA targets, inits and
    merge methods with their parameters, as lines. Raises the run's one-line OsrmError on the first
    problem. Touches no network and writes nothing: built-in data and Hub models are looked up in
    their caches (not cached = fetched on the first run), local data files are read."""
    forced = validate_force(force)
    specs = task_specs(cfg)
    check_merge_constraints(cfg, [s.name for s in specs])
    root = cache_dir(cache)
    task_lines = [check_task(s, root) for s in specs]
    model, model_type = check_model(cfg.model)
    if cfg.lora.target_modules:
        targets = ", ".join(cfg.lora.target_modules)
    elif model_type:
        targets = ", ".join(default_target_modules(model_type)) + f" (default for {model_type})"
    else:
        targets = "the architecture's default, resolved when the model is downloaded"
    searches = [k for k in MERGE_SEARCHES if getattr(cfg.merge, k) is not None]
    lines = [f"config {cfg.name}: OK ({len(specs)} tasks, {len(cfg.inits)} inits, {len(cfg.merge.methods)} merge methods"
             + (f", merge searches {', '.join(searches)}" if searches else "") + ")",
             f"model: {model}", f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, targets {targets}"]
    lines += [f"task {t}" for t in task_lines]
    lines += [f"init {i.name}: mode {i.mode}" + (", A frozen" if i.freeze_A else "") + (", B frozen" if i.freeze_B else "")
              for i in cfg.inits]
    lines += [f"merge {m}" for m in describe_merge(cfg.merge, len(specs))]
    if forced:
        lines.append(f"force: {', '.join(sorted(forced))}")
    return lines
