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


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "demo"
        env = {**os.environ, "OSRM_LORA_NO_PROGRESS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "osrm_lora.cli", "-q", "demo", "--out", str(run_dir)],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return proc.returncode
        manifest = json.loads((run_dir / "manifest.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
    stages = manifest["stage_seconds"]
    groups: dict[str, float] = {}
    for key, sec in stages.items():
        groups[key.split("/")[0]] = groups.get(key.split("/")[0], 0.0) + sec
    rows = [[k, f"{v:.1f} s"] for k, v in groups.items()] + [["total wall (incl. loading, report)", f"{wall:.1f} s"]]
    met = wall <= TARGET_S
    md = (f"`osrm-lora demo` after the one-time data fetch (4 tasks x 2 inits, {', '.join(sorted({r['method'] for r in results['merged']}))}). "
          f"Target <= {TARGET_S:.0f} s: **{'met' if met else 'missed'}** ({wall:.0f} s"
          + ("" if met else f", {wall - TARGET_S:.0f} s over") + ").\n\n" + markdown_table(["stage", "time"], rows))
    print(md)
    rec = BenchRecord(name="demo_time", preset="cpu", command=command_line(), seeds={"demo": results["seed"]},
                      machine=machine_info("cpu"), settings={"target_s": TARGET_S},
                      results={"wall_s": wall, "stages": stages, "groups": groups, "met": met,
                               "avg_test": {f"{r['init']}|{r['method']}": r["avg_test"] for r in results["merged"]}},
                      summary_md=md)
    write_results(rec, ROOT / "bench" / "results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
