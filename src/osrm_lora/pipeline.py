"""The pipeline: tasks -> profile -> init -> train -> diagnose -> merge+evaluate -> results/report.

Run directory layout (stable; documented in the README)::

    RUN_DIR/
      config.yaml                      resolved config
      manifest.json                    seeds, versions, device, stage timings, hashes
      stats/                           activation statistics store (OSRM inits only)
      adapters/<init>/<task>/          PEFT adapter + head.safetensors/head.json + metrics.json
      diagnostics/<init>/              interference.json + interference.png
      merges/<init>/<method>/          merged adapter (selected lambda) + sweep.json + README.md card
      merges/<init>/{rmm,search}/      merge.rmm / merge.search: rmm.json / search.json (+ search.db),
                                       merged/ (the found merge), sweep.json (the results record)
      results.json                     every number, named by init, method, lambda, seed and split
      report.md, report.html           human-readable summary
      .stages/<stage>.json             input hash of each finished stage (resume / skip)

Each stage writes its artifact atomically and then records a hash of its inputs; rerunning the same
config into the same directory skips finished stages and redoes unfinished ones.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import try_to_load_from_cache

import osrm_lora.rmm as rmm_lib
import osrm_lora.search as search_lib
from osrm_lora.adapters import load_adapter
from osrm_lora.backbone import (
    default_target_modules,
    load_classifier,
    load_tokenizer,
    resolve_model_path,
    select_device,
)
from osrm_lora.config import (
    MERGE_SEARCHES,
    InitSettings,
    MergeSettings,
    PipelineConfig,
    RMMSettings,
    SearchSettings,
    config_to_dict,
)
from osrm_lora.constraints import Constraint, check_constraint_tasks, shortfalls
from osrm_lora.data import load_suite, load_task
from osrm_lora.data.canonical import canonical_paths
from osrm_lora.data.metrics import METRICS
from osrm_lora.data.sources.builtin import builtin_task, canonical_stem
from osrm_lora.data.sources.hf import GLUE_DATASET, glue_preset
from osrm_lora.data.sources.local import load_local_source
from osrm_lora.data.spec import TaskSpec
from osrm_lora.data.task import Task
from osrm_lora.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    check_same,
    from_rank0,
    get_env,
    main_first,
    raise_if_any_failed,
    shard,
)
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.evaluate import mean, normalised
from osrm_lora.fsutil import atomic_file, cache_dir, claim_output, read_json, sha256_json, write_json
from osrm_lora.memory import measure_peak
from osrm_lora.merge.registry import MethodInfo, get_method, resolve_params
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.report.tables import grid_edge

logger = logging.getLogger(__name__)

LEDGER_STAGES: tuple[str, ...] = ("profile", "train", "diagnose", "merge")
"""The stages the :class:`StageLedger` records, skips when finished and re-runs under ``--force``."""
STAGES = LEDGER_STAGES
"""What ``--force`` accepts (plus ``all``). Task data is read every run (the download cache is kept:
delete it to fetch again), the OSRM initialisation is computed inside ``train`` and the report is
rewritten at the end of every run, so none of them is a stage of its own. Forcing a stage re-runs
it; the stages after it re-run when its outputs changed (their inputs hash those outputs)."""

_STAGE_HINT = "data is read every run, the OSRM init is part of train, the report is rewritten every run"


def validate_force(force: Sequence[str]) -> frozenset[str]:
    """The ``--force`` stage names as a set; ConfigError naming unknown ones."""
    bad = sorted(set(force) - set(STAGES) - {"all"})
    if bad:
        raise ConfigError(f"unknown stage(s) {bad} for --force; choose from {', '.join(STAGES)} or all "
                          f"({_STAGE_HINT})")
    return frozenset(force)


# --------------------------------------------------------------------------- stage bookkeeping
@dataclass
class StageLedger:
    """Records finished stages (by input hash) so reruns skip them; ``force`` names stages to redo.

    ``timings`` holds the seconds of every stage of this invocation by stage id, in the order met:
    measured for those that ran and, for those skipped as finished, the time recorded when they ran
    (``previous``: the last manifest's ``stage_seconds``, else the stage's marker).
    """

    run_dir: Path
    force: frozenset[str] = frozenset()
    timings: dict[str, float] = field(default_factory=dict)
    previous: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)  # stage ids skipped as finished, in the order met

    def _marker(self, stage_id: str) -> Path:
        return self.run_dir / ".stages" / f"{stage_id.replace('/', '__')}.json"

    def done(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path]) -> bool:
        if stage not in LEDGER_STAGES:
            raise ValueError(f"stage {stage!r} is not one of the ledger's stages {LEDGER_STAGES}")
        if stage in self.force or "all" in self.force:
            return False
        marker = self._marker(stage_id)
        if not marker.exists() or not all(p.exists() for p in outputs):
            return False
        try:
            return read_json(marker).get("inputs") == sha256_json(payload)
        except OsrmError:
            return False

    def finish(self, stage: str, stage_id: str, payload: Any, seconds: float) -> None:
        self.timings[stage_id] = round(seconds, 3)
        write_json(self._marker(stage_id), {"stage": stage, "id": stage_id, "inputs": sha256_json(payload), "seconds": seconds})

    def skip(self, stage_id: str) -> None:
        """Record a stage skipped as finished, with the seconds it took when it ran (if known)."""
        logger.info("skipping %s (finished, inputs unchanged)", stage_id)
        self.cached.append(stage_id)
        seconds = self.previous.get(stage_id)
        if seconds is None:
            try:
                seconds = read_json(self._marker(stage_id)).get("seconds")
            except OsrmError:
                seconds = None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            self.timings[stage_id] = round(float(seconds), 3)

    def run(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless the stage is done with the same inputs. Returns True if it ran."""
        if self.done(stage, stage_id, payload, outputs):
            self.skip(stage_id)
            return False
        t0 = time.perf_counter()
        fn()
        self.finish(stage, stage_id, payload, time.perf_counter() - t0)
        return True

    def run_collective(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path],
                       fn: Callable[[], Any]) -> bool:
        """:meth:`run` for a stage that every process runs together (sharded profiling, DDP training):
        rank 0 decides whether it is done, every rank runs ``fn``, rank 0 records it."""
        env = get_env()
        done = broadcast_object(self.done(stage, stage_id, payload, outputs) if env.is_main else None)
        if done:
            if env.is_main:
                self.skip(stage_id)
            return False
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            fn()
        except Exception as exc:  # every rank must learn of a failure, or the others wait forever
            error = exc
        raise_if_any_failed(error)
        if env.is_main:
            self.finish(stage, stage_id, payload, time.perf_counter() - t0)
        barrier()
        return True


