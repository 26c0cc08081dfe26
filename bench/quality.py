"""Merged quality with and without OSRM: inits x merge methods x seeds, selected on validation.

    python bench/quality.py --preset cpu     # reduced: demo-sized subsamples, 1 seed (states so)
    python bench/quality.py --preset gpu     # offline6 at full size, 3 seeds (one GPU)
    python bench/quality.py --preset gpu --seeds 0 --aggregate-only   # re-aggregate finished runs

Each seed is one pipeline run (resumable) under bench/runs/quality-<preset>/seed<k>. The script then
aggregates mean +- std over seeds per (init, method): absolute merged test average, normalised test
average, single-task test average, the selected lambda, and the normalised score at the WORST
lambda of the grid (robustness). It checks the targets of the benchmark issue for every
configuration and picks the recommended configuration on VALIDATION (highest merged validation
average among the configurations that ran with the most seeds, so that a lucky single seed cannot
win over a 3-seed mean), then reports its test numbers. The summary table states the number of seeds
of every row (seed runs made in parts may cover different inits). Results go to
bench/results/quality_<preset>.json and the matching section of BENCHMARKS.md.
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

from osrm_lora.benchutil import BenchRecord, command_line, machine_info, markdown_table, write_results  # noqa: E402
from osrm_lora.config import parse_config  # noqa: E402
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
]
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.5]

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
            "inits": INITS,
            "merge": {"methods": ["task_arithmetic", "ties", "dare_ties", "emr", "regmean", "tsv_m", "iso_c",
                                  "knots", "core_space"],
                      "lambdas": LAMBDAS},
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


def _config(preset: str, seed: int, inits: list[str] | None = None) -> Any:
    raw = dict(PRESETS[preset]["config"])
    raw["name"] = f"quality-{preset}-seed{seed}"
    raw["seed"] = seed
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


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std over seeds per (init, method) of every headline number, with the seeds it covers."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    row_seeds: dict[tuple[str, str], list[int]] = {}
    singles: dict[str, list[float]] = {}
    for res in runs:
        for init, per_task in res["single_task"].items():
            singles.setdefault(init, []).append(mean(v["test"] for v in per_task.values()))
        for rec in res["merged"]:
            key = (rec["init"], rec["method"])
            single_avg = mean(v["test"] for v in res["single_task"][rec["init"]].values())
            worst = min(p["avg_normalised_test"] for p in rec["curve"]) if rec["curve"] else float("nan")
            d = rows.setdefault(key, {k: [] for k in ("merged_test", "merged_val", "normalised", "single", "lambda",
                                                      "worst_norm")})
            d["merged_test"].append(rec["avg_test"])
            d["merged_val"].append(rec["avg_validation"])
            d["normalised"].append(rec["avg_normalised_test"])
            d["single"].append(single_avg)
            d["lambda"].append(rec["lambda"] if rec["lambda"] is not None else float("nan"))
            d["worst_norm"].append(worst)
            row_seeds.setdefault(key, []).append(int(res["seed"]))
    table: dict[str, dict[str, Any]] = {}
    for (i, m), d in rows.items():
        entry: dict[str, Any] = {k: {"mean": statistics.fmean(v), "std": _sd(v), "values": v} for k, v in d.items()}
        entry["seeds"] = row_seeds[(i, m)]
        entry["n_seeds"] = len(row_seeds[(i, m)])
        table[f"{i}|{m}"] = entry
    return {"configs": table, "single": {i: {"mean": statistics.fmean(v), "std": _sd(v)} for i, v in singles.items()}}


def check_targets(agg: dict[str, Any]) -> dict[str, Any]:
    """The issue's four targets for every configuration; the recommendation is chosen on validation."""
    configs = agg["configs"]
    base = configs.get("standard|task_arithmetic")
    std_single = agg["single"].get("standard", {}).get("mean", float("nan"))
    out: dict[str, Any] = {}
    for key, c in configs.items():
        t = {
            "merged_vs_standard_TA": c["merged_test"]["mean"] - (base["merged_test"]["mean"] if base else float("nan")),
            "normalised": c["normalised"]["mean"],
            "single_minus_standard": c["single"]["mean"] - std_single,
            "worst_lambda_normalised": c["worst_norm"]["mean"],
        }
        t["met"] = {
            "merged >= standard+TA + 5": t["merged_vs_standard_TA"] >= 5,
            "normalised >= 95": t["normalised"] >= 95,
            "single within 1 of standard": abs(t["single_minus_standard"]) <= 1 or t["single_minus_standard"] > 0,
            "worst-lambda normalised >= 90": t["worst_lambda_normalised"] >= 90,
        }
        t["all_met"] = all(t["met"].values())
        out[key] = t
    # only configurations with the most seeds compete: a 1-seed mean is noisier than a 3-seed one
    max_seeds = max(c["n_seeds"] for c in configs.values())
    pool = sorted(k for k, c in configs.items() if c["n_seeds"] == max_seeds)
    excluded = sorted(k for k in configs if k not in pool)
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


