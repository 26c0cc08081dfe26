"""The merge engine's types: method parameters, the context of data-aware methods, the result, and
the method table that :func:`register_method` fills.

A leaf of the merge package: the method modules import it, and :mod:`osrm_lora.merge.registry`
(which imports the method modules to register them) builds on it, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from osrm_lora.adapters import LoraAdapter
from osrm_lora.errors import OsrmError

PARAM_TYPES = ("float", "int", "bool", "str", "floats")


@dataclass(frozen=True)
class Param:
    """A typed method parameter with a default and a valid range.

    ``low``/``high`` bound numeric values (``low_open``/``high_open`` make the bound exclusive);
    ``choices`` restricts strings; type ``floats`` is a list of floats (e.g. per-adapter weights)
    whose length must equal the number of adapters; ``None`` is allowed as its default.
    """

    name: str
    type: str
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def range_text(self) -> str:
        if self.choices:
            return "{" + "|".join(self.choices) + "}"
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        lb = "(" if (self.low_open or self.low is None) else "["
        hb = ")" if (self.high_open or self.high is None) else "]"
        return f"{lb}{lo},{hi}{hb}"

    def parse(self, text: str) -> Any:
        """Parse a CLI string into this parameter's type (validated by :meth:`validate`)."""
        t = text.strip()
        try:
            if self.type == "float":
                return float(t)
            if self.type == "int":
                return int(t)
            if self.type == "bool":
                low = t.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(t)
            if self.type == "floats":
                return [float(x) for x in t.replace(";", ",").split(",") if x.strip()]
            return t
        except ValueError as exc:
            raise OsrmError(f"parameter {self.name}={text!r} is not a valid {self.type}; pass e.g. "
                            f"{self.name}={self.default if self.default is not None else '1.0,1.0'}") from exc

    def validate(self, value: Any, method: str, n_adapters: int) -> Any:
        """Return ``value`` coerced to the parameter type; OsrmError when out of range."""
        where = f"method {method}: parameter {self.name}"
        if self.type == "floats":
            if value is None:
                return None
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise OsrmError(f"{where} must be a list of {n_adapters} numbers; pass e.g. weights=[1.0, ...]")
            vals = [float(v) for v in value]
            if len(vals) != n_adapters:
                raise OsrmError(f"{where} has {len(vals)} values but {n_adapters} adapters are merged; "
                                "give one value per adapter")
            if not all(math.isfinite(v) for v in vals):
                raise OsrmError(f"{where} contains NaN/Inf; pass finite numbers")
            return vals
        if self.type == "bool":
            if not isinstance(value, bool):
                raise OsrmError(f"{where} must be true or false, got {value!r}")
            return value
        if self.type == "str":
            if not isinstance(value, str):
                raise OsrmError(f"{where} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise OsrmError(f"{where}={value!r} is not valid; choose one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OsrmError(f"{where} must be a number, got {value!r}")
        if self.type == "int":
            if float(value) != int(value):
                raise OsrmError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            raise OsrmError(f"{where} must be finite, got {value!r}")
        bad = (self.low is not None and (value < self.low or (self.low_open and value == self.low))) or (
            self.high is not None and (value > self.high or (self.high_open and value == self.high)))
        if bad:
            raise OsrmError(f"{where}={value!r} is out of range; it must lie in {self.range_text()}")
        return value


@dataclass
class MergeContext:
    """Optional inputs of data-aware methods.

    - ``grams``: per task, module key -> input Gram matrix / second moment (n x n) (regmean).
    - ``fisher``: per task, param name -> diagonal Fisher. Names are ``"<module>"`` (dense, m x n,
      same shape as the delta) or ``"<module>.lora_A"`` / ``"<module>.lora_B"`` (factor shapes) (fisher).
    - ``entropy_fn``: for adamerging. Contract: ``entropy_fn(deltas) -> torch.Tensor`` (0-dim) where
      ``deltas`` maps every module key to the merged dense delta (m x n, (out, in) orientation,
      differentiable w.r.t. the merging coefficients); the function must run the model with
      ``W0 + delta`` (e.g. ``torch.func.functional_call``) on a batch of *unlabeled* inputs of the
      tasks and return the mean prediction entropy (summed or averaged over tasks). It is called once
      per optimisation step and must not detach the deltas.
    - ``constraint_fn``: for adamerging, optional. Same call contract as ``entropy_fn``; returns a
      differentiable penalty >= 0 that is 0 while the constraint tasks are served as well as by their
      own adapters (:func:`osrm_lora.merge_inputs.constraint_function`), added to the loss with the
      method's ``constraint_weight``.
    - ``seed``: seed of random methods (DARE) unless the method's own ``seed`` parameter is given.

    Fields for merging a model a few modules at a time (:mod:`osrm_lora.merge.stream`), where the
    adapters passed to a method hold only some of the modules:

    - ``task_thresholds``: per task, the magnitude threshold of a task-wide top-``density`` trim
      (``threshold="task"``), computed beforehand over all modules; used instead of the threshold
      over the modules at hand.
    - ``task_rescalers``: per task, EMR's task-wide rescaler (``rescale="task"``), computed beforehand.
    - ``per_module_seed``: DARE draws each module's masks from a generator seeded with
      ``module_seed(seed, key)`` (so they do not depend on which other modules are merged in the
      same call) instead of one generator run over all modules in sorted order (PEFT parity).
    - ``streaming``: the adapters are a subset of the modules; a method that needs a task-wide
      statistic that was not given raises instead of computing it over the subset.
    - ``magnitude_probe``: pre-pass hook. When set, a task-wide magnitude trim hands every tensor
      it would trim to ``magnitude_probe(task, tensor)`` and merges nothing (all-zero result).
    """

    grams: list[dict[str, torch.Tensor]] | None = None
    fisher: list[dict[str, torch.Tensor]] | None = None
    entropy_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    constraint_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    seed: int = 0
    task_thresholds: list[float] | None = None
    task_rescalers: list[float] | None = None
    per_module_seed: bool = False
    streaming: bool = False
    magnitude_probe: Callable[[int, torch.Tensor], None] | None = None

    def to(self, device: torch.device | str) -> MergeContext:
        """A copy with the Gram and Fisher tensors on ``device`` (the callables are kept as they are)."""
        return dataclasses.replace(
            self,
            grams=None if self.grams is None else [_dict_to(g, device) for g in self.grams],
            fisher=None if self.fisher is None else [_dict_to(f, device) for f in self.fisher],
        )


def _dict_to(tensors: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


@dataclass
class MergeResult:
    """Result of a merge: factor form (``adapter``), dense deltas, or per-task dense deltas."""

    method: str
    params: dict[str, Any]
    adapter: LoraAdapter | None = None
    deltas: dict[str, torch.Tensor] | None = None
    per_task_deltas: list[dict[str, torch.Tensor]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # PEFT config template of the merged adapter (set by merge())
    source_ranks: dict[str, int] = field(default_factory=dict)  # module -> sum of input ranks (set by merge())
    task_names: list[str] = field(default_factory=list)
    # per input adapter: its config and non-LoRA tensors (biases, heads), no modules (set by merge())
    inputs: list[LoraAdapter] = field(default_factory=list)

    @property
    def module_keys(self) -> list[str]:
        if self.adapter is not None:
            return list(self.adapter.modules)
        if self.deltas is not None:
            return list(self.deltas)
        if self.per_task_deltas:
            return list(self.per_task_deltas[0])
        return []

    def deltas_for(self, task_index: int | None = None) -> dict[str, torch.Tensor]:
        """Dense deltas (m x n, (out, in) orientation, scaling included) to add to the base weights
        when evaluating task ``task_index``. Shared-model results ignore ``task_index``; per-task
        results (emr) require it."""
        if self.per_task_deltas is not None:
            if task_index is None:
                raise OsrmError(f"method {self.method} deploys one model per task; pass the task index "
                                f"(0..{len(self.per_task_deltas) - 1}) to deltas_for")
            if not 0 <= task_index < len(self.per_task_deltas):
                raise OsrmError(f"task index {task_index} out of range; use 0..{len(self.per_task_deltas) - 1}")
            return self.per_task_deltas[task_index]
        if self.deltas is not None:
            return self.deltas
        if self.adapter is not None:
            return self.adapter.deltas()
        raise OsrmError(f"merge result of {self.method} is empty; rerun the merge")

    def scaled(self, factor: float) -> MergeResult:
        """The result of the same merge with ``scaling`` multiplied by ``factor``, for a method whose
        output is linear in its scaling (``MethodInfo.linear_in_scaling``): every dense delta times
        ``factor``, or, in factor form, every ``B`` times ``factor`` (the same delta to float rounding).
        ``info["scaled_from"]`` records the scaling actually merged at."""
        base = float(self.params.get("scaling", 1.0))
        adapter = None
        if self.adapter is not None:
            adapter = dataclasses.replace(self.adapter, modules={
                k: dataclasses.replace(m, B=m.B * factor) for k, m in self.adapter.modules.items()})
        return dataclasses.replace(
            self,
            params={**self.params, "scaling": base * factor},
            adapter=adapter,
            deltas=None if self.deltas is None else {k: v * factor for k, v in self.deltas.items()},
            per_task_deltas=None if self.per_task_deltas is None
            else [{k: v * factor for k, v in d.items()} for d in self.per_task_deltas],
            info={**self.info, "scaled_from": base},
        )

    def to(self, device: torch.device | str) -> MergeResult:
        """A copy with every tensor (factors, deltas, the inputs' heads and biases) on ``device``."""
        return dataclasses.replace(
            self,
            adapter=None if self.adapter is None else self.adapter.to(device),
            deltas=None if self.deltas is None else _dict_to(self.deltas, device),
            per_task_deltas=None if self.per_task_deltas is None else [_dict_to(d, device) for d in self.per_task_deltas],
            inputs=[a.to(device) for a in self.inputs],
        )


MethodFn = Callable[[list[LoraAdapter], dict[str, Any], MergeContext], MergeResult]


@dataclass(frozen=True)
class MethodInfo:
    """Registered merge method with its schema and flags."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    description: str
    paper: str
    exact_in_factor_space: bool = False
    needs: frozenset[str] = frozenset()
    per_task: bool = False
    min_adapters: int = 1
    # the output at scaling s is s times the output at scaling 1 (a lambda sweep merges once)
    linear_in_scaling: bool = False
    # what couples the modules of a merge with these (resolved) parameters, beyond per-module work:
    # "task_thresholds" (a task-wide magnitude trim), "task_rescalers" (task-wide rescalers),
    # "per_module_seed" (random masks, drawn per module when streamed)
    task_wide: Callable[[Mapping[str, Any]], frozenset[str]] = field(default=lambda _params: frozenset())

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(p.name for p in self.params) or "(none)"
        raise OsrmError(f"method {self.name} has no parameter {name!r}; valid parameters: {valid}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(name: str, *, params: Sequence[Param] = (), description: str, paper: str,
                    exact_in_factor_space: bool = False, needs: Sequence[str] = (), per_task: bool = False,
                    min_adapters: int = 1, linear_in_scaling: bool = False,
                    task_wide: Callable[[Mapping[str, Any]], frozenset[str]] | None = None,
                    ) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering a merge method under ``name``. ``linear_in_scaling``: the method applies
    its ``scaling`` parameter as a final factor (checked for every such method by the test suite), so a
    lambda sweep can merge once and scale (:meth:`MergeResult.scaled`). ``task_wide(params)``: the
    statistics over all modules a merge with ``params`` needs (see :attr:`MethodInfo.task_wide`); the
    streamed merge computes them in a pre-pass."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name} registered twice")
        _REGISTRY[name] = MethodInfo(name, fn, tuple(params), description, paper, exact_in_factor_space,
                                     frozenset(needs), per_task, min_adapters, linear_in_scaling,
                                     *([task_wide] if task_wide is not None else []))
        return fn

    return deco
