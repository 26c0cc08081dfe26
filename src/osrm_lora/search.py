"""Multi-fidelity automated merge search (after "Fine, I'll Merge It Myself", arXiv 2502.04030).

Black-box search, with Optuna, over how to merge a set of LoRA adapters (one per task), scored on the
tasks' VALIDATION splits only. The test split is scored once, for the configuration finally chosen.

Search space (see docs/SEARCH.md). The adapted modules are split into layer groups (the modules of
one transformer layer share a group; ``n_groups`` contiguous groups of layers; modules outside any
numbered layer form a group of their own). Per group ``g`` a trial chooses

- ``g<i>.method``: one merge method among ``methods`` (any registered method that merges into one
  shared model without task data: task_arithmetic, ties, dare_ties, tsv_m, ...);
- ``g<i>.scaling``: its coefficient lambda, in ``scaling_range`` (methods with a ``scaling``);
- ``g<i>.<method>.<param>``: the method's density-like parameter (``density`` of ties /
  magnitude_prune, ``p`` of dare_*, ``rank_fraction`` of tsv_m) in :data:`PARAM_RANGES`;
- ``g<i>.use.<task>`` (with ``masks``): whether that adapter's update of the group's modules takes part.

The group's modules are merged by that method over the included adapters only (each method sees
adapters restricted to the group's modules, so task-wide statistics such as the TIES threshold are
taken over the group), and the groups' dense updates are put together into one update. A group with
no adapter included keeps the base weights.

Fidelities. Each trial is scored on nested random subsets of every task's validation split:
``rungs`` fidelities with fractions ``eta**-(rungs-1), ..., 1/eta, 1`` (each at least
``min_examples`` examples). After every fidelity but the last the trial reports its mean score at
step ``eta**k`` and the pruner (Hyperband or successive halving) may stop it. Optuna's pruners are
single-objective; a multi-objective (Pareto) search screens by the same successive-halving rule
applied to the mean score.

Objectives. ``"mean"``: the mean validation score over the tasks (TPE by default). ``"pareto"``: one
objective per task (TPE multi-objective or NSGA-II); the Pareto front over tasks is reported and the
chosen configuration is the front's member with the best mean.

Constraints (after "One Bad Model Spoils the Bunch", arXiv 2406.14563). A constraint task's
validation score must not fall below a floor (absolute, or its own adapter's validation score minus
a tolerance). Violations are given to the sampler (``Trial.set_constraint``: TPE, NSGA-II) or, for the
random sampler, subtracted from the objective; an infeasible trial is never chosen.

Budget, in full-validation evaluations (a fidelity with a fraction ``f`` of the examples costs
``f``), seconds and trials, all counted over the whole study: the study lives in ``search.db``
(SQLite) in the output directory, so rerunning the same command resumes it without redoing finished
trials (and a larger budget extends it).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import optuna
import torch

from osrm_lora.adapters import LoraAdapter, load_adapter
from osrm_lora.backbone import load_head
from osrm_lora.cards import adapter_hash
from osrm_lora.config import (
    SEARCH_METHODS,
    SearchBudget,
    SearchObjective,
    SearchPruner,
    SearchSampler,
    check_methods,
)
from osrm_lora.config import searchable_methods as searchable_methods  # re-exported: defined with the settings
from osrm_lora.constraints import Constraint, check_constraint_tasks, shortfalls
from osrm_lora.diagnose import merged_evaluator_for
from osrm_lora.encoding import Encoded
from osrm_lora.errors import OsrmError
from osrm_lora.evaluate import mean
from osrm_lora.fsutil import atomic_file, claim_output, read_json, write_json
from osrm_lora.inference import check_adapter_dir
from osrm_lora.merge.methods._common import merged_config
from osrm_lora.merge.registry import MergeContext, MergeResult, get_method, merge
from osrm_lora.merged_eval import MergedEvaluator

logger = logging.getLogger(__name__)

DEFAULT_METHODS = SEARCH_METHODS
PARAM_RANGES: dict[str, tuple[float, float]] = {"density": (0.1, 1.0), "p": (0.0, 0.9), "rank_fraction": (0.1, 1.0)}
"""The method parameters searched besides ``scaling`` and their ranges (others keep their defaults)."""
OBJECTIVES: tuple[str, ...] = get_args(SearchObjective)
SAMPLERS: tuple[str, ...] = get_args(SearchSampler)
PRUNERS: tuple[str, ...] = get_args(SearchPruner)
STORAGE = "search.db"
RECORD = "search.json"
MERGED = "merged"
STUDY = "osrm-lora-search"
PAPER = "https://arxiv.org/abs/2502.04030"
SUMMARY = ("multi-fidelity merge search (Optuna TPE / NSGA-II, Hyperband): per layer group a method, its "
           "coefficients and which adapters take part, screened on validation subsets; single- or multi-objective")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class LayerGroup:
    """A group of adapted modules that gets one merge method, its parameters and its adapter mask."""

    name: str
    layers: tuple[str, ...]
    modules: tuple[str, ...]


_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)(?:\.|$)")


def layer_of(key: str) -> tuple[str, int] | None:
    """``(prefix, index)`` of the numbered layer a module key lies in (``bert.encoder.layer.3.x`` ->
    ``("bert.encoder.layer", 3)``), None for a module outside numbered layers."""
    m = _LAYER.match(key)
    return (m.group("prefix"), int(m.group("index"))) if m else None


def layer_groups(module_keys: Sequence[str], n_groups: int | None = None) -> list[LayerGroup]:
    """Split modules into ``n_groups`` contiguous groups of layers (None: one group per layer); modules
    outside numbered layers form one more group."""
    if n_groups is not None and (isinstance(n_groups, bool) or int(n_groups) < 1):
        raise OsrmError(f"the number of layer groups must be >= 1, got {n_groups!r}")
    by_layer: dict[tuple[str, int], list[str]] = {}
    rest: list[str] = []
    prefixes: dict[str, int] = {}
    for key in module_keys:  # prefixes in the order the modules come (an encoder before its decoder)
        layer = layer_of(key)
        if layer is not None:
            prefixes.setdefault(layer[0], len(prefixes))
    for key in sorted(module_keys):
        layer = layer_of(key)
        if layer is None:
            rest.append(key)
        else:
            by_layer.setdefault(layer, []).append(key)
    layers = sorted(by_layer, key=lambda lay: (prefixes[lay[0]], lay[1]))
    n = len(layers) if n_groups is None else min(int(n_groups), len(layers))
    groups: list[LayerGroup] = []
    for g in range(n):
        chunk = layers[g * len(layers) // n:(g + 1) * len(layers) // n]
        groups.append(LayerGroup(f"g{g}", tuple(f"{p}.{i}" for p, i in chunk),
                                 tuple(k for lay in chunk for k in by_layer[lay])))
    if rest:
        groups.append(LayerGroup(f"g{len(groups)}", (), tuple(rest)))
    return groups


def search_evaluator(dirs: Sequence[Path], constraints: Sequence[Constraint], *, model: str | None,
                     max_length: int | None, batch_size: int, device: str | None) -> tuple[MergedEvaluator, str]:
    """The evaluator of a search over ``dirs`` (validation and test splits); the constraints' tasks
    are checked against the adapters' heads before any data is loaded."""
    check_constraint_tasks(constraints, [load_head(check_adapter_dir(d))[1].task for d in dirs])
    return merged_evaluator_for(dirs, model=model, max_length=max_length, batch_size=batch_size, device=device,
                                splits=("validation", "test"))


