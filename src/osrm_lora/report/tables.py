"""Tables of a run's results as plain data (text cells plus numbers), shared by the HTML, Markdown and
terminal renderers.

Every function here is pure: it reads the ``results.json`` mapping written by
:mod:`osrm_lora.pipeline` and returns :class:`Table` objects. Scores are on a 0..100 scale, normalised
scores in %, and unless a column says otherwise every score is on the TEST split for the lambda chosen
on the average VALIDATION score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from osrm_lora.errors import OsrmError

SELECTION_RULE = "λ chosen on the average validation score"
MEMORY_KEYS = ("merge_peak_mb", "peak_memory_mb", "merge_memory_mb", "memory_mb", "peak_mb")
REQUIRED_KEYS = ("tasks", "single_task", "merged")


@dataclass
class Cell:
    """One table cell: display ``text``; ``value`` is the number compared when marking the best."""

    text: str
    value: float | None = None
    best: bool = False
    note: str = ""  # secondary text shown small after the main text (e.g. the normalised %)
    mark: bool = False  # highlighted for another reason (e.g. the lambda selected on validation)
    numeric: bool = False  # right-aligned


@dataclass
class Table:
    """A titled table; ``groups`` (label, span) is an optional header row above ``header``."""

    key: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] | None = None
    row_classes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- small helpers
def is_number(value: Any) -> TypeGuard[int | float]:
    """True for a finite int/float (not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    """Format a number (``-`` for missing, NaN or infinite values)."""
    if not is_number(value):
        return "-"
    return f"{value:{spec}}{suffix}"


def fmt_lambda(value: Any) -> str:
    return "n/a" if value is None else fmt(value, "g")


def grid_edge(grid: Sequence[float], chosen: Any) -> str | None:
    """``upper`` / ``lower`` when ``chosen`` is the largest / smallest value of a grid of two or more
    values, else None (inside the grid, not in it, or no grid to choose from)."""
    values = sorted({float(g) for g in grid if is_number(g)})
    if len(values) < 2 or not is_number(chosen):
        return None
    if math.isclose(float(chosen), values[-1]):
        return "upper"
    if math.isclose(float(chosen), values[0]):
        return "lower"
    return None


def lambda_edge(rec: Mapping[str, Any]) -> str | None:
    """Whether a merged record's lambda, chosen on validation, sits at an edge of its grid (the stored
    ``lambda_at_edge``; for results written before it, computed from the lambda curve)."""
    if "lambda_at_edge" in rec:
        edge: str | None = rec["lambda_at_edge"]
        return edge
    if rec.get("lambda_source", "validation") != "validation":
        return None
    return grid_edge([p.get("lambda") for p in rec.get("curve", [])], rec.get("lambda"))


def lambda_note(rec: Mapping[str, Any]) -> str:
    """A short note for a merged record's lambda: at the edge of the grid, or fixed in the config."""
    edge = lambda_edge(rec)
    if edge:
        return f"edge: {'largest' if edge == 'upper' else 'smallest'} in grid"
    if rec.get("lambda_source") == "config":
        return "fixed in config"
    return ""


def spread(value: Any) -> tuple[float, float] | None:
    """(mean, standard deviation) of a value aggregated over seeds (``{"mean": .., "std": ..}``, as the
    benchmarks write it), else None. A plain number has no spread: one run is one seed."""
    if isinstance(value, Mapping) and is_number(value.get("mean")) and is_number(value.get("std")):
        return float(value["mean"]), float(value["std"])
    return None


def num(value: Any, spec: str = ".1f", suffix: str = "", note: str = "") -> Cell:
    """A numeric cell (value kept for best-marking when finite). A value aggregated over seeds
    (see :func:`spread`) reads ``mean ± sd``; a plain number is shown alone (no spread is invented)."""
    ms = spread(value)
    if ms is not None:
        return Cell(f"{fmt(ms[0], spec)} ± {fmt(ms[1], spec)}{suffix}", ms[0], note=note, numeric=True)
    return Cell(fmt(value, spec, suffix), float(value) if is_number(value) else None, note=note, numeric=True)


def text(value: Any) -> Cell:
    """A text cell (booleans as yes/no)."""
    if isinstance(value, bool):
        return Cell("yes" if value else "no")
    return Cell("-" if value is None else str(value))


def lambda_cell(value: Any, note: str = "") -> Cell:
    return Cell(fmt_lambda(value), numeric=True, note=note)


def merged_lambda_cell(rec: Mapping[str, Any]) -> Cell:
    """The selected lambda of a merged record, with :func:`lambda_note` beside it."""
    return lambda_cell(rec.get("lambda"), lambda_note(rec))


LAMBDA_NOTE_CAPTION = ("\"edge\" beside λ: the chosen λ is the smallest or largest of the grid, so the best λ may lie "
                       "outside it (extend merge.lambdas); \"fixed in config\": merge.params set the scaling, no sweep.")


def mean(values: Sequence[Any]) -> float:
    """Mean of the finite numbers in ``values`` (NaN when there are none or any is missing)."""
    vals = list(values)
    if not vals or not all(is_number(v) for v in vals):
        return float("nan")
    return sum(float(v) for v in vals) / len(vals)


def mark_best(rows: list[list[Cell]], columns: Sequence[int], *, lower_is_better: Sequence[int] = (),
              eligible: Callable[[int], bool] = lambda _i: True) -> None:
    """Mark, per column, the cell(s) with the best value among the eligible rows (ties all marked)."""
    for c in columns:
        cand = [(i, rows[i][c].value) for i in range(len(rows)) if eligible(i) and c < len(rows[i])]
        vals = [(i, v) for i, v in cand if v is not None]
        if len(vals) < 2:
            continue
        pick = min if c in lower_is_better else max
        best = pick(v for _, v in vals)
        for i, v in vals:
            if math.isclose(v, best, rel_tol=0, abs_tol=1e-9):
                rows[i][c].best = True


def validate_results(results: Any, source: str = "results.json") -> None:
    """Raise :class:`OsrmError` (one line) when ``results`` lacks what the report needs."""
    if not isinstance(results, Mapping):
        raise OsrmError(f"{source} is not a JSON object; regenerate it with `osrm-lora run`")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise OsrmError(f"{source} lacks {', '.join(missing)}; regenerate it with `osrm-lora run`")
    if not isinstance(results["tasks"], list) or not results["tasks"]:
        raise OsrmError(f"{source} lists no tasks; regenerate it with `osrm-lora run`")
    for rec in results["merged"]:
        if rec.get("init") not in results["single_task"]:
            raise OsrmError(f"{source}: merged record of init {rec.get('init')!r} has no single-task scores; "
                            "regenerate it with `osrm-lora run`")


def init_names(results: Mapping[str, Any]) -> list[str]:
    """Init names in config order (falling back to the single-task keys)."""
    names = [i["name"] for i in results.get("inits", []) if i.get("name") in results["single_task"]]
    return names + [n for n in results["single_task"] if n not in names]


def init_info(results: Mapping[str, Any], init: str) -> dict[str, Any]:
    for i in results.get("inits", []):
        if i.get("name") == init:
            return dict(i)
    return {"name": init, "mode": "standard" if init == "standard" else "?"}


def init_label(results: Mapping[str, Any], init: str) -> str:
    """``name (mode, A frozen)``: the init and how it was set up."""
    info = init_info(results, init)
    mode = str(info.get("mode", "?"))
    bits = [] if mode == init else [mode]
    if info.get("freeze_A"):
        bits.append("A frozen")
    if info.get("freeze_B"):
        bits.append("B frozen")
    return f"{init} ({', '.join(bits)})" if bits else init


def is_osrm(results: Mapping[str, Any], init: str) -> bool:
    mode: str = init_info(results, init).get("mode", "standard")
    return mode != "standard"


def methods(results: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for rec in results["merged"]:
        if rec["method"] not in out:
            out.append(rec["method"])
    return out


def merged_records(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Merged records ordered by init (config order), then method."""
    order = {n: k for k, n in enumerate(init_names(results))}
    return sorted(results["merged"], key=lambda r: order.get(r["init"], len(order)))


def single_avg(results: Mapping[str, Any], init: str, split: str = "test") -> float:
    single = results["single_task"][init]
    return mean([single.get(t, {}).get(split) for t in results["tasks"]])


def memory_mb(rec: Mapping[str, Any]) -> float | None:
    """Peak merge memory in MB when the record carries it (under any of :data:`MEMORY_KEYS`)."""
    for k in MEMORY_KEYS:
        if is_number(rec.get(k)):
            return float(rec[k])
    return None


def worst_normalised(rec: Mapping[str, Any]) -> float:
    """Lowest average normalised test score over the lambda curve (NaN without a curve)."""
    vals = [p.get("avg_normalised_test") for p in rec.get("curve", [])]
    vals = [v for v in vals if is_number(v)]
    return min(vals) if vals else float("nan")


def method_label(rec: Mapping[str, Any]) -> str:
    params = rec.get("params") or {}
    if not params:
        return str(rec["method"])
    return f"{rec['method']} ({', '.join(f'{k}={v}' for k, v in params.items())})"


def smallest_test_split(results: Mapping[str, Any]) -> int | None:
    """The fewest test examples of any task (recorded per task in ``single_task``), or None."""
    sizes = [v.get("n_test") for per_task in results["single_task"].values() for v in per_task.values()]
    sizes = [int(n) for n in sizes if is_number(n) and n > 0]
    return min(sizes) if sizes else None


def verdict_lines(results: Mapping[str, Any]) -> list[str]:
    """One sentence per merge method: what the best OSRM init (chosen on VALIDATION) changed against
    standard LoRA at that method on the test average, then the noise level of the run."""
    recs = {(r["init"], r["method"]): r for r in results["merged"]}
    osrm = [i for i in init_names(results) if is_osrm(results, i)]
    lines = []
    for method in methods(results):
        std = recs.get(("standard", method))
        cands = [recs[(i, method)] for i in osrm if (i, method) in recs]
        if std is None or not cands:
            continue
        best = max(cands, key=lambda r: r.get("avg_validation", float("-inf")))
        gain = best["avg_test"] - std["avg_test"]
        single_gain = single_avg(results, best["init"]) - single_avg(results, "standard")
        lines.append(f"{method}: OSRM {init_label(results, best['init'])} (best OSRM init on validation) merges to "
                     f"{best['avg_test']:.1f} against {std['avg_test']:.1f} for standard LoRA ({gain:+.1f} points, "
                     f"test average; single-task {single_gain:+.1f}).")
    if not lines:
        return []
    n = smallest_test_split(results)
    noise = (f"One seed ({results.get('seed', '?')}): no spread over seeds; the smallest test split has {n} "
             f"examples, so one example moves that task's score by {100 / n:.1f} points"
             if n else f"One seed ({results.get('seed', '?')}): no spread over seeds")
    subsampled = "; the tasks were subsampled (max_train/max_eval), so these are not full-data scores" \
        if results.get("subsampled") else ""
    return lines + [noise + subsampled + "."]


def run_seeds(results: Mapping[str, Any]) -> list[Any]:
    """The seeds the results come from, in order: ``seeds`` when the results list several, else the
    run's ``seed``, plus any other seed a merged record names."""
    listed = results.get("seeds")
    found: list[Any] = list(listed) if isinstance(listed, list) else [
        results.get("seed", (results.get("manifest") or {}).get("seed"))]
    found += [r.get("seed") for r in results.get("merged", []) if isinstance(r, Mapping)]
    out: list[Any] = []
    for s in found:
        if s is not None and s not in out:
            out.append(s)
    return out


def seed_text(results: Mapping[str, Any]) -> str:
    """``seed 0`` (or ``seeds 0, 1, 2``; ``seed not recorded``): the short form for titles."""
    seeds = run_seeds(results)
    if not seeds:
        return "seed not recorded"
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(str(s) for s in seeds)}"


def seed_note(results: Mapping[str, Any]) -> str:
    """The seed statement put beside every number of one run (a table's caption, a figure's caption):
    ``One run, seed 0: ...`` or, for results over several seeds, which seeds and where the ± is."""
    seeds = run_seeds(results)
    if not seeds:
        return "Seed not recorded (one run, so no ± over seeds)"
    if len(seeds) == 1:
        return f"Seed {seeds[0]} (one run, so no ± over seeds)"
    return (f"Seeds {', '.join(str(s) for s in seeds)}: a cell with ± reads mean ± standard deviation over the "
            "seeds; a cell without ± is one value")


def cached_stages(results: Mapping[str, Any]) -> list[str]:
    """Stage ids the last invocation skipped as finished (manifest ``stages_cached``; empty when not recorded)."""
    cached = (results.get("manifest") or {}).get("stages_cached") or []
    return [str(s) for s in cached] if isinstance(cached, (list, tuple)) else []


def train_time_problems(results: Mapping[str, Any]) -> list[str]:
    """Why the per-init training times of a run cannot be compared (empty when they can): training in
    several processes at once, on different devices, or stages cached from an earlier invocation."""
    man = results.get("manifest") or {}
    records = [v for per in results["single_task"].values() for v in per.values() if isinstance(v, Mapping)]
    problems: list[str] = []
    raw_procs = [man.get("processes"), man.get("world_size")] + [v.get("world_size") for v in records]
    procs = [int(p) for p in raw_procs if is_number(p)]
    if procs and max(procs) > 1:
        problems.append(f"training ran in {max(procs)} processes at once (parallel), so adapter times overlap and "
                        "share the hardware")
    devices = sorted({str(v["device"]) for v in records if v.get("device")})
    if len(devices) > 1:
        problems.append(f"the adapters were trained on different devices ({', '.join(devices)})")
    train_ids = [k for k in (man.get("stage_seconds") or {}) if str(k).startswith("train/")]
    cached = [s for s in cached_stages(results) if s.startswith("train/")]
    if cached:
        problems.append(f"{len(cached)} of {max(len(train_ids), len(cached))} training stages were cached in the "
                        "last invocation: their times come from the invocation that ran them")
    elif "stages_cached" not in man and not (procs and max(procs) > 1):
        stage_total = sum(float(v) for v in (man.get("stage_seconds") or {}).values() if is_number(v))
        wall = man.get("wall_seconds")
        if is_number(wall) and stage_total > float(wall) * 1.02 + 1.0:
            problems.append(f"the stage times add up to {stage_total:.0f} s, more than this invocation's "
                            f"{float(wall):.0f} s wall time in one process, so some stages were cached from an "
                            "earlier invocation")
    return problems


def ratio_matrices(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(init, diagnostics) for every init, in config order, whose results carry an interference ratio matrix."""
    inter = results.get("interference") or {}
    return [(i, inter[i]) for i in init_names(results) if isinstance(inter.get(i), Mapping) and inter[i].get("ratio")]


def interference_scale(results: Mapping[str, Any]) -> tuple[float, float, bool] | None:
    """One colour scale for the interference heatmaps of every init of a run: ``(vmin, vmax, log)``
    over the positive finite ratios of all inits (logarithmic when they span a range; linear from 0
    otherwise); None without ratio matrices."""
    diags = ratio_matrices(results)
    if not diags:
        return None
    values = [float(v) for _, d in diags for row in d["ratio"] for v in row if is_number(v) and v > 0]
    if values and max(values) > min(values):
        return min(values), max(values), True
    return 0.0, max(values + [1.0]), False


def scale_text(scale: tuple[float, float, bool]) -> str:
    """``log colour scale 0.004 to 1`` (or ``linear colour scale 0 to 1``)."""
    vmin, vmax, log = scale
    return f"{'log' if log else 'linear'} colour scale {vmin:.3g} to {vmax:.3g}"


# --------------------------------------------------------------------------- the tables
def summary_table(results: Mapping[str, Any]) -> Table:
    """One row per (init, method): averages over tasks, robustness and merge time."""
    header = ["init", "method", "λ (val)", "avg val", "avg merged test", "avg single test", "normalised test %",
              "worst-λ normalised %", "merge s"]
    rows: list[list[Cell]] = []
    for rec in merged_records(results):
        rows.append([
            text(init_label(results, rec["init"])), text(method_label(rec)), merged_lambda_cell(rec),
            num(rec.get("avg_validation")), num(rec.get("avg_test")), num(single_avg(results, rec["init"])),
            num(rec.get("avg_normalised_test")), num(worst_normalised(rec)), num(rec.get("merge_seconds"), ".2f"),
        ])
    mark_best(rows, [3, 4, 6, 7, 8], lower_is_better=[8])
    return Table("summary", "Summary: averages over tasks",
                 f"{seed_note(results)}. Test split unless the column says val (validation); {SELECTION_RULE}. "
                 "Normalised = merged / single-task test score of the same init. Worst-λ = lowest normalised score "
                 f"over the λ grid (test curve, robustness only). Best per column in bold (fastest for merge s). {LAMBDA_NOTE_CAPTION}",
                 header, rows)


def per_task_table(results: Mapping[str, Any]) -> Table:
    """Rows: per init a single-task row, then one row per method; columns: per task merged test and
    normalised %, then averages. Best per column among the merged rows."""
    tasks = list(results["tasks"])
    metrics = results.get("metrics", {})
    header = ["init", "method", "λ (val)"]
    groups: list[tuple[str, int]] = [("", 3)]
    for t in tasks:
        header += ["test", "norm %"]
        groups.append((f"{t} ({metrics[t]})" if t in metrics else t, 2))
    header += ["test", "norm %"]
    groups.append(("average", 2))
    rows: list[list[Cell]] = []
    classes: list[str] = []
    for init in init_names(results):
        single = results["single_task"][init]
        row = [text(init_label(results, init)), Cell("single-task (no merge)"), Cell("-", numeric=True)]
        for t in tasks:
            row += [num(single.get(t, {}).get("test")), Cell("100", numeric=True)]
        row += [num(single_avg(results, init)), Cell("100", numeric=True)]
        rows.append(row)
        classes.append("single")
        for rec in [r for r in merged_records(results) if r["init"] == init]:
            row = [text(init_label(results, init)), text(method_label(rec)), merged_lambda_cell(rec)]
            norm = rec.get("normalised_test") or {}
            for t in tasks:
                row += [num(rec.get("test", {}).get(t)), num(norm.get(t))]
            row += [num(rec.get("avg_test")), num(rec.get("avg_normalised_test"))]
            rows.append(row)
            classes.append("merged")
    mark_best(rows, list(range(3, len(header))), eligible=lambda i: classes[i] == "merged")
    return Table("results", "Results per task: merged vs single-task",
                 f"{seed_note(results)}. Test split; {SELECTION_RULE}. Scores 0..100 in each task's metric; "
                 "norm % = merged / single-task test score of the same init. Best merged value per column in bold; "
                 f"single-task rows are the reference. {LAMBDA_NOTE_CAPTION}", header, rows, groups=groups, row_classes=classes)


def robustness_table(results: Mapping[str, Any]) -> Table:
    """Rows (init, method), columns lambda: average normalised TEST score; the selected lambda marked."""
    lambdas: list[float] = sorted({float(p["lambda"]) for r in results["merged"] for p in r.get("curve", [])
                                   if is_number(p.get("lambda"))})
    header = ["init", "method"] + [fmt(lam, "g") for lam in lambdas]
    rows: list[list[Cell]] = []
    for rec in merged_records(results):
        if not rec.get("curve"):  # a merge search (rmm, search): no lambda curve
            continue
        by_lam = {float(p["lambda"]): p for p in rec.get("curve", []) if is_number(p.get("lambda"))}
        row = [text(init_label(results, rec["init"])), text(method_label(rec))]
        for lam in lambdas:
            p = by_lam.get(lam)
            cell = num(None if p is None else p.get("avg_normalised_test"),
                       note="" if p is None else f"val {fmt(p.get('avg_validation'))}")
            if p is not None and is_number(rec.get("lambda")) and math.isclose(lam, float(rec["lambda"])):
                cell.mark = True
                cell.text += " ◆"
            row.append(cell)
        rows.append(row)
    return Table("robustness-table", "Robustness over λ",
                 f"{seed_note(results)}. Average normalised TEST score (%) at each λ, with the average VALIDATION "
                 "score (0..100) beside it; ◆ = the λ selected on validation. The test curve is a robustness report, "
                 "never used for selection.",
                 header, rows)


def single_task_table(results: Mapping[str, Any]) -> Table:
    """One row per init: single-task test per task, averages, A drift and, when the training times of
    the run are comparable (:func:`train_time_problems`), the training time; the caption says why it is
    kept or left out."""
    tasks = list(results["tasks"])
    problems = train_time_problems(results)
    show_time = not problems
    header = ["init", "mode", "A frozen"] + [f"{t} test" for t in tasks] + [
        "avg test", "avg val", "A drift (mean)", "best epoch"] + (["train s (all tasks)"] if show_time else [])
    rows: list[list[Cell]] = []
    for init in init_names(results):
        info = init_info(results, init)
        single = results["single_task"][init]
        drift = mean([single.get(t, {}).get("a_drift_mean") for t in tasks])
        epochs = [single.get(t, {}).get("best_epoch") for t in tasks]
        secs = [single.get(t, {}).get("seconds") for t in tasks]
        row = [text(init), text(info.get("mode")), text("yes" if info.get("freeze_A") else "no")]
        row += [num(single.get(t, {}).get("test")) for t in tasks]
        row += [num(single_avg(results, init)), num(single_avg(results, init, "validation")), num(drift, ".3f"),
                Cell(", ".join("-" if e is None else str(e) for e in epochs), numeric=True)]
        if show_time:
            row.append(num(sum(secs) if all(is_number(s) for s in secs) else None, ".1f"))
        rows.append(row)
    mark_best(rows, list(range(3, 3 + len(tasks) + 2)))
    if show_time:
        device = (results.get("manifest") or {}).get("device")
        timing = ("train s = sum over the tasks of each adapter's training wall time (model loading, epochs and "
                  f"evaluation), one adapter after another in one process{f' on {device}' if device else ''}, all "
                  "in this invocation, so comparable across inits; not marked best.")
    else:
        timing = f"Training time left out, not comparable across inits: {'; '.join(problems)}."
    return Table("single-task-table", "Single-task scores per init",
                 f"{seed_note(results)}. Test split (avg val = validation) of each task's own adapter before merging; "
                 "checkpoint chosen on validation. A drift = mean relative change of A during training (0 when A is "
                 f"frozen). Best per column in bold. {timing}", header, rows)


def interference_table(results: Mapping[str, Any]) -> Table:
    """One row per init with diagnostics: mean and max off-diagonal interference ratio."""
    header = ["init", "stage", "mean off-diag ratio", "max off-diag ratio", "modules"]
    rows: list[list[Cell]] = []
    for init in init_names(results):
        diag = (results.get("interference") or {}).get(init)
        if not diag or "ratio" not in diag:
            continue
        ratio = diag["ratio"]
        off = [v for i, r in enumerate(ratio) for j, v in enumerate(r) if i != j and is_number(v)]
        rows.append([text(init_label(results, init)), text("after OSRM" if is_osrm(results, init) else "before OSRM"),
                     num(diag.get("mean_offdiag_ratio"), ".3g"), num(max(off) if off else None, ".3g"),
                     num(len(diag.get("modules", [])) or None, "d")])
    mark_best(rows, [2, 3], lower_is_better=[2, 3])
    return Table("interference-table", "Interference summary",
                 f"{seed_note(results)}. ratio[i][j] = E‖ΔW_i h_j‖² / E‖ΔW_j h_j‖², from the trained adapters and "
                 "the activation statistics of the train split (no forward pass). Lower off-diagonal = less "
                 "interference. Best in bold.",
                 header, rows)


def merge_cost_table(results: Mapping[str, Any]) -> Table:
    """One row per (init, method): merge time at the selected lambda, memory if recorded, stage time."""
    stages = (results.get("manifest") or {}).get("stage_seconds") or {}
    recs = merged_records(results)
    cached = set(cached_stages(results))
    has_mem = any(memory_mb(r) is not None for r in recs)
    header = ["init", "method", "merge s (selected λ)"] + (["peak memory MB"] if has_mem else []) + [
        "λ grid size", "merge stage s (sweep + evaluation)"]
    rows: list[list[Cell]] = []
    for rec in recs:
        row = [text(init_label(results, rec["init"])), text(method_label(rec)), num(rec.get("merge_seconds"), ".2f")]
        if has_mem:
            row.append(num(memory_mb(rec), ".0f"))
        stage_id = f"merge/{rec['init']}/{rec['method']}"
        row += [num(len(rec.get("curve", [])) or None, "d"),
                num(stages.get(stage_id), ".1f", note="cached" if stage_id in cached else "")]
        rows.append(row)
    mark_best(rows, [2] + ([3] if has_mem else []), lower_is_better=[2, 3])
    searched = " For rmm and search: the merge of the found configuration (the search itself is in \"Merge searches\")." \
        if search_records(results) else ""
    return Table("merge-cost-table", "Merge cost",
                 f"{seed_note(results)}. Wall time of one merge at the selected λ; peak memory of the merges above "
                 "the level before them (largest over the λ sweep; resident memory sampled on CPU, exact on CUDA); the "
                 "stage time covers the whole λ sweep with validation and test evaluation (\"cached\": skipped in the "
                 f"last invocation, so both times are those of the invocation that ran it). Best in bold.{searched}",
                 header, rows)


def search_records(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Merged records of the merge searches (``rmm``, ``search``: they carry ``evaluations_used``)."""
    return [r for r in merged_records(results) if "evaluations_used" in r]


def _chosen_text(rec: Mapping[str, Any], tasks: Sequence[str]) -> str:
    """The found merge in words: RMM's choice per layer, or the search's method, coefficients and
    adapters per layer group."""
    best = rec.get("best") or {}
    if isinstance(best.get("architecture"), Mapping):
        return "; ".join(f"{layer}: {label}" for layer, label in best["architecture"].items())
    parts = []
    for choice in (best.get("config") or {}).get("groups", []):
        params = ", ".join(f"{k}={fmt(v, '.3g')}" for k, v in (choice.get("params") or {}).items())
        include = choice.get("include") or [True] * len(tasks)
        used = [t for t, u in zip(tasks, include) if u]
        over = "all adapters" if len(used) == len(tasks) else (", ".join(used) or "no adapter")
        parts.append(f"{choice.get('group')}: {choice.get('method')}({params}) over {over}")
    return "; ".join(parts) or "-"


def _budget_text(rec: Mapping[str, Any]) -> str:
    budget = rec.get("budget") or {}
    used = fmt(rec.get("evaluations_used"), ".4g")
    limit = budget.get("evaluations")
    steps = (f"{budget['episodes']} episodes" if is_number(budget.get("episodes")) else
             f"{budget['used']['trials']} trials" if isinstance(budget.get("used"), Mapping)
             and is_number(budget["used"].get("trials")) else "")
    return (f"{used} of {fmt(limit, '.4g')}" if is_number(limit) else used) + (f" ({steps})" if steps else "")


def search_table(results: Mapping[str, Any]) -> Table:
    """One row per merge search (rmm, search) and init: the validation evaluations it used, its wall
    time, its validation and test averages and what it found (empty without merge searches)."""
    tasks = list(results["tasks"])
    header = ["init", "method", "evaluations used (of budget)", "search s", "avg val", "avg test", "found"]
    rows = [[text(init_label(results, r["init"])), text(r["method"]), text(_budget_text(r)),
             num(r.get("search_seconds"), ".1f"), num(r.get("avg_validation")), num(r.get("avg_test")),
             text(_chosen_text(r, tasks))] for r in search_records(results)]
    return Table("search-table", "Merge searches",
                 f"{seed_note(results)}. RMM (rmm) and the multi-fidelity search (search) choose on the validation "
                 "splits only: evaluations are merged-model evaluations on validation (rmm: one per completed "
                 "episode on small subsets, plus the final re-scoring on the whole split; search: in whole-split "
                 "units, a subset of fraction f costing f). The test split is scored once, for the found merge. "
                 "Their validation averages are the best of many candidates on the same data, so they are biased "
                 "upwards against the lambda sweeps'.", header, rows)


def _kv(key: str, title: str, caption: str, pairs: Sequence[tuple[str, Any]]) -> Table:
    return Table(key, title, caption, ["key", "value"], [[text(k), text(v)] for k, v in pairs])


def manifest_tables(results: Mapping[str, Any]) -> list[Table]:
    """Run facts: identity and hardware, library versions, data, inits and stage timings."""
    man = results.get("manifest") or {}
    run = [("name", results.get("name", man.get("name"))), ("model", results.get("model", man.get("model"))),
           ("seed", results.get("seed", man.get("seed"))), ("config hash", man.get("config_hash")),
           ("device", man.get("device")), ("device name", man.get("device_name")), ("threads", man.get("threads")),
           ("platform", man.get("platform")), ("wall time s", fmt(man.get("wall_seconds"), ".1f"))]
    tables = [_kv("manifest-run", "Run", "Identity, seeds and hardware of the run.", run)]
    versions = man.get("versions") or {}
    if versions:
        tables.append(_kv("manifest-versions", "Library versions", "As recorded at the end of the run.",
                          list(versions.items())))
    data = man.get("tasks") or {}
    metrics = results.get("metrics", {})
    drows = [[text(t), text(metrics.get(t)), text(d.get("source") or "local"), num(d.get("n_train"), "d"),
              num(d.get("n_validation"), "d"), num(d.get("n_test"), "d"), text(str(d.get("fingerprint", "-"))[:12])]
             for t, d in data.items()]
    if drows:
        tables.append(Table("manifest-data", "Data", "Split sizes and content fingerprints (first 12 hex digits).",
                            ["task", "metric", "source", "train", "validation", "test", "fingerprint"], drows))
    irows = [[text(i.get("name")), text(i.get("mode")), text(bool(i.get("freeze_A"))), text(bool(i.get("freeze_B"))),
              num(i.get("ridge"), "g")] for i in results.get("inits", [])]
    if irows:
        tables.append(Table("manifest-inits", "Initialisations", "One LoRA adapter per task is trained for each init.",
                            ["init", "mode", "freeze A", "freeze B", "ridge"], irows))
    stages = man.get("stage_seconds") or {}
    if stages:
        cached = set(cached_stages(results))
        srows = [[text(k), num(v, ".1f", note="cached: time of the invocation that ran it" if k in cached else "")]
                 for k, v in stages.items()]
        total = sum(v for v in stages.values() if is_number(v))
        srows.append([Cell("total (all stages, cached ones included)"), num(total, ".1f")])
        tables.append(Table("manifest-stages", "Stage timings",
                            f"{seed_note(results)}. Seconds per stage. A stage skipped in the last invocation "
                            "because it had finished (cached) shows the time of the invocation that ran it.",
                            ["stage", "seconds"], srows))
    return tables
