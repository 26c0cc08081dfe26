"""Choose the single-task learning rates on VALIDATION (standard LoRA), before any quality run.

    python bench/tune_lr.py --preset gpu     # offline6 tasks, capped at 2000 train examples
    python bench/tune_lr.py --preset cpu     # demo-sized

Trains standard LoRA for every (task, lora lr, head lr) of the grid and records the best validation
score per epoch; the chosen pair maximises the average validation score over tasks. Test splits are
not touched. Writes bench/results/tune_lr_<preset>.json and its BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from benchlib import BenchRecord, command_line, machine_info, markdown_table, write_results  # noqa: E402

from osrm_lora.config import LoraSettings, TrainSettings  # noqa: E402
from osrm_lora.data import load_task  # noqa: E402
from osrm_lora.logutil import setup_logging  # noqa: E402
from osrm_lora.train import train_task  # noqa: E402

logger = logging.getLogger("bench.tune_lr")

PRESETS = {
    "gpu": {"tasks": ["mr", "movie_docs", "hedge", "bbc", "spam", "foods"], "max_train": 2000, "max_eval": 400,
            "epochs": 3, "batch_size": 32, "max_length": 128, "grid": [(5e-4, 5e-3), (1e-3, 1e-2), (2e-3, 1e-2), (5e-3, 1e-2)]},
    "cpu": {"tasks": ["mr", "hedge"], "max_train": 400, "max_eval": 150, "epochs": 2, "batch_size": 16,
            "max_length": 64, "grid": [(1e-3, 1e-2), (2e-3, 1e-2)]},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging(-1)
    p = PRESETS[args.preset]
    tasks = [load_task({"name": t, "max_train": p["max_train"], "max_eval": p["max_eval"]}) for t in p["tasks"]]
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (lr, head_lr), task in itertools.product(p["grid"], tasks):
            key = f"lr={lr:g},head_lr={head_lr:g}"
            cfg = TrainSettings(epochs=p["epochs"], batch_size=p["batch_size"], lr=lr, head_lr=head_lr,
                                max_length=p["max_length"], eval_batch_size=256)
            t0 = time.perf_counter()
            res = train_task(task, Path(tmp) / key / task.name, train=cfg, lora=LoraSettings(), seed=args.seed,
                             evaluate_test=False)
            seconds[f"{key}|{task.name}"] = time.perf_counter() - t0
            results.setdefault(key, {})[task.name] = res.validation
            logger.warning("%s %s: validation %.2f (epoch %d)", key, task.name, res.validation, res.best_epoch)
    avg = {k: sum(v.values()) / len(v) for k, v in results.items()}
    best = max(avg, key=avg.get)
    headers = ["lora lr, head lr"] + [t.name for t in tasks] + ["avg validation"]
    rows = [[k] + [f"{v[t.name]:.1f}" for t in tasks] + [f"{avg[k]:.1f}" + (" **best**" if k == best else "")]
            for k, v in results.items()]
    md = (f"Standard LoRA (r=8, alpha=16, query+value), {p['epochs']} epochs, batch {p['batch_size']}, "
          f"{p['max_length']} tokens, train capped at {p['max_train']}, validation capped at {p['max_eval']}, "
          f"seed {args.seed}. VALIDATION scores (best epoch); test not touched.\n\n"
          + markdown_table(headers, rows) + f"\n\nChosen: **{best}**.")
    print(md)
    import torch

    rec = BenchRecord(name="tune_lr", preset=args.preset, command=command_line(), seeds={"train": args.seed},
                      machine=machine_info("cuda" if torch.cuda.is_available() else "cpu"), settings=p,
                      results={"validation": results, "avg": avg, "best": best, "seconds": seconds}, summary_md=md)
    write_results(rec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
