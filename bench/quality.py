"""Merged quality with and without OSRM: inits x merge methods x seeds, selected on validation.

    python bench/quality.py --preset cpu       # reduced: demo-sized subsamples, 1 seed (states so)
    python bench/quality.py --preset gpu       # offline6, LoRA r=8 on query/value, 3 seeds (one GPU)
    python bench/quality.py --preset gpu-hard  # offline6, LoRA r=16 on all linear layers: where merging hurts
    python bench/quality.py --preset gpu-hard --seeds 0 --lr 1e-3 --inits standard,lori --no-write   # one part
    python bench/quality.py --preset gpu-hard --aggregate-only   # aggregate finished parts, write results
    python bench/quality.py --preset gpu-family --plan-jobs      # issue 15: TA/TIES/CTM/EMR vs RMM and search

Each (seed, learning rate, inits part) is one pipeline run (resumable) under
bench/runs/quality-<preset>/seed<k>-lr<lr>[-<inits>]. A preset may give an init several learning
rates (``lr_grid``): the script then keeps, PER INIT, the rate with the highest single-task
VALIDATION average over seeds (test is never used to choose). It aggregates mean +- std over seeds
per (init, method): merged test average, normalised test average (merged / single-task of the same
init), the normalised score at lambda = 1 (the plain sum, no tuning), the whole lambda curve, the
single-task average and the selected lambda. The recommended configuration is ONE shared merged
model (EMR, which deploys one model per task, is reported apart) chosen on VALIDATION among the
configurations with the most seeds, and is checked against the targets of the where-merging-hurts
issue (recovered share of the points standard merging loses, single-task cost, normalised scores,
against standard LoRA + EMR). Results go to bench/results/quality_<preset>.json and the matching
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from benchlib import BenchRecord, command_line, machine_info, markdown_table, write_results  # noqa: E402

from osrm_lora.config import ALL_LINEAR, parse_config  # noqa: E402
from osrm_lora.evaluate import mean  # noqa: E402
from osrm_lora.fsutil import read_json  # noqa: E402
from osrm_lora.logutil import setup_logging  # noqa: E402

logger = logging.getLogger("bench.quality")

INITS = [
    {"name": "standard", "mode": "standard"},
    {"name": "code", "mode": "code"},
    {"name": "paper", "mode": "paper"},
    {"name": "own", "mode": "own"},
    {"name": "paper-frozenA", "mode": "paper", "freeze_A": True},
    {"name": "own-frozenA", "mode": "own", "freeze_A": True},
    {"name": "own-k32", "mode": "own", "subspace_dim": 32},
    {"name": "standard-frozenA", "mode": "standard", "freeze_A": True},
    {"name": "lori", "mode": "standard", "freeze_A": True, "b_sparsity": 0.9},
    {"name": "own-pen0.1", "mode": "own", "interference_penalty": 0.1},
    {"name": "own-pen1", "mode": "own", "interference_penalty": 1.0},
    {"name": "own-pen3", "mode": "own", "interference_penalty": 3.0},
    {"name": "standard-pen1", "mode": "standard", "interference_penalty": 1.0},
    # a rank split: the best 8 of 16 OSRM directions held in A, the other 8 rows free (issue: where merging hurts)
    {"name": "own-split8", "mode": "own", "frozen_rank": 8},
    # the penalty weight around gpu-hard's validation winner (0.1), and the rank split with it
    {"name": "own-pen0.03", "mode": "own", "interference_penalty": 0.03},
    {"name": "own-pen0.3", "mode": "own", "interference_penalty": 0.3},
    {"name": "own-split8-pen0.1", "mode": "own", "frozen_rank": 8, "interference_penalty": 0.1},
]
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.5]
HARD_LAMBDAS = [0.1, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0]
CPU_HARD_BASE = {  # the reduced all-linear setting of cpu-hard and cpu-family
    "model": "default",
    "tasks": [{"name": n, "max_train": 300, "max_eval": 100} for n in ("mr", "hedge", "bbc", "spam")],
    "lora": {"rank": 16, "alpha": 32, "target_modules": ALL_LINEAR},
    "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "head_lr": 1e-2, "max_length": 48},
}
SHARED_METHODS = ["task_arithmetic", "ties", "tsv_m", "core_space", "regmean", "knots"]
PER_TASK_METHODS = {"emr"}  # one deployed model per task: reported apart, never the recommendation
SEARCHED_METHODS = {"rmm", "search"}  # merge searches (merge.rmm, merge.search): no lambda, a search budget
GPU_TASKS = ("mr", "movie_docs", "hedge", "bbc", "spam", "foods")
MPNET_ALL_LINEAR = ["q", "k", "v", "o", "intermediate.dense", "output.dense"]  # MPNet names its attention q/k/v/o
HARD_TRAIN = {"epochs": 4, "batch_size": 32, "lr": 1e-3, "head_lr": 1e-2, "max_length": 128, "eval_batch_size": 256}
FAMILY_RMM = {"methods": ["task_arithmetic", "ties", "dare_ties"], "episodes": 500, "budget": 300, "subset_size": 32,
              "rescore": 3}
"""RMM in gpu-family: the command's candidates at their default parameters (lambda 1), 32 validation examples
per task per reward, 300 evaluations (3 of them the final whole-split re-scoring), at most 500 episodes."""
FAMILY_SEARCH = {"methods": ["task_arithmetic", "ties", "dare_ties", "tsv_m"], "n_groups": 3, "rungs": 3, "eta": 3,
                 "min_examples": 8, "budget": {"evaluations": 40}}
"""The merge search in gpu-family: 3 groups of 2 layers, fidelities 1/9, 1/3 and all of the validation split
(45, 134 and 400 examples of a 400-example task), Hyperband, TPE, 40 full-validation evaluations.