# ---------------------------------------------------------------------------------------------- merging
def restrict(adapter: LoraAdapter, keys: Sequence[str]) -> LoraAdapter:
    """``adapter`` with only the modules ``keys`` (and no non-LoRA tensors)."""
    return LoraAdapter({k: adapter.modules[k] for k in keys}, adapter.config, adapter.name, {})


def group_deltas(adapters: Sequence[LoraAdapter], group: LayerGroup, choice: Mapping[str, Any],
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense updates of ``group``'s modules: ``choice["method"]`` with ``choice["params"]`` over the
    adapters ``choice["include"]`` marks (all-zero when none is included)."""
    include = list(choice.get("include") or [True] * len(adapters))
    chosen = [restrict(ad, group.modules) for ad, use in zip(adapters, include) if use]
    info = get_method(str(choice["method"]))
    if len(chosen) < max(1, info.min_adapters):
        return {k: torch.zeros_like(adapters[0].modules[k].delta()) for k in group.modules}
    result = merge(chosen, info.name, dict(choice.get("params") or {}), context=MergeContext(seed=seed),
                   ignore_extra=True)
    deltas = result.deltas_for(None)
    return {k: deltas[k].float() for k in group.modules}


def config_deltas(adapters: Sequence[LoraAdapter], groups: Sequence[LayerGroup], config: Mapping[str, Any],
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The merged dense update of every module under a searched ``config`` (``{"groups": [choice, ...]}``)."""
    out: dict[str, torch.Tensor] = {}
    for group, choice in zip(groups, config["groups"]):
        out.update(group_deltas(adapters, group, choice, seed))
    return out


def sample_config(trial: Any, groups: Sequence[LayerGroup], methods: Sequence[str], tasks: Sequence[str], *,
                  scaling_range: tuple[float, float], masks: bool) -> dict[str, Any]:
    """Draw one configuration from ``trial`` (define-by-run; the names are the search space)."""
    out = []
    for group in groups:
        g = group.name
        method = str(trial.suggest_categorical(f"{g}.method", list(methods)))
        info = get_method(method)
        params: dict[str, Any] = {}
        names = {p.name for p in info.params}
        if "scaling" in names:
            params["scaling"] = float(trial.suggest_float(f"{g}.scaling", *scaling_range))
        for pname, (low, high) in PARAM_RANGES.items():
            if pname in names:
                params[pname] = float(trial.suggest_float(f"{g}.{method}.{pname}", low, high))
        include = [bool(trial.suggest_categorical(f"{g}.use.{t}", [True, False])) if masks else True for t in tasks]
        out.append({"group": g, "method": method, "params": params, "include": include})
    return {"groups": out}


# ---------------------------------------------------------------------------------------------- fidelities
def fidelity_fractions(rungs: int, eta: int) -> list[float]:
    """``eta**-(rungs-1), ..., 1/eta, 1``."""
    if isinstance(rungs, bool) or int(rungs) < 1:
        raise OsrmError(f"the number of fidelities (--rungs) must be >= 1, got {rungs!r}")
    if isinstance(eta, bool) or int(eta) < 2:
        raise OsrmError(f"the reduction factor (--eta) must be an integer >= 2, got {eta!r}")
    return [float(eta) ** (k - (rungs - 1)) for k in range(rungs)]


def split_name(rung: int, rungs: int) -> str:
    """The evaluator split of fidelity ``rung``: a validation subset, the whole validation split last."""
    return "validation" if rung == rungs - 1 else f"validation@{rung}"


def install_subsets(evaluator: MergedEvaluator, fractions: Sequence[float], *, seed: int,
                    min_examples: int) -> dict[str, dict[str, int]]:
    """Register nested random validation subsets (``validation@k``) on every task of ``evaluator``;
    returns per split the number of examples of each task."""
    sizes: dict[str, dict[str, int]] = {}
    for t, slot in enumerate(evaluator.slots):
        full = slot.encoded["validation"]
        n = len(full)
        if n == 0:
            raise OsrmError(f"task {slot.task.name} has an empty validation split; the search needs validation data")
        gen = torch.Generator().manual_seed(int(seed) * 1000003 + t)
        order = torch.randperm(n, generator=gen)
        for k, frac in enumerate(fractions):
            name = split_name(k, len(fractions))
            if name != "validation":
                m = min(n, max(int(min_examples), math.ceil(frac * n)))
                idx = sorted(order[:m].tolist())
                slot.encoded[name] = Encoded(tuple(full.features[i] for i in idx), full.labels[idx])
            sizes.setdefault(name, {})[slot.task.name] = len(slot.encoded[name])
    return sizes


def sha_promotable(value: float, competing: Sequence[float], eta: int) -> bool:
    """Successive halving (Optuna's rule, maximising): keep a trial whose value is among the top
    ``1/eta`` of the values seen at this fidelity (the best while fewer than ``eta`` are seen)."""
    ranked = sorted(competing)
    idx = max(len(ranked) // eta - 1, 0)
    return value >= ranked[-(idx + 1)]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Mapping[int, Sequence[float]]) -> list[int]:
    """Keys of the points no other point dominates (maximising every coordinate)."""
    return [k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k)]


