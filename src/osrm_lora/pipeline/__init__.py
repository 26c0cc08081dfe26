"""The pipeline: tasks -> profile -> init -> train -> diagnose -> merge+evaluate -> results/report.

- :mod:`~osrm_lora.pipeline.layout`: :class:`RunLayout`, every path under a run directory (the layout
  documented in the README);
- :mod:`~osrm_lora.pipeline.ledger`: the stages (:data:`STAGES`), :class:`StageLedger` (finished
  stages by input hash: resume / skip) and ``--force``;
- :mod:`~osrm_lora.pipeline.jobs`: independent jobs spread over the processes;
- :mod:`~osrm_lora.pipeline.context`: :class:`RunContext`, what every stage of a run is given;
- :mod:`~osrm_lora.pipeline.stages`: tasks, profile, the OSRM init, train, diagnose;
- :mod:`~osrm_lora.pipeline.merging`: the merge stage (lambda sweeps and the merge searches);
- :mod:`~osrm_lora.pipeline.checks`: ``osrm-lora run CONFIG --check``;
- :mod:`~osrm_lora.pipeline.manifest`: the run's manifest and output hashes;
- :mod:`~osrm_lora.pipeline.run`: :func:`run_pipeline`.

Each stage writes its artifact atomically and then records a hash of its inputs; rerunning the same
config into the same directory skips finished stages and redoes unfinished ones.
"""

from __future__ import annotations

from osrm_lora.pipeline.checks import (
    HUB_ID,
    check_merge_constraints,
    check_model,
    check_run,
    check_task,
    describe_merge,
    describe_rmm,
    describe_search,
    task_specs,
)
from osrm_lora.pipeline.context import RunContext
from osrm_lora.pipeline.jobs import _parallel_mode, parallel_mode, run_jobs
from osrm_lora.pipeline.layout import RunLayout, task_dirname
from osrm_lora.pipeline.ledger import LEDGER_STAGES, STAGE_DEFS, STAGES, Stage, StageLedger, validate_force
from osrm_lora.pipeline.manifest import manifest, output_hashes, previous_stage_seconds
from osrm_lora.pipeline.merging import (
    edge_lambda_warnings,
    lambda_grid,
    merge_and_sweep,
    needs_grams,
    search_and_evaluate,
)
from osrm_lora.pipeline.run import SEARCH_NOTE, run_pipeline
from osrm_lora.pipeline.stages import (
    adapter_dirs,
    init_subspaces,
    profile_stage,
    resolve_tasks,
    task_fingerprint,
    train_all,
)

__all__ = [
    "HUB_ID",
    "LEDGER_STAGES",
    "SEARCH_NOTE",
    "STAGES",
    "STAGE_DEFS",
    "RunContext",
    "RunLayout",
    "Stage",
    "StageLedger",
    "_parallel_mode",
    "adapter_dirs",
    "check_merge_constraints",
    "check_model",
    "check_run",
    "check_task",
    "describe_merge",
    "describe_rmm",
    "describe_search",
    "edge_lambda_warnings",
    "init_subspaces",
    "lambda_grid",
    "manifest",
    "merge_and_sweep",
    "needs_grams",
    "output_hashes",
    "parallel_mode",
    "previous_stage_seconds",
    "profile_stage",
    "resolve_tasks",
    "run_jobs",
    "run_pipeline",
    "search_and_evaluate",
    "task_dirname",
    "task_fingerprint",
    "task_specs",
    "train_all",
    "validate_force",
]