Sizing (one part alone on an H200, seed 0, standard, gpu-family's tasks with training cut to 600 examples x 2
epochs, which leaves the search costs unchanged): RMM with 200 evaluations took 27 s (201 episodes), the search
with 24 evaluations 43 s (31 trials, 17 pruned; the per-group merges on the CPU dominate), stages with model
loading 32 s and 45 s. Scaled to these budgets: about 40 s + 70 s, about 2 minutes per (seed, init) part."""


def _inits(*names: str) -> list[dict[str, Any]]:
    by_name = {i["name"]: i for i in INITS}
    return [by_name[n] for n in names]

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "description": "REDUCED: tasks mr, hedge, bbc, spam capped at 300 train / 100 validation / 100 test examples, "
                       "48 tokens, 2 epochs, lr 2e-3 / head 1e-2, 1 seed, 4 inits, TA and TIES; MiniLM-L6 on 2 CPU cores",
        "seeds": [0],
        "config": {
            "model": "default",
            "tasks": [{"name": n, "max_train": 300, "max_eval": 100} for n in ("mr", "hedge", "bbc", "spam")],
            "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "head_lr": 1e-2, "max_length": 48},
            "inits": [INITS[0], INITS[2], INITS[5], INITS[6]],
            "merge": {"methods": ["task_arithmetic", "ties"], "lambdas": [0.5, 1.0, 1.5]},
        },
    },
    "gpu": {
        "description": "offline6 tasks (mr, movie_docs, hedge, bbc, spam, foods) with training capped at 1000 "
                       "examples per task (validation/test at full size), 128 tokens, 3 epochs, lr 2e-3 / head 1e-2 "
                       "(chosen on validation by bench/tune_lr.py), MiniLM-L6 on one GPU (bf16 autocast)",
        "seeds": [0, 1, 2],
        "config": {
            "model": "default",
            "tasks": [{"name": n, "max_train": 1000} for n in ("mr", "movie_docs", "hedge", "bbc", "spam", "foods")],
            "train": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "head_lr": 1e-2, "max_length": 128,
                      "eval_batch_size": 256},
            "inits": [i for i in INITS if "frozen_rank" not in i],  # the rank splits are sized for r=16
            "merge": {"methods": ["task_arithmetic", "ties", "dare_ties", "emr", "regmean", "tsv_m", "iso_c",
                                  "knots", "core_space"],
                      "lambdas": LAMBDAS},
        },
    },
    "gpu-hard": {
        "description": "WHERE MERGING HURTS: offline6 tasks (mr, movie_docs, hedge, bbc, spam, foods), LoRA r=16, "
                       "alpha 32 on query, key, value, intermediate.dense and output.dense, training capped at 2000 "
                       "examples per task and validation/test at 400 (seeded, stratified), 128 tokens, 4 epochs, head "
                       "lr 1e-2, LoRA lr per init chosen on validation from lr_grid, MiniLM-L6 on one GPU (bf16 "
                       "autocast); activation statistics from 100 samples per task; no interference diagnostic",
        "seeds": [0, 1, 2],
        "lr_grid": {"standard": [5e-4, 1e-3], "own": [5e-4, 1e-3], "standard-frozenA": [1e-3, 2e-3],
                    "own-frozenA": [1e-3, 2e-3], "lori": [1e-3, 2e-3]},
        "default_lr": 1e-3,
        "config": {
            "model": "default",
            "tasks": [{"name": n, "max_train": 2000, "max_eval": 400} for n in GPU_TASKS],
            "lora": {"rank": 16, "alpha": 32, "target_modules": ALL_LINEAR},
            "train": HARD_TRAIN,
            "inits": _inits("standard", "own-frozenA", "lori", "standard-frozenA", "own-pen1", "own", "own-pen0.1",
                            "own-pen3", "standard-pen1", "code", "paper-frozenA", "own-k32", "own-split8",
                            "own-pen0.03", "own-pen0.3", "own-split8-pen0.1"),
            "diagnose": False,
            "merge": {"methods": [*SHARED_METHODS, "emr"], "lambdas": HARD_LAMBDAS},
        },
    },
    "gpu-family": {
        "description": "ISSUE-15 FAMILY COMPARISON (merge searches beside the lambda-swept methods): gpu-hard's "
                       "setting (offline6 tasks mr, movie_docs, hedge, bbc, spam, foods; LoRA r=16, alpha 32 on all "
                       "linear layers; training capped at 2000 examples per task, validation/test at 400; 128 tokens, "
                       "4 epochs, lr 1e-3 / head 1e-2; MiniLM-L6 on one GPU, bf16 autocast), inits standard and "
                       "own-frozenA (lr 1e-3 each), methods TA, TIES, CTM, DOGE (FusionBench's DOGE-TA defaults) "
                       "and EMR with lambda on validation, plus "
                       "Reinforced Model Merging (candidates: each adapter, TA, TIES, DARE-TIES; 300 evaluations on "
                       "32-example validation subsets per task) and the multi-fidelity merge search (TA/TIES/"
                       "DARE-TIES/TSV-M per group of 2 layers with adapter masks, Hyperband over 1/9, 1/3 and all of "
                       "the validation split, 40 full-validation evaluations), both per (seed, init) on validation "
                       "only, the test split scored once for the merge each finds",
        "seeds": [0, 1, 2],
        "config": {
            "model": "default",
            "tasks": [{"name": n, "max_train": 2000, "max_eval": 400} for n in GPU_TASKS],
            "lora": {"rank": 16, "alpha": 32, "target_modules": ALL_LINEAR},
            "train": HARD_TRAIN,
            "inits": _inits("standard", "own-frozenA"),
            "diagnose": False,
            "merge": {"methods": ["task_arithmetic", "ties", "ctm", "doge", "emr"], "lambdas": HARD_LAMBDAS,
                      "rmm": FAMILY_RMM, "search": FAMILY_SEARCH},
        },
    },
    "cpu-family": {
        "description": "REDUCED variant of gpu-family for 2 CPU cores (issue-15 family comparison): tasks mr, hedge, "
                       "bbc, spam capped at 300 train / 100 validation / 100 test examples, 48 tokens, 2 epochs, LoRA "
                       "r=16 alpha 32 on all linear layers, lr 2e-3 / head 1e-2, 1 seed, inits standard and "
                       "own-frozenA, methods TA, TIES, CTM, EMR, RMM (60 evaluations on 16-example subsets) and the "
                       "merge search (8 full-validation evaluations); MiniLM-L6",
        "seeds": [0],
        "config": {
            **CPU_HARD_BASE,
            "inits": _inits("standard", "own-frozenA"),
            "diagnose": False,
            "merge": {"methods": ["task_arithmetic", "ties", "ctm", "emr"], "lambdas": [0.5, 1.0, 1.5, 2.0],
                      "rmm": {**FAMILY_RMM, "episodes": 100, "budget": 60, "subset_size": 16},
                      "search": {**FAMILY_SEARCH, "budget": {"evaluations": 8}}},
        },
    },
    "cpu-hard": {
        "description": "REDUCED variant of gpu-hard for 2 CPU cores: tasks mr, hedge, bbc, spam capped at 300 train / "
                       "100 validation / 100 test examples, 48 tokens, 2 epochs, LoRA r=16 alpha 32 on all linear "
                       "layers, lr 2e-3 / head 1e-2, 1 seed, inits standard, standard-frozenA, lori, own-frozenA, "
                       "methods TA, TIES and EMR; MiniLM-L6",
        "seeds": [0],
        "config": {
            **CPU_HARD_BASE,
            "inits": _inits("standard", "standard-frozenA", "lori", "own-frozenA"),
            "diagnose": False,
            "merge": {"methods": ["task_arithmetic", "ties", "emr"], "lambdas": [0.5, 1.0, 1.5, 2.0]},
        },
    },
    "gpu-mpnet-hard": {
        "description": "WHERE MERGING HURTS, BIGGER MODEL: gpu-hard's setting (offline6 tasks mr, movie_docs, hedge, "
                       "bbc, spam, foods; training capped at 2000 examples per task, validation/test at 400; 128 "
                       "tokens, 4 epochs, head lr 1e-2; LoRA r=16, alpha 32 on every linear layer of the block: "
                       "attention q, k, v, o, intermediate.dense, output.dense) on all-mpnet-base-v2 (110M, 12 "
                       "layers, hidden 768), LoRA lr 1e-3 for both inits (gpu-hard's validation choice for them on "
                       "MiniLM, NOT tuned for this model), inits standard and own-frozenA, TA/TIES/TSV-M and EMR, one "
                       "GPU (bf16 autocast); model path from $OSRM_QUALITY_MODEL",
        "seeds": [0, 1, 2],
        "config": {
            "model": os.environ.get("OSRM_QUALITY_MODEL", "sentence-transformers/all-mpnet-base-v2"),
            "tasks": [{"name": n, "max_train": 2000, "max_eval": 400} for n in GPU_TASKS],
            "lora": {"rank": 16, "alpha": 32, "target_modules": MPNET_ALL_LINEAR},
            "train": HARD_TRAIN,
            "inits": _inits("standard", "own-frozenA"),
            "diagnose": False,
            "merge": {"methods": ["task_arithmetic", "ties", "tsv_m", "emr"], "lambdas": HARD_LAMBDAS},
        },
    },
    "gpu-mpnet": {
        "description": "REDUCED, BIGGER MODEL: all-mpnet-base-v2 (110M, 12 layers, hidden 768; LoRA on q/v) on mr, "
                       "hedge, bbc, spam with training capped at 1000 examples per task (validation/test at full "
                       "size), 128 tokens, 3 epochs, lr 1e-3 / head 1e-2 (fixed a priori, NOT tuned for this model), "
                       "1 seed, 3 inits, TA/TIES/EMR, one GPU (bf16 autocast); model path from $OSRM_QUALITY_MODEL",
        "seeds": [0],
        "config": {
            "model": os.environ.get("OSRM_QUALITY_MODEL", "sentence-transformers/all-mpnet-base-v2"),
            "tasks": [{"name": n, "max_train": 1000} for n in ("mr", "hedge", "bbc", "spam")],
            "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "head_lr": 1e-2, "max_length": 128,
                      "eval_batch_size": 256},
            "inits": [INITS[0], INITS[1], INITS[2]],
            "merge": {"methods": ["task_arithmetic", "ties", "emr"], "lambdas": LAMBDAS},
        },
    },
}


def _config(preset: str, seed: int, inits: list[str] | None = None, lr: float | None = None) -> Any:
    raw = dict(PRESETS[preset]["config"])
    raw["name"] = f"quality-{preset}-seed{seed}"
    raw["seed"] = seed
    if lr is not None:
        raw["train"] = {**raw["train"], "lr": lr}
    if inits:
        known = {i["name"]: i for i in raw["inits"]}
        unknown = [i for i in inits if i not in known]
        if unknown:
            raise SystemExit(f"unknown inits {unknown}; the preset has {sorted(known)}")
        raw["inits"] = [known[i] for i in inits]
    return parse_config(raw)


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's results from runs over disjoint sets of inits (same tasks, seed, settings)."""
    out = dict(parts[0])
    out["single_task"] = {}
    out["merged"] = []
    out["interference"] = {}
    for p in parts:
        out["single_task"].update(p["single_task"])
        out["merged"].extend(p["merged"])
        out["interference"].update(p.get("interference", {}))
    return out


