"""Every command-line option for a setting of the pipeline config takes that setting's default and help
from the settings model (osrm_lora.config), so a stage command run alone does what the pipeline's stage
does with the same settings (``profile --seed`` once defaulted to 42, the pipeline's profile stage to
the run's seed 0).

The walk covers every command of the typer app; an option maps to a setting by name, looked up in
the command's settings models in order (first match), unless named in ``FIELDS`` / ``NOT_SETTINGS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from osrm_lora.cli import app, main
from osrm_lora.config import (
    InitSettings,
    LoraSettings,
    MergeSettings,
    PipelineConfig,
    ProfileSettings,
    RMMSettings,
    SearchBudget,
    SearchSettings,
    TrainSettings,
    setting_default,
    setting_help,
)
from osrm_lora.osrm import DEFAULT_OSRM_MODE, INIT_MODES, OSRM_MODES

MODELS: dict[str, tuple[type, ...]] = {
    "train": (TrainSettings, LoraSettings, InitSettings, PipelineConfig),
    "profile": (ProfileSettings, TrainSettings, LoraSettings, PipelineConfig),
    "init": (InitSettings, LoraSettings, PipelineConfig),
    "search": (SearchSettings, SearchBudget, MergeSettings, PipelineConfig),
    "rmm": (RMMSettings, MergeSettings, PipelineConfig),
}
"""The settings models of a command's options, in lookup order; every other command: PipelineConfig."""

FIELDS: dict[tuple[str, str], tuple[type, str, Callable[[Any], Any]]] = {
    # (command, option) -> (model, field, the field's default as the option's default)
    ("train", "freeze_a"): (InitSettings, "freeze_A", lambda v: v),
    ("train", "freeze_b"): (InitSettings, "freeze_B", lambda v: v),
    ("profile", "float64"): (ProfileSettings, "dtype", lambda v: v == "float64"),
    ("search", "groups"): (SearchSettings, "n_groups", lambda v: 0 if v is None else v),
    ("search", "seed"): (PipelineConfig, "seed", lambda v: v),  # SearchSettings.seed None = the run's seed
    ("rmm", "seed"): (PipelineConfig, "seed", lambda v: v),  # RMMSettings.seed None = the run's seed
    ("search", "device"): (PipelineConfig, "device", lambda v: v),  # the run's device, not merge.device
    ("search", "constraint"): (MergeSettings, "constraints", lambda v: v),
    ("rmm", "constraint"): (MergeSettings, "constraints", lambda v: v),
    ("rmm", "device"): (PipelineConfig, "device", lambda v: v),
}

DIFFERENT_DEFAULT: dict[tuple[str, str], tuple[type, str, Any, str]] = {
    # (command, option) -> (model, field, the option's default, why): help from the field, default on purpose not
    ("init", "mode"): (InitSettings, "mode", DEFAULT_OSRM_MODE,
                       "an init entry defaults to the standard baseline; the init command writes OSRM subspaces"),
    ("search", "budget"): (SearchBudget, "evaluations", None,
                           "None = the settings' 20 evaluations unless --seconds or --trials is given (as merge.search)"),
    ("rmm", "ppo"): (RMMSettings, "ppo", None,
                     "KEY=VALUE overrides of the nested PPO settings; none given = the settings' (the paper's) defaults"),
}

NOT_SETTINGS: set[tuple[str, str]] = {
    # options named like a setting that are not it: the base model of trained adapters ('default' = theirs)
    (cmd, "model") for cmd in ("evaluate", "predict", "export", "search", "rmm", "diagnose")
}


def commands() -> Iterator[tuple[str, Any]]:
    """(path, click command) of every command (typer may vendor its own click: duck-typed)."""
    def walk(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}".strip())
        else:
            yield path, cmd

    yield from walk(typer.main.get_command(app), "")


def _as_option(value: Any, option: Any) -> Any:
    if option.multiple:  # a repeatable option: None when not given
        return list(value or []) or None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def mapped_options() -> list[tuple[str, Any, type, str, Callable[[Any], Any]]]:
    """(command, option, model, field, transform) of every option that stands for a setting."""
    out = []
    for path, cmd in commands():
        for param in cmd.params:
            if (param.param_type_name != "option" or param.name is None or param.required  # no default to check
                    or (path, param.name) in NOT_SETTINGS):
                continue
            key = (path, param.name)
            if key in FIELDS:
                model, field, transform = FIELDS[key]
            elif key in DIFFERENT_DEFAULT:
                model, field = DIFFERENT_DEFAULT[key][:2]
                transform = lambda v, d=DIFFERENT_DEFAULT[key][2]: d  # noqa: E731
            else:
                found = [m for m in MODELS.get(path, (PipelineConfig,)) if param.name in _field_names(m)]
                if not found:
                    continue
                model, field, transform = found[0], param.name, lambda v: v
            out.append((path, param, model, field, transform))
    return out


def _field_names(model: type) -> set[str]:
    import dataclasses

    return set(model.model_fields) if hasattr(model, "model_fields") else {f.name for f in dataclasses.fields(model)}


MAPPED = mapped_options()


@pytest.mark.parametrize(("path", "option", "model", "field", "transform"), MAPPED,
                         ids=[f"{p}--{o.name}" for p, o, *_ in MAPPED])
