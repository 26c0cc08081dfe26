"""Validated configuration (pydantic): stage settings and the pipeline config read from YAML.

Unknown keys and out-of-range values are errors (``extra="forbid"`` everywhere).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from osrm_lora.constraints import Constraint
from osrm_lora.data.spec import TaskSpec
from osrm_lora.data.suites import load_suite
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.merge.registry import get_method, list_methods, resolve_params
from osrm_lora.osrm import INIT_MODES, OSRM_MODES, InitMode

DEFAULT_LAMBDAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.5)
ALL_LINEAR: tuple[str, ...] = ("query", "key", "value", "intermediate.dense", "output.dense")
"""LoRA targets for every linear layer of a BERT-style encoder block (MiniLM, BERT): names match as
suffixes, as in PEFT (``name == t`` or ``name.endswith("." + t)``), so ``output.dense`` covers both
``attention.output.dense`` and the feed-forward ``output.dense``: 6 modules per layer. The regime
where merging hurts (``bench/quality.py --preset gpu-hard``, the demo)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def setting_default(model: type[Any], name: str) -> Any:
    """The default of setting ``name`` of a settings model (pydantic) or settings dataclass, a fresh
    value for a ``default_factory``: what a command-line option for that setting defaults to, so a
    stage command run alone does what the pipeline's stage does (tests/test_cli_defaults.py)."""
    if issubclass(model, BaseModel):
        if name not in model.model_fields:
            raise KeyError(f"{model.__name__} has no setting {name!r}")
        return model.model_fields[name].get_default(call_default_factory=True)
    for f in dataclasses.fields(model):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{model.__name__}.{name} has no default")
    raise KeyError(f"{model.__name__} has no setting {name!r}")


def setting_help(model: type[Any], name: str) -> str:
    """The one-line description of setting ``name`` (``Field(description=...)``, or a dataclass
    field's ``metadata["description"]``): the help text of the command-line option for it."""
    if issubclass(model, BaseModel):
        if name not in model.model_fields:
            raise KeyError(f"{model.__name__} has no setting {name!r}")
        text = model.model_fields[name].description
    else:
        found = [f for f in dataclasses.fields(model) if f.name == name]
        if not found:
            raise KeyError(f"{model.__name__} has no setting {name!r}")
        text = found[0].metadata.get("description")
    if not text:
        raise KeyError(f"{model.__name__}.{name} has no description; give it one (Field(description=...))")
    return str(text)


# ---------------------------------------------------------------------------------------------- merge searches
# The settings of Reinforced Model Merging (osrm_lora.rmm) and of the multi-fidelity merge search
# (osrm_lora.search), defined here once: those modules, their commands and the pipeline's merge.rmm /
# merge.search sections all use them.
RMM_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties")
"""The merged candidates of RMM besides each task's own adapter (``osrm-lora rmm --methods``)."""
SEARCH_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "tsv_m")
"""The merge methods a layer group of the merge search can get (``osrm-lora search --methods``)."""
SearchObjective = Literal["mean", "pareto"]
SearchSampler = Literal["tpe", "nsga2", "random"]
SearchPruner = Literal["hyperband", "successive_halving", "none"]