def select_lr(parts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per init, the learning rate with the highest single-task VALIDATION average (mean over the
    seeds that ran it; ties go to the smaller rate), and every seed's results restricted to it.

    ``parts``: ``{"seed", "lr", "results"}`` per pipeline run. Returns the per-seed results (the
    chosen rate of every init only) and ``{init: {"lr", "validation_by_lr", "seeds_by_lr"}}``."""
    vals: dict[str, dict[float, list[float]]] = {}
    for part in parts:
        for init, per_task in part["results"]["single_task"].items():
            vals.setdefault(init, {}).setdefault(float(part["lr"]), []).append(
                mean(v["validation"] for v in per_task.values()))
    chosen: dict[str, dict[str, Any]] = {}
    for init, by_lr in vals.items():
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = max(sorted(means), key=lambda lr: means[lr])
        chosen[init] = {"lr": best, "validation_by_lr": {str(k): v for k, v in sorted(means.items())},
                        "seeds_by_lr": {str(k): len(v) for k, v in sorted(by_lr.items())}}
    runs = []
    for seed in sorted({int(p["seed"]) for p in parts}):
        keep = []
        for part in (p for p in parts if int(p["seed"]) == seed):
            res, lr = part["results"], float(part["lr"])
            inits = {i for i in res["single_task"] if chosen[i]["lr"] == lr}
            if inits:
                keep.append({**res, "single_task": {i: v for i, v in res["single_task"].items() if i in inits},
                             "merged": [m for m in res["merged"] if m["init"] in inits]})
        if keep:
            runs.append(merge_parts(keep))
    return runs, chosen


def recorded_runs(record: dict[str, Any], skip: set[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The per-seed results and learning-rate choices a written record (bench/results/quality_<preset>.json)
    holds for every init NOT in ``skip``: so that new inits join a study whose other parts' runs are no
    longer on disk. The record keeps only each init's chosen rate, so its lr choice is taken as recorded."""
    runs = []
    for r in record["results"]["per_seed"]:
        single = {i: v for i, v in r["single_task"].items() if i not in skip}
        if single:
            runs.append({"seed": int(r["seed"]), "single_task": single,
                         "merged": [m for m in r["merged"] if m["init"] not in skip]})
    lrs = {i: v for i, v in record["results"]["aggregate"]["lr_selection"].items() if i not in skip}
    return runs, lrs


def combine_runs(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, the new runs' results joined with the recorded ones (disjoint inits; the new run's
    manifest kept)."""
    seeds = sorted({int(r["seed"]) for r in new} | {int(r["seed"]) for r in old})
    return [merge_parts([r for r in new if int(r["seed"]) == s] + [r for r in old if int(r["seed"]) == s])
            for s in seeds]


def _sd(values: list[float]) -> float:
    """Standard deviation over seeds (0 for one seed; NaN when a value is NaN: not measured, e.g. the
    lambda of a merge search)."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": _sd(values), "values": values}


