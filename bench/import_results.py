"""Re-render BENCHMARKS.md sections from result JSON files brought back from another machine.

    python bench/import_results.py RESULT.json [...]

A GPU run writes its JSON (a full BenchRecord: date, machine, command, seeds, summary) on the GPU
machine; this copies each file into bench/results/ and rewrites its section of BENCHMARKS.md from it,
so the figures still come only from the benchmark command's own output.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from benchlib import BENCHMARKS_MD, BenchRecord, section_markdown, update_markdown_section  # noqa: E402


def main(argv: list[str]) -> int:
    out_dir = ROOT / "bench" / "results"
    for name in argv:
        data = json.loads(Path(name).read_text())
        data.pop("key", None)
        rec = BenchRecord(**data)
        target = out_dir / f"{rec.name}_{rec.preset}.json"
        if Path(name).resolve() != target.resolve():
            shutil.copyfile(name, target)
        update_markdown_section(BENCHMARKS_MD, rec.key, section_markdown(rec, target.resolve(), BENCHMARKS_MD.resolve()))
        print(f"imported {rec.key} from {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
