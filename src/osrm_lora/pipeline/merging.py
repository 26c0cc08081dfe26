"""The merge stage: every (init, method) merged at each lambda and selected on validation
(:func:`merge_and_sweep`), and the merge searches ``merge.rmm`` / ``merge.search``
(:func:`search_and_evaluate`), each written as one results record (``sweep.json``)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import osrm_lora.rmm as rmm_lib
import osrm_lora.search as search_lib
from osrm_lora.adapters import load_adapter
from osrm_lora.config import MERGE_SEARCHES, InitSettings, RMMSettings, SearchSettings
from osrm_lora.constraints import Constraint, check_constraint_tasks, shortfalls
from osrm_lora.data.task import Task
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import mean, normalised
from osrm_lora.fsutil import read_json, write_json
from osrm_lora.memory import measure_peak
from osrm_lora.merge.registry import MethodInfo, get_method
from osrm_lora.merged_eval import MergedEvaluator
from osrm_lora.pipeline.context import RunContext
from osrm_lora.pipeline.layout import ADAPTER_METRICS, SWEEP
from osrm_lora.pipeline.ledger import MERGE
from osrm_lora.report.tables import grid_edge

logger = logging.getLogger(__name__)


def needs_grams(method: str) -> bool:
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


# --------------------------------------------------------------------------- the stage's units
def merge_init(ctx: RunContext, init: InitSettings, method: str, stats_dir: Path) -> None:
    """The merge stage for one (init, method), recorded in the ledger as ``merge/<init>/<method>``."""
    cfg = ctx.cfg
    out = ctx.layout.merge(init.name, method)
    dirs = ctx.adapter_dirs(init.name)
    params = dict(cfg.merge.params.get(method, {}))
    payload = {"adapters": ctx.adapter_hashes[init.name], "method": method, "params": params,
               "lambdas": cfg.merge.lambdas, "seed": cfg.seed, "tasks": ctx.fingerprints}
    if needs_grams(method):  # RegMean merges with the statistics: re-merge when they change
        payload["stats"] = ctx.stats_hash
    if cfg.merge.constraints:  # enters the inputs only when set, so earlier runs stay finished
        payload["constraints"] = cfg.merge.constraints
    ctx.ledger.run(MERGE.name, MERGE.id(init.name, method), payload, [out / SWEEP],
                   lambda: merge_and_sweep(ctx.model_path, ctx.tasks, dirs, method, params, cfg.merge.lambdas, out,
                                           max_length=cfg.train.max_length, batch_size=cfg.train.eval_batch_size,
                                           device=cfg.device, seed=cfg.seed, init_name=init.name,
                                           stats_dir=stats_dir if stats_dir.exists() else None,
                                           merge_device=cfg.merge.device, constraints=cfg.merge.constraints,
                                           evaluator=ctx.merged_evaluator(dirs)))


def search_init(ctx: RunContext, init: InitSettings, kind: str) -> None:
    """The merge stage's search ``kind`` (``rmm`` or ``search``) over one init's adapters, recorded in
    the ledger as ``merge/<init>/<kind>`` (``--force merge`` redoes it)."""
    cfg = ctx.cfg
    settings = getattr(cfg.merge, kind)
    out = ctx.layout.merge(init.name, kind)
    dirs = ctx.adapter_dirs(init.name)
    payload = {"adapters": ctx.adapter_hashes[init.name], "method": kind, "settings": settings.model_dump(mode="json"),
               "seed": cfg.seed, "tasks": ctx.fingerprints, "constraints": cfg.merge.constraints,
               "max_length": cfg.train.max_length}
    forced = ctx.ledger.forced(MERGE.name)
    ctx.ledger.run(MERGE.name, MERGE.id(init.name, kind), payload, [out / SWEEP],
                   lambda: search_and_evaluate(kind, settings, ctx.model_path, ctx.tasks, dirs, out,
                                               max_length=cfg.train.max_length, batch_size=cfg.train.eval_batch_size,
                                               device=cfg.device, seed=cfg.seed, init_name=init.name,
                                               constraints=cfg.merge.constraints, fresh=forced))


# --------------------------------------------------------------------------- merge + lambda sweep
def _single_scores(dirs: Sequence[Path], tasks: Sequence[Task]) -> dict[str, dict[str, Any]]:
    """Each adapter's own scores (its training record), by task name."""
    return {t.name: read_json(d / ADAPTER_METRICS) for d, t in zip(dirs, tasks)}


