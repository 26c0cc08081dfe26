"""The stages before merging: tasks, profile (activation statistics), the OSRM init, train (every
(init, task) adapter: one at a time, batched, or spread over processes) and diagnose."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from osrm_lora.backbone import default_target_modules, load_classifier, load_tokenizer, select_device
from osrm_lora.config import InitSettings, PipelineConfig, ProfileSettings
from osrm_lora.data import load_suite, load_task
from osrm_lora.data.task import Task
from osrm_lora.distributed import barrier, from_rank0, get_env, raise_if_any_failed, shard
from osrm_lora.errors import ConfigError
from osrm_lora.fsutil import sha256_file, sha256_json
from osrm_lora.pipeline.checks import check_merge_constraints
from osrm_lora.pipeline.context import RunContext
from osrm_lora.pipeline.jobs import parallel_mode, run_jobs
from osrm_lora.pipeline.layout import ADAPTER_METRICS, INTERFERENCE, RunLayout
from osrm_lora.pipeline.ledger import DIAGNOSE, PROFILE, TRAIN
from osrm_lora.stats import StatsStore, collect_statistics

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

Subspaces = dict[str, dict[str, torch.Tensor]]
"""OSRM bases of one init: per task, per module."""


# --------------------------------------------------------------------------- tasks
def task_fingerprint(task: Task) -> str:
    """Content hash of a task's splits (texts, pairs, labels) and metric."""
    payload = {
        "name": task.name,
        "metric": task.metric,
        "problem_type": task.problem_type,
        "labels": list(task.label_names),
    }
    for split in ("train", "validation", "test"):
        s = task.split(split)
        payload[split] = sha256_json([list(s.texts), list(s.labels), list(s.text_pairs or [])])
    return sha256_json(payload)


def resolve_tasks(cfg: PipelineConfig, cache: str | None = None, hf_loader: Any = None) -> list[Task]:
    """Load the suite's and the listed tasks (duplicate names are an error).

    ``hf_loader`` replaces ``datasets.load_dataset`` for HF/GLUE tasks (offline stand-ins in tests).
    """
    specs: list[Any] = []
    if cfg.suite:
        specs.extend(load_suite(cfg.suite))
    specs.extend(cfg.tasks)
    tasks = [load_task(s, cache=cache, hf_loader=hf_loader) for s in specs]
    names = [t.name for t in tasks]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"duplicate task names {dups}; give each task a unique name")
    check_merge_constraints(cfg, names)
    if len(tasks) < 2:
        logger.warning("only one task: merging needs two or more to be meaningful")
    return tasks


def dir_hash(path: Path) -> str | None:
    """Content hash of the files directly in ``path`` (None when it does not exist)."""
    if not path.exists():
        return None
    return sha256_json({p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()})


def init_payload(init: InitSettings) -> dict[str, Any]:
    """An init's settings as the train stage's inputs: settings added later enter only when set away
    from their default, so runs made before they existed stay finished."""
    later = {"solver": "eigh", "frozen_rank": None}
    return init.model_dump(mode="json", exclude={k for k, v in later.items() if getattr(init, k) == v})


def adapter_dirs(run_dir: Path, init: str, tasks: Sequence[Task]) -> list[Path]:
    return RunLayout(run_dir).adapters(init, [t.name for t in tasks])


# --------------------------------------------------------------------------- profile
def profile_tasks(model_path: str, tasks: Sequence[Task], target_modules: Sequence[str] | None,
                  settings: ProfileSettings, *, max_length: int, device: str | None, seed: int) -> StatsStore:
    """Activation statistics of every task's train split under the pre-trained model (what ``osrm-lora
    profile`` and the pipeline's profile stage compute). ``target_modules`` None or empty: the
    architecture's defaults. Sharded over the processes when there are several; the same store on all."""
    tokenizer = load_tokenizer(model_path)
    model = load_classifier(model_path, 2, device=select_device(device), pad_token_id=tokenizer.pad_token_id)
    targets = list(target_modules or []) or default_target_modules(cast("PreTrainedConfig", model.config).model_type)
    texts = {t.name: (list(t.train.texts), None if t.train.text_pairs is None else list(t.train.text_pairs)) for t in tasks}
    return collect_statistics(model, tokenizer, texts, targets, n_samples=settings.n_samples, max_length=max_length,
                              batch_size=settings.batch_size, include_padding=settings.include_padding,
                              dtype=torch.float64 if settings.dtype == "float64" else torch.float32, seed=seed)


def profile_stage(cfg: PipelineConfig, tasks: Sequence[Task], model_path: str, out: Path) -> None:
    """Collect the activation statistics of every task (train split) under the pre-trained model."""
    store = profile_tasks(model_path, tasks, cfg.lora.target_modules, cfg.profile, max_length=cfg.train.max_length,
                          device=cfg.device, seed=cfg.seed)
    if get_env().is_main:
        store.save(out)


