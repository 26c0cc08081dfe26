"""Wall time of `osrm-lora demo` after the one-time set-up (data already fetched), per stage.

    python bench/demo_time.py            # target: <= 5 minutes on 2 CPU cores

Runs the demo into a fresh temporary run directory in a subprocess (so nothing is cached between
runs except the fetched data), reads the run's manifest for stage timings, and writes
bench/results/demo_time_cpu.json and its BENCHMARKS.md section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from benchlib import BenchRecord, command_line, machine_info, markdown_table, write_results  # noqa: E402

TARGET_S = 300.0


def _avg(per_task: dict[str, dict[str, float]], split: str) -> float:
    return sum(v[split] for v in per_task.values()) / len(per_task)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "demo"
        env = {**os.environ, "OSRM_LORA_NO_PROGRESS": "1"}
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "osrm_lora.cli", "-q", "demo", "--out", str(run_dir)],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return proc.returncode
        print(proc.stdout)  # the demo's table, as a user sees it
        manifest = json.loads((run_dir / "manifest.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
    stages = manifest["stage_seconds"]
    groups: dict[str, float] = {}
    for key, sec in stages.items():
        groups[key.split("/")[0]] = groups.get(key.split("/")[0], 0.0) + sec
    rows = [[k, f"{v:.1f} s"] for k, v in groups.items()] + [["total wall (incl. loading, report)", f"{wall:.1f} s"]]
    met = wall <= TARGET_S
    single = results["single_task"]
    tasks = list(next(iter(single.values())))
    methods = list(dict.fromkeys(r["method"] for r in results["merged"]))
    md = (f"`osrm-lora demo` after the one-time data fetch ({len(tasks)} tasks ({', '.join(tasks)}) x {len(single)} inits "
          f"({', '.join(single)}), {', '.join(methods)}). Target <= {TARGET_S:.0f} s: **{'met' if met else 'missed'}** "
          f"({wall:.0f} s" + ("" if met else f", {wall - TARGET_S:.0f} s over") + "). Load average (1 min) "
          f"{load_before:.2f} before and {load_after:.2f} after the run (the machine's 2 cores may be shared).\n\n"
          + markdown_table(["stage", "time"], rows)
          + "\n\nTest averages of this run (validation chose λ; single = each task's own adapter):\n\n"
          + markdown_table(["init", "single-task", *methods],
                           [[init, f"{_avg(per, 'test'):.1f}",
                             *[next((f"{r['avg_test']:.1f} ({r['avg_normalised_test']:.0f}%)" for r in results["merged"]
                                     if r["init"] == init and r["method"] == m), "-") for m in methods]]
                            for init, per in single.items()]))
    print(md)
    rec = BenchRecord(name="demo_time", preset="cpu", command=command_line(), seeds={"demo": results["seed"]},
                      machine=machine_info("cpu"), settings={"target_s": TARGET_S, "tasks": tasks,
                                                             "inits": list(single), "methods": methods},
                      results={"wall_s": wall, "stages": stages, "groups": groups, "met": met,
                               "load_avg_1min": {"before": load_before, "after": load_after},
                               "avg_test": {f"{r['init']}|{r['method']}": r["avg_test"] for r in results["merged"]},
                               "avg_validation": {f"{r['init']}|{r['method']}": r["avg_validation"]
                                                  for r in results["merged"]},
                               "single_avg": {init: {"validation": _avg(per, "validation"), "test": _avg(per, "test")}
                                              for init, per in single.items()}},
                      summary_md=md)
    write_results(rec, ROOT / "bench" / "results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
