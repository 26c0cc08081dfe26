"""Write ``report.md`` for a run directory from its ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from osrm_lora.fsutil import atomic_file, read_json
from osrm_lora.report.summary import markdown_table, results_rows


def markdown_report(results: dict[str, Any]) -> str:
    header, rows = results_rows(results)
    parts = [
        f"# osrm-lora report: {results.get('name', 'run')}",
        "",
        f"Model: `{results.get('model')}`, seed {results.get('seed')}. Tasks: {', '.join(results['tasks'])}.",
        "",
        "## Merged vs single-task (test split; lambda chosen on validation)",
        "",
        "Each cell: merged / single-task (normalised %).",
        "",
        markdown_table(header, rows),
        "",
        "## Single-task scores (test split, checkpoint chosen on validation)",
        "",
    ]
    inits = list(results["single_task"])
    sh = ["task"] + inits
    srows = [[t] + [f"{results['single_task'][i][t]['test']:.1f}" for i in inits] for t in results["tasks"]]
    parts += [markdown_table(sh, srows), ""]
    parts += ["## Notes", ""] + [f"- {n}" for n in results.get("notes", [])]
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` into ``run_dir`` and return its path."""
    run_dir = Path(run_dir)
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").exists() else None
    if results is None:
        from osrm_lora.errors import OsrmError

        raise OsrmError(f"{run_dir} has no results.json; run `osrm-lora run` or `osrm-lora demo` first")
    out = run_dir / "report.md"
    with atomic_file(out) as fh:
        fh.write(markdown_report(results))
    return out
