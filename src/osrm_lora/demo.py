"""The embedded demo: MiniLM-L6 on the `demo` suite, standard LoRA vs OSRM, merged and evaluated."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from osrm_lora.config import InitSettings, MergeSettings, PipelineConfig, ProfileSettings, TrainSettings

logger = logging.getLogger(__name__)

DEMO_METHODS = ("task_arithmetic", "ties")


def demo_config(methods: tuple[str, ...] | None = None) -> PipelineConfig:
    """The demo's settings: small subsamples and short sequences so it runs in minutes on 2 CPU cores."""
    from osrm_lora.merge import list_methods

    available = {m.name for m in list_methods()}
    chosen = [m for m in (methods or DEMO_METHODS) if m in available] or ["task_arithmetic"]
    return PipelineConfig(
        name="demo",
        model="default",
        suite="demo",
        seed=0,
        device="auto",
        train=TrainSettings(epochs=2, batch_size=16, lr=2e-3, head_lr=1e-2, max_length=48, eval_batch_size=128),
        inits=[
            InitSettings(name="standard", mode="standard"),
            InitSettings(name="osrm-code", mode="code"),
        ],
        profile=ProfileSettings(n_samples=100),
        merge=MergeSettings(methods=chosen, lambdas=[0.5, 1.0, 1.5]),
        diagnose=True,
    )


def run_demo(run_dir: str | Path = "runs/demo", force: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the demo pipeline and return its results."""
    from osrm_lora.pipeline import run_pipeline

    cfg = demo_config()
    logger.info(
        "demo: all-MiniLM-L6-v2 on mr, hedge, bbc, spam, SUBSAMPLED (320 training and 100 validation/test "
        "examples per task, see the sizes below) and truncated to %d tokens so it runs in about 5 minutes on "
        "2 CPU cores; scores are therefore noisy. Use `osrm-lora run configs/offline6.yaml` for full sizes",
        cfg.train.max_length,
    )
    return run_pipeline(cfg, run_dir, force=force)