def run_jobs(jobs: Sequence[Any], fn: Callable[[Any], Any]) -> None:
    """Run independent jobs spread over the processes (round robin; all of them in one process),
    then wait for every process. A failure on any rank is raised on every rank."""
    error: BaseException | None = None
    for job in shard(jobs):
        try:
            fn(job)
        except Exception as exc:
            error = exc
            break
    raise_if_any_failed(error)
    barrier()


def task_fingerprint(task: Task) -> str:
    """Content hash of a task's splits (texts, pairs, labels) and metric."""
    payload = {
        "name": task.name,
        "metric": task.metric,
        "problem_type": task.problem_type,
        "labels": list(task.label_names),
    }
    for split in ("train", "validation", "test"):
        s = task.split(split)
        payload[split] = sha256_json([list(s.texts), list(s.labels), list(s.text_pairs or [])])
    return sha256_json(payload)


# --------------------------------------------------------------------------- stages
def _check_constraints(cfg: PipelineConfig, names: Sequence[str]) -> None:
    try:
        check_constraint_tasks([Constraint.parse(c) for c in cfg.merge.constraints], names)
    except OsrmError as exc:
        raise ConfigError(f"merge.constraints: {exc}; fix merge.constraints in the config") from None


def resolve_tasks(cfg: PipelineConfig, cache: str | None = None, hf_loader: Any = None) -> list[Task]:
    """Load the suite's and the listed tasks (duplicate names are an error).

    ``hf_loader`` replaces ``datasets.load_dataset`` for HF/GLUE tasks (offline stand-ins in tests).
    """
    specs: list[Any] = []
    if cfg.suite:
        specs.extend(load_suite(cfg.suite))
    specs.extend(cfg.tasks)
    tasks = [load_task(s, cache=cache, hf_loader=hf_loader) for s in specs]
    names = [t.name for t in tasks]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"duplicate task names {dups}; give each task a unique name")
    _check_constraints(cfg, names)
    if len(tasks) < 2:
        logger.warning("only one task: merging needs two or more to be meaningful")
    return tasks


def _target_modules(cfg: PipelineConfig, model_path: str) -> list[str]:
    if cfg.lora.target_modules:
        return list(cfg.lora.target_modules)
    from transformers import AutoConfig

    return default_target_modules(AutoConfig.from_pretrained(model_path).model_type)


def profile_stage(cfg: PipelineConfig, tasks: Sequence[Task], model_path: str, out: Path) -> None:
    """Collect the activation statistics of every task (train split) under the pre-trained model."""
    from osrm_lora.stats import collect_statistics

    tokenizer = load_tokenizer(model_path)
    model = load_classifier(model_path, 2, device=select_device(cfg.device), pad_token_id=tokenizer.pad_token_id)
    texts = {t.name: (list(t.train.texts), None if t.train.text_pairs is None else list(t.train.text_pairs)) for t in tasks}
    store = collect_statistics(  # sharded over the processes when there are several; same store on all
        model,
        tokenizer,
        texts,
        _target_modules(cfg, model_path),
        n_samples=cfg.profile.n_samples,
        max_length=cfg.train.max_length,
        batch_size=cfg.profile.batch_size,
        include_padding=cfg.profile.include_padding,
        dtype=torch.float64 if cfg.profile.dtype == "float64" else torch.float32,
        seed=cfg.seed,
    )
    if get_env().is_main:
        store.save(out)