@dataclass(frozen=True)
class PPOSettings:
    """PPO hyperparameters of RMM's agent; the defaults are the paper's / reference code's."""

    epochs: int = 40
    clip: float = 0.2
    gamma: float = 0.99
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    update_every: int = 4
    hidden: int = 64
    value_coef: float = 0.5
    entropy_coef: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("epochs", "update_every", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OsrmError(f"PPO setting {name} must be an integer >= 1, got {v!r}")
        for name in ("lr_actor", "lr_critic"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise OsrmError(f"PPO setting {name} must be a positive number, got {v!r}")
        if not (0 < self.clip < 1):
            raise OsrmError(f"PPO setting clip must lie in (0, 1), got {self.clip!r}")
        if not (0 <= self.gamma <= 1):
            raise OsrmError(f"PPO setting gamma must lie in [0, 1], got {self.gamma!r}")
        for name in ("value_coef", "entropy_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise OsrmError(f"PPO setting {name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class SearchBudget:
    """When the merge search stops: ``evaluations`` (full-validation evaluations: a fidelity with a
    fraction f of the examples costs f), ``seconds`` (summed trial time) and ``trials`` (finished
    trials), each counted over the whole study, resumed runs included; None = no limit of that kind
    (one must be set)."""

    evaluations: float | None = dataclasses.field(default=20.0, metadata={
        "description": "Budget in full-validation evaluations (default 20 unless seconds or trials is given)."})
    seconds: float | None = dataclasses.field(default=None, metadata={"description": "Budget in seconds of trials."})
    trials: int | None = dataclasses.field(default=None, metadata={"description": "Budget in trials."})

    def __post_init__(self) -> None:
        if self.evaluations is None and self.seconds is None and self.trials is None:
            raise OsrmError("the search needs a budget: evaluations (--budget), seconds or trials; set one of them")
        for name, v in (("evaluations", self.evaluations), ("seconds", self.seconds), ("trials", self.trials)):
            if v is not None and (isinstance(v, bool) or not math.isfinite(float(v)) or v <= 0):
                raise OsrmError(f"budget {name} must be a positive number, got {v!r}")


def searchable_methods() -> list[str]:
    """Registered methods that merge into one shared model without task data (what RMM's candidates
    and the merge search's layer groups can use)."""
    return [m.name for m in list_methods() if not m.per_task and not m.needs]


def check_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` without repeats; OsrmError naming a method that is unknown, deploys one model per
    task or needs task data (neither can be searched)."""
    if not methods:
        raise OsrmError(f"no merge methods to search; pass some of {', '.join(searchable_methods())}")
    out: list[str] = []
    for name in methods:
        info = get_method(name)
        if info.per_task or info.needs:
            why = "deploys one model per task" if info.per_task else f"needs {', '.join(sorted(info.needs))}"
            raise OsrmError(f"method {name} cannot be searched ({why}); choose among {', '.join(searchable_methods())}")
        if name not in out:
            out.append(name)
    return out


def _as_value_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Run pydantic's validation of a settings dataclass, its OsrmError (from ``__post_init__``) as a
    ValueError, so the config error names the key."""
    try:
        return handler(value)
    except OsrmError as exc:
        raise ValueError(str(exc)) from None


class RMMSettings(_Strict):
    """``merge.rmm``: Reinforced Model Merging in the merge stage, once per init over that init's
    adapters (:func:`osrm_lora.rmm.rmm_search`, whose keyword arguments these are; docs/SEARCH.md).
    Rewards and the choice use the validation splits only; ``merge.constraints`` apply."""

    methods: list[str] = Field(default_factory=lambda: list(RMM_METHODS), description=(
        "Merge methods whose merges are candidates besides each task's adapter ('' = adapters only)."))
    """The merged candidates besides each task's own adapter ([] = the adapters only)."""
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Parameters of the candidate methods (``{ties: {density: 0.3}}``); defaults otherwise."""
    episodes: int = Field(300, gt=0, description="Most episodes (each builds one architecture layer by layer).")
    budget: int = Field(200, gt=0, description=(
        "Most merged-model evaluations on validation (subset rewards + the final re-scoring)."))
    """Most merged-model evaluations on validation: one per completed episode (on subsets) plus the
    final re-scoring of ``rescore`` architectures on the whole split, which is reserved from it."""
    subset_size: int = Field(32, gt=0, description="Validation examples per task behind each reward.")
    """Validation examples per task behind each reward."""
    rescore: int = Field(3, gt=0, description=(
        "Architectures re-scored on the whole validation split at the end (from the budget)."))
    penalty: float = Field(1.0, ge=0, description="Reward penalty per score point a constraint falls short.")
    """Reward points lost per score point a constraint falls short."""
    max_steps: int | None = Field(None, gt=0)
    """Most steps per episode (None: 4 x the number of layers)."""
    seed: int | None = None
    """None: the run's seed."""
    ppo: PPOSettings = Field(default_factory=PPOSettings, description=(
        "The agent's PPO settings (epochs, clip, gamma, lr_actor, lr_critic, update_every, hidden, value_coef, "
        "entropy_coef); defaults: the paper's."))

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value:
            return []
        try:
            return check_methods(value)
        except OsrmError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("ppo", mode="wrap")
    @classmethod
    def _ppo(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _as_value_error(value, handler)

    @model_validator(mode="after")
    def _check(self) -> RMMSettings:
        for method in self.params:
            if method not in self.methods:
                raise ValueError(f"params given for {method}, which is not a candidate method "
                                 f"({', '.join(self.methods) or 'none'}); add it to methods or drop its params")
        if self.budget <= self.rescore:
            raise ValueError(f"the evaluation budget ({self.budget}) must exceed the {self.rescore} final "
                             "re-scoring(s) on the whole validation split it reserves; raise budget or lower rescore")
        return self

    def search_kwargs(self, run_seed: int) -> dict[str, Any]:
        """The keyword arguments of :func:`osrm_lora.rmm.rmm_search` (the seed resolved)."""
        return {"methods": list(self.methods), "params": {m: dict(p) for m, p in self.params.items()},
                "episodes": self.episodes, "budget": self.budget, "subset_size": self.subset_size,
                "rescore": self.rescore, "penalty": self.penalty, "max_steps": self.max_steps,
                "seed": run_seed if self.seed is None else self.seed, "ppo": self.ppo}


class SearchSettings(_Strict):
    """``merge.search``: the multi-fidelity merge search in the merge stage, once per init over that
    init's adapters (:func:`osrm_lora.search.search_merge`, whose keyword arguments these are;
    docs/SEARCH.md). Trials and the choice use the validation splits only (low fidelities: random
    validation subsets); ``merge.constraints`` apply."""

    methods: list[str] = Field(default_factory=lambda: list(SEARCH_METHODS),
                               description="Merge methods a layer group can get.")
    n_groups: int | None = Field(4, gt=0, description="Layer groups of contiguous layers, each with its own method.")
    """Layer groups of contiguous layers, each with its own method (None: one per layer)."""
    masks: bool = Field(True, description="Also search, per layer group, which adapters take part.")
    """Also search, per layer group, which adapters take part."""
    scaling_range: tuple[float, float] = Field((0.1, 1.5), description="LOW,HIGH of every group's lambda.")
    objective: SearchObjective = Field("mean", description=(
        "mean (mean validation score) or pareto (one objective per task)."))
    """``mean`` (one objective: the mean validation score) or ``pareto`` (one objective per task)."""
    sampler: SearchSampler = Field("tpe", description=f"{', '.join(get_args(SearchSampler)[:-1])} or "
                                                      f"{get_args(SearchSampler)[-1]}.")
    pruner: SearchPruner = Field("hyperband", description=f"{', '.join(get_args(SearchPruner)[:-1])} or "
                                                          f"{get_args(SearchPruner)[-1]}.")
    rungs: int = Field(3, ge=1, description="Fidelities: validation fractions eta^-(rungs-1) .. 1/eta, 1.")
    """Fidelities: validation fractions eta^-(rungs-1), ..., 1/eta, 1."""
    eta: int = Field(3, ge=2, description="Reduction factor between fidelities.")
    min_examples: int = Field(8, ge=1, description="Smallest validation subset per task.")
    """Smallest validation subset per task."""
    budget: SearchBudget = SearchBudget()
    """``{evaluations, seconds, trials}``; evaluations defaults to 20 unless seconds or trials is given."""
    seed: int | None = None
    """None: the run's seed."""
    population: int | None = Field(None, gt=1)
    """NSGA-II population (None: 20)."""

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        try:
            return check_methods(value)
        except OsrmError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("scaling_range")
    @classmethod
    def _scaling_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise ValueError(f"the scaling range must be two numbers 0 <= low < high, got [{lo:g}, {hi:g}]")
        return value

    @field_validator("budget", mode="wrap")
    @classmethod
    def _budget(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, Mapping) and "evaluations" not in value and (
                value.get("seconds") is not None or value.get("trials") is not None):
            value = {**value, "evaluations": None}  # as the command: the default 20 only without another limit
        return _as_value_error(value, handler)

    def search_kwargs(self, run_seed: int) -> dict[str, Any]:
        """The keyword arguments of :func:`osrm_lora.search.search_merge` (the seed resolved)."""
        return {"methods": list(self.methods), "n_groups": self.n_groups, "masks": self.masks,
                "scaling_range": tuple(self.scaling_range), "objective": self.objective, "sampler": self.sampler,
                "pruner": self.pruner, "rungs": self.rungs, "eta": self.eta, "min_examples": self.min_examples,
                "budget": self.budget, "seed": run_seed if self.seed is None else self.seed,
                "population": self.population}


MERGE_SEARCHES: tuple[str, ...] = ("rmm", "search")
"""The merge searches the merge stage can run after the lambda sweeps (``merge.rmm``, ``merge.search``);
their records in results.json carry these method names."""


class LoraSettings(_Strict):
    """LoRA shape. ``target_modules=None`` resolves per architecture (query/value)."""

    rank: int = Field(8, gt=0, le=4096, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(None, description=(
        "Module names to adapt, matched as suffixes as in PEFT (default per architecture)."))


class TrainSettings(_Strict):
    """Fine-tuning hyperparameters (AdamW, linear schedule with warmup, grad clipping)."""

    epochs: int = Field(3, gt=0, le=1000, description="Training epochs (the best on validation is kept).")
    batch_size: int = Field(32, gt=0, description="Training batch (the global batch with several processes).")
    lr: float = Field(5e-4, gt=0, lt=1, description="Learning rate (AdamW).")
    head_lr: float | None = Field(None, gt=0, lt=1, description=(
        "Learning rate of the head (classifier and pooler); default: the same as lr."))
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description=(
        "Share of the training steps over which the learning rate warms up linearly."))
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping: largest norm of the gradients of all trained parameters.")
    eval_batch_size: int = Field(128, gt=0, description="Batch size of evaluation (validation, test, merged models).")
    max_length: int = Field(128, gt=1, le=65536, description="Token limit (longer inputs are truncated).")
    train_pooler: bool = Field(True, description=(
        "Train the pooler with the classifier, where the architecture has one (off: the classifier only)."))
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "Under torchrun: ddp (a model copy per process) or fsdp (sharded)."))
    """With several processes training one adapter: ``ddp`` keeps a full model copy per process;
    ``fsdp`` shards the (frozen) base weights, the LoRA factors and the head over the processes
    (torch FSDP2, one unit per transformer block), for bases too large for one device."""
    batched: bool = False
    """Train the (init x task) adapters of a run together in one pass over one shared frozen base
    (:func:`osrm_lora.train_batched.train_tasks_batched`): each batch concatenates examples of
    several adapters, each routed through its own LoRA factors and head; every adapter keeps its own
    optimizer, data order, clipping and best epoch, and is written exactly as when trained alone
    (same numbers up to float rounding; dropout draws other masks). Ignored with ``parallel: data``
    and for layouts the batched path refuses: those adapters are trained one at a time."""


class InitSettings(_Strict):
    """One initialisation to compare: a named OSRM mode (or ``standard``) plus freezing options."""

    name: str
    mode: InitMode = Field("standard", description=f"{', '.join(INIT_MODES[:-1])} or {INIT_MODES[-1]}.")
    freeze_A: bool = Field(False, description="Keep A fixed (OSRM subspace).")
    freeze_B: bool = Field(False, description="Keep B fixed.")
    ridge: float = Field(1e-3, gt=0, description="Ridge of the own mode (eps = ridge * trace(S_others) / n).")
    solver: Literal["eigh", "subset"] = "eigh"
    """OSRM eigensolver: ``eigh`` (exact, batched over modules and tasks) or ``subset`` (only the r
    needed eigenvectors by filtered subspace iteration, each checked by a residual bound on its
    principal angles and redone with ``eigh`` when the bound exceeds 1e-6 rad; faster for large
    hidden sizes). See docs/METHOD.md."""
    subspace_dim: int | None = Field(None, gt=0)
    """OSRM subspace of dimension k >= rank: A starts as its best r directions and is projected
    back onto it after every optimizer step (between frozen A, k = rank, and free A)."""
    b_sparsity: float | None = Field(None, gt=0, lt=1)
    """LoRI (Zhang et al. 2025, arXiv 2504.07448): train B under a fixed sparse mask that keeps the
    ``1 - b_sparsity`` share of B's entries of largest magnitude over all modules together (LoRI
    uses 0.9 with a frozen random A: ``mode: standard, freeze_A: true``). The mask comes from a
    calibration pass of ``calibration_epochs`` of dense training; the adapter and head are then reset
    to their initial values and trained with the mask from the start."""
    calibration_epochs: int = Field(1, gt=0, le=1000)
    interference_penalty: float = Field(0.0, ge=0)
    """Weight of the interference penalty added to the training loss: the output shift the adapter
    causes on the OTHER tasks' inputs over the shift on its own task's inputs,
    ``sum_m tr(B A S_others A^T B^T) / sum_m tr(B A S_own A^T B^T)`` over the LoRA modules m, with the
    second moments S from the run's activation statistics (S_others: mean over the other tasks).
    0 trains without it."""
    frozen_rank: int | None = Field(None, gt=0)
    """A rank split between a frozen OSRM part and a free part: the first ``frozen_rank`` rows of A
    are the mode's best OSRM directions and stay fixed; the other ``rank - frozen_rank`` rows start
    as standard LoRA's random A and train (with B). Needs an OSRM mode and 0 < frozen_rank < rank;
    not with freeze_A or subspace_dim. Trained one adapter at a time (``train.batched`` falls back)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("init names may contain letters, digits, '_', '.', '-' only")
        return value

    @model_validator(mode="after")
    def _not_both_frozen(self) -> InitSettings:
        if self.freeze_A and self.freeze_B:
            raise ValueError("freeze_A and freeze_B together leave nothing to train")
        if self.subspace_dim is not None and self.mode == "standard":
            raise ValueError(f"subspace_dim needs an OSRM mode ({', '.join(OSRM_MODES[:-1])} or {OSRM_MODES[-1]}), not standard")
        if self.b_sparsity is not None and self.freeze_B:
            raise ValueError("b_sparsity masks B, so B must be trainable; drop freeze_B")
        if self.frozen_rank is not None:
            if self.mode == "standard":
                raise ValueError(f"frozen_rank needs an OSRM mode ({', '.join(OSRM_MODES[:-1])} or "
                                 f"{OSRM_MODES[-1]}), not standard")
            if self.freeze_A or self.subspace_dim is not None:
                raise ValueError("frozen_rank freezes part of A: drop freeze_A (all of A frozen) or subspace_dim")
        return self


class ProfileSettings(_Strict):
    """Activation statistics: samples per task, padding rule, precision."""

    n_samples: int = Field(100, gt=0, description="Training examples per task (a seeded sample).")
    batch_size: int = Field(16, gt=0, description="Batch size of the statistics pass.")
    include_padding: bool = Field(False, description="Count padding tokens (as the reference code).")
    dtype: Literal["float32", "float64"] = Field("float32", description="Accumulate in float32 or float64.")


class MergeSettings(_Strict):
    """Merging: methods, lambda grid (chosen on validation), fixed per-method parameters."""

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "emr"])
    """Default: Task Arithmetic (with the default inits, OSRM own + frozen A + TA is within 0.02
    validation points of the configuration ``bench/quality.py --preset gpu-hard`` picks, own + TIES,
    3 seeds; the top ten lie within validation noise), and EMR as the per-task reference: EMR deploys one masked, rescaled model per task, so it needs the task id at
    inference."""
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    """The lambda grid: the merge is redone at every lambda (its ``scaling``) and the lambda with the
    best average validation score is kept."""
    device: Literal["auto", "cpu"] = "auto"
    """Where merges run: ``auto`` = on the run's device (the GPU when the run has one; dense methods
    hold one module's stacked task deltas at a time there), ``cpu`` = always on the CPU (to leave GPU
    memory to other work). Results agree to float32 rounding; DARE's random masks differ by device."""
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Fixed parameters per method (names and ranges as in ``osrm-lora merge --list``), checked when
    the config is loaded. A ``scaling`` given here is used as is: that method is merged at that
    scaling only, with no lambda sweep (the other methods still sweep ``lambdas``)."""

    constraints: list[str] = Field(default_factory=list, description=(
        "TASK>=FLOOR or TASK>=single-TOL: a floor on a task's validation score."))
    """Tasks whose validation score must not drop: ``TASK>=FLOOR`` (score points) or
    ``TASK>=single-TOL`` (its own adapter's validation score minus TOL). Every method's lambda is then
    chosen on validation among the lambdas that meet them (the best overall when none does, with a
    warning), each merge records whether its constraints hold, and AdaMerging adds a penalty on the
    constraint tasks' validation loss to its objective (its ``constraint_weight``). RMM and the merge
    search penalise and exclude architectures / trials that miss them."""
    rmm: RMMSettings | None = None
    """Reinforced Model Merging per init after the lambda sweeps (absent: not run); results.json
    method ``rmm``, outputs in ``merges/<init>/rmm/``."""
    search: SearchSettings | None = None
    """The multi-fidelity merge search per init after the lambda sweeps (absent: not run);
    results.json method ``search``, outputs in ``merges/<init>/search/``."""

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        try:
            return [Constraint.parse(v).text() for v in value]
        except OsrmError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("the lambda grid is empty")
        if any(v < 0 for v in value):
            raise ValueError("lambdas must be >= 0")
        return sorted(set(value))


class PipelineConfig(_Strict):
    """Everything ``osrm-lora run`` needs. ``suite`` or ``tasks`` (or both: tasks are appended)."""

    name: str = "run"
    model: str = Field("default", description="HF model id or directory; 'default' = embedded MiniLM-L6.")
    suite: str | None = None
    tasks: list[str | TaskSpec] = Field(default_factory=list)
    seed: int = Field(0, description="Random seed (data order, sampled examples, initialisation).")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    inits: list[InitSettings] = Field(
        default_factory=lambda: [InitSettings(name="standard"),
                                 InitSettings(name="osrm-own-frozenA", mode="own", freeze_A=True)]
    )
    """Default: the standard baseline and OSRM ``own`` with A frozen, the init of the shared-model
    configuration chosen on validation by ``bench/quality.py --preset gpu-hard`` (all linear layers,
    r=16, 3 seeds; see BENCHMARKS.md). In the query/value regime (``--preset gpu``) ``code`` and
    ``own`` did as well within seed noise."""
    profile: ProfileSettings = ProfileSettings()
    merge: MergeSettings = MergeSettings()
    diagnose: bool = True
    parallel: Literal["auto", "tasks", "data"] = "auto"
    """With several processes (``torchrun`` / ``accelerate launch``): ``tasks`` trains different
    adapters in different processes at once, ``data`` trains each adapter with all processes
    (DDP, ``train.batch_size`` is the global batch), ``auto`` picks ``tasks`` when there are at least
    as many tasks as processes. Profiling is always sharded; merges and diagnostics are spread over
    the processes. Ignored in a single process."""

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_entries(cls, value: Any) -> Any:
        """Validate mapping entries as :class:`TaskSpec` here, so an error names the task and the key
        (not the ``str`` branch of the union)."""
        if not isinstance(value, list):
            return value
        return [_task_entry(i, item) for i, item in enumerate(value)]

    @field_validator("inits", mode="before")
    @classmethod
    def _inits_from_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            out = []
            for item in value:
                if isinstance(item, str):
                    out.append({"name": item if item == "standard" else f"osrm-{item}", "mode": item})
                else:
                    out.append(item)
            return out
        return value

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.suite and not self.tasks:
            raise ValueError("name a suite or list tasks")
        names = [i.name for i in self.inits]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate init names {names}")
        if not self.inits:
            raise ValueError("list at least one init")
        for init in self.inits:
            if init.frozen_rank is not None and init.frozen_rank >= self.lora.rank:
                raise ValueError(f"init {init.name}: frozen_rank {init.frozen_rank} leaves no free rows of the LoRA "
                                 f"rank {self.lora.rank}; use 0 < frozen_rank < rank")
        check_merge_settings(self.merge, _task_count(self))
        return self


TASK_KEYS: tuple[str, ...] = tuple(TaskSpec.model_fields)
PATH_KEYS: tuple[str, ...] = ("path", "train_file", "validation_file", "test_file")
"""Task keys holding file paths; relative ones are resolved against the config file's directory."""


def _task_entry(index: int, item: Any) -> Any:
    """One entry of ``tasks``: a name stays a name; a mapping becomes a :class:`TaskSpec` or a
    ValueError naming the task, the problem and (for unknown keys) the allowed keys."""
    if isinstance(item, (str, TaskSpec)):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"task {index} must be a task name or a mapping of task keys, got {type(item).__name__}")
    label = f"task {index} ({item['name']!r})" if isinstance(item.get("name"), str) else f"task {index}"
    unknown = [str(k) for k in item if k not in TASK_KEYS]
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(TASK_KEYS)}")
    try:
        return TaskSpec.model_validate(dict(item))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ValueError(f"{label}: {where + ': ' if where else ''}{msg}") from None


def _task_count(cfg: PipelineConfig) -> int:
    """Number of adapters a merge will see: the suite's tasks plus the listed ones."""
    try:
        suite = len(load_suite(cfg.suite)) if cfg.suite else 0
    except OsrmError as exc:
        raise ValueError(str(exc)) from None
    return suite + len(cfg.tasks)


def check_merge_settings(merge: MergeSettings, n_tasks: int) -> None:
    """Every method and every ``merge.params`` entry against the merge registry (names, types, ranges,
    one value per task for list parameters); ValueError with the registry's one-line message."""
    try:
        for method in merge.params:
            get_method(method)  # a typo in merge.params is an error, not silently ignored
        for method in merge.methods:
            resolve_params(get_method(method), merge.params.get(method, {}), n_tasks)
    except OsrmError as exc:
        raise ValueError(f"merge: {exc}") from None
    dups = sorted({m for m in merge.methods if merge.methods.count(m) > 1})
    if dups:
        raise ValueError(f"merge: methods {dups} are listed twice; list each method once")
    if merge.rmm is not None:
        try:
            for method, params in merge.rmm.params.items():
                resolve_params(get_method(method), params, n_tasks)
        except OsrmError as exc:
            raise ValueError(f"merge.rmm.params: {exc}") from None
    if merge.search is not None and merge.search.objective == "pareto" and n_tasks < 2:
        raise ValueError("merge.search: a Pareto search needs at least two tasks; use objective: mean")


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "unknown key"
    extra = f" ({len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{source}: {where}{msg}{extra}; fix the config (see configs/*.yaml for examples)"


def resolve_task_paths(data: Mapping[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """A copy of a raw config whose relative task file paths (:data:`PATH_KEYS`) are made absolute
    against ``base_dir`` (the config file's directory); absolute and ``~`` paths are kept."""
    out = dict(data)
    tasks = out.get("tasks")
    if isinstance(tasks, list):
        out["tasks"] = [_resolve_entry_paths(t, Path(base_dir)) if isinstance(t, Mapping) else t for t in tasks]
    return out


def _resolve_entry_paths(entry: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    out = dict(entry)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not value.startswith("~") and not os.path.isabs(value):
            out[key] = os.path.normpath(os.path.join(base_dir.absolute(), value))
    return out


def parse_config(data: Any, source: str = "config", base_dir: str | Path | None = None) -> PipelineConfig:
    """Validate a mapping as a :class:`PipelineConfig` (ConfigError with a one-line message).

    With ``base_dir``, relative task file paths are resolved against it (see :func:`resolve_task_paths`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values; fix the config")
    if base_dir is not None:
        data = resolve_task_paths(data, base_dir)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a YAML pipeline config. Relative task file paths (``path``, ``train_file``,
    ``validation_file``, ``test_file``) are relative to the config file's directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    return parse_config(data, source=str(path), base_dir=path.parent)


def config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    """JSON/YAML-ready dict of a config (for manifests and hashing). Absent merge searches
    (``merge.rmm``, ``merge.search``) are left out, so configs without them hash as before they existed."""
    data = cfg.model_dump(mode="json")
    for key in MERGE_SEARCHES:
        if data["merge"].get(key) is None:
            data["merge"].pop(key, None)
    return data