# ---------------------------------------------------------------------------------------------- study
@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own log lines (one per trial; a failed trial's traceback) only with -v."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if logger.isEnabledFor(logging.DEBUG) else optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def _sampler(name: str, seed: int, population: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population or 20)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(name: str, rungs: int, eta: int, multi: bool) -> optuna.pruners.BasePruner:
    if multi or name == "none" or rungs < 2:
        return optuna.pruners.NopPruner()  # multi-objective: screened in the objective (sha_promotable)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=eta ** (rungs - 1), reduction_factor=eta)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta, min_early_stopping_rate=0)


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def budget_used(study: optuna.Study) -> dict[str, Any]:
    """Evaluations, seconds and trials used so far by the whole study, and trials per state."""
    done = _finished(study)
    states: dict[str, int] = {}
    for t in done:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {"evaluations": float(sum(float(t.user_attrs.get("cost", 0.0)) for t in done)),
            "seconds": float(sum(float(t.user_attrs.get("seconds", 0.0)) for t in done)),
            "trials": len(done), "states": states}


def _exhausted(budget: SearchBudget, used: Mapping[str, Any]) -> bool:
    return ((budget.evaluations is not None and used["evaluations"] >= budget.evaluations)
            or (budget.seconds is not None and used["seconds"] >= budget.seconds)
            or (budget.trials is not None and used["trials"] >= budget.trials))


def _fail_interrupted(study: optuna.Study) -> None:
    """Trials left running by an interrupted earlier run count as failed (only one search runs per
    output directory: it is locked)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        logger.info("trial %d of the earlier run was interrupted; counted as failed", t.number)


def _open_study(out: Path, settings: dict[str, Any], *, directions: list[Literal["minimize", "maximize"]],
                sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
                restart: bool = False) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / STORAGE).resolve()}")
    study = optuna.create_study(storage=storage, study_name=STUDY, directions=directions, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    stored = study.user_attrs.get("settings")
    if stored is not None and stored != settings and restart:
        differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        logger.info("%s holds a search with other settings (%s differ); starting anew", out, ", ".join(differ))
        optuna.delete_study(study_name=STUDY, storage=storage)
        study = optuna.create_study(storage=storage, study_name=STUDY, directions=directions, sampler=sampler,
                                    pruner=pruner)
        stored = None
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise OsrmError(f"{out} holds a search with other settings ({', '.join(differ)} differ); rerun with the same "
                        "settings to resume it, pass --overwrite to start anew, or choose another --out")
    return study


# ---------------------------------------------------------------------------------------------- search
def search_merge(
    adapter_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    n_groups: int | None = 4,
    masks: bool = True,
    scaling_range: tuple[float, float] = (0.1, 1.5),
    objective: str = "mean",
    sampler: str = "tpe",
    pruner: str = "hyperband",
    rungs: int = 3,
    eta: int = 3,
    min_examples: int = 8,
    budget: SearchBudget = SearchBudget(),
    constraints: Sequence[Constraint | str] = (),
    seed: int = 0,
    population: int | None = None,
    model: str | None = None,
    max_length: int | None = None,
    batch_size: int = 128,
    device: str | None = None,
    evaluator: MergedEvaluator | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
) -> dict[str, Any]:
    """Search per-layer-group merge methods, coefficients and adapter masks on validation; write the
    chosen merge to ``out_dir/merged`` (:func:`osrm_lora.merge.io.save_merge_result`) and
    ``out_dir/search.json``; return the contents of ``search.json``.

    ``adapter_dirs``: trained adapters (each with its task head and ``metrics.json``); the tasks, their
    splits and the token limit are those of the runs that trained them (as ``osrm-lora evaluate``),
    unless ``evaluator`` (a :class:`MergedEvaluator` over the same adapters, in order; then
    ``model_path`` names its base model) is given. Rerunning into the same ``out_dir`` resumes the
    study (``overwrite`` discards it; ``restart``: a study made with other settings is discarded
    instead of refused). An ``evaluator`` without the test split is searched all the same: the
    chosen configuration's ``test`` is then None (the caller scores it; see :func:`best_deltas`).
    See the module docstring for the search space and fidelities.
    """
    methods = check_methods(methods)
    if objective not in OBJECTIVES:
        raise OsrmError(f"unknown objective {objective!r}; use {' or '.join(OBJECTIVES)}")
    if sampler not in SAMPLERS:
        raise OsrmError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise OsrmError(f"unknown pruner {pruner!r}; use one of {', '.join(PRUNERS)}")
    lo, hi = (float(x) for x in scaling_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise OsrmError(f"the scaling range must be two numbers 0 <= low < high, got {scaling_range!r}")
    if isinstance(min_examples, bool) or int(min_examples) < 1:
        raise OsrmError(f"min_examples must be >= 1, got {min_examples!r}")
    fractions = fidelity_fractions(rungs, eta)
    rungs, eta = int(rungs), int(eta)
    parsed = [c if isinstance(c, Constraint) else Constraint.parse(c) for c in constraints]
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise OsrmError("no adapter directories given; pass the adapters to merge (each with its task head)")
    out = Path(out_dir)
    with claim_output(out, resume=True, inputs=dirs):
        if overwrite:
            for name in (STORAGE, RECORD):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / MERGED, ignore_errors=True)
        if evaluator is None:
            evaluator, model_path = search_evaluator(dirs, parsed, model=model, max_length=max_length,
                                                     batch_size=batch_size, device=device)
        tasks = evaluator.task_names
        if any("validation" not in slot.encoded for slot in evaluator.slots):
            raise OsrmError("the evaluator must hold the validation split (splits=('validation', ...))")
        has_test = all("test" in slot.encoded for slot in evaluator.slots)
        if len(tasks) != len(dirs):
            raise OsrmError(f"the evaluator has {len(tasks)} tasks for {len(dirs)} adapters; give one adapter per task")
        if objective == "pareto" and len(tasks) < 2:
            raise OsrmError("a Pareto search needs at least two tasks; use --objective mean")
        check_constraint_tasks(parsed, tasks)
        adapters = [load_adapter(d, name=t) for d, t in zip(dirs, tasks)]
        for ad, d in zip(adapters, dirs):
            if ad.trains_biases:
                raise OsrmError(f"{d} trains biases, which a per-layer search cannot merge; train the adapters "
                                "with bias='none'")
        groups = layer_groups(list(adapters[0].modules), n_groups)
        sizes = install_subsets(evaluator, fractions, seed=seed, min_examples=int(min_examples))
        total = sum(sizes["validation"].values())
        rung_cost = [sum(sizes[split_name(k, rungs)].values()) / total for k in range(rungs)]
        own = [ad.deltas() for ad in adapters]
        single = evaluator.evaluate(lambda i: own[i], "validation", per_task=True)
        floors = {c.text(): c.resolve(single) for c in parsed}
        settings = {
            "tasks": tasks, "adapters": [adapter_hash(d) for d in dirs], "methods": methods,
            "groups": [list(g.modules) for g in groups], "masks": bool(masks), "scaling_range": [lo, hi],
            "param_ranges": {k: list(v) for k, v in PARAM_RANGES.items()}, "objective": objective,
            "sampler": sampler, "pruner": pruner, "rungs": rungs, "eta": eta, "min_examples": int(min_examples),
            "constraints": [c.text() for c in parsed], "seed": int(seed), "population": population,
        }
        multi = objective == "pareto"
        penalise = bool(parsed) and sampler == "random"  # the random sampler ignores constraints

        def violations(scores: Mapping[str, float]) -> list[float]:
            return shortfalls(parsed, floors, scores)

        def set_constraints(trial: optuna.Trial, viol: Sequence[float]) -> None:
            """The violations at the last fidelity scored, for the samplers (TPE, NSGA-II) to learn
            feasibility from (``Trial.set_constraint``, which Optuna 5 prefers to ``constraints_func``)."""
            for c, v in zip(parsed, viol):
                trial.set_constraint(c.text(), v)

        def run_trial(trial: optuna.Trial) -> float | list[float]:
            t0 = time.perf_counter()
            config = sample_config(trial, groups, methods, tasks, scaling_range=(lo, hi), masks=masks)
            trial.set_user_attr("config", config)
            deltas = config_deltas(adapters, groups, config, seed)
            cost = 0.0
            scores: dict[str, float] = {}
            for k in range(rungs):
                scores = evaluator.evaluate(lambda i: deltas, split_name(k, rungs))
                cost += rung_cost[k]
                viol = violations(scores)
                penalty = sum(max(0.0, v) for v in viol) if penalise else 0.0
                value = mean(scores.values()) - penalty
                trial.set_user_attr(f"rung{k}", scores)
                trial.set_user_attr(f"rung{k}_value", value)
                trial.set_user_attr("constraints", viol)
                trial.set_user_attr("cost", cost)
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                if k == rungs - 1:
                    break
                if multi:
                    competing = [float(t.user_attrs[f"rung{k}_value"]) for t in trial.study.get_trials(deepcopy=False)
                                 if f"rung{k}_value" in t.user_attrs]
                    prune = pruner != "none" and not sha_promotable(value, competing, eta)
                else:
                    trial.report(value, step=eta ** k)
                    prune = trial.should_prune()
                if prune:
                    set_constraints(trial, viol)
                    raise optuna.TrialPruned()
            set_constraints(trial, viol)
            trial.set_user_attr("validation", scores)
            if multi:
                return [scores[t] - penalty for t in tasks]
            return value

        with _quiet_optuna():
            study = _open_study(out, settings, directions=["maximize"] * (len(tasks) if multi else 1),
                                sampler=_sampler(sampler, seed, population),
                                pruner=_pruner(pruner, rungs, eta, multi), restart=restart)
            _fail_interrupted(study)
            used = budget_used(study)
            if used["trials"]:  # a resumed study: a sampler seeded anew would draw the first trials' params again
                study.sampler = _sampler(sampler, seed + len(study.trials), population)
                logger.info("resuming the search in %s: %d trials done, %.2f evaluations and %.0f s used",
                            out, used["trials"], used["evaluations"], used["seconds"])

            def stop_when_spent(st: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
                if _exhausted(budget, budget_used(st)):
                    st.stop()

            if not _exhausted(budget, used):
                study.optimize(
                    run_trial,
                    n_trials=None if budget.trials is None else int(budget.trials) - used["trials"],
                    timeout=None if budget.seconds is None else max(1e-3, float(budget.seconds) - used["seconds"]),
                    callbacks=[stop_when_spent], gc_after_trial=False)
            record = _record(study, settings, groups, fractions, sizes, single, floors, budget, multi)
        best = record["best"]
        if best is None:
            write_json(out / RECORD, record)
            reason = ("no trial met the constraints" if record["complete_trials"] else
                      "no trial was evaluated on the whole validation split within the budget")
            raise OsrmError(f"{reason} ({record['budget']['used']['trials']} trials); "
                            f"raise the budget{' or loosen the constraints' if parsed else ''} and rerun to resume")
        deltas = config_deltas(adapters, groups, best["config"], seed)
        # once, for the chosen configuration
        best["test"] = evaluator.evaluate(lambda i: deltas, "test") if has_test else None
        best["avg_test"] = None if best["test"] is None else mean(best["test"].values())
        _save(out, adapters, dirs, groups, best, deltas, model_path, seed)
        record["output"] = MERGED
        write_json(out / RECORD, record)
    logger.info("search: best trial %d, validation avg %.2f%s; written to %s", best["trial"], best["avg_validation"],
                "" if best["avg_test"] is None else f", test avg {best['avg_test']:.2f}", out)
    return record


def record_groups(record: Mapping[str, Any]) -> list[LayerGroup]:
    """The layer groups of a ``search.json`` record (its search space)."""
    return [LayerGroup(str(g["name"]), tuple(g["layers"]), tuple(g["modules"]))
            for g in record["search_space"]["groups"]]


def best_deltas(record: Mapping[str, Any], adapters: Sequence[LoraAdapter]) -> dict[str, torch.Tensor]:
    """The dense update of every module of a search's chosen configuration (``record``: the contents of
    ``search.json``; ``adapters``: the searched ones, in the record's task order), merged again exactly
    as the search scored it (DARE's masks seeded by the record's seed)."""
    if record.get("best") is None:
        raise OsrmError("the search record has no chosen configuration; rerun the search with a larger budget")
    if [a.name for a in adapters] != list(record["tasks"]):
        raise OsrmError(f"the adapters are of tasks {[a.name for a in adapters]}, the search of {record['tasks']}; "
                        "pass the searched adapters in the same order")
    return config_deltas(adapters, record_groups(record), record["best"]["config"], int(record["seed"]))


def _trial_record(t: optuna.trial.FrozenTrial, rungs: int) -> dict[str, Any]:
    viol = [float(v) for v in t.user_attrs.get("constraints") or []]
    return {
        "trial": t.number, "state": t.state.name.lower(), "params": dict(t.params),
        "config": t.user_attrs.get("config"),
        "fidelities": [t.user_attrs[f"rung{k}"] for k in range(rungs) if f"rung{k}" in t.user_attrs],
        "validation": t.user_attrs.get("validation"),
        "avg_validation": mean(t.user_attrs["validation"].values()) if t.user_attrs.get("validation") else None,
        "objective": None if t.values is None else [float(v) for v in t.values],  # what the sampler saw
        "constraint_violation": viol, "feasible": all(v <= 0 for v in viol),
        "cost": float(t.user_attrs.get("cost", 0.0)), "seconds": float(t.user_attrs.get("seconds", 0.0)),
    }


def _record(study: optuna.Study, settings: dict[str, Any], groups: Sequence[LayerGroup], fractions: Sequence[float],
            sizes: Mapping[str, Mapping[str, int]], single: Mapping[str, float], floors: Mapping[str, float],
            budget: SearchBudget, multi: bool) -> dict[str, Any]:
    rungs = len(fractions)
    trials = [_trial_record(t, rungs) for t in _finished(study)]
    complete = [r for r in trials if r["state"] == "complete" and r["validation"]]
    feasible = [r for r in complete if r["feasible"]]
    tasks = settings["tasks"]
    front_ids = pareto_front({r["trial"]: [r["validation"][t] for t in tasks] for r in feasible})
    front = [{"trial": r["trial"], "validation": r["validation"], "avg_validation": r["avg_validation"]}
             for r in feasible if r["trial"] in front_ids]
    pool = [r for r in feasible if r["trial"] in front_ids] if multi else feasible
    chosen = max(pool, key=lambda r: (r["avg_validation"], -r["trial"]), default=None)
    best = None if chosen is None else {
        "trial": chosen["trial"], "params": chosen["params"], "config": chosen["config"],
        "validation": chosen["validation"], "avg_validation": chosen["avg_validation"],
        "selected_on": "validation" + (" (Pareto front member with the best mean)" if multi else " (mean)"),
    }
    return {
        "paper": PAPER,
        "objective": settings["objective"], "sampler": settings["sampler"], "pruner": settings["pruner"],
        "seed": settings["seed"], "tasks": tasks,
        "search_space": {
            "methods": settings["methods"], "scaling_range": settings["scaling_range"],
            "param_ranges": settings["param_ranges"], "masks": settings["masks"],
            "groups": [{"name": g.name, "layers": list(g.layers), "modules": list(g.modules)} for g in groups],
        },
        "fidelities": [{"rung": k, "fraction": f, "step": settings["eta"] ** k, "split": split_name(k, rungs),
                        "examples": dict(sizes[split_name(k, rungs)])} for k, f in enumerate(fractions)],
        "constraints": [{"constraint": text, "floor": floor} for text, floor in floors.items()],
        "single_task_validation": dict(single),
        "budget": {"evaluations": budget.evaluations, "seconds": budget.seconds, "trials": budget.trials,
                   "used": budget_used(study), "unit": "full-validation evaluations (fidelity fraction each)"},
        "complete_trials": len(complete), "feasible_trials": len(feasible),
        "best": best, "pareto_front": front, "trials": trials,
        "storage": STORAGE, "study": STUDY,
        "notes": ["every trial and the selection use validation splits only; the chosen configuration is scored "
                  "on test once"],
    }


def _dominant_method(config: Mapping[str, Any]) -> str:
    counts: dict[str, int] = {}
    for choice in config["groups"]:
        counts[choice["method"]] = counts.get(choice["method"], 0) + 1
    return max(counts, key=lambda m: (counts[m], m))


def save_found_merge(target: Path, adapters: Sequence[LoraAdapter], dirs: Sequence[Path], *, carrier: str,
                     label: str, params: dict[str, Any], info: dict[str, Any], deltas: dict[str, torch.Tensor],
                     model_path: str | None, scores: dict[str, Any], paper: str, reproduce: str) -> Path:
    """Write a merge found by a search (dense ``deltas`` of every module) to ``target`` with the common
    merge writer, so ``osrm-lora evaluate --merged`` and the other consumers of a merge read it; the
    files name the search ``label`` (``merge_info.json`` method and params, the card) instead of the
    registered ``carrier`` method the writer needs."""
    from osrm_lora.cards import merge_card
    from osrm_lora.merge.io import MERGE_INFO, save_merge_result

    result = MergeResult(carrier, params, deltas=deltas, info=info, config=merged_config(adapters),
                         task_names=[a.name for a in adapters],
                         inputs=[LoraAdapter({}, a.config, a.name, dict(a.extra)) for a in adapters])
    target = save_merge_result(result, target, base_model_path=model_path, inputs=[str(d) for d in dirs],
                               scores=scores)
    meta = read_json(target / MERGE_INFO)
    meta.update({"method": label, "params": params})
    write_json(target / MERGE_INFO, meta)
    assert result.config is not None  # set above from merged_config(); save_merge_result keeps it
    card = merge_card(method=label, params=params, base_model=model_path or result.config.get("base_model_name_or_path"),
                      inputs=[str(d) for d in dirs], task_names=result.task_names, paper=paper, scores=scores,
                      info=result.info, needs=(label,))
    head, _, _ = card.partition("## Reproduce")
    with atomic_file(target / "README.md") as fh:
        fh.write(head + "## Reproduce\n\n" + reproduce)
    return target


def _save(out: Path, adapters: Sequence[LoraAdapter], dirs: Sequence[Path], groups: Sequence[LayerGroup],
          best: dict[str, Any], deltas: dict[str, torch.Tensor], model_path: str | None, seed: int) -> None:
    params = {"groups": best["config"]["groups"], "seed": seed}
    info = {"search": f"../{RECORD}", "trial": best["trial"], "paper": PAPER,
            "groups": {g.name: list(g.modules) for g in groups}}
    scores: dict[str, Any] = {"split": "validation", "scores": best["validation"]}
    if best["test"] is not None:
        scores["test"] = best["test"]
    # save_merge_result names a registered method in its card; the files are relabelled "search"
    save_found_merge(out / MERGED, adapters, dirs, carrier=_dominant_method(best["config"]), label="search",
                     params=params, info=info, deltas=deltas, model_path=model_path, scores=scores, paper=PAPER,
                     reproduce=("Found by `osrm-lora search` (per layer group: merge method, coefficients and "
                                f"adapter mask); `{RECORD}` beside this directory records the search and the chosen "
                                f"configuration, and rerunning the same command on the same `--out` resumes it from "
                                f"`{STORAGE}`.\n"))


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    """What ``osrm-lora search`` prints: the chosen trial, its scores, the budget used, the outputs."""
    best = record["best"]
    used = record["budget"]["used"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(used["states"].items()))
    test = "" if best["avg_test"] is None else f", test avg {best['avg_test']:.2f} (test scored once, for this trial)"
    lines = [f"best trial {best['trial']}: validation avg {best['avg_validation']:.2f}{test}"]
    for choice in best["config"]["groups"]:
        params = ", ".join(f"{k}={v:.3g}" for k, v in choice["params"].items())
        used_tasks = [t for t, u in zip(record["tasks"], choice["include"]) if u]
        lines.append(f"  {choice['group']}: {choice['method']}({params}) over {', '.join(used_tasks) or 'no adapter'}")
    if record["objective"] == "pareto":
        lines.append(f"Pareto front: trials {', '.join(str(p['trial']) for p in record['pareto_front'])}")
    lines.append(f"{used['trials']} trials ({states}), {used['evaluations']:.2f} evaluations, {used['seconds']:.1f} s")
    return lines
