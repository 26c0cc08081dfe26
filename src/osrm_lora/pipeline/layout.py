"""Every path under a run directory, in one place (the layout is stable and documented in the README)::

    RUN_DIR/
      config.yaml                      resolved config
      manifest.json                    seeds, versions, device, stage timings, hashes
      stats/                           activation statistics store (OSRM inits only)
      adapters/<init>/<task>/          PEFT adapter + head.safetensors/head.json + metrics.json
      diagnostics/<init>/              interference.json + interference.png
      merges/<init>/<method>/          merged adapter (selected lambda) + sweep.json + README.md card
      merges/<init>/{rmm,search}/      merge.rmm / merge.search: rmm.json / search.json (+ search.db),
                                       merged/ (the found merge), sweep.json (the results record)
      results.json                     every number, named by init, method, lambda, seed and split
      report.md, report.html           human-readable summary
      .stages/<stage>.json             input hash of each finished stage (resume / skip)

This module is a leaf (it imports nothing of the package), so any module may build run paths with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
STATS = "stats"
ADAPTERS = "adapters"
DIAGNOSTICS = "diagnostics"
MERGES = "merges"
RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
STAGES_DIR = ".stages"
"""The stage markers' folder; its presence also marks a directory as one osrm-lora wrote."""

ADAPTER_METRICS = "metrics.json"
"""An adapter directory's training record (written by :func:`osrm_lora.train.train_task`)."""
INTERFERENCE = "interference.json"
INTERFERENCE_PNG = "interference.png"
SWEEP = "sweep.json"
"""A merge directory's results record (written last: the merge stage's completion mark)."""

TOP_LEVEL = (CONFIG, MANIFEST, STATS, ADAPTERS, DIAGNOSTICS, MERGES, RESULTS, REPORT_MD, REPORT_HTML, STAGES_DIR)
"""The names directly under RUN_DIR."""
WEIGHT_DIRS = (ADAPTERS, MERGES)
"""The folders whose ``*.safetensors`` the manifest hashes."""


def task_dirname(name: str) -> str:
    """A task name as one path component (``glue/cola`` -> ``glue__cola``)."""
    return name.replace("/", "__")


def stage_filename(stage_id: str) -> str:
    """A stage id as a marker file name (``train/standard/cola`` -> ``train__standard__cola.json``)."""
    return f"{stage_id.replace('/', '__')}.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory; ``RunLayout(run_dir).adapter("standard", "glue/cola")``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def stats(self) -> Path:
        return self.root / STATS

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def stages(self) -> Path:
        return self.root / STAGES_DIR

    def stage_marker(self, stage_id: str) -> Path:
        return self.stages / stage_filename(stage_id)

    def weight_dirs(self) -> list[Path]:
        return [self.root / sub for sub in WEIGHT_DIRS]

    def adapter(self, init: str, task: str) -> Path:
        return self.root / ADAPTERS / init / task_dirname(task)

    def adapters(self, init: str, tasks: Sequence[str]) -> list[Path]:
        return [self.adapter(init, t) for t in tasks]

    def adapter_metrics(self, init: str, task: str) -> Path:
        return self.adapter(init, task) / ADAPTER_METRICS

    def diagnostics(self, init: str) -> Path:
        return self.root / DIAGNOSTICS / init

    def interference(self, init: str) -> Path:
        return self.diagnostics(init) / INTERFERENCE

    def interference_png(self, init: str) -> Path:
        return self.diagnostics(init) / INTERFERENCE_PNG

    def merge(self, init: str, method: str) -> Path:
        """``merges/<init>/<method>/``; a merge search's folder is ``merge(init, "rmm" | "search")``."""
        return self.root / MERGES / init / method

    def merge_record(self, init: str, method: str) -> Path:
        return self.merge(init, method) / SWEEP
