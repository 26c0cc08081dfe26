"""What every stage of one run is given: the config, the run directory, the ledger, the tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from osrm_lora.config import PipelineConfig
from osrm_lora.data.task import Task
from osrm_lora.merged_eval import MergedEvaluator
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
    _evaluator: MergedEvaluator | None = field(default=None, repr=False)

    def merged_evaluator(self, head_dirs: Sequence[Path]) -> MergedEvaluator:
        """The run's one evaluator of merged models (base model, tokenizer and encoded validation and
        test splits loaded once per process), set to the heads of ``head_dirs``."""
        if self._evaluator is None:
            self._evaluator = MergedEvaluator(self.model_path, self.tasks, head_dirs,
                                              max_length=self.cfg.train.max_length,
                                              batch_size=self.cfg.train.eval_batch_size, device=self.cfg.device)
        else:
            self._evaluator.use_heads(head_dirs)
        return self._evaluator

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def adapter_dirs(self, init: str) -> list[Path]:
        """The adapter directories of ``init``, one per task in run order."""
        return self.layout.adapters(init, [t.name for t in self.tasks])