def init_subspaces(cfg: PipelineConfig, init: InitSettings, tasks: Sequence[Task], stats_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """OSRM bases per task per module for one init (empty dict for ``standard``).

    Rows are ordered best first, ``subspace_dim`` (default: the LoRA rank) rows per module.
    """
    if init.mode == "standard":
        return {}
    from osrm_lora.osrm import compute_osrm_A
    from osrm_lora.stats import StatsStore

    store = StatsStore.load(stats_dir)
    k = init.subspace_dim or cfg.lora.rank
    if k < cfg.lora.rank:
        raise ConfigError(f"init {init.name}: subspace_dim {k} is smaller than the LoRA rank {cfg.lora.rank}; "
                          "use subspace_dim >= rank")
    return compute_osrm_A(store, [t.name for t in tasks], k, init.mode, ridge=init.ridge,
                          device=select_device(cfg.device), solver=init.solver)


# --------------------------------------------------------------------------- run --check
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
    _check_constraints(cfg, [s.name for s in specs])
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


# --------------------------------------------------------------------------- the run
@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    ledger: StageLedger
    model_path: str
    tasks: list[Task]
    fingerprints: dict[str, str]
    stats_hash: str | None = None  # content hash of the statistics store, computed once after profiling
    adapter_hashes: dict[str, list[str | None]] = field(default_factory=dict)  # per init, once after training
    stage_seconds: dict[str, float] = field(default_factory=dict)  # every process's stage timings
    stages_cached: list[str] = field(default_factory=list)  # every process's stages skipped as finished


def _write_config(cfg: PipelineConfig, run_dir: Path) -> None:
    with atomic_file(run_dir / "config.yaml") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)