def summary(agg: dict[str, Any], targets: dict[str, Any], description: str, seeds: list[int]) -> str:
    headers = ["init", "method", "seeds", "merged test avg", "normalised %", "single-task avg",
               "worst-λ normalised %", "λ (validation)", "targets met"]
    rows = []
    for key, c in sorted(agg["configs"].items()):
        init, method = key.split("|")
        met = targets["per_config"][key]["met"]
        rows.append([init, method, str(c["n_seeds"]), _pm(c["merged_test"]), _pm(c["normalised"]), _pm(c["single"]),
                     _pm(c["worst_norm"]), _pm(c["lambda"], 2), f"{sum(met.values())}/4"])
    best = targets["recommended_on_validation"]
    tb = targets["per_config"][best]
    n_best = targets["recommendation_seeds"]
    excluded = targets["excluded_fewer_seeds"]
    seeds_note = ""
    if excluded:
        # name the inits run with fewer seeds (every method of an init shares its seed runs)
        fewer: dict[str, list[int]] = {}
        for key in excluded:
            fewer.setdefault(key.split("|")[0], agg["configs"][key]["seeds"])
        seeds_note = (" Not every configuration ran with every seed: "
                      + "; ".join(f"{i} only with seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"
                                  for i, s in sorted(fewer.items()))
                      + " (column \"seeds\"; a single seed shows std 0).")
    pool_text = (f"highest merged VALIDATION average among the {len(targets['recommendation_pool'])} configurations "
                 f"with the most seeds ({n_best}); the {len(excluded)} with fewer seeds are not considered"
                 if excluded else "highest merged VALIDATION average")
    lines = [
        f"Setting: {description}; seeds {seeds}. Scores on the TEST split (0-100), mean ± std over seeds; "
        "λ and checkpoints chosen on validation; normalised = merged / single-task score of the same init."
        + seeds_note,
        "",
        markdown_table(headers, rows),
        "",
        f"Recommended configuration ({pool_text}): **{best}** ({n_best} seed{'s' if n_best > 1 else ''}). "
        f"Against the targets: merged − standard TA = {tb['merged_vs_standard_TA']:+.1f} points "
        f"({'met' if tb['met']['merged >= standard+TA + 5'] else 'missed'}, target +5); "
        f"normalised {tb['normalised']:.1f}% ({'met' if tb['met']['normalised >= 95'] else 'missed'}, target 95%); "
        f"single-task − standard = {tb['single_minus_standard']:+.1f} "
        f"({'met' if tb['met']['single within 1 of standard'] else 'missed'}, target within 1); "
        f"worst-λ normalised {tb['worst_lambda_normalised']:.1f}% "
        f"({'met' if tb['met']['worst-lambda normalised >= 90'] else 'missed'}, target 90%).",
    ]
    all_met = [f"{k} ({agg['configs'][k]['n_seeds']} seed{'s' if agg['configs'][k]['n_seeds'] > 1 else ''})"
               for k, v in sorted(targets["per_config"].items()) if v["all_met"]]
    lines.append("")
    lines.append("Configurations meeting all four targets at once: " + (", ".join(all_met) if all_met else "none") + ".")
    front = pareto_front(agg)
    lines.append("")
    lines.append("Front of single-task vs merged score (configurations no other beats on both the single-task and "
                 "the merged TEST average; reported, not used for selection): "
                 + ", ".join(f"{k} (single {agg['configs'][k]['single']['mean']:.1f}, merged "
                             f"{agg['configs'][k]['merged_test']['mean']:.1f})" for k in front) + ".")
    return "\n".join(lines)