def _constraint_rows(parsed: Sequence[Constraint], floors: dict[str, float], validation: dict[str, float],
                     test: dict[str, float]) -> list[dict[str, Any]]:
    """The ``constraints`` entries of a results record: each constraint's floor and the scores."""
    return [{"constraint": c.text(), "floor": floors[c.text()], "validation": validation[c.task],
             "test": test[c.task], "met_on_validation": validation[c.task] >= floors[c.text()]} for c in parsed]


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
    evaluator: MergedEvaluator | None = None,
) -> dict[str, Any]:
    """Merge ``dirs`` with ``method`` at every lambda, select on validation, save the selected merge.

    ``merge_device="auto"`` merges on the evaluator's device (the GPU when there is one), ``"cpu"``
    on the CPU. ``constraints`` (``TASK>=FLOOR`` / ``TASK>=single-TOL``, see
    :class:`osrm_lora.constraints.Constraint`): the lambda is chosen among those meeting them on
    validation. ``evaluator``: one already holding the base model and the tasks' encoded validation
    and test splits, with the heads of ``dirs`` (:meth:`RunContext.merged_evaluator`); default: a new one."""
    from osrm_lora.merge import get_method, merge, save_merge_result
    from osrm_lora.merge_inputs import build_merge_context
    from osrm_lora.merged_eval import sweep

    info = get_method(method)
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, tasks)]
    if evaluator is None:
        evaluator = MergedEvaluator(model_path, tasks, dirs, max_length=max_length, batch_size=batch_size,
                                    device=device)
    parsed = [Constraint.parse(c) for c in constraints]
    names = [t.name for t in tasks]
    check_constraint_tasks(parsed, names)
    single = _single_scores(dirs, tasks)
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

    once: list[Any] = []  # a method linear in its scaling is merged once, at scaling 1, then scaled

    def merge_fn(lam: float) -> Any:
        p = dict(params)
        if lambda_source is None:
            return merge(adapters, method, p, context=context)
        if not (info.linear_in_scaling and len(grid) > 1):
            return merge(adapters, method, {**p, "scaling": lam}, context=context)
        if not once:
            once.append(merge(adapters, method, {**p, "scaling": 1.0}, context=context))
        return once[0] if lam == 1.0 else once[0].scaled(lam)

    def feasible(scores: dict[str, float]) -> bool:
        return all(v <= 0 for v in shortfalls(parsed, floors, scores))

    curve, best_result, selected = sweep(evaluator, merge_fn, grid, merge_device=str(on),
                                         feasible=feasible if parsed else None)
    best_result = best_result.to("cpu")
    record = _sweep_record(init_name, method, params, seed, curve, selected, grid, lambda_source,
                           {name: m["test"] for name, m in single.items()}, dirs)
    record["merged_once"] = bool(once)  # merged at scaling 1 and scaled for every lambda
    if once:  # what the selected merge costs on its own: that one merge (scaling it is free)
        record["merge_seconds"] = float(once[0].info["seconds"])
    if parsed:
        record["constraints"] = _constraint_rows(parsed, floors, selected.validation, selected.test)
        record["constraints_met"] = all(r["met_on_validation"] for r in record["constraints"])
        if not record["constraints_met"]:
            logger.warning("%s/%s: no lambda meets the constraints %s on validation; kept the best lambda",
                           init_name, method, ", ".join(c.text() for c in parsed))
    save_merge_result(best_result, out, base_model_path=model_path, inputs=[str(d) for d in dirs],
                      scores={"split": "validation", "lambda": record["lambda"], "scores": selected.validation,
                              "test": selected.test})
    write_json(out / SWEEP, record)
    return record