def test_option_default_and_help_come_from_the_setting(path: str, option: Any, model: type, field: str,
                                                       transform: Callable[[Any], Any]) -> None:
    expected = _as_option(transform(setting_default(model, field)), option)
    assert option.default == expected, (f"osrm-lora {path} --{option.name} defaults to {option.default!r}, "
                                        f"{model.__name__}.{field} to {expected!r}")
    assert setting_help(model, field) in (option.help or ""), f"osrm-lora {path} --{option.name}: help not from {model.__name__}.{field}"


def test_the_walk_covers_the_stage_options() -> None:
    """The name-based mapping finds the options it must (a rename would otherwise drop them silently)."""
    seen = {(p, o.name) for p, o, *_ in MAPPED}
    must = {("profile", "seed"), ("profile", "n_samples"), ("profile", "batch_size"), ("profile", "max_length"),
            ("profile", "include_padding"), ("profile", "float64"), ("train", "seed"), ("train", "lr"),
            ("train", "epochs"), ("train", "rank"), ("train", "freeze_a"), ("train", "strategy"), ("init", "ridge"),
            ("init", "seed"), ("init", "mode"), ("search", "groups"), ("search", "methods"), ("search", "budget"),
            ("rmm", "methods"), ("rmm", "episodes"), ("rmm", "seed"), ("rmm", "constraint"), ("merge", "device"), ("evaluate", "device")}
    assert must <= seen, sorted(must - seen)
    assert not {k for k in FIELDS if k not in seen}, "a FIELDS entry names an option that no longer exists"


def test_profile_seed_is_the_pipeline_seed() -> None:
    """The mismatch this file was written for: profile alone sampled other examples than the pipeline."""
    profile = dict(commands())["profile"]
    seed = next(p for p in profile.params if p.name == "seed")
    assert seed.default == PipelineConfig.model_fields["seed"].default == 0


def test_init_modes_spelled_once() -> None:
    assert set(OSRM_MODES) < set(INIT_MODES) and INIT_MODES[0] == "standard"
    cmds = dict(commands())
    init_help = next(p.help for p in cmds["init"].params if p.name == "mode")
    project_help = next(p.help for p in cmds["project"].params if p.name == "mode")
    assert all(m in (init_help or "") for m in INIT_MODES)
    assert all(m in (project_help or "") for m in OSRM_MODES) and "standard" not in (project_help or "")
    with pytest.raises(ValueError):
        InitSettings(name="x", mode="lori")  # type: ignore[arg-type]


NOT_IN_COMMAND: dict[tuple[str, type], dict[str, str]] = {
    # (command, settings model) -> {field: why no option of that command stands for it}
    ("train", TrainSettings): {
        "batched": "trains the run's adapters together in one pass; `osrm-lora train` trains one adapter",
    },
    ("train", LoraSettings): {},
}


@pytest.mark.parametrize(("path", "model"), list(NOT_IN_COMMAND), ids=[f"{p}-{m.__name__}" for p, m in NOT_IN_COMMAND])
def test_every_setting_of_the_command_is_an_option(path: str, model: type) -> None:
    """A user training one adapter by hand can set what the pipeline config can (--head-lr, --warmup-ratio,
    ... were once missing from `osrm-lora train`); defaults and help are checked by the test above."""
    excluded = NOT_IN_COMMAND[(path, model)]
    reached = {field for p, _, m, field, _ in MAPPED if p == path and m is model}
    missing = set(model.model_fields) - reached - set(excluded)
    assert not missing, f"osrm-lora {path} has no option for {model.__name__}.{sorted(missing)}"
    assert not set(excluded) & reached, "an excluded setting now has an option; drop it from NOT_IN_COMMAND"
    assert set(excluded) <= set(model.model_fields), "NOT_IN_COMMAND names a setting that no longer exists"


def test_train_options_reach_the_training(tiny_bert: Path, tmp_path: Path) -> None:
    """The optimisation options of `osrm-lora train` reach the TrainSettings train_task trains with (and
    records in metrics.json); --no-train-pooler leaves the pooler at the base model's weights."""
    from safetensors.torch import load_file
    from tinymodels import WORDS

    data = tmp_path / "kw.jsonl"
    data.write_text("".join(json.dumps({"text": f"alpha {'red' if i % 2 else 'golf'} {WORDS[i % 20]}", "label": i % 2}) + "\n"
                            for i in range(40)))
    out = tmp_path / "adapter"
    assert main(["-q", "train", "--task", str(data), "--model", str(tiny_bert), "--out", str(out), "--epochs", "1",
                 "--rank", "2", "--batch-size", "8", "--max-length", "8", "--lr", "0.01", "--head-lr", "0.5",
                 "--weight-decay", "0.1", "--max-grad-norm", "0.5", "--warmup-ratio", "0.2", "--eval-batch-size", "3",
                 "--no-train-pooler"]) == 0
    recorded = json.loads((out / "metrics.json").read_text())["train"]
    expected = {"lr": 0.01, "head_lr": 0.5, "weight_decay": 0.1, "max_grad_norm": 0.5, "warmup_ratio": 0.2,
                "eval_batch_size": 3, "train_pooler": False, "max_length": 8, "batch_size": 8, "epochs": 1}
    assert {k: recorded[k] for k in expected} == expected
    head = load_file(str(out / "head.safetensors"))
    base = load_file(str(tiny_bert / "model.safetensors"))
    pooler = [k for k in head if ".pooler." in k]
    assert pooler and all(k in base for k in pooler), sorted(head)
    assert all(head[k].equal(base[k]) for k in pooler), "the pooler was trained despite --no-train-pooler"
