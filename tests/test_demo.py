"""The demo's configuration: the regime where merging hurts, with the package's default inits."""

from __future__ import annotations

from osrm_lora.config import ALL_LINEAR, PipelineConfig
from osrm_lora.demo import DEMO_METHODS, demo_config


def test_demo_runs_all_linear_lora_with_the_default_inits() -> None:
    cfg = demo_config()
    assert cfg.lora.rank == 16 and cfg.lora.alpha == 32
    assert cfg.lora.target_modules == list(ALL_LINEAR)
    # the demo compares the same inits a config without `inits:` gets
    default_inits = PipelineConfig(suite="demo").inits
    assert cfg.inits == default_inits
    assert [(i.name, i.mode, i.freeze_A) for i in cfg.inits] == [("standard", "standard", False),
                                                                 ("osrm-own-frozenA", "own", True)]


def test_demo_merges_with_task_arithmetic_and_emr() -> None:
    cfg = demo_config()
    assert DEMO_METHODS == ("task_arithmetic", "emr")
    assert cfg.merge.methods == ["task_arithmetic", "emr"]
    assert len(cfg.merge.lambdas) >= 3  # TA's lambda is chosen on validation
    assert cfg.merge.params == {"emr": {"scaling": 1.0}}  # EMR as published, no sweep
    assert demo_config(("task_arithmetic",)).merge.params == {}


def test_demo_evaluates_on_hundreds_of_examples_per_task() -> None:
    cfg = demo_config()
    assert cfg.suite is None and [t.name for t in cfg.tasks] == ["mr", "bbc", "spam"]
    assert all(t.max_eval is not None and t.max_eval >= 300 for t in cfg.tasks)
    assert all(t.max_train == 320 for t in cfg.tasks)
    assert cfg.seed == 0 and cfg.diagnose


def test_all_linear_covers_every_linear_layer_of_a_bert_block() -> None:
    import torch.nn as nn

    from osrm_lora.stats import target_linear_modules

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Module()
            self.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(self.attention.self, name, nn.Linear(4, 4))
            self.attention.output = nn.Module()
            self.attention.output.dense = nn.Linear(4, 4)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(4, 8)
            self.output = nn.Module()
            self.output.dense = nn.Linear(8, 4)

    block = Block()
    all_linear = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert set(target_linear_modules(block, list(ALL_LINEAR))) == all_linear
    assert len(all_linear) == 6
