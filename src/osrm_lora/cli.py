"""The ``osrm-lora`` command line: one subcommand per stage plus ``run``, ``demo`` and ``report``.

User errors (:class:`OsrmError`) print one line, ``error: ...``, and exit with status 2; nothing else
is printed as a traceback unless ``-v`` is given.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from pydantic import ValidationError

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
from osrm_lora.errors import OsrmError, validation_message
from osrm_lora.fsutil import claim_output
from osrm_lora.logutil import setup_logging
from osrm_lora.model.keys import matches_target, select_targets
from osrm_lora.osrm import DEFAULT_OSRM_MODE, OSRM_MODES

if TYPE_CHECKING:
    from osrm_lora.data.task import Task

logger = logging.getLogger("osrm_lora.cli")

app = typer.Typer(
    name="osrm-lora",
    help="Fine-tune one LoRA per task (OSRM or standard init), merge them, evaluate every task, diagnose interference.",
    epilog="Documentation: docs/ in the osrm-lora source tree (METHOD, MERGING, DATA, RUNS, EXTENDING).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
tasks_app = typer.Typer(help="List, inspect and fetch tasks and suites.\n\nExample: osrm-lora tasks list\n\nExample: osrm-lora tasks show mr bbc", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tasks_app, name="tasks")

_STATE = {"verbosity": 0}


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"osrm-lora {version('osrm-lora')}")
        except PackageNotFoundError:  # running from a source tree without installing
            typer.echo("osrm-lora (not installed; source tree)")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging: -v debug (repeat the flag, e.g. -vv; it takes no value).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    _STATE["verbosity"] = -1 if quiet else verbose
    setup_logging(_STATE["verbosity"])


def _join_group(device: str | None) -> bool:
    """Join the process group when started by torchrun / accelerate launch; True on rank 0 (the
    process that prints results)."""
    from osrm_lora.distributed import init_distributed

    return init_distributed(device).is_main


OVERWRITE_HELP = "Replace an earlier osrm-lora output at --out (a file or a directory osrm-lora did not write is never replaced)."


def _csv(value: Optional[str]) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# An option for a setting of the pipeline config takes its default and help from the settings model
# (osrm_lora.config), so a stage command run alone does what the pipeline's stage does; checked for
# every command by tests/test_cli_defaults.py.
def _default(model: type[Any], name: str) -> Any:
    """The default of setting ``name`` of ``model`` as its option takes it (a list comma-separated)."""
    value = setting_default(model, name)
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def _choices(names: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


_help = setting_help
MODEL_HELP = _help(PipelineConfig, "model")
DEVICE_HELP = _help(PipelineConfig, "device")
SEED_HELP = _help(PipelineConfig, "seed")


def _device_arg(device: Optional[str]) -> None:
    """Fail fast on a --device torch cannot use: an unknown type, CUDA without a CUDA device, a GPU index
    beyond the devices present."""
    if device in (None, "", "auto"):
        return
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise OsrmError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OsrmError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OsrmError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise OsrmError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")


def _model_arg(model: Optional[str], option: str = "--model") -> None:
    """Fail fast on a --model / --base-model that cannot be loaded: a local path that does not exist,
    or a Hub id that is not cached while the Hub is offline or unreachable."""
    if model is None:
        return
    from osrm_lora.inference import check_model_available

    check_model_available(model, option)


# --------------------------------------------------------------------------- pipeline
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    force: Annotated[Optional[list[str]], typer.Option(help="Recompute a stage (repeatable): profile, train, diagnose, merge, all.")] = None,
) -> None:
    """Run the embedded demo: MiniLM-L6 on mr/bbc/spam (subsampled), standard LoRA vs OSRM, merged.

    LoRA r=16 (alpha 32) on all linear layers, where merging hurts; inits standard and OSRM own with A
    frozen; merged with Task Arithmetic (one shared model, lambda chosen on validation) and EMR (one
    model per task). About 4 minutes on 2 CPU cores: 320 training and up to 300 validation/test
    examples per task, 2 epochs, 32 tokens, one seed.

    Example: osrm-lora demo --out runs/demo
    """
    from osrm_lora.demo import run_demo
    from osrm_lora.pipeline.layout import RunLayout
    from osrm_lora.report import print_results

    results = run_demo(out, force=tuple(force or ()))
    print_results(results)
    logger.info("results: %s, report: %s", RunLayout(out).results, RunLayout(out).report_html)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Pipeline YAML config (see configs/).")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<config name>).")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="Recompute a stage (repeatable): profile, train, diagnose, merge, all.")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Data cache directory (default $OSRM_LORA_CACHE or ~/.cache/osrm-lora).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Resolve tasks, model, methods and parameters, print them and exit; no network, writes nothing (uncached data and Hub models are only named, and fetched on the first run).")] = False,
) -> None:
    """Run the whole pipeline from a YAML config; rerunning into the same directory resumes it.

    Example: osrm-lora run configs/offline6.yaml --out runs/offline6

    Example: osrm-lora run configs/offline6.yaml --check
    """
    from osrm_lora.config import load_config
    from osrm_lora.pipeline import check_run, run_pipeline
    from osrm_lora.report import print_results

    if config.is_dir():
        raise OsrmError(f"{config} is a directory; pass a pipeline YAML config file (see configs/)")
    cfg = load_config(config)
    _device_arg(cfg.device)
    if check:
        for line in check_run(cfg, force=tuple(force or ()), cache=str(cache) if cache else None):
            typer.echo(line)
        return
    main_rank = _join_group(cfg.device)
    results = run_pipeline(cfg, out or Path("runs") / cfg.name, force=tuple(force or ()), cache=str(cache) if cache else None)
    if main_rank:
        print_results(results)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory with results.json.")]) -> None:
    """(Re)write the report of a run directory.

    Example: osrm-lora report runs/demo
    """
    from osrm_lora.fsutil import read_json
    from osrm_lora.pipeline.layout import RunLayout
    from osrm_lora.report import print_results, write_report

    path = write_report(run_dir)
    print_results(read_json(RunLayout(run_dir).results))
    logger.info("report written: %s", path)


# --------------------------------------------------------------------------- tasks
@tasks_app.command("list")
def tasks_list() -> None:
    """List built-in tasks and suites.

    Example: osrm-lora tasks list
    """
    from osrm_lora.data import BUILTIN_TASKS, SUITES

    typer.echo("built-in tasks: " + ", ".join(sorted(BUILTIN_TASKS)))
    typer.echo("GLUE (online): glue/cola, glue/sst2, glue/mrpc, glue/qqp, glue/stsb, glue/mnli, glue/qnli, glue/rte")
    from osrm_lora.data import load_suite

    for name in SUITES:
        typer.echo(f"suite {name}: " + ", ".join(s.name for s in load_suite(name)))


@tasks_app.command("show")
def tasks_show(
    names: Annotated[list[str], typer.Argument(metavar="NAMES...", help="Task names (built-in or glue/<task>).")],
    cache: Annotated[Optional[Path], typer.Option(help="Data cache directory.")] = None,
) -> None:
    """Fetch (first time only) and summarise tasks: sizes, labels, metric, an example.

    Example: osrm-lora tasks show mr bbc
    """
    from osrm_lora.data import load_task

    for name in names:
        t = load_task(name, cache=str(cache) if cache else None)
        typer.echo(f"{t.name}: {t.problem_type}, metric {t.metric}, labels {list(t.label_names)}; "
                   f"train {len(t.train)}, validation {len(t.validation)}, test {len(t.test)}")
        typer.echo(f"  example: {t.train.texts[0][:120]!r} -> {t.train.labels[0]}")


# --------------------------------------------------------------------------- stages
@app.command()
def train(
    task: Annotated[str, typer.Option(help="Task name (built-in, glue/<task>) or a local file path.")],
    out: Annotated[Path, typer.Option(help="Output adapter directory.")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = _default(PipelineConfig, "model"),
    init: Annotated[Optional[Path], typer.Option(help="Initial adapter from `osrm-lora init` (its A is used).")] = None,
    rank: Annotated[int, typer.Option(min=1, help=_help(LoraSettings, "rank"))] = _default(LoraSettings, "rank"),
    alpha: Annotated[float, typer.Option(min=0.0, help=_help(LoraSettings, "alpha"))] = _default(LoraSettings, "alpha"),
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help=_help(LoraSettings, "dropout"))] = _default(LoraSettings, "dropout"),
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated. " + _help(LoraSettings, "target_modules"))] = _default(LoraSettings, "target_modules"),
    epochs: Annotated[int, typer.Option(min=1, help=_help(TrainSettings, "epochs"))] = _default(TrainSettings, "epochs"),
    batch_size: Annotated[int, typer.Option(min=1, help=_help(TrainSettings, "batch_size"))] = _default(TrainSettings, "batch_size"),
    lr: Annotated[float, typer.Option(min=0.0, help=_help(TrainSettings, "lr"))] = _default(TrainSettings, "lr"),
    head_lr: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help=_help(TrainSettings, "head_lr"))] = _default(TrainSettings, "head_lr"),
    warmup_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help=_help(TrainSettings, "warmup_ratio"))] = _default(TrainSettings, "warmup_ratio"),
    weight_decay: Annotated[float, typer.Option(min=0.0, help=_help(TrainSettings, "weight_decay"))] = _default(TrainSettings, "weight_decay"),
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help=_help(TrainSettings, "max_grad_norm"))] = _default(TrainSettings, "max_grad_norm"),
    max_length: Annotated[int, typer.Option(min=2, help=_help(TrainSettings, "max_length"))] = _default(TrainSettings, "max_length"),
    eval_batch_size: Annotated[int, typer.Option(min=1, help=_help(TrainSettings, "eval_batch_size"))] = _default(TrainSettings, "eval_batch_size"),
    train_pooler: Annotated[bool, typer.Option("--train-pooler/--no-train-pooler", help=_help(TrainSettings, "train_pooler"))] = _default(TrainSettings, "train_pooler"),
    freeze_a: Annotated[bool, typer.Option("--freeze-a", help=_help(InitSettings, "freeze_A"))] = _default(InitSettings, "freeze_A"),
    freeze_b: Annotated[bool, typer.Option("--freeze-b", help=_help(InitSettings, "freeze_B"))] = _default(InitSettings, "freeze_B"),
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = _default(PipelineConfig, "seed"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
    strategy: Annotated[str, typer.Option(help=_help(TrainSettings, "strategy"))] = _default(TrainSettings, "strategy"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Fine-tune one LoRA adapter + head on a task; keeps the best epoch on validation.

    Under torchrun / accelerate launch all processes train the adapter together (data parallel);
    --batch-size stays the global batch.

    Example: osrm-lora train --task mr --out runs/mr-lora --epochs 3

    Example: torchrun --nproc_per_node 4 -m osrm_lora train --task mr --out runs/mr --strategy fsdp
    """
    from osrm_lora.data import load_task
    from osrm_lora.distributed import main_first
    from osrm_lora.train import load_init_A, train_task

    lora = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, target_modules=_csv(target_modules))
    _model_arg(model)
    _device_arg(device)
    if strategy not in ("ddp", "fsdp"):
        raise OsrmError(f"unknown --strategy {strategy!r}; use ddp or fsdp")
    tcfg = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, warmup_ratio=warmup_ratio,
                         weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_length=max_length,
                         eval_batch_size=eval_batch_size, train_pooler=train_pooler, strategy=strategy)
    with claim_output(out, overwrite=overwrite, inputs=[init] if init else []):  # refuse a bad --out first
        main_rank = _join_group(device)  # under torchrun: data parallel, --batch-size is the global batch
        A = load_init_A(init) if init else None
        with main_first():
            task_obj = load_task(task)
        res = train_task(task_obj, out, model=model, lora=lora, train=tcfg, seed=seed, device=device, init_A=A,
                         freeze_A=freeze_a, freeze_B=freeze_b, init_name="osrm" if init else "standard")
    if main_rank:
        typer.echo(f"{res.task}: validation {res.validation:.2f} (epoch {res.best_epoch}), test {res.test:.2f}; "
                   f"saved to {out}")


