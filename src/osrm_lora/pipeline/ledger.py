"""The stage ledger: which stages exist, which are finished (by input hash), and ``--force``.

Each stage writes its artifact atomically and then records a hash of its inputs
(``.stages/<stage id>.json``); rerunning the same config into the same directory skips finished
stages and redoes unfinished ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osrm_lora.distributed import barrier, broadcast_object, get_env, raise_if_any_failed
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.fsutil import read_json, sha256_json, write_json
from osrm_lora.pipeline.layout import RunLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage the ledger records: its name (what ``--force`` takes) and the form of its ids."""

    name: str
    ids: str
    summary: str

    def id(self, *parts: str) -> str:
        """The stage id of one unit of this stage (``TRAIN.id("standard", "cola")`` -> ``train/standard/cola``)."""
        return "/".join((self.name, *parts))


PROFILE = Stage("profile", "profile", "activation statistics of every task (OSRM inits, RegMean, diagnostics)")
TRAIN = Stage("train", "train/<init>/<task>", "one adapter per init and task (the OSRM init is computed here)")
DIAGNOSE = Stage("diagnose", "diagnose/<init>", "interference diagnostics per init")
MERGE = Stage("merge", "merge/<init>/<method>", "merge + lambda sweep per init and method, and the merge searches")

STAGE_DEFS: tuple[Stage, ...] = (PROFILE, TRAIN, DIAGNOSE, MERGE)
"""The stages in run order."""
LEDGER_STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_DEFS)
"""The stages the :class:`StageLedger` records, skips when finished and re-runs under ``--force``."""
STAGES = LEDGER_STAGES
"""What ``--force`` accepts (plus ``all``). Task data is read every run (the download cache is kept:
delete it to fetch again), the OSRM initialisation is computed inside ``train`` and the report is
rewritten at the end of every run, so none of them is a stage of its own. Forcing a stage re-runs
it; the stages after it re-run when its outputs changed (their inputs hash those outputs)."""

_STAGE_HINT = "data is read every run, the OSRM init is part of train, the report is rewritten every run"


def validate_force(force: Sequence[str]) -> frozenset[str]:
    """The ``--force`` stage names as a set; ConfigError naming unknown ones."""
    bad = sorted(set(force) - set(STAGES) - {"all"})
    if bad:
        raise ConfigError(f"unknown stage(s) {bad} for --force; choose from {', '.join(STAGES)} or all "
                          f"({_STAGE_HINT})")
    return frozenset(force)


@dataclass
class StageLedger:
    """Records finished stages (by input hash) so reruns skip them; ``force`` names stages to redo.

    ``timings`` holds the seconds of every stage of this invocation by stage id, in the order met:
    measured for those that ran and, for those skipped as finished, the time recorded when they ran
    (``previous``: the last manifest's ``stage_seconds``, else the stage's marker).
    """

    run_dir: Path
    force: frozenset[str] = frozenset()
    timings: dict[str, float] = field(default_factory=dict)
    previous: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)  # stage ids skipped as finished, in the order met

    def _marker(self, stage_id: str) -> Path:
        return RunLayout(self.run_dir).stage_marker(stage_id)

    def forced(self, stage: str) -> bool:
        """True when ``--force`` names ``stage`` (or ``all``)."""
        return stage in self.force or "all" in self.force

    def done(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path]) -> bool:
        if stage not in LEDGER_STAGES:
            raise ValueError(f"stage {stage!r} is not one of the ledger's stages {LEDGER_STAGES}")
        if self.forced(stage):
            return False
        marker = self._marker(stage_id)
        if not marker.exists() or not all(p.exists() for p in outputs):
            return False
        try:
            matches: bool = read_json(marker).get("inputs") == sha256_json(payload)
            return matches
        except OsrmError:
            return False

    def finish(self, stage: str, stage_id: str, payload: Any, seconds: float) -> None:
        self.timings[stage_id] = round(seconds, 3)
        write_json(self._marker(stage_id), {"stage": stage, "id": stage_id, "inputs": sha256_json(payload), "seconds": seconds})

    def skip(self, stage_id: str) -> None:
        """Record a stage skipped as finished, with the seconds it took when it ran (if known)."""
        logger.info("skipping %s (finished, inputs unchanged)", stage_id)
        self.cached.append(stage_id)
        seconds = self.previous.get(stage_id)
        if seconds is None:
            try:
                seconds = read_json(self._marker(stage_id)).get("seconds")
            except OsrmError:
                seconds = None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            self.timings[stage_id] = round(float(seconds), 3)

    def run(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless the stage is done with the same inputs. Returns True if it ran."""
        if self.done(stage, stage_id, payload, outputs):
            self.skip(stage_id)
            return False
        t0 = time.perf_counter()
        fn()
        self.finish(stage, stage_id, payload, time.perf_counter() - t0)
        return True

    def run_collective(self, stage: str, stage_id: str, payload: Any, outputs: Sequence[Path],
                       fn: Callable[[], Any]) -> bool:
        """:meth:`run` for a stage that every process runs together (sharded profiling, DDP training):
        rank 0 decides whether it is done, every rank runs ``fn``, rank 0 records it."""
        env = get_env()
        done = broadcast_object(self.done(stage, stage_id, payload, outputs) if env.is_main else None)
        if done:
            if env.is_main:
                self.skip(stage_id)
            return False
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            fn()
        except Exception as exc:  # every rank must learn of a failure, or the others wait forever
            error = exc
        raise_if_any_failed(error)
        if env.is_main:
            self.finish(stage, stage_id, payload, time.perf_counter() - t0)
        barrier()
        return True