def _sweep_record(init_name: str, method: str, params: dict[str, Any], seed: int, curve: Sequence[Any], selected: Any,
                  grid: Sequence[float], lambda_source: str | None, single_test: dict[str, float],
                  dirs: Sequence[Path]) -> dict[str, Any]:
    """The results record of one lambda sweep (the selected lambda's scores and the whole curve)."""
    norm = normalised(selected.test, single_test)
    return {
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


# --------------------------------------------------------------------------- merge searches
_CLI_OPTION = re.compile(r"--([a-z][a-z-]*)")
# the command's ways out that are no settings of the pipeline, in the pipeline's words
_COMMAND_ONLY = {"pass --overwrite to start anew, or choose another --out": "run with --force merge to start anew"}
_SEARCH_BUDGET_KEYS = {"budget": "budget.evaluations", "seconds": "budget.seconds", "trials": "budget.trials"}


def _config_hint(message: str, kind: str) -> str:
    """A search's error message with its command-line options named as the config keys
    (``--budget`` -> ``merge.rmm.budget``, ``merge.search.budget.evaluations``); an option that is no
    setting of ``merge.<kind>`` is left as it is, and the command's own ways out are rephrased."""
    fields = set((RMMSettings if kind == "rmm" else SearchSettings).model_fields)

    def key(m: re.Match[str]) -> str:
        name = m.group(1).replace("-", "_")
        name = _SEARCH_BUDGET_KEYS.get(name, name) if kind == "search" else name
        return f"merge.{kind}.{name}" if name.split(".")[0] in fields else m.group(0)

    for command, pipeline in _COMMAND_ONLY.items():
        message = message.replace(command, pipeline)
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
    (out / SWEEP).unlink(missing_ok=True)  # the stage's completion mark: gone until this search is recorded
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
    test, merge_seconds, peak_bytes = _score_found_on_test(kind, found, dirs, tasks, evaluator)
    record = _search_record(kind, settings, found, tasks, dirs, test, init_name=init_name, seed=int(kwargs["seed"]),
                            merge_seconds=merge_seconds, peak_bytes=peak_bytes, search_seconds=search_seconds)
    if parsed:
        floors = {c["constraint"]: float(c["floor"]) for c in found["constraints"]}
        record["constraints"] = _constraint_rows(parsed, floors, record["validation"], test)
        record["constraints_met"] = all(r["met_on_validation"] for r in record["constraints"])
    write_json(out / SWEEP, record)
    logger.info("%s/%s: validation avg %.2f, test avg %.2f (test scored once), %.2f evaluations in %.1f s",
                init_name, kind, record["avg_validation"], record["avg_test"], record["evaluations_used"],
                search_seconds)
    return record


def _score_found_on_test(kind: str, found: dict[str, Any], dirs: Sequence[Path], tasks: Sequence[Task],
                         evaluator: MergedEvaluator) -> tuple[dict[str, float], float, int]:
    """Rebuild the merge a search found from its record (timed, peak memory measured) and score its
    test split once: ``(test scores, merge seconds, peak bytes)``."""
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, tasks)]
    rebuild = rmm_lib.best_deltas if kind == "rmm" else search_lib.best_deltas

    def timed() -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        return rebuild(found, adapters), time.perf_counter() - start

    peak, (deltas, merge_seconds) = measure_peak(timed, device="cpu")
    evaluator.add_split("test")
    test = evaluator.evaluate(lambda i: deltas, "test")  # once, for the chosen merge
    return test, merge_seconds, peak.bytes


def _search_record(kind: str, settings: RMMSettings | SearchSettings, found: dict[str, Any], tasks: Sequence[Task],
                   dirs: Sequence[Path], test: dict[str, float], *, init_name: str, seed: int, merge_seconds: float,
                   peak_bytes: int, search_seconds: float) -> dict[str, Any]:
    """The results record of a merge search, in the schema of :func:`merge_and_sweep` (no curve)."""
    best = found["best"]
    validation = {t.name: float(best["validation"][t.name]) for t in tasks}
    single_test = {t.name: read_json(d / ADAPTER_METRICS)["test"] for d, t in zip(dirs, tasks)}
    norm = normalised(test, single_test)
    used = found["budget"]["used"]
    chosen = ({"architecture": best["layers"], "picked_by": best["picked_by"], "subset_rewards": best["subset_rewards"]}
              if kind == "rmm" else {"trial": best["trial"], "config": best["config"]})
    return {
        "init": init_name,
        "method": kind,
        "params": {},
        "seed": seed,
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
        "merge_peak_mb": peak_bytes / 2**20,
        "curve": [],
        "inputs": [str(d) for d in dirs],
        "search_seconds": search_seconds,
        "evaluations_used": float(used if kind == "rmm" else used["evaluations"]),
        "budget": found["budget"],
        "best": chosen,
        "settings": {**settings.model_dump(mode="json"), "seed": seed},
        "record": rmm_lib.RECORD if kind == "rmm" else search_lib.RECORD,
        "output": found.get("output"),
    }