@app.command()
def profile(
    tasks: Annotated[str, typer.Option(help="Comma-separated task names, or a suite name.")],
    out: Annotated[Path, typer.Option(help="Statistics store directory.")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = _default(PipelineConfig, "model"),
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated. " + _help(LoraSettings, "target_modules"))] = _default(LoraSettings, "target_modules"),
    n_samples: Annotated[int, typer.Option(min=1, help=_help(ProfileSettings, "n_samples"))] = _default(ProfileSettings, "n_samples"),
    batch_size: Annotated[int, typer.Option(min=1, help=_help(ProfileSettings, "batch_size"))] = _default(ProfileSettings, "batch_size"),
    max_length: Annotated[int, typer.Option(min=2, help=_help(TrainSettings, "max_length"))] = _default(TrainSettings, "max_length"),
    include_padding: Annotated[bool, typer.Option(help=_help(ProfileSettings, "include_padding"))] = _default(ProfileSettings, "include_padding"),
    float64: Annotated[bool, typer.Option(help=_help(ProfileSettings, "dtype") + " This flag: float64.")] = _default(ProfileSettings, "dtype") == "float64",
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = _default(PipelineConfig, "seed"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Collect activation statistics (count, sum, Gram per task per module input) under the pre-trained model.

    Example: osrm-lora profile --tasks mr,hedge,bbc,spam --out runs/stats
    """
    from osrm_lora.backbone import resolve_model_path
    from osrm_lora.distributed import barrier, main_first
    from osrm_lora.pipeline.stages import profile_tasks

    _model_arg(model)
    _device_arg(device)
    settings = ProfileSettings(n_samples=n_samples, batch_size=batch_size, include_padding=include_padding,
                               dtype="float64" if float64 else "float32")
    with claim_output(out, overwrite=overwrite):  # refuse a bad --out before profiling; lock it meanwhile
        main_rank = _join_group(device)  # under torchrun: the batches are split over the processes
        with main_first():
            task_objs = _load_tasks(tasks)
        store = profile_tasks(resolve_model_path(model), task_objs, _csv(target_modules), settings,
                              max_length=max_length, device=device, seed=seed)
        if main_rank:
            store.save(out)
            typer.echo(f"statistics for {len(task_objs)} tasks saved to {out}")
    barrier()


def _load_tasks(spec: str) -> list[Task]:
    from osrm_lora.data import SUITES, load_suite, load_task

    if spec in SUITES:
        return [load_task(s) for s in load_suite(spec)]
    return [load_task(name) for name in _csv(spec) or []]


@app.command()
def init(
    stats: Annotated[Path, typer.Option(help="Statistics store from `osrm-lora profile`.")],
    out: Annotated[Path, typer.Option(help="Directory for one initial adapter per task.")],
    mode: Annotated[str, typer.Option(help=_help(InitSettings, "mode"))] = DEFAULT_OSRM_MODE,
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = _default(PipelineConfig, "model"),
    rank: Annotated[int, typer.Option(min=1, help=_help(LoraSettings, "rank"))] = _default(LoraSettings, "rank"),
    alpha: Annotated[float, typer.Option(min=0.0, help=_help(LoraSettings, "alpha"))] = _default(LoraSettings, "alpha"),
    ridge: Annotated[float, typer.Option(min=0.0, help=_help(InitSettings, "ridge"))] = _default(InitSettings, "ridge"),
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated. " + _help(LoraSettings, "target_modules"))] = _default(LoraSettings, "target_modules"),
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = _default(PipelineConfig, "seed"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Write one initial PEFT adapter per task with OSRM A (B = 0); `train --init` starts from it.

    Example: osrm-lora init --stats runs/stats --mode paper --out runs/init
    """
    from osrm_lora.train import write_initial_adapters

    lora = LoraSettings(rank=rank, alpha=alpha, target_modules=_csv(target_modules))
    _model_arg(model)
    _check_init_targets(stats, lora.target_modules)
    with claim_output(out, overwrite=overwrite, container=True, inputs=[stats]):
        paths = write_initial_adapters(stats, out, mode=mode, model=model, lora=lora, ridge=ridge, seed=seed)
    typer.echo(f"{len(paths)} initial adapters ({mode}) written under {out}")


def _check_init_targets(stats: Path, targets: list[str] | None) -> None:
    """--target-modules must adapt exactly the modules the statistics store holds (PEFT suffix match)."""
    if not targets:
        return
    from osrm_lora.stats import StatsStore

    held = StatsStore.load(stats).modules
    if not held:
        return
    unknown = [t for t in targets if not select_targets(held, [t])]
    uncovered = [m for m in held if not matches_target(m, targets)]
    if unknown or uncovered:
        names = sorted({m.rsplit(".", 1)[-1] for m in held})
        problem = (f"--target-modules {','.join(unknown)} not in the statistics store {stats}" if unknown
                   else f"--target-modules {','.join(targets)} leave out modules of the statistics store {stats}")
        raise OsrmError(f"{problem}, which holds the modules {', '.join(names)} ({len(held)} in all, e.g. {held[0]}); pass "
                        f"--target-modules {','.join(names)} or profile again with the target modules you want")


@app.command()
def project(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Trained adapter directories, named by task.")],
    stats: Annotated[Path, typer.Option(help="Statistics store covering the same tasks.")],
    out: Annotated[Path, typer.Option(help="Output directory (one projected adapter per input).")],
    rank: Annotated[int, typer.Option(min=1, help="Dimension of the OSRM subspace.")] = 8,
    mode: Annotated[str, typer.Option(help=f"OSRM mode of the subspace: {_choices(OSRM_MODES)}.")] = DEFAULT_OSRM_MODE,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Post-hoc OSRM: project each adapter's input side onto its OSRM subspace (heads preserved).

    Example: osrm-lora project runs/demo/adapters/standard/* --stats runs/demo/stats --out runs/projected
    """
    from osrm_lora.osrm import run_project

    with claim_output(out, overwrite=overwrite, container=True, inputs=[*adapters, stats]):
        rep = run_project([str(a) for a in adapters], str(stats), str(out), rank=rank, mode=mode)
    _print_projection(rep)


LOW_ENERGY_KEPT = 0.25
"""A projection that keeps less of an adapter's update energy than this is warned about."""


def _print_projection(rep: dict[str, Any]) -> None:
    """Per task: the share of the update energy (||dW||_F^2) the projection kept, its weakest module and
    the output directory; a warning on stderr for a projection that keeps little."""
    typer.echo(f"projected onto the rank-{rep.get('rank')} OSRM subspace ({rep.get('mode')} mode):")
    for task, info in rep.get("tasks", {}).items():
        kept = float(info.get("energy_kept", float("nan")))
        modules = {k: float(v) for k, v in (info.get("modules") or {}).items()}
        weakest = min(modules, key=lambda k: modules[k]) if modules else None
        detail = f", weakest module {weakest} {100 * modules[weakest]:.1f}%" if weakest is not None else ""
        share = f"{100 * kept:.1f}%" if math.isfinite(kept) else "n/a (the adapter's update is zero)"
        typer.echo(f"{task}: update energy kept {share} ({len(modules)} modules{detail}) -> {info.get('output')}")
        if kept < LOW_ENERGY_KEPT:
            logger.warning("the projection of %s keeps only %.1f%% of its update energy (< %.0f%%): the projected "
                           "adapter may lose much of its task performance; evaluate it, or project with a larger --rank",
                           task, 100 * kept, 100 * LOW_ENERGY_KEPT)


@app.command()
def diagnose(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Adapter directories, named by task.")],
    out: Annotated[Path, typer.Option(help="Output directory for interference.json/png (leave_one_out.json).")],
    stats: Annotated[Optional[Path], typer.Option(help="Statistics store covering the same tasks (with --leave-one-out: optional, adds the ranking by interference).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    leave_one_out: Annotated[bool, typer.Option("--leave-one-out", help="Score every task on validation with the Task Arithmetic merge of all adapters and without each other adapter: how much each one drags the others down.")] = False,
    scaling: Annotated[float, typer.Option(min=0.0, help="--leave-one-out: the Task Arithmetic lambda.")] = 1.0,
    model: Annotated[str, typer.Option(help="--leave-one-out: base model (default: the adapters').")] = "default",
    device: Annotated[str, typer.Option(help="--leave-one-out: " + DEVICE_HELP)] = _default(PipelineConfig, "device"),
) -> None:
    """Interference of every adapter on every task's inputs, from stored Gram matrices (no forward pass).

    With --leave-one-out: per adapter i and other task j, task j's validation score with the Task
    Arithmetic merge of all adapters minus without adapter i (a matrix and the worst adapter).

    Example: osrm-lora diagnose runs/demo/adapters/standard/* --stats runs/demo/stats --out runs/diag

    Example: osrm-lora diagnose runs/demo/adapters/standard/* --leave-one-out --scaling 0.5 --out runs/loo
    """
    from osrm_lora.diagnose import format_leave_one_out, run_diagnose, run_leave_one_out

    if stats is None and not leave_one_out:
        raise OsrmError("diagnose needs --stats (interference statistics) or --leave-one-out; see `osrm-lora diagnose --help`")
    if leave_one_out:
        _model_arg(model)
        _device_arg(device)
    with claim_output(out, overwrite=overwrite, container=True, inputs=[*adapters, *([stats] if stats else [])]):
        if leave_one_out:
            loo = run_leave_one_out([str(a) for a in adapters], str(out), scaling=scaling,
                                    stats_path=str(stats) if stats else None, model=model, device=device)
        else:
            run_diagnose([str(a) for a in adapters], str(stats), str(out))
    if leave_one_out:
        for line in format_leave_one_out(loo):
            typer.echo(line)
        typer.echo(f"leave-one-out written to {out}/leave_one_out.json")
        return
    typer.echo(f"interference written to {out}/interference.json and interference.png")


@app.command()
def merge(
    adapters: Annotated[Optional[list[Path]], typer.Argument(metavar="ADAPTERS...", help="PEFT adapter directories to merge.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Merge method (see --list).")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="key=value (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="peft (adapter) or full (merged model).")] = "peft",
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated per-adapter weights.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Base model for --format full (default: the adapters' base_model_name_or_path).")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="PEFT output of dense methods: the largest relative error of each module's update (default 1e-3; the SVD rank is chosen to meet it).")] = None,
    svd_rank: Annotated[Optional[int], typer.Option("--svd-rank", min=1, help="PEFT output of dense methods: force this SVD rank (error reported; checked only against an explicit --max-error).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Merge a few modules at a time (large models); automatic under torchrun.")] = False,
    modules_per_step: Annotated[int, typer.Option(min=1, help="Modules in memory at once with --stream.")] = 1,
    device: Annotated[str, typer.Option(help=f"Device for --stream: {DEVICE_HELP} (under torchrun: one GPU per process).")] = _default(PipelineConfig, "device"),
    list_: Annotated[bool, typer.Option("--list", help="List merge methods and exit.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Merge LoRA adapters with a registered method; writes a PEFT adapter or a full model.

    With --stream (or when started by torchrun / accelerate launch) the modules are split over the
    processes and merged a few at a time, so peak memory stays near a few modules; --format full
    then writes a sharded safetensors model.

    Example: osrm-lora merge --method ties -p density=0.2 -p scaling=0.7 a/ b/ c/ --out merged/

    Example: torchrun --nproc_per_node 8 -m osrm_lora merge --method ties a/ b/ --out m/ --format full
    """
    from osrm_lora.distributed import launched_distributed
    from osrm_lora.merge import format_method_list, run_merge
    from osrm_lora.merge.cli import result_line, run_stream_merge

    if list_:
        typer.echo(format_method_list())
        return
    if not method or out is None:
        raise OsrmError("merge needs --method and --out (or --list); see `osrm-lora merge --help`")
    try:
        w = [float(x) for x in _csv(weights) or []] if weights else None
    except ValueError:
        raise OsrmError(f"--weights {weights!r} is not a comma-separated list of numbers; pass e.g. --weights 1.0,0.5") from None
    dirs = [str(a) for a in adapters or []]
    _model_arg(base_model, "--base-model")
    _device_arg(device)
    with claim_output(out, overwrite=overwrite, inputs=dirs):  # refuse a bad --out before merging
        if stream or launched_distributed():
            run_stream_merge(dirs, method, list(param or []), str(out), format=fmt, weights=w,
                             base_model_path=base_model, svd_rank=svd_rank, max_error=max_error,
                             modules_per_step=modules_per_step, device=device)
            if not _join_group(device):
                return
        else:
            run_merge(dirs, method, list(param or []), str(out), format=fmt, weights=w, base_model_path=base_model,
                      svd_rank=svd_rank, max_error=max_error)
    typer.echo(result_line(out, len(adapters or []), method))


@app.command()
def search(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Trained adapter directories (each with its task head), one per task.")],
    out: Annotated[Path, typer.Option(help="Output directory: search.db (the study; rerunning resumes it), search.json, merged/.")],
    methods: Annotated[str, typer.Option(help="Comma-separated. " + _help(SearchSettings, "methods"))] = _default(SearchSettings, "methods"),
    groups: Annotated[int, typer.Option(min=0, help=_help(SearchSettings, "n_groups") + " 0 = one per layer.")] = _default(SearchSettings, "n_groups"),
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help=_help(SearchSettings, "masks"))] = _default(SearchSettings, "masks"),
    scaling_range: Annotated[str, typer.Option(help=_help(SearchSettings, "scaling_range"))] = _default(SearchSettings, "scaling_range"),
    objective: Annotated[str, typer.Option(help=_help(SearchSettings, "objective"))] = _default(SearchSettings, "objective"),
    sampler: Annotated[str, typer.Option(help=_help(SearchSettings, "sampler"))] = _default(SearchSettings, "sampler"),
    pruner: Annotated[str, typer.Option(help=_help(SearchSettings, "pruner"))] = _default(SearchSettings, "pruner"),
    rungs: Annotated[int, typer.Option(min=1, help=_help(SearchSettings, "rungs"))] = _default(SearchSettings, "rungs"),
    eta: Annotated[int, typer.Option(min=2, help=_help(SearchSettings, "eta"))] = _default(SearchSettings, "eta"),
    min_examples: Annotated[int, typer.Option(min=1, help=_help(SearchSettings, "min_examples"))] = _default(SearchSettings, "min_examples"),
    budget: Annotated[Optional[float], typer.Option(help=_help(SearchBudget, "evaluations"))] = None,
    seconds: Annotated[Optional[float], typer.Option(help=_help(SearchBudget, "seconds"))] = _default(SearchBudget, "seconds"),
    trials: Annotated[Optional[int], typer.Option(min=1, help=_help(SearchBudget, "trials"))] = _default(SearchBudget, "trials"),
    constraint: Annotated[Optional[list[str]], typer.Option(help=_help(MergeSettings, "constraints") + " Repeatable.")] = None,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = _default(PipelineConfig, "seed"),
    model: str = "default",
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Token limit (default: the one the adapters were trained with).")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard an earlier search at --out and start anew (otherwise it is resumed).")] = False,
) -> None:
    """Search per layer group a merge method, its coefficients and which adapters take part, on validation
    subsets of growing size (Hyperband); writes the best merge, scored once on test.

    Example: osrm-lora search runs/demo/adapters/standard/* --out runs/search --budget 30

    Example: osrm-lora search a/ b/ c/ --out s/ --objective pareto --constraint mr>=single-2
    """
    from osrm_lora.search import search_merge, summary_lines

    _model_arg(model)
    _device_arg(device)
    try:
        low, high = (float(x) for x in scaling_range.split(","))
    except ValueError:
        raise OsrmError(f"--scaling-range {scaling_range!r} is not LOW,HIGH; pass e.g. --scaling-range 0.1,1.5") from None
    default_evaluations = setting_default(SearchBudget, "evaluations")  # only without another limit, as merge.search
    evaluations = budget if budget is not None else (default_evaluations if seconds is None and trials is None else None)
    record = search_merge([str(a) for a in adapters], out, methods=_csv(methods) or [], n_groups=groups or None,
                          masks=masks, scaling_range=(low, high), objective=objective, sampler=sampler, pruner=pruner,
                          rungs=rungs, eta=eta, min_examples=min_examples,
                          budget=SearchBudget(evaluations=evaluations, seconds=seconds, trials=trials),
                          constraints=list(constraint or []), seed=seed, model=model, max_length=max_length,
                          device=device, overwrite=overwrite)
    for line in summary_lines(record):
        typer.echo(line)
    typer.echo(f"written to {out}/merged and {out}/search.json")


@app.command()
def rmm(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Trained adapter directories (each with its task head), one per task.")],
    out: Annotated[Path, typer.Option(help="Output directory: rmm.json (candidates, reward curve, chosen architecture), merged/.")],
    methods: Annotated[str, typer.Option(help="Comma-separated. " + _help(RMMSettings, "methods"))] = _default(RMMSettings, "methods"),
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="METHOD.KEY=VALUE: a candidate method's parameter (repeatable; defaults otherwise).")] = None,
    episodes: Annotated[int, typer.Option(help=_help(RMMSettings, "episodes"))] = _default(RMMSettings, "episodes"),
    budget: Annotated[int, typer.Option(help=_help(RMMSettings, "budget"))] = _default(RMMSettings, "budget"),
    subset_size: Annotated[int, typer.Option(help=_help(RMMSettings, "subset_size"))] = _default(RMMSettings, "subset_size"),
    rescore: Annotated[int, typer.Option(help=_help(RMMSettings, "rescore"))] = _default(RMMSettings, "rescore"),
    constraint: Annotated[Optional[list[str]], typer.Option(help=_help(MergeSettings, "constraints") + " Repeatable.")] = None,
    penalty: Annotated[float, typer.Option(help=_help(RMMSettings, "penalty"))] = _default(RMMSettings, "penalty"),
    ppo: Annotated[Optional[list[str]], typer.Option("--ppo", help=_help(RMMSettings, "ppo") + " One as KEY=VALUE; repeatable.")] = None,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = _default(PipelineConfig, "seed"),
    model: str = "default",
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Token limit (default: the one the adapters were trained with).")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Reinforced Model Merging: a PPO agent picks, layer by layer, one candidate's update (a task's
    adapter or a merge) or none, rewarded on small validation subsets; writes the best architecture's
    merge, chosen on the whole validation split and scored once on test.

    Example: osrm-lora rmm runs/demo/adapters/standard/* --out runs/rmm --budget 200 --subset-size 32

    Example: osrm-lora rmm a/ b/ c/ --out r/ --methods ties -p ties.density=0.3 --constraint mr>=single-2
    """
    from osrm_lora.rmm import parse_candidate_params, parse_ppo, rmm_search, summary_lines

    names = _csv(methods) or []
    params = parse_candidate_params(list(param or []), names)
    ppo_settings = parse_ppo(list(ppo or []))
    _model_arg(model)
    _device_arg(device)
    result = rmm_search([str(a) for a in adapters], out, methods=names, params=params, episodes=episodes,
                        budget=budget, subset_size=subset_size, rescore=rescore, constraints=list(constraint or []),
                        penalty=penalty, ppo=ppo_settings, seed=seed, model=model, max_length=max_length,
                        device=device, overwrite=overwrite)
    for line in summary_lines(result.record):
        typer.echo(line)
    typer.echo(f"written to {out}/merged and {out}/rmm.json")


@app.command("evaluate")
def evaluate_cmd(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Adapter directories (each with its task head).")],
    merged: Annotated[Optional[Path], typer.Option(help="A merged adapter to evaluate with each task's head.")] = None,
    split: Annotated[str, typer.Option(help="validation or test.")] = "test",
    model: Annotated[str, typer.Option(help="HF model id or directory; 'default' = embedded MiniLM-L6.")] = "default",
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Token limit (default: the one each adapter was trained with).")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
) -> None:
    """Score adapters (or one merged adapter with each task's head) on each task's split.

    The task's data, splits and token limit are those of the run that trained the adapter (its
    metrics.json), so an adapter's own test score reproduces the run's.

    Example: osrm-lora evaluate runs/demo/adapters/standard/* --merged runs/demo/merges/standard/task_arithmetic
    """
    from osrm_lora.inference import iter_scores

    _model_arg(model)
    _device_arg(device)
    for s in iter_scores([str(a) for a in adapters], merged=str(merged) if merged else None, split=split,
                         model=model, max_length=max_length, device=device):
        typer.echo(s.line())  # each task as soon as it is scored


@app.command("evaluate-lm")
def evaluate_lm_cmd(
    texts: Annotated[list[Path], typer.Argument(metavar="TEXTS...", help="Text files, one text per line (one file per task).")],
    model: Annotated[str, typer.Option(help="Causal LM (HF id or directory) the adapters were trained on.")],
    adapter: Annotated[Optional[Path], typer.Option(help="A LoRA adapter (own or merged) to fold in.")] = None,
    max_length: Annotated[int, typer.Option(min=2)] = 512,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = _default(PipelineConfig, "device"),
) -> None:
    """Loss and perplexity of a causal LM (optionally with a merged LoRA) on each text file.

    Example: osrm-lora evaluate-lm --model my-llama --adapter merged/ task_a.txt task_b.txt
    """
    from osrm_lora.inference import evaluate_causal_lm

    _device_arg(device)
    res = evaluate_causal_lm([str(t) for t in texts], model=model, adapter=str(adapter) if adapter else None,
                             max_length=max_length, device=device)
    for name, r in res.items():
        typer.echo(f"{name}\tloss {r['loss']:.4f}\tperplexity {r['perplexity']:.2f}")


@app.command()
def predict(
    adapter: Annotated[Path, typer.Option(help="Adapter directory with the task's head.")],
    texts: Annotated[list[str], typer.Argument(metavar="TEXTS...", help="Texts to label ('-' reads lines from stdin).")],
    merged: Annotated[Optional[Path], typer.Option(help="Use this merged adapter instead of the task's own.")] = None,
    model: Annotated[str, typer.Option(help="HF model id or directory; 'default' = embedded MiniLM-L6.")] = "default",
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Token limit (default: the one the adapter was trained with).")] = None,
    scores: Annotated[bool, typer.Option("--scores", help="Also print each label's probability.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per text: text, label, scores.")] = False,
) -> None:
    """Label new texts for a task: one line per text, `label<TAB>text` (with --scores the
    probability of the label follows it, then every label's probability).

    Example: osrm-lora predict --adapter runs/demo/adapters/standard/mr "a gripping, funny film"
    """
    from osrm_lora.inference import predict as predict_all

    _model_arg(model)
    items = [line.rstrip("\n") for line in sys.stdin] if texts == ["-"] else texts
    preds = predict_all(str(adapter), items, merged=str(merged) if merged else None, model=model,
                        max_length=max_length)
    for text, pred in zip(items, preds):
        if json_out:
            typer.echo(json.dumps({"text": text, "label": pred.label, "scores": pred.scores}, ensure_ascii=False))
        elif scores and pred.scores:
            every = " ".join(f"{k}={v:.4f}" for k, v in pred.scores.items())
            typer.echo(f"{pred.label}\t{pred.scores[pred.label]:.4f}\t{every}\t{text}")
        else:
            typer.echo(f"{pred.label}\t{text}")


@app.command()
def export(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTERS...", help="Adapter directories (each with its head).")],
    out: Annotated[Path, typer.Option(help="Output directory: one HF model per task.")],
    merged: Annotated[Optional[Path], typer.Option(help="Merged adapter to fold in (default: each task's own).")] = None,
    model: Annotated[str, typer.Option(help="HF model id or directory; 'default' = embedded MiniLM-L6.")] = "default",
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Write per task a standalone HF sequence classifier (base + update folded in + the task's head).

    Example: osrm-lora export runs/demo/adapters/standard/* --merged runs/demo/merges/standard/task_arithmetic --out exported/
    """
    from osrm_lora.inference import check_adapter_dir, check_merged_dir, export_models

    _model_arg(model)
    for a in adapters:  # before claiming --out
        check_adapter_dir(a)
    if merged is not None:
        check_merged_dir(merged)
    with claim_output(out, overwrite=overwrite, container=True, inputs=[*adapters, *([merged] if merged else [])]):
        paths = export_models([str(a) for a in adapters], str(out), merged=str(merged) if merged else None, model=model)
    for p in paths:
        typer.echo(str(p))


def _usage_message(exc: Exception) -> str:
    """A click usage error (missing or invalid option, unknown command) as one line with the help hint."""
    message = " ".join(str(exc.format_message()).split()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) if ctx is not None else None
    return f"{message}; see `{path} --help`" if path else message


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors -> one line on stderr, exit status 2."""
    finished = False
    try:
        rc = _main_entry(argv)
        finished = True
        return rc
    finally:
        if "osrm_lora.distributed" in sys.modules:  # a process group exists only if the command loaded it
            from osrm_lora.distributed import shutdown

            # leave the process group (torchrun) whatever happened; after a finished command, with every rank
            shutdown(synchronize=finished)


def _main_entry(argv: list[str] | None) -> int:
    try:
        rc = app(args=argv, prog_name="osrm-lora", standalone_mode=False)
        if isinstance(rc, int) and rc == 130:  # typer turns Ctrl-C into Exit(130) and returns it here
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc != 0:
            return rc
    except OsrmError as exc:
        if _STATE["verbosity"] > 0:
            logger.exception("error")
        typer.echo(f"error: {exc}", err=True)
        return 2
    except ValidationError as exc:  # a value the option accepts but the settings reject (e.g. --lr 5)
        if _STATE["verbosity"] > 0:
            logger.exception("error")
        typer.echo(f"error: {validation_message(exc)}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except Exception as exc:  # click usage errors (typer may vendor its own click)
        if type(exc).__name__ == "NoArgsIsHelpError" and hasattr(exc, "show"):
            exc.show()  # the help text
            return int(getattr(exc, "exit_code", 2))
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"error: {_usage_message(exc)}", err=True)
            return int(exc.exit_code)
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