def run_profile(ctx: RunContext, base_payload: dict[str, Any]) -> None:
    """The profile stage in the ledger (every process takes part); sets ``ctx.stats_hash``."""
    cfg = ctx.cfg
    stats_dir = ctx.layout.stats
    payload = {**base_payload, "profile": cfg.profile.model_dump(mode="json")}
    ctx.ledger.run_collective(PROFILE.name, PROFILE.id(), payload, [stats_dir],
                              lambda: profile_stage(cfg, ctx.tasks, ctx.model_path, stats_dir))
    ctx.stats_hash = dir_hash(stats_dir)


# --------------------------------------------------------------------------- OSRM init
def init_subspaces(cfg: PipelineConfig, init: InitSettings, tasks: Sequence[Task], stats_dir: Path) -> Subspaces:
    """OSRM bases per task per module for one init (empty dict for ``standard``).

    Rows are ordered best first, ``subspace_dim`` (default: the LoRA rank) rows per module.
    """
    if init.mode == "standard":
        return {}
    from osrm_lora.osrm import compute_osrm_A
    store = StatsStore.load(stats_dir)
    k = init.subspace_dim or cfg.lora.rank
    if k < cfg.lora.rank:
        raise ConfigError(f"init {init.name}: subspace_dim {k} is smaller than the LoRA rank {cfg.lora.rank}; "
                          "use subspace_dim >= rank")
    return compute_osrm_A(store, [t.name for t in tasks], k, init.mode, ridge=init.ridge,
                          device=select_device(cfg.device), solver=init.solver)


# --------------------------------------------------------------------------- train
@dataclass
class _Training:
    """The train stage's units: one ``train/<init>/<task>`` per adapter, with its stage inputs and the
    per-adapter arguments of :func:`osrm_lora.train.train_task` (the OSRM subspaces computed once per init)."""

    ctx: RunContext
    stats_dir: Path
    base_payload: dict[str, Any]
    mode: str  # "tasks" or "data" (see parallel_mode)
    subspaces: dict[str, Subspaces] = field(default_factory=dict)

    def __post_init__(self) -> None:
        train = self.ctx.cfg.train
        # `batched` enters the stage inputs only when set, so runs made before the setting existed stay finished
        self.train_payload = train.model_dump(mode="json", exclude=None if train.batched else {"batched"})

    def stage(self, init: InitSettings, task: Task) -> tuple[str, Path, dict[str, Any]]:
        """``(stage id, adapter directory, stage inputs)`` of one adapter."""
        ctx, cfg = self.ctx, self.ctx.cfg
        adir = ctx.layout.adapter(init.name, task.name)
        payload = {**self.base_payload, "task": ctx.fingerprints[task.name],
                   "init": init_payload(init),
                   "lora": cfg.lora.model_dump(mode="json"), "train": self.train_payload,
                   "stats": ctx.stats_hash if init.mode != "standard" or init.interference_penalty > 0 else None}
        return TRAIN.id(init.name, task.name), adir, payload

    def _subspaces(self, init: InitSettings) -> Subspaces:
        if init.mode != "standard" and init.name not in self.subspaces:
            cfg, tasks = self.ctx.cfg, self.ctx.tasks
            if self.mode == "data":  # every rank must train with the same subspace: rank 0's, broadcast
                self.subspaces[init.name] = from_rank0(lambda: {
                    t: {k: U.cpu() for k, U in b.items()}
                    for t, b in init_subspaces(cfg, init, tasks, self.stats_dir).items()})
            else:
                self.subspaces[init.name] = init_subspaces(cfg, init, tasks, self.stats_dir)
        return self.subspaces.get(init.name, {})

    def options(self, init: InitSettings, task: Task) -> dict[str, Any]:
        """The per-adapter arguments of train_task (and of a batched AdapterJob)."""
        basis = self._subspaces(init).get(task.name)
        rank, split = self.ctx.cfg.lora.rank, init.frozen_rank
        init_A = {k: U[:rank].contiguous() for k, U in basis.items()} if basis and not split else None
        frozen_rows = {k: U[:split].contiguous() for k, U in basis.items()} if basis and split else None
        grams = None
        if init.interference_penalty > 0:
            from osrm_lora.osrm import interference_grams

            grams = interference_grams(StatsStore.load(self.stats_dir), task.name, [t.name for t in self.ctx.tasks])
        return {"init_A": init_A, "freeze_A": init.freeze_A, "freeze_B": init.freeze_B, "init_name": init.name,
                "A_subspace": basis if init.subspace_dim else None, "b_sparsity": init.b_sparsity,
                "calibration_epochs": init.calibration_epochs, "interference_grams": grams,
                "interference_penalty": init.interference_penalty, "A_frozen_rows": frozen_rows}

    def job(self, item: tuple[InitSettings, Task]) -> None:
        """Train one adapter unless it is finished (with every process under ``parallel: data``)."""
        from osrm_lora.train import train_task

        init, task = item
        ctx, cfg = self.ctx, self.ctx.cfg
        stage_id, adir, payload = self.stage(init, task)

        def _do() -> None:
            train_task(task, adir, model=ctx.model_path, lora=cfg.lora, train=cfg.train, seed=cfg.seed,
                       device=cfg.device, data_parallel=self.mode == "data", **self.options(init, task))

        run = ctx.ledger.run_collective if self.mode == "data" else ctx.ledger.run
        run(TRAIN.name, stage_id, payload, [adir / ADAPTER_METRICS], _do)


