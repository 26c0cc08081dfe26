"""One run: tasks -> profile -> init -> train -> diagnose -> merge+evaluate -> results/report, into
a run directory (:mod:`osrm_lora.pipeline.layout`), resuming the stages that are finished."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from osrm_lora.backbone import resolve_model_path
from osrm_lora.config import MERGE_SEARCHES, PipelineConfig, config_to_dict
from osrm_lora.distributed import all_gather_objects, broadcast_object, check_same, get_env, main_first
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_file, claim_output, read_json, sha256_json, write_json
from osrm_lora.pipeline.checks import task_specs
from osrm_lora.pipeline.context import RunContext
from osrm_lora.pipeline.jobs import parallel_mode, run_jobs
from osrm_lora.pipeline.layout import STAGES_DIR, RunLayout
from osrm_lora.pipeline.ledger import StageLedger, validate_force
from osrm_lora.pipeline.manifest import manifest, previous_stage_seconds
from osrm_lora.pipeline.merging import edge_lambda_warnings, merge_init, needs_grams, search_init
from osrm_lora.pipeline.stages import diagnose_init, dir_hash, resolve_tasks, run_profile, task_fingerprint, train_all

logger = logging.getLogger(__name__)

SEARCH_NOTE = ("rmm / search: the merge found by the search on the validation splits only (rewards and low fidelities "
               "on random validation subsets, the choice on the whole splits); its test split is scored once, after "
               "the search; no lambda curve")


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
        with claim_output(run_dir, resume=True, ours_if=(STAGES_DIR,)):
            return _run_pipeline(cfg, run_dir, force=force, cache=cache, hf_loader=hf_loader)
    except OsrmError:
        if env.is_main and fresh and run_dir.is_dir() and not any(RunLayout(run_dir).stages.glob("*.json")):
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
    ctx = _start(cfg, run_dir, forced, cache, hf_loader)
    needs_stats = (any(i.mode != "standard" or i.interference_penalty > 0 for i in cfg.inits) or cfg.diagnose
                   or any(needs_grams(m) for m in cfg.merge.methods))
    base_payload = {"model": ctx.model_path, "tasks": ctx.fingerprints, "seed": cfg.seed,
                    "max_length": cfg.train.max_length, "targets": cfg.lora.target_modules}
    if needs_stats:
        run_profile(ctx, base_payload)
    train_all(ctx, ctx.layout.stats, base_payload)
    train_results = _training_results(ctx)
    diagnostics = _diagnose_all(ctx)
    merged = _merge_all(ctx)
    return _finish(ctx, started, train_results, merged, diagnostics)


def _start(cfg: PipelineConfig, run_dir: Path, forced: frozenset[str], cache: str | None, hf_loader: Any) -> RunContext:
    """Seed, resolve the model, load the tasks, create the run directory, write its config.yaml."""
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
        _write_config(cfg, ctx.layout)
    if env.active:
        logger.info("%d processes (%s); training parallel over %s", env.world_size, env.backend,
                    parallel_mode(cfg, len(tasks), env.world_size))
    for t in tasks:
        logger.info("task %-12s %-14s train %5d  validation %4d  test %4d  (%s)", t.name, t.metric, len(t.train),
                    len(t.validation), len(t.test), t.source or "local")
    return ctx


def _write_config(cfg: PipelineConfig, layout: RunLayout) -> None:
    with atomic_file(layout.config) as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)


def _training_results(ctx: RunContext) -> dict[str, dict[str, dict[str, Any]]]:
    """Every adapter's training record by init and task; sets ``ctx.adapter_hashes``."""
    train_results: dict[str, dict[str, dict[str, Any]]] = {}
    for init in ctx.cfg.inits:
        dirs = ctx.adapter_dirs(init.name)
        train_results[init.name] = {t.name: read_json(ctx.layout.adapter_metrics(init.name, t.name)) for t in ctx.tasks}
        ctx.adapter_hashes[init.name] = [dir_hash(d) for d in dirs]
    return train_results


def _diagnose_all(ctx: RunContext) -> dict[str, Any]:
    if not ctx.cfg.diagnose:
        return {}
    run_jobs(ctx.cfg.inits, lambda init: diagnose_init(ctx, init, ctx.layout.stats))
    return {init.name: read_json(ctx.layout.interference(init.name)) for init in ctx.cfg.inits}


def _merge_all(ctx: RunContext) -> list[dict[str, Any]]:
    """The merge stage: every (init, method) sweep, then every (init, search); their results records."""
    cfg, layout = ctx.cfg, ctx.layout
    merge_jobs = [(init, method) for init in cfg.inits for method in cfg.merge.methods]
    run_jobs(merge_jobs, lambda job: merge_init(ctx, job[0], job[1], layout.stats))
    merged = [read_json(layout.merge_record(init.name, method)) for init, method in merge_jobs]
    for line in edge_lambda_warnings(merged):
        logger.warning("%s", line)
    search_jobs = [(init, kind) for init in cfg.inits for kind in MERGE_SEARCHES if getattr(cfg.merge, kind) is not None]
    run_jobs(search_jobs, lambda job: search_init(ctx, job[0], job[1]))
    merged += [read_json(layout.merge_record(init.name, kind)) for init, kind in search_jobs]
    return merged


def _finish(ctx: RunContext, started: float, train_results: dict[str, dict[str, dict[str, Any]]],
            merged: list[dict[str, Any]], diagnostics: dict[str, Any]) -> dict[str, Any]:
    """Gather the stage timings, write results.json, manifest.json and the report (rank 0), and return
    the results on every process."""
    env = get_env()
    for timings in all_gather_objects(ctx.ledger.timings):  # stages skipped as finished keep their earlier time
        ctx.stage_seconds.update(timings)
    ctx.stages_cached = sorted({s for cached in all_gather_objects(ctx.ledger.cached) for s in cached})
    results: dict[str, Any] | None = None
    if env.is_main:
        results = _assemble(ctx, train_results, merged, diagnostics)
        results["manifest"] = manifest(ctx, started)
        write_json(ctx.layout.results, results)
        write_json(ctx.layout.manifest, results["manifest"])
        try:
            from osrm_lora.report import write_report

            write_report(ctx.run_dir)
        except ImportError:
            logger.debug("report module not available")
    results = broadcast_object(results)
    assert results is not None
    return results


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