def output_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every weight file the run produced (adapters, heads, merged results), by relative path."""
    from osrm_lora.fsutil import sha256_file

    files = [p for sub in ("adapters", "merges") for p in sorted((run_dir / sub).rglob("*.safetensors"))
             if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    return {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in files}


def _manifest(ctx: RunContext, started: float) -> dict[str, Any]:
    import peft
    import transformers

    dev = select_device(ctx.cfg.device)
    return {
        "name": ctx.cfg.name,
        "seed": ctx.cfg.seed,
        "model": ctx.model_path,
        "tasks": {t.name: {"fingerprint": ctx.fingerprints[t.name], "source": t.source, "n_train": len(t.train),
                           "n_validation": len(t.validation), "n_test": len(t.test)} for t in ctx.tasks},
        "config_hash": sha256_json(config_to_dict(ctx.cfg)),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "osrm_lora": __import__("osrm_lora").__version__,
        },
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1) if dev.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processes": get_env().world_size,
        "output_hashes": output_hashes(ctx.run_dir),
        "stage_seconds": ctx.stage_seconds,
        "stages_cached": ctx.stages_cached,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def previous_stage_seconds(run_dir: Path) -> dict[str, float]:
    """``stage_seconds`` of the run directory's last manifest (empty when there is none or it is unreadable)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        seconds = read_json(path).get("stage_seconds") or {}
    except (OsrmError, AttributeError):
        return {}
    return {str(k): float(v) for k, v in seconds.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(seconds, dict) else {}


def _needs_grams(method: str) -> bool:
    """True when ``method`` merges with the tasks' activation statistics (RegMean's Gram matrices)."""
    return "grams" in get_method(method).needs


def lambda_grid(info: MethodInfo, params: dict[str, Any], lambdas: Sequence[float]) -> tuple[list[float], str | None]:
    """The scalings a method is merged at and where they come from: ``validation`` (the lambda grid,
    one chosen on validation), ``config`` (a ``scaling`` in ``merge.params``: used as is, no sweep), or
    None (the method has no scaling: one merge)."""
    if "scaling" not in {p.name for p in info.params}:
        return [1.0], None
    if params.get("scaling") is not None:
        return [float(params["scaling"])], "config"
    return list(lambdas), "validation"


def edge_lambda_warnings(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per merged record whose lambda, chosen on validation, is the smallest or largest of
    its grid (so the best lambda may lie outside the grid)."""
    lines = []
    for rec in records:
        grid = [float(p["lambda"]) for p in rec.get("curve", []) if isinstance(p.get("lambda"), (int, float))]
        edge = grid_edge(grid, rec.get("lambda")) if rec.get("lambda_source", "validation") == "validation" else None
        if edge:
            word = "largest" if edge == "upper" else "smallest"
            lines.append(f"{rec.get('init')}/{rec.get('method')}: lambda {rec['lambda']:g} chosen on validation is the "
                         f"{word} of the grid {[round(g, 6) for g in sorted(grid)]}; the best lambda may lie beyond "
                         "it: extend merge.lambdas")
    return lines


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str | Path,
    *,
    force: Sequence[str] = (),
    cache: str | None = None,
    hf_loader: Any = None,
) -> dict[str, Any]:
    """Run every stage of ``cfg`` into ``run_dir`` (resuming finished stages) and return the results.

    ``hf_loader`` replaces ``datasets.load_dataset`` for HF/GLUE tasks (offline stand-ins in tests).

    If this call created ``run_dir`` and fails with a user error before any stage finished, the
    directory is removed again, so bad input leaves no partial run behind.
    """
    run_dir = Path(run_dir)
    force = tuple(validate_force(force))  # before claiming the directory: a typo leaves nothing behind
    fresh = not run_dir.exists()
    env = get_env()
    if env.active:
        check_same(sha256_json(config_to_dict(cfg)), "the pipeline config")
        fresh = all(all_gather_objects(fresh))
    try:
        # one writer per run directory (lock naming PID and host); resumes an earlier run of ours,
        # refuses a file or a non-empty directory osrm-lora did not write (.stages: runs from before the marker)
        with claim_output(run_dir, resume=True, ours_if=(".stages",)):
            return _run_pipeline(cfg, run_dir, force=force, cache=cache, hf_loader=hf_loader)
    except OsrmError:
        if env.is_main and fresh and run_dir.is_dir() and not any((run_dir / ".stages").glob("*.json")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_pipeline(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    force: Sequence[str] = (),
    cache: str | None = None,
    hf_loader: Any = None,
) -> dict[str, Any]:
    forced = validate_force(force)
    started = time.perf_counter()
    if run_dir.exists() and not run_dir.is_dir():
        raise OsrmError(f"{run_dir} is a file; choose a directory for the run")
    torch.manual_seed(cfg.seed)
    env = get_env()
    model_path = resolve_model_path(cfg.model)
    with main_first():  # a first-time download into the shared cache happens once
        tasks = resolve_tasks(cfg, cache, hf_loader)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OsrmError(f"cannot create run directory {run_dir}: {exc.strerror}; choose a writable path") from None
    ledger = StageLedger(run_dir, forced, previous=previous_stage_seconds(run_dir))
    ctx = RunContext(cfg, run_dir, ledger, model_path, tasks, {t.name: task_fingerprint(t) for t in tasks})
    if env.active:
        check_same(ctx.fingerprints, "the task data")
    if env.is_main:
        _write_config(cfg, run_dir)
    if env.active:
        logger.info("%d processes (%s); training parallel over %s", env.world_size, env.backend,
                    _parallel_mode(cfg, len(tasks), env.world_size))
    for t in tasks:
        logger.info("task %-12s %-14s train %5d  validation %4d  test %4d  (%s)", t.name, t.metric, len(t.train),
                    len(t.validation), len(t.test), t.source or "local")

    needs_stats = (any(i.mode != "standard" or i.interference_penalty > 0 for i in cfg.inits) or cfg.diagnose
                   or any(_needs_grams(m) for m in cfg.merge.methods))
    stats_dir = run_dir / "stats"
    base_payload = {"model": model_path, "tasks": ctx.fingerprints, "seed": cfg.seed, "max_length": cfg.train.max_length,
                    "targets": cfg.lora.target_modules}
    if needs_stats:
        payload = {**base_payload, "profile": cfg.profile.model_dump(mode="json")}
        ctx.ledger.run_collective("profile", "profile", payload, [stats_dir],
                                  lambda: profile_stage(cfg, tasks, model_path, stats_dir))
        ctx.stats_hash = _dir_hash(stats_dir)

    _train_all(ctx, stats_dir, base_payload)
    train_results: dict[str, dict[str, dict[str, Any]]] = {}
    for init in cfg.inits:
        dirs = adapter_dirs(run_dir, init.name, tasks)
        train_results[init.name] = {t.name: read_json(d / "metrics.json") for t, d in zip(tasks, dirs)}
        ctx.adapter_hashes[init.name] = [_dir_hash(d) for d in dirs]

    if cfg.diagnose:
        run_jobs(cfg.inits, lambda init: _diagnose_init(ctx, init, stats_dir))
    diagnostics: dict[str, Any] = {init.name: read_json(run_dir / "diagnostics" / init.name / "interference.json")
                                   for init in cfg.inits} if cfg.diagnose else {}

    merge_jobs = [(init, method) for init in cfg.inits for method in cfg.merge.methods]
    run_jobs(merge_jobs, lambda job: _merge_init(ctx, job[0], job[1], stats_dir))
    merged = [read_json(run_dir / "merges" / init.name / method / "sweep.json") for init, method in merge_jobs]
    for line in edge_lambda_warnings(merged):
        logger.warning("%s", line)
    search_jobs = [(init, kind) for init in cfg.inits for kind in MERGE_SEARCHES if getattr(cfg.merge, kind) is not None]
    run_jobs(search_jobs, lambda job: _search_init(ctx, job[0], job[1]))
    merged += [read_json(run_dir / "merges" / init.name / kind / "sweep.json") for init, kind in search_jobs]

    for timings in all_gather_objects(ctx.ledger.timings):  # stages skipped as finished keep their earlier time
        ctx.stage_seconds.update(timings)
    ctx.stages_cached = sorted({s for cached in all_gather_objects(ctx.ledger.cached) for s in cached})
    results: dict[str, Any] | None = None
    if env.is_main:
        results = _assemble(ctx, train_results, merged, diagnostics)
        results["manifest"] = _manifest(ctx, started)
        write_json(run_dir / "results.json", results)
        write_json(run_dir / "manifest.json", results["manifest"])
        try:
            from osrm_lora.report import write_report

            write_report(run_dir)
        except ImportError:
            logger.debug("report module not available")
    results = broadcast_object(results)
    assert results is not None
    return results


def _parallel_mode(cfg: PipelineConfig, n_tasks: int, world_size: int) -> str:
    """How several processes share the training: ``tasks`` (one adapter per process at a time) or
    ``data`` (every adapter with all processes, DDP)."""
    if cfg.parallel != "auto":
        return cfg.parallel
    return "tasks" if n_tasks >= world_size else "data"


def _train_all(ctx: RunContext, stats_dir: Path, base_payload: dict[str, Any]) -> None:
    """Train every (init, task) adapter: in one process one after the other (or, with
    ``train.batched``, together in one pass); with several processes either spread over them
    (``parallel: tasks``; batched: each process trains its share together) or each with all of them
    (``parallel: data``, never batched)."""
    from osrm_lora.train import train_task

    cfg = ctx.cfg
    env = get_env()
    mode = _parallel_mode(cfg, len(ctx.tasks), env.world_size) if env.active else "tasks"
    subspaces: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    # `batched` enters the stage inputs only when set, so runs made before the setting existed stay finished
    train_payload = cfg.train.model_dump(mode="json", exclude=None if cfg.train.batched else {"batched"})

    def stage(init: InitSettings, task: Task) -> tuple[str, Path, dict[str, Any]]:
        adir = ctx.run_dir / "adapters" / init.name / task_dirname(task.name)
        payload = {**base_payload, "task": ctx.fingerprints[task.name], "init": init.model_dump(mode="json", exclude={"solver"} if init.solver == "eigh" else None),
                   "lora": cfg.lora.model_dump(mode="json"), "train": train_payload,
                   "stats": ctx.stats_hash if init.mode != "standard" or init.interference_penalty > 0 else None}
        return f"train/{init.name}/{task.name}", adir, payload

    def options(init: InitSettings, task: Task) -> dict[str, Any]:
        """The per-adapter arguments of train_task (and of a batched AdapterJob)."""
        if init.mode != "standard" and init.name not in subspaces:
            if mode == "data":  # every rank must train with the same subspace: rank 0's, broadcast
                subspaces[init.name] = from_rank0(lambda: {
                    t: {k: U.cpu() for k, U in b.items()}
                    for t, b in init_subspaces(cfg, init, ctx.tasks, stats_dir).items()})
            else:
                subspaces[init.name] = init_subspaces(cfg, init, ctx.tasks, stats_dir)
        basis = subspaces.get(init.name, {}).get(task.name)
        init_A = {k: U[: cfg.lora.rank].contiguous() for k, U in basis.items()} if basis else None
        grams = None
        if init.interference_penalty > 0:
            from osrm_lora.osrm import interference_grams
            from osrm_lora.stats import StatsStore

            grams = interference_grams(StatsStore.load(stats_dir), task.name, [t.name for t in ctx.tasks])
        return {"init_A": init_A, "freeze_A": init.freeze_A, "freeze_B": init.freeze_B, "init_name": init.name,
                "A_subspace": basis if init.subspace_dim else None, "b_sparsity": init.b_sparsity,
                "calibration_epochs": init.calibration_epochs, "interference_grams": grams,
                "interference_penalty": init.interference_penalty}

    def job(item: tuple[InitSettings, Task]) -> None:
        init, task = item
        stage_id, adir, payload = stage(init, task)

        def _do() -> None:
            train_task(task, adir, model=ctx.model_path, lora=cfg.lora, train=cfg.train, seed=cfg.seed,
                       device=cfg.device, data_parallel=mode == "data", **options(init, task))

        run = ctx.ledger.run_collective if mode == "data" else ctx.ledger.run
        run("train", stage_id, payload, [adir / "metrics.json"], _do)

    jobs = [(init, task) for init in cfg.inits for task in ctx.tasks]
    if mode == "data":
        if cfg.train.batched:
            logger.warning("train.batched is ignored with parallel: data (each adapter trains with all processes)")
        for item in jobs:
            job(item)
    elif cfg.train.batched:
        _train_batched(ctx, jobs, stage, options, job)
    else:
        run_jobs(jobs, job)


def _train_batched(
    ctx: RunContext,
    jobs: Sequence[tuple[InitSettings, Task]],
    stage: Callable[[InitSettings, Task], tuple[str, Path, dict[str, Any]]],
    options: Callable[[InitSettings, Task], dict[str, Any]],
    solo: Callable[[tuple[InitSettings, Task]], None],
) -> None:
    """``train.batched``: this process's share of the (init, task) adapters that are not finished,
    trained together in one pass; each is recorded in the ledger (``train/<init>/<task>``, with its
    share of the pass's time) as soon as it is written. Adapters the batched path refuses
    (:class:`~osrm_lora.train_batched.BatchingUnsupported`) are trained one at a time instead."""
    from osrm_lora.train import TrainResult
    from osrm_lora.train_batched import AdapterJob, BatchingUnsupported, train_tasks_batched

    cfg = ctx.cfg
    error: BaseException | None = None
    try:
        pending = []
        for init, task in shard(jobs):
            stage_id, adir, payload = stage(init, task)
            if ctx.ledger.done("train", stage_id, payload, [adir / "metrics.json"]):
                ctx.ledger.skip(stage_id)
            else:
                pending.append((init, task, stage_id, adir, payload))
        if pending:
            specs = [AdapterJob(task, adir, seed=cfg.seed, train=cfg.train, **options(init, task))
                     for init, task, _, adir, _ in pending]

            def record(index: int, result: TrainResult) -> None:
                _, _, stage_id, _, payload = pending[index]
                ctx.ledger.finish("train", stage_id, payload, result.seconds)

            try:
                train_tasks_batched(specs, model=ctx.model_path, lora=cfg.lora, train=cfg.train, device=cfg.device,
                                    on_result=record)
            except BatchingUnsupported as exc:
                logger.warning("train.batched: %s; training these %d adapters one at a time", exc, len(pending))
                for init, task, *_ in pending:
                    solo((init, task))
    except Exception as exc:  # every rank must learn of a failure, or the others wait forever
        error = exc
    raise_if_any_failed(error)
    barrier()


def _dir_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    from osrm_lora.fsutil import sha256_file

    return sha256_json({p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()})


def task_dirname(name: str) -> str:
    """A task name as one path component (``glue/cola`` -> ``glue__cola``)."""
    return name.replace("/", "__")


def adapter_dirs(run_dir: Path, init: str, tasks: Sequence[Task]) -> list[Path]:
    return [run_dir / "adapters" / init / task_dirname(t.name) for t in tasks]


def _diagnose_init(ctx: RunContext, init: InitSettings, stats_dir: Path) -> None:
    from osrm_lora.diagnose import run_diagnose

    out = ctx.run_dir / "diagnostics" / init.name
    dirs = adapter_dirs(ctx.run_dir, init.name, ctx.tasks)
    payload = {"adapters": ctx.adapter_hashes[init.name], "stats": ctx.stats_hash}
    ctx.ledger.run("diagnose", f"diagnose/{init.name}", payload, [out / "interference.json"],
                   lambda: run_diagnose([str(d) for d in dirs], str(stats_dir), str(out)))


def _merge_init(ctx: RunContext, init: InitSettings, method: str, stats_dir: Path) -> None:
    cfg = ctx.cfg
    out = ctx.run_dir / "merges" / init.name / method
    dirs = adapter_dirs(ctx.run_dir, init.name, ctx.tasks)
    params = dict(cfg.merge.params.get(method, {}))
    payload = {"adapters": ctx.adapter_hashes[init.name], "method": method, "params": params,
               "lambdas": cfg.merge.lambdas, "seed": cfg.seed, "tasks": ctx.fingerprints}
    if _needs_grams(method):  # RegMean merges with the statistics: re-merge when they change
        payload["stats"] = ctx.stats_hash
    if cfg.merge.constraints:  # enters the inputs only when set, so earlier runs stay finished
        payload["constraints"] = cfg.merge.constraints
    ctx.ledger.run("merge", f"merge/{init.name}/{method}", payload, [out / "sweep.json"],
                   lambda: merge_and_sweep(ctx.model_path, ctx.tasks, dirs, method, params, cfg.merge.lambdas, out,
                                           max_length=cfg.train.max_length, batch_size=cfg.train.eval_batch_size,
                                           device=cfg.device, seed=cfg.seed, init_name=init.name,
                                           stats_dir=stats_dir if stats_dir.exists() else None,
                                           merge_device=cfg.merge.device, constraints=cfg.merge.constraints))


def merge_and_sweep(
    model_path: str,
    tasks: Sequence[Task],
    dirs: Sequence[Path],
    method: str,
    params: dict[str, Any],
    lambdas: Sequence[float],
    out: Path,
    *,
    max_length: int,
    batch_size: int,
    device: str | None,
    seed: int,
    init_name: str = "",
    stats_dir: Path | None = None,
    merge_device: str = "auto",
    constraints: Sequence[str] = (),
) -> dict[str, Any]:
    """Merge ``dirs`` with ``method`` at every lambda, select on validation, save the selected merge.

    ``merge_device="auto"`` merges on the evaluator's device (the GPU when there is one), ``"cpu"``
    on the CPU. ``constraints`` (``TASK>=FLOOR`` / ``TASK>=single-TOL``, see
    :class:`osrm_lora.constraints.Constraint`): the lambda is chosen among those meeting them on
    validation."""
    from osrm_lora.merge import get_method, merge, save_merge_result
    from osrm_lora.merge_inputs import build_merge_context
    from osrm_lora.merged_eval import sweep

    info = get_method(method)
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, tasks)]
    evaluator = MergedEvaluator(model_path, tasks, dirs, max_length=max_length, batch_size=batch_size, device=device)
    parsed = [Constraint.parse(c) for c in constraints]
    names = [t.name for t in tasks]
    check_constraint_tasks(parsed, names)
    single = {t.name: read_json(d / "metrics.json") for d, t in zip(dirs, tasks)}  # each adapter's own scores
    single_val = {name: m["validation"] for name, m in single.items()}
    floors = {c.text(): c.resolve(single_val) for c in parsed}
    context = build_merge_context(info.needs, adapters, tasks, dirs, evaluator, stats_dir=stats_dir, seed=seed,
                                  max_length=max_length,
                                  constraint_tasks=sorted({names.index(c.task) for c in parsed}))
    on = evaluator.device if merge_device == "auto" else torch.device(merge_device)
    if on.type != "cpu":
        adapters = [a.to(on) for a in adapters]
        context = context.to(on)
    grid, lambda_source = lambda_grid(info, params, lambdas)
    if lambda_source == "config":
        logger.info("%s/%s: scaling %g from merge.params, no lambda sweep", init_name, method, grid[0])

    def merge_fn(lam: float) -> Any:
        p = dict(params)
        if lambda_source is not None:
            p["scaling"] = lam
        return merge(adapters, method, p, context=context)

    def feasible(scores: dict[str, float]) -> bool:
        return all(v <= 0 for v in shortfalls(parsed, floors, scores))

    curve, best_result, selected = sweep(evaluator, merge_fn, grid, merge_device=str(on),
                                         feasible=feasible if parsed else None)
    best_result = best_result.to("cpu")
    single_test = {name: m["test"] for name, m in single.items()}
    norm = normalised(selected.test, single_test)
    record = {
        "init": init_name,
        "method": method,
        "params": params,
        "seed": seed,
        "selected_on": "validation",
        "lambda": selected.lam if lambda_source is not None else None,
        "lambda_source": lambda_source,
        "lambda_at_edge": grid_edge(grid, selected.lam) if lambda_source == "validation" else None,
        "validation": selected.validation,
        "test": selected.test,
        "avg_validation": mean(selected.validation.values()),
        "avg_test": mean(selected.test.values()),
        "normalised_test": norm,
        "avg_normalised_test": mean(norm.values()),
        "merge_seconds": selected.merge_seconds,
        "merge_peak_mb": max((p.merge_peak_mb or 0.0 for p in curve), default=None),
        "curve": [
            {"lambda": p.lam, "validation": p.validation, "test": p.test, "avg_validation": p.avg_validation,
             "avg_test": mean(p.test.values()), "avg_normalised_test": mean(normalised(p.test, single_test).values())}
            for p in curve
        ],
        "inputs": [str(d) for d in dirs],
    }
    if parsed:
        record["constraints"] = [
            {"constraint": c.text(), "floor": floors[c.text()], "validation": selected.validation[c.task],
             "test": selected.test[c.task], "met_on_validation": selected.validation[c.task] >= floors[c.text()]}
            for c in parsed]
        record["constraints_met"] = all(r["met_on_validation"] for r in record["constraints"])
        if not record["constraints_met"]:
            logger.warning("%s/%s: no lambda meets the constraints %s on validation; kept the best lambda",
                           init_name, method, ", ".join(c.text() for c in parsed))
    save_merge_result(best_result, out, base_model_path=model_path, inputs=[str(d) for d in dirs],
                      scores={"split": "validation", "lambda": record["lambda"], "scores": selected.validation,
                              "test": selected.test})
    write_json(out / "sweep.json", record)
    return record


def _search_init(ctx: RunContext, init: InitSettings, kind: str) -> None:
    """The merge stage's search ``kind`` (``rmm`` or ``search``) over one init's adapters, recorded in
    the ledger as ``merge/<init>/<kind>`` (``--force merge`` redoes it)."""
    cfg = ctx.cfg
    settings = getattr(cfg.merge, kind)
    out = ctx.run_dir / "merges" / init.name / kind
    dirs = adapter_dirs(ctx.run_dir, init.name, ctx.tasks)
    payload = {"adapters": ctx.adapter_hashes[init.name], "method": kind, "settings": settings.model_dump(mode="json"),
               "seed": cfg.seed, "tasks": ctx.fingerprints, "constraints": cfg.merge.constraints,
               "max_length": cfg.train.max_length}
    forced = "merge" in ctx.ledger.force or "all" in ctx.ledger.force
    ctx.ledger.run("merge", f"merge/{init.name}/{kind}", payload, [out / "sweep.json"],
                   lambda: search_and_evaluate(kind, settings, ctx.model_path, ctx.tasks, dirs, out,
                                               max_length=cfg.train.max_length, batch_size=cfg.train.eval_batch_size,
                                               device=cfg.device, seed=cfg.seed, init_name=init.name,
                                               constraints=cfg.merge.constraints, fresh=forced))


_CLI_OPTION = re.compile(r"--([a-z][a-z-]*)")
_SEARCH_BUDGET_KEYS = {"budget": "budget.evaluations", "seconds": "budget.seconds", "trials": "budget.trials"}


def _config_hint(message: str, kind: str) -> str:
    """A search's error message with its command-line options named as the config keys
    (``--budget`` -> ``merge.rmm.budget``, ``merge.search.budget.evaluations``)."""
    def key(m: re.Match[str]) -> str:
        name = m.group(1)
        name = _SEARCH_BUDGET_KEYS.get(name, name) if kind == "search" else name
        return f"merge.{kind}.{name.replace('-', '_')}"

    text = _CLI_OPTION.sub(key, message).replace("loosen the constraints", "loosen merge.constraints")
    return text.replace("raise the budget", f"raise merge.{kind}.budget")


def search_and_evaluate(
    kind: str,
    settings: RMMSettings | SearchSettings,
    model_path: str,
    tasks: Sequence[Task],
    dirs: Sequence[Path],
    out: Path,
    *,
    max_length: int,
    batch_size: int,
    device: str | None,
    seed: int,
    init_name: str = "",
    constraints: Sequence[str] = (),
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the merge search ``kind`` over ``dirs`` into ``out`` and write ``out/sweep.json``, the
    results record of the found merge in the schema of :func:`merge_and_sweep` (method ``kind``).

    ``kind="rmm"``: :func:`osrm_lora.rmm.rmm_search` (``out/rmm.json``, ``out/merged/``; always run
    anew); ``kind="search"``: :func:`osrm_lora.search.search_merge` (``out/search.json``,
    ``out/search.db``, ``out/merged/``; a study with the same settings is resumed unless ``fresh``,
    one with other settings discarded). The search is given an evaluator that holds the tasks'
    VALIDATION splits only; afterwards the chosen merge is rebuilt from the search's record and its
    test split scored once, for the record. ``constraints`` as in :func:`merge_and_sweep`."""
    if kind not in MERGE_SEARCHES or (kind == "rmm") != isinstance(settings, RMMSettings):
        raise OsrmError(f"merge search {kind!r} does not match its settings ({type(settings).__name__}); "
                        f"use rmm with RMMSettings or search with SearchSettings")
    parsed = [Constraint.parse(c) for c in constraints]
    check_constraint_tasks(parsed, [t.name for t in tasks])
    out.mkdir(parents=True, exist_ok=True)  # also where another process than rank 0 runs it (search.db lives here)
    (out / "sweep.json").unlink(missing_ok=True)  # the stage's completion mark: gone until this search is recorded
    evaluator = MergedEvaluator(model_path, tasks, dirs, max_length=max_length, batch_size=batch_size, device=device,
                                splits=("validation",))
    kwargs = settings.search_kwargs(seed)
    t0 = time.perf_counter()
    try:
        if isinstance(settings, RMMSettings):
            found = rmm_lib.rmm_search(dirs, out, **kwargs, constraints=parsed, evaluator=evaluator,
                                       model_path=model_path, overwrite=True).record
        else:
            found = search_lib.search_merge(dirs, out, **kwargs, constraints=parsed, evaluator=evaluator,
                                            model_path=model_path, overwrite=fresh, restart=True)
    except OsrmError as exc:
        raise OsrmError(f"merge.{kind} of init {init_name}: {_config_hint(str(exc), kind)}") from None
    search_seconds = time.perf_counter() - t0
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, tasks)]
    rebuild = rmm_lib.best_deltas if kind == "rmm" else search_lib.best_deltas

    def timed() -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        return rebuild(found, adapters), time.perf_counter() - start

    peak, (deltas, merge_seconds) = measure_peak(timed, device="cpu")
    evaluator.add_split("test")
    test = evaluator.evaluate(lambda i: deltas, "test")  # once, for the chosen merge
    best = found["best"]
    validation = {t.name: float(best["validation"][t.name]) for t in tasks}
    single_test = {t.name: read_json(d / "metrics.json")["test"] for d, t in zip(dirs, tasks)}
    norm = normalised(test, single_test)
    used = found["budget"]["used"]
    chosen = ({"architecture": best["layers"], "picked_by": best["picked_by"], "subset_rewards": best["subset_rewards"]}
              if kind == "rmm" else {"trial": best["trial"], "config": best["config"]})
    record: dict[str, Any] = {
        "init": init_name,
        "method": kind,
        "params": {},
        "seed": int(kwargs["seed"]),
        "selected_on": "validation",
        "lambda": None,
        "lambda_source": None,
        "lambda_at_edge": None,
        "validation": validation,
        "test": test,
        "avg_validation": mean(validation.values()),
        "avg_test": mean(test.values()),
        "normalised_test": norm,
        "avg_normalised_test": mean(norm.values()),
        "merge_seconds": merge_seconds,
        "merge_peak_mb": peak.bytes / 2**20,
        "curve": [],
        "inputs": [str(d) for d in dirs],
        "search_seconds": search_seconds,
        "evaluations_used": float(used if kind == "rmm" else used["evaluations"]),
        "budget": found["budget"],
        "best": chosen,
        "settings": {**settings.model_dump(mode="json"), "seed": int(kwargs["seed"])},
        "record": rmm_lib.RECORD if kind == "rmm" else search_lib.RECORD,
        "output": found.get("output"),
    }
    if parsed:
        floors = {c["constraint"]: float(c["floor"]) for c in found["constraints"]}
        record["constraints"] = [
            {"constraint": c.text(), "floor": floors[c.text()], "validation": validation[c.task],
             "test": test[c.task], "met_on_validation": validation[c.task] >= floors[c.text()]} for c in parsed]
        record["constraints_met"] = all(r["met_on_validation"] for r in record["constraints"])
    write_json(out / "sweep.json", record)
    logger.info("%s/%s: validation avg %.2f, test avg %.2f (test scored once), %.2f evaluations in %.1f s",
                init_name, kind, record["avg_validation"], record["avg_test"], record["evaluations_used"],
                search_seconds)
    return record


def _assemble(ctx: RunContext, train_results: dict[str, dict[str, dict[str, Any]]], merged: list[dict[str, Any]],
              diagnostics: dict[str, Any]) -> dict[str, Any]:
    single = {
        init: {task: {"validation": m["validation"], "test": m["test"], "best_epoch": m["best_epoch"],
                      "a_drift_mean": m.get("a_drift_mean", 0.0), "seconds": m.get("seconds"),
                      "n_test": m.get("n_test")}
               for task, m in per_task.items()}
        for init, per_task in train_results.items()
    }
    return {
        "name": ctx.cfg.name,
        "model": ctx.model_path,
        "seed": ctx.cfg.seed,
        "tasks": [t.name for t in ctx.tasks],
        "metrics": {t.name: t.metric for t in ctx.tasks},
        "subsampled": any(spec.max_train or spec.max_eval for spec in task_specs(ctx.cfg)),
        "inits": [i.model_dump(mode="json") for i in ctx.cfg.inits],
        "single_task": single,
        "merged": merged,
        "interference": diagnostics,
        "notes": [
            "lambda and every hyperparameter selected on the validation split; test scores reported once for the selection",
            "the per-lambda test curve is a robustness report, never used for selection",
            "normalised = merged test score / single-task test score of the same init, in %",
            *([SEARCH_NOTE] if any(r.get("method") in MERGE_SEARCHES for r in merged) else []),
        ],
    }


SEARCH_NOTE = ("rmm / search: the merge found by the search on the validation splits only (rewards and low fidelities "
               "on random validation subsets, the choice on the whole splits); its test split is scored once, after "
               "the search; no lambda curve")