def train_all(ctx: RunContext, stats_dir: Path, base_payload: dict[str, Any]) -> None:
    """Train every (init, task) adapter: in one process one after the other (or, with
    ``train.batched``, together in one pass); with several processes either spread over them
    (``parallel: tasks``; batched: each process trains its share together) or each with all of them
    (``parallel: data``, never batched)."""
    cfg = ctx.cfg
    env = get_env()
    mode = parallel_mode(cfg, len(ctx.tasks), env.world_size) if env.active else "tasks"
    training = _Training(ctx, stats_dir, base_payload, mode)
    jobs = [(init, task) for init in cfg.inits for task in ctx.tasks]
    if mode == "data":
        if cfg.train.batched:
            logger.warning("train.batched is ignored with parallel: data (each adapter trains with all processes)")
        for item in jobs:
            training.job(item)
    elif cfg.train.batched:
        train_batched(ctx, jobs, training.stage, training.options, training.job)
    else:
        run_jobs(jobs, training.job)


def train_batched(
    ctx: RunContext,
    jobs: Sequence[tuple[InitSettings, Task]],
    stage: Callable[[InitSettings, Task], tuple[str, Path, dict[str, Any]]],
    options: Callable[[InitSettings, Task], dict[str, Any]],
    solo: Callable[[tuple[InitSettings, Task]], None],
) -> None:
    """``train.batched``: this process's share of the (init, task) adapters that are not finished,
    trained together in one pass; each is recorded in the ledger (``train/<init>/<task>``, with its
    share of the pass's time) as soon as it is written. Adapters the batched path refuses
    (:class:`~osrm_lora.train_batched.BatchingUnsupported`) are trained one at a time instead."""
    error: BaseException | None = None
    try:
        pending = []
        for init, task in shard(jobs):
            stage_id, adir, payload = stage(init, task)
            if ctx.ledger.done(TRAIN.name, stage_id, payload, [adir / ADAPTER_METRICS]):
                ctx.ledger.skip(stage_id)
            else:
                pending.append((init, task, stage_id, adir, payload))
        if pending:
            _train_pending(ctx, pending, options, solo)
    except Exception as exc:  # every rank must learn of a failure, or the others wait forever
        error = exc
    raise_if_any_failed(error)
    barrier()


def _train_pending(ctx: RunContext, pending: Sequence[tuple[InitSettings, Task, str, Path, dict[str, Any]]],
                   options: Callable[[InitSettings, Task], dict[str, Any]],
                   solo: Callable[[tuple[InitSettings, Task]], None]) -> None:
    """Train the unfinished adapters of :func:`train_batched` in one pass (one at a time if refused)."""
    from osrm_lora.train import TrainResult
    from osrm_lora.train_batched import AdapterJob, BatchingUnsupported, train_tasks_batched

    cfg = ctx.cfg
    specs = [AdapterJob(task, adir, seed=cfg.seed, train=cfg.train, **options(init, task))
             for init, task, _, adir, _ in pending]

    def record(index: int, result: TrainResult) -> None:
        _, _, stage_id, _, payload = pending[index]
        ctx.ledger.finish(TRAIN.name, stage_id, payload, result.seconds)

    try:
        train_tasks_batched(specs, model=ctx.model_path, lora=cfg.lora, train=cfg.train, device=cfg.device,
                            on_result=record)
    except BatchingUnsupported as exc:
        logger.warning("train.batched: %s; training these %d adapters one at a time", exc, len(pending))
        for init, task, *_ in pending:
            solo((init, task))


# --------------------------------------------------------------------------- diagnose
def diagnose_init(ctx: RunContext, init: InitSettings, stats_dir: Path) -> None:
    """The diagnose stage for one init (``diagnose/<init>``): interference of its adapters."""
    from osrm_lora.diagnose import run_diagnose

    out = ctx.layout.diagnostics(init.name)
    dirs = ctx.adapter_dirs(init.name)
    payload = {"adapters": ctx.adapter_hashes[init.name], "stats": ctx.stats_hash}
    ctx.ledger.run(DIAGNOSE.name, DIAGNOSE.id(init.name), payload, [out / INTERFERENCE],
                   lambda: run_diagnose([str(d) for d in dirs], str(stats_dir), str(out)))