def pareto_front(agg: dict[str, Any]) -> list[str]:
    """Configurations not dominated on (single-task mean, merged test mean), best merged first."""
    pts = {k: (c["single"]["mean"], c["merged_test"]["mean"]) for k, c in agg["configs"].items()}
    front = [k for k, (s, m) in pts.items()
             if not any(s2 >= s and m2 >= m and (s2, m2) != (s, m) for s2, m2 in pts.values())]
    return sorted(front, key=lambda k: -pts[k][1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="override the preset's seeds")
    ap.add_argument("--runs", default=str(ROOT / "bench" / "runs"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--aggregate-only", action="store_true", help="only aggregate finished seed runs")
    ap.add_argument("--no-write", action="store_true", help="run without writing BENCHMARKS.md (partial runs)")
    ap.add_argument("--inits", default=None, help="comma-separated subset of the preset's inits (a part of a seed)")
    args = ap.parse_args(argv)
    setup_logging(0)
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    from osrm_lora.pipeline import run_pipeline

    runs = []
    subset = [i for i in args.inits.split(",") if i] if args.inits else None
    tag = "-" + "+".join(subset) if subset else ""
    n_parts = 0
    for seed in seeds:
        base = Path(args.runs) / f"quality-{args.preset}"
        if args.aggregate_only:
            parts = [read_json(p / "results.json") for p in sorted(base.glob(f"seed{seed}*"))
                     if (p / "results.json").exists()]
            if not parts:
                logger.warning("seed %d has no results yet under %s", seed, base)
                continue
            runs.append(merge_parts(parts))
            n_parts += len(parts)
        else:
            runs.append(run_pipeline(_config(args.preset, seed, subset), base / f"seed{seed}{tag}"))
    if not runs:
        logger.error("no finished runs to aggregate")
        return 1
    done_seeds = [r["seed"] for r in runs]
    agg = aggregate(runs)
    targets = check_targets(agg)
    md = summary(agg, targets, preset["description"], done_seeds)
    print(md)
    if args.no_write:
        return 0
    manifest = runs[0].get("manifest", {})
    machine = machine_info(manifest.get("device", "cpu"))
    notes = [f"runs under {Path(args.runs) / ('quality-' + args.preset)} (not committed)"]
    if args.aggregate_only and str(manifest.get("device", "")).startswith("cuda"):
        # the runs were made on a GPU machine: describe that machine from the runs' own manifests
        v = manifest.get("versions", {})
        machine = {"gpu": manifest.get("device_name"), "device": manifest.get("device"), "torch": v.get("torch"),
                   "transformers": v.get("transformers"), "peft": v.get("peft"), "python": v.get("python"),
                   "platform": manifest.get("platform"),
                   "gpu_memory_gib": manifest.get("gpu_memory_gib", "not recorded"),
                   "cuda": manifest.get("cuda") or "not recorded"}
        how = (f"`python bench/quality.py --preset {args.preset} --seeds K --inits PART --no-write` (one call per "
               "part of the inits)" if n_parts > len(runs) else f"`python bench/quality.py --preset {args.preset}`")
        notes.append(f"seed runs were made on {manifest.get('device_name')} with {how}, then aggregated from their "
                     "results.json by the command above")
    rec = BenchRecord(
        name="quality",
        preset=args.preset,
        command=command_line(),
        seeds={f"seed{i}": s for i, s in enumerate(done_seeds)},
        machine=machine,
        settings={"description": preset["description"], "config": preset["config"], "seeds_done": done_seeds},
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
