"""What every stage of one run is given: the config, the run directory, the ledger, the tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from osrm_lora.config import PipelineConfig
from osrm_lora.data.task import Task
from osrm_lora.pipeline.layout import RunLayout
from osrm_lora.pipeline.ledger import StageLedger


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    ledger: StageLedger
    model_path: str
    tasks: list[Task]
    fingerprints: dict[str, str]
    stats_hash: str | None = None  # content hash of the statistics store, computed once after profiling
    adapter_hashes: dict[str, list[str | None]] = field(default_factory=dict)  # per init, once after training
    stage_seconds: dict[str, float] = field(default_factory=dict)  # every process's stage timings
    stages_cached: list[str] = field(default_factory=list)  # every process's stages skipped as finished

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def adapter_dirs(self, init: str) -> list[Path]:
        """The adapter directories of ``init``, one per task in run order."""
        return self.layout.adapters(init, [t.name for t in self.tasks])