def curve_at(curve: list[dict[str, Any]], lam: float) -> float:
    """Normalised test average of a sweep at ``lam`` (a method without scaling has the one point 1.0)."""
    for point in curve:
        if math.isclose(point["lambda"], lam):
            return float(point["avg_normalised_test"])
    return float("nan")


def aggregate(runs: list[dict[str, Any]], lrs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Mean +- std over seeds per (init, method) of every headline number, with the seeds it covers."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    curves: dict[tuple[str, str], dict[float, list[float]]] = {}
    row_seeds: dict[tuple[str, str], list[int]] = {}
    singles: dict[str, list[float]] = {}
    singles_val: dict[str, list[float]] = {}
    for res in runs:
        for init, per_task in res["single_task"].items():
            singles.setdefault(init, []).append(mean(v["test"] for v in per_task.values()))
            singles_val.setdefault(init, []).append(mean(v["validation"] for v in per_task.values()))
        for rec in res["merged"]:
            key = (rec["init"], rec["method"])
            single_avg = mean(v["test"] for v in res["single_task"][rec["init"]].values())
            worst = min(p["avg_normalised_test"] for p in rec["curve"]) if rec["curve"] else float("nan")
            d = rows.setdefault(key, {k: [] for k in ("merged_test", "merged_val", "normalised", "single", "lambda",
                                                      "norm_at_1", "worst_norm")})
            d["merged_test"].append(rec["avg_test"])
            d["merged_val"].append(rec["avg_validation"])
            d["normalised"].append(rec["avg_normalised_test"])
            d["single"].append(single_avg)
            d["lambda"].append(rec["lambda"] if rec["lambda"] is not None else float("nan"))
            d["norm_at_1"].append(curve_at(rec["curve"], 1.0))
            d["worst_norm"].append(worst)
            for k in ("search_seconds", "evaluations_used"):  # merge searches (rmm, search) only
                if k in rec:
                    d.setdefault(k, []).append(float(rec[k]))
            for point in rec["curve"]:
                curves.setdefault(key, {}).setdefault(float(point["lambda"]), []).append(point["avg_normalised_test"])
            row_seeds.setdefault(key, []).append(int(res["seed"]))
    table: dict[str, dict[str, Any]] = {}
    for (i, m), d in rows.items():
        entry: dict[str, Any] = {k: _stat(v) for k, v in d.items()}
        entry["seeds"] = row_seeds[(i, m)]
        entry["n_seeds"] = len(row_seeds[(i, m)])
        entry["curve"] = {str(lam): statistics.fmean(v) for lam, v in sorted(curves.get((i, m), {}).items())}
        entry["lr"] = (lrs or {}).get(i, {}).get("lr")
        table[f"{i}|{m}"] = entry
    return {"configs": table,
            "single": {i: {"mean": statistics.fmean(v), "std": _sd(v)} for i, v in singles.items()},
            "single_validation": {i: {"mean": statistics.fmean(v), "std": _sd(v)} for i, v in singles_val.items()},
            "lr_selection": lrs or {}}


TARGETS = (  # (name, key of the value, threshold, unit): value >= threshold is met
    ("merged recovers >= 75% of the points standard TA loses", "recovered_pct", 75.0, "%"),
    ("single-task average >= standard - 0.5", "single_minus_standard", -0.5, " pts"),
    ("normalised >= 98%", "normalised", 98.0, "%"),
    ("normalised at lambda = 1 >= 95%", "norm_at_1", 95.0, "%"),
    ("merged >= standard LoRA + EMR (per-task models)", "merged_minus_standard_emr", 0.0, " pts"),
)


def config_targets(c: dict[str, Any], agg: dict[str, Any]) -> dict[str, Any]:
    """The where-merging-hurts targets of one configuration (means over seeds, test split)."""
    configs = agg["configs"]
    nan = float("nan")
    base = configs.get("standard|task_arithmetic")
    emr = configs.get("standard|emr")
    std_single = agg["single"].get("standard", {}).get("mean", nan)
    lost = std_single - base["merged_test"]["mean"] if base else nan
    t = {
        "standard_loses": lost,
        "recovered_pct": 100 * (c["merged_test"]["mean"] - base["merged_test"]["mean"]) / lost
        if base and lost > 0 else nan,
        "single_minus_standard": c["single"]["mean"] - std_single,
        "normalised": c["normalised"]["mean"],
        "norm_at_1": c["norm_at_1"]["mean"],
        "merged_minus_standard_emr": c["merged_test"]["mean"] - emr["merged_test"]["mean"] if emr else nan,
    }
    t["met"] = {name: (not math.isnan(t[key])) and t[key] >= thr for name, key, thr, _ in TARGETS}
    t["all_met"] = all(t["met"].values())
    return t


def check_targets(agg: dict[str, Any]) -> dict[str, Any]:
    """The targets for every configuration; the recommendation (one shared merged model, not EMR) is
    chosen on VALIDATION among the configurations with the most seeds."""
    configs = agg["configs"]
    out = {key: config_targets(c, agg) for key, c in configs.items()}
    shared = {k: c for k, c in configs.items() if k.split("|")[1] not in PER_TASK_METHODS} or configs
    max_seeds = max(c["n_seeds"] for c in shared.values())
    pool = sorted(k for k, c in shared.items() if c["n_seeds"] == max_seeds)
    excluded = sorted(k for k in shared if k not in pool)
    if excluded:
        logger.info("recommendation among %d configurations with %d seeds; %d with fewer seeds left out",
                    len(pool), max_seeds, len(excluded))
    best = max(pool, key=lambda k: configs[k]["merged_val"]["mean"])
    return {"per_config": out, "recommended_on_validation": best, "recommendation_seeds": max_seeds,
            "recommendation_pool": pool, "excluded_fewer_seeds": excluded}


def _pm(d: dict[str, Any], digits: int = 1) -> str:
    if d["mean"] is None or (isinstance(d["mean"], float) and math.isnan(d["mean"])):
        return "-"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def targets_table(t: dict[str, Any]) -> str:
    rows = []
    for name, key, thr, unit in TARGETS:
        v = t[key]
        if math.isnan(v):
            rows.append([name, "not measured", "missed", "-"])
            continue
        rows.append([name, f"{v:+.1f}{unit}" if unit == " pts" else f"{v:.1f}{unit}",
                     "met" if v >= thr else "missed", f"{v - thr:+.1f}{unit}"])
    return markdown_table(["target", "value", "status", "margin (value - target)"], rows)


def summary(agg: dict[str, Any], targets: dict[str, Any], description: str, seeds: list[int]) -> str:
    headers = ["init", "method", "seeds", "lr", "merged test avg", "normalised %", "normalised at λ=1 %",
               "single-task avg", "λ (validation)", "targets met"]
    rows = []
    for key, c in sorted(agg["configs"].items()):
        init, method = key.split("|")
        met = targets["per_config"][key]["met"]
        label = method + (" (per-task models)" if method in PER_TASK_METHODS else
                          " (merge search)" if method in SEARCHED_METHODS else "")
        rows.append([init, label, str(c["n_seeds"]), f"{c['lr']:g}" if c.get("lr") else "-", _pm(c["merged_test"]),
                     _pm(c["normalised"]), _pm(c["norm_at_1"]), _pm(c["single"]), _pm(c["lambda"], 2),
                     f"{sum(met.values())}/{len(met)}"])
    best = targets["recommended_on_validation"]
    tb = targets["per_config"][best]
    n_best = targets["recommendation_seeds"]
    excluded = targets["excluded_fewer_seeds"]
    seeds_note = ""
    if excluded:
        fewer: dict[str, list[int]] = {}
        for key in excluded:
            fewer.setdefault(key.split("|")[0], agg["configs"][key]["seeds"])
        seeds_note = (" Not every configuration ran with every seed: "
                      + "; ".join(f"{i} only with seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"
                                  for i, s in sorted(fewer.items()))
                      + " (column \"seeds\"; a single seed shows std 0).")
    lines = [
        f"Setting: {description}; seeds {seeds}. Scores on the TEST split (0-100), mean ± std over seeds; "
        "λ, checkpoints and learning rates chosen on validation; normalised = merged / single-task score of the "
        "same init; \"normalised at λ=1\" is the plain sum of the adapters (no tuning)." + seeds_note,
        "",
        markdown_table(headers, rows),
    ]
    if agg.get("lr_selection") and any(len(v["validation_by_lr"]) > 1 for v in agg["lr_selection"].values()):
        lr_rows = [[i, ", ".join(f"{lr}: {v:.2f}" for lr, v in s["validation_by_lr"].items()), f"{s['lr']:g}"]
                   for i, s in sorted(agg["lr_selection"].items())]
        lines += ["", "Learning rate per init, chosen on the single-task VALIDATION average (mean over seeds):", "",
                  markdown_table(["init", "validation average by lr", "chosen lr"], lr_rows)]
    curve_keys = [k for k in dict.fromkeys([best, "standard|task_arithmetic"]) if k in agg["configs"]]
    lams = sorted({float(lam) for k in curve_keys for lam in agg["configs"][k]["curve"]})
    if len(lams) > 1:
        crow = [[k] + [f"{agg['configs'][k]['curve'].get(str(lam), float('nan')):.1f}" for lam in lams]
                for k in curve_keys]
        lines += ["", "Normalised test average (%) along the λ grid (robustness; never used for selection):", "",
                  markdown_table(["configuration"] + [f"λ={lam:g}" for lam in lams], crow)]
    pool_text = (f"highest merged VALIDATION average among the {len(targets['recommendation_pool'])} shared-model "
                 f"configurations with the most seeds ({n_best})")
    lost = tb["standard_loses"]
    lines += [
        "",
        f"Standard LoRA + Task Arithmetic loses {lost:.1f} points against standard single-task models"
        + (" (under 3 points: this regime shows little interference)" if lost < 3 else "") + ".",
        "",
        f"Recommended shared-model configuration ({pool_text}): **{best}** ({n_best} seed{'s' if n_best > 1 else ''}).",
        "",
        targets_table(tb),
    ]
    searched = [k for k in sorted(agg["configs"]) if k.split("|")[1] in SEARCHED_METHODS]
    if searched:
        srows = [[*k.split("|"), str(agg["configs"][k]["n_seeds"]), _pm(agg["configs"][k]["evaluations_used"]),
                  _pm(agg["configs"][k]["search_seconds"]), _pm(agg["configs"][k]["merged_val"]),
                  _pm(agg["configs"][k]["merged_test"]), _pm(agg["configs"][k]["normalised"])]
                 for k in searched if "evaluations_used" in agg["configs"][k]]
        lines += ["", "Merge searches (RMM: rmm, multi-fidelity search: search), per (seed, init) on the validation "
                  "splits only, the test split scored once for the merge found; their validation averages are the "
                  "best of many evaluated candidates, so biased upwards against the λ sweeps' (compare on test):", "",
                  markdown_table(["init", "method", "seeds", "evaluations used", "search s", "merged val avg",
                                  "merged test avg", "normalised %"], srows)]
    all_met = [k for k, v in sorted(targets["per_config"].items()) if v["all_met"]]
    lines += ["", "Configurations meeting all targets at once: " + (", ".join(all_met) if all_met else "none") + "."]
    front = pareto_front(agg)
    lines += ["", "Front of single-task vs merged score (configurations no other beats on both the single-task and "
              "the merged TEST average; reported, not used for selection): "
              + ", ".join(f"{k} (single {agg['configs'][k]['single']['mean']:.1f}, merged "
                          f"{agg['configs'][k]['merged_test']['mean']:.1f})" for k in front) + "."]
    return "\n".join(lines)


def pareto_front(agg: dict[str, Any]) -> list[str]:
    """Configurations not dominated on (single-task mean, merged test mean), best merged first."""
    pts = {k: (c["single"]["mean"], c["merged_test"]["mean"]) for k, c in agg["configs"].items()}
    front = [k for k, (s, m) in pts.items()
             if not any(s2 >= s and m2 >= m and (s2, m2) != (s, m) for s2, m2 in pts.values())]
    return sorted(front, key=lambda k: -pts[k][1])


def run_tag(seed: int, lr: float, inits: list[str] | None) -> str:
    return f"seed{seed}-lr{lr:g}" + ("-" + "+".join(inits) if inits else "")


def planned_runs(preset: str, seeds: list[int]) -> list[tuple[int, float, list[str]]]:
    """(seed, lr, inits) of every pipeline run of a preset: inits grouped by learning rate."""
    p = PRESETS[preset]
    default_lr = p.get("default_lr", p["config"]["train"]["lr"])
    grid = p.get("lr_grid", {})
    by_lr: dict[float, list[str]] = {}
    for init in p["config"]["inits"]:
        for lr in grid.get(init["name"], [default_lr]):
            by_lr.setdefault(float(lr), []).append(init["name"])
    return [(seed, lr, names) for seed in seeds for lr, names in sorted(by_lr.items())]


def planned_jobs(preset: str, seeds: list[int]) -> list[tuple[int, float, list[str]]]:
    """One (seed, lr, [init]) per pipeline run of a preset, in the preset's init order (its priority),
    then learning rate, then seed: for running the parts side by side on one GPU."""
    p = PRESETS[preset]
    default_lr = p.get("default_lr", p["config"]["train"]["lr"])
    grid = p.get("lr_grid", {})
    return [(seed, float(lr), [init["name"]]) for init in p["config"]["inits"]
            for lr in grid.get(init["name"], [default_lr]) for seed in seeds]


def read_parts(base: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Finished runs under ``base``: results.json with the lr from the run's own config.yaml."""
    import yaml

    parts = []
    for seed in seeds:
        for d in sorted(base.glob(f"seed{seed}-*")) + sorted(base.glob(f"seed{seed}")):
            if not (d / "results.json").exists():
                continue
            cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
            parts.append({"seed": seed, "lr": float(cfg["train"]["lr"]), "results": read_json(d / "results.json")})
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="override the preset's seeds")
    ap.add_argument("--runs", default=str(ROOT / "bench" / "runs"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--aggregate-only", action="store_true", help="only aggregate finished seed runs")
    ap.add_argument("--no-write", action="store_true", help="run without writing BENCHMARKS.md (partial runs)")
    ap.add_argument("--inits", default=None, help="comma-separated subset of the preset's inits (a part of a seed)")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate of the preset's grid (a part)")
    ap.add_argument("--plan", action="store_true", help="print one line 'seed lr inits' per planned run and exit")
    ap.add_argument("--note", action="append", default=[], help="a note to record with the results (repeatable)")
    ap.add_argument("--with-record", action="store_true",
                    help="also aggregate the results the preset's written record (bench/results/quality_PRESET.json) "
                         "holds for inits that have no finished run under --runs (runs made on another machine)")
    ap.add_argument("--plan-jobs", action="store_true",
                    help="print one line 'seed lr init' per single-init run, in priority order, and exit")
    args = ap.parse_args(argv)
    setup_logging(0)
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    if args.plan or args.plan_jobs:
        for seed, lr, names in (planned_jobs if args.plan_jobs else planned_runs)(args.preset, seeds):
            print(seed, f"{lr:g}", ",".join(names))
        return 0
    from osrm_lora.pipeline import run_pipeline

    base = Path(args.runs) / f"quality-{args.preset}"
    if not args.aggregate_only:
        subset = [i for i in args.inits.split(",") if i] if args.inits else None
        plan = ([(seed, args.lr, subset) for seed in seeds] if args.lr is not None or subset
                else planned_runs(args.preset, seeds))
        for seed, lr, names in plan:
            lr = lr if lr is not None else float(preset["config"]["train"]["lr"])
            run_pipeline(_config(args.preset, seed, names, lr), base / run_tag(seed, lr, names))
        if args.no_write:
            return 0
    parts = read_parts(base, seeds)
    if not parts:
        logger.error("no finished runs to aggregate under %s", base)
        return 1
    runs, lrs = select_lr(parts)
    if args.with_record:
        record_path = Path(args.out) / f"quality_{args.preset}.json"
        if not record_path.exists():
            logger.error("--with-record: no record at %s; run without --with-record", record_path)
            return 1
        record = read_json(record_path)
        old, old_lrs = recorded_runs(record, set(lrs))
        args.note.append(f"inits {', '.join(sorted(old_lrs))} are the per-seed results of the record of {record['date']} "
                         f"(its command: `{record['command']}`); the other inits are runs under {base}")
        runs, lrs = combine_runs(runs, old), {**old_lrs, **lrs}
    done_seeds = [r["seed"] for r in runs]
    agg = aggregate(runs, lrs)
    targets = check_targets(agg)
    md = summary(agg, targets, preset["description"], done_seeds)
    print(md)
    if args.no_write:
        return 0
    manifest = runs[0].get("manifest", {})
    machine = machine_info(manifest.get("device", "cpu"))
    notes = [f"runs under {base} (not committed)", *args.note]
    if str(manifest.get("device", "")).startswith("cuda"):
        # the runs were made on a GPU machine: describe that machine from the runs' own manifests
        v = manifest.get("versions", {})
        machine = {"gpu": manifest.get("device_name"), "device": manifest.get("device"), "torch": v.get("torch"),
                   "transformers": v.get("transformers"), "peft": v.get("peft"), "python": v.get("python"),
                   "platform": manifest.get("platform"),
                   "gpu_memory_gib": manifest.get("gpu_memory_gib", "not recorded"),
                   "cuda": manifest.get("cuda") or "not recorded"}
        notes.append(f"runs were made on {manifest.get('device_name')} with `python bench/quality.py --preset "
                     f"{args.preset} --seeds K --lr LR --inits PART --no-write` (one call per line of "
                     f"`--plan`), then aggregated from their results.json by the command above")
    rec = BenchRecord(
        name="quality",
        preset=args.preset,
        command=command_line(),
        seeds={f"seed{i}": s for i, s in enumerate(done_seeds)},
        machine=machine,
        settings={"description": preset["description"], "config": preset["config"],
                  "lr_grid": preset.get("lr_grid", {}), "seeds_done": done_seeds},
        results={"aggregate": agg, "targets": targets, "front": pareto_front(agg),
                 "per_seed": [{"seed": r["seed"], "single_task": r["single_task"],
                               "merged": [{k: v for k, v in m.items() if k != "inputs"} for m in r["merged"]]}
                              for r in runs]},
        summary_md=md,
        notes=notes,
    )
    write_results(rec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
