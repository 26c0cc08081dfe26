"""The embedded demo: MiniLM-L6 on mr, bbc and spam, standard LoRA vs OSRM, merged and evaluated.

The demo runs in the regime where merging hurts (``bench/quality.py --preset gpu-hard``, BENCHMARKS.md):
LoRA r=16, alpha 32 on every linear layer of the encoder, standard LoRA against OSRM ``own`` with
``A`` frozen (the package's default inits), merged with Task Arithmetic (one shared model) and EMR
(one model per task, the per-task reference). It is cut to fit about 4 minutes on 2 CPU cores:
three tasks, 320 training examples per task, 2 epochs, 32 tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from osrm_lora.config import (
    ALL_LINEAR,
    InitSettings,
    LoraSettings,
    MergeSettings,
    PipelineConfig,
    ProfileSettings,
    TrainSettings,
)
from osrm_lora.data.spec import TaskSpec

logger = logging.getLogger(__name__)

DEMO_METHODS = ("task_arithmetic", "emr")
DEMO_TASKS = ("mr", "bbc", "spam")
"""hedge (in the ``demo`` suite) is left out: at 320 training examples it stays near chance (50-60%
validation accuracy) and a fourth task puts the demo over its 5 minutes."""
DEMO_MAX_TRAIN = 320
DEMO_MAX_EVAL = 300
"""Validation and test cap per task: 300 for mr and spam; bbc has 212 of each (its whole split)."""
DEMO_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
"""Task Arithmetic's lambda grid (chosen on validation). EMR is merged as published, at scaling 1
(no sweep), which saves three evaluations per init."""


def demo_config(methods: tuple[str, ...] | None = None) -> PipelineConfig:
    """The demo's settings: all-linear LoRA (where merging hurts), subsamples and short sequences so
    it runs in minutes on 2 CPU cores."""
    from osrm_lora.merge import list_methods

    available = {m.name for m in list_methods()}
    chosen = [m for m in (methods or DEMO_METHODS) if m in available] or ["task_arithmetic"]
    return PipelineConfig(
        name="demo",
        model="default",
        tasks=[TaskSpec(name=n, max_train=DEMO_MAX_TRAIN, max_eval=DEMO_MAX_EVAL) for n in DEMO_TASKS],
        seed=0,
        device="auto",
        lora=LoraSettings(rank=16, alpha=32, target_modules=list(ALL_LINEAR)),
        train=TrainSettings(epochs=2, batch_size=16, lr=2e-3, head_lr=1e-2, max_length=32, eval_batch_size=128),
        inits=[
            InitSettings(name="standard", mode="standard"),
            InitSettings(name="osrm-own-frozenA", mode="own", freeze_A=True),
        ],
        profile=ProfileSettings(n_samples=100),
        merge=MergeSettings(methods=chosen, lambdas=list(DEMO_LAMBDAS),
                            params={"emr": {"scaling": 1.0}} if "emr" in chosen else {}),
        diagnose=True,
    )


def run_demo(run_dir: str | Path = "runs/demo", force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the demo pipeline and return its results."""
    from osrm_lora.pipeline import run_pipeline

    cfg = demo_config()
    logger.info(
        "demo: all-MiniLM-L6-v2 on %s, LoRA r=%d (alpha %g) on all linear layers, standard vs OSRM own with "
        "A frozen, merged with %s. Cut to run in about 4 minutes on 2 CPU cores: %d tasks (hedge left out), "
        "SUBSAMPLED to %d training examples per task and at most %d validation/test examples (bbc: 212), %d "
        "epochs, truncated to %d tokens, one seed; EMR at scaling 1 (no sweep). So the single-task scores are "
        "lower than at full size and the scores are noisy (see the line under the table). For full sizes and "
        "3 seeds see `bench/quality.py --preset gpu-hard` (BENCHMARKS.md)",
        ", ".join(DEMO_TASKS), cfg.lora.rank, cfg.lora.alpha, " and ".join(cfg.merge.methods), len(DEMO_TASKS),
        DEMO_MAX_TRAIN, DEMO_MAX_EVAL, cfg.train.epochs, cfg.train.max_length,
    )
    return run_pipeline(cfg, run_dir, force=force)
