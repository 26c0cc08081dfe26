"""Regenerate tests/fixtures/merge_references.json: outputs of the authors' own code for OPCM and KnOTS-TIES.

Runs OUTSIDE the project venv, in a separate one holding the reference implementations; nothing of
osrm_lora is imported, and the tests read the JSON only (CI has neither reference installed)::

    python3 -m venv /tmp/fbenv
    /tmp/fbenv/bin/pip install torch==2.13.0 fusion_bench==0.2.33 "transformers<5" "datasets<4.5"
    git clone https://github.com/gstoica27/KnOTS /tmp/KnOTS   # tested at commit baa35e8
    /tmp/fbenv/bin/python scripts/make_merge_references.py --knots /tmp/KnOTS \
        --out tests/fixtures/merge_references.json

- OPCM: FusionBench's ``OPCMForCLIP.run`` (``fusion_bench.method.opcm.opcm``; the class behind the
  ``opcm`` method config) is run end to end on toy float64 models made of bias-free ``nn.Linear``
  layers (base ``W0`` random, or zero, task model ``t`` = ``W0 + B_t A_t``), CPU, no shuffling, no
  saving or evaluation; the output is the merged model minus ``W0``.
- KnOTS-TIES: the official ``SVDMerger`` (``task_merger.py``; its ``utils`` module, which needs
  CLIP and scikit-learn, is replaced by a stub giving ``get_mask_fn``/``get_merging_fn`` from the
  repository's own ``masking_ops.py``) with the ``vitB_r16_knots_ties.py`` settings
  (``sign_resolve_mode=sum_of_values``, ``merging_type=mean``, ``concat_across_output=True``)
  on toy models whose fine-tuned weights are ``W0 + B_t A_t``; output = merged weights minus ``W0``.

Inputs are drawn from fixed seeds (NumPy) and rounded to float32, so the same factors give the
project's float32 LoRA adapters exactly. The JSON holds the factors, the settings and the outputs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import types
from collections import OrderedDict
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fusion_bench.method.opcm.opcm import OPCMForCLIP
from torch import nn

Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (A r x n, B m x r)

OPCM_CASES = [
    # full-rank task vectors (full fine-tuning, FusionBench's own setting): r = min(m, n)
    {"name": "dense", "seed": 1, "shapes": {"enc.q": [6, 5], "enc.v": [4, 7], "mlp.up": [8, 8]},
     "ranks": [5, 4, 8], "tasks": 4, "alpha": 0.5},
    {"name": "dense_alpha", "seed": 2, "shapes": {"enc.q": [6, 5], "enc.v": [4, 7], "mlp.up": [8, 8]},
     "ranks": [5, 4, 8], "tasks": 3, "alpha": 0.8},
    # low-rank (LoRA) task vectors: the running sum is rank deficient, and FusionBench's output
    # depends on the base weights through rounding (same task vectors, two bases)
    {"name": "lora", "seed": 3, "shapes": {"enc.q": [12, 10], "enc.v": [9, 14]},
     "ranks": [2, 2], "tasks": 3, "alpha": 0.5},
    {"name": "lora_zero_base", "seed": 3, "shapes": {"enc.q": [12, 10], "enc.v": [9, 14]},
     "ranks": [2, 2], "tasks": 3, "alpha": 0.5, "zero_base": True},
]
KNOTS_CASES = [
    {"name": "ties", "seed": 4, "shapes": {"enc.q": [6, 5], "enc.v": [4, 7], "mlp.up": [8, 6]},
     "ranks": [2, 2, 3], "tasks": 3, "topK": 20, "scaling": 0.6},
    {"name": "ties_dense", "seed": 5, "shapes": {"enc.q": [6, 5], "enc.v": [4, 7]},
     "ranks": [2, 3], "tasks": 4, "topK": 50, "scaling": 1.0},
]


def draw_factors(seed: int, shapes: dict[str, list[int]], ranks: list[int], tasks: int) -> list[Factors]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(tasks):
        f = {}
        for (key, (m, n)), r in zip(shapes.items(), ranks):
            A = rng.standard_normal((r, n)).astype(np.float32).astype(np.float64)
            B = (0.5 * rng.standard_normal((m, r))).astype(np.float32).astype(np.float64)
            f[key] = (A, B)
        out.append(f)
    return out


class ToyModel(nn.Module):
    """Bias-free linear layers named like the module keys (dots become submodules)."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: torch.dtype) -> None:
        super().__init__()
        for key, w in weights.items():
            parent: nn.Module = self
            *path, leaf = key.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
            lin.weight.data = torch.tensor(w, dtype=dtype)
            parent.add_module(leaf, lin)


def base_weights(seed: int, shapes: dict[str, list[int]], zero: bool = False) -> dict[str, np.ndarray]:
    if zero:
        return {k: np.zeros((m, n)) for k, (m, n) in shapes.items()}
    rng = np.random.default_rng(1000 + seed)
    return {k: rng.standard_normal((m, n)).astype(np.float32).astype(np.float64) for k, (m, n) in shapes.items()}


def task_deltas(factors: list[Factors]) -> list[dict[str, np.ndarray]]:
    return [{k: B @ A for k, (A, B) in f.items()} for f in factors]


def weights_of(model: nn.Module, keys: list[str]) -> dict[str, np.ndarray]:
    return {k: model.get_submodule(k).weight.detach().double().numpy() for k in keys}


# ------------------------------------------------------------------------------------------------ OPCM


class ToyPool:
    """The slice of FusionBench's BaseModelPool that OPCMForCLIP.run uses."""

    def __init__(self, base: nn.Module, models: list[nn.Module]) -> None:
        self.base, self.models = base, models
        self.model_names = [f"task{i}" for i in range(len(models))]

    def load_pretrained_model(self) -> nn.Module:
        return deepcopy(self.base)

    def load_model(self, name: str) -> nn.Module:
        return deepcopy(self.models[self.model_names.index(name)])


def fusion_bench_opcm(case: dict[str, Any], factors: list[Factors]) -> dict[str, np.ndarray]:
    keys = list(case["shapes"])
    w0 = base_weights(case["seed"], case["shapes"], case.get("zero_base", False))
    models = [ToyModel({k: w0[k] + d[k] for k in keys}, torch.float64) for d in task_deltas(factors)]
    algo = OPCMForCLIP(alpha=case["alpha"], shuffle_order=False, seed=None, save_on_every_step=False,
                       evaluate_on_every_step=False)
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)  # no logger: log_dir None, logging a no-op
    algo._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    merged = algo.run(ToyPool(ToyModel(w0, torch.float64), models))
    return {k: v - w0[k] for k, v in weights_of(merged, keys).items()}


# ------------------------------------------------------------------------------------------------ KnOTS


def import_knots(src: Path) -> types.ModuleType:
    """The official ``task_merger`` module from a checkout (not a package: imported by path)."""
    sys.path.insert(0, str(src))
    import masking_ops

    stub = types.ModuleType("utils")  # the real one imports CLIP, scikit-learn, peft, transformers
    stub.get_mask_fn = lambda name: {"ties": masking_ops.ties_masking, "tv": masking_ops.tv_masking}[name]
    stub.get_merging_fn = lambda name: None  # used only for merge_other_params
    sys.modules["utils"] = stub
    import task_merger

    return task_merger


class ToyHandler:
    """KnOTS param_handler: the fine-tunable (here: all linear) weights of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def get_ft_parameters(self) -> OrderedDict:
        return OrderedDict(sorted((k, v.detach().clone()) for k, v in self.model.state_dict().items()))


def official_knots(task_merger: types.ModuleType, case: dict[str, Any],
                   factors: list[Factors]) -> dict[str, np.ndarray]:
    keys = sorted(case["shapes"])
    w0 = base_weights(case["seed"], case["shapes"])
    base = ToyModel({k: w0[k] for k in keys}, torch.float32)
    models = [ToyModel({k: w0[k] + d[k] for k in keys}, torch.float32) for d in task_deltas(factors)]
    cfg = {"representation": "svd-vector", "sign_resolve_mode": "sum_of_values", "scaling_coeffs": case["scaling"],
           "topK": case["topK"], "merge_method": "ties", "merging_type": "mean", "concat_across_output": True,
           "dare": False}
    merger = task_merger.SVDMerger(models, base, ToyHandler, device="cpu", merge_config=cfg)
    merger.set_scaling_coeffs(cfg["scaling_coeffs"])
    merger.transform(cfg)
    merged = merger.merge(cfg)
    return {k: v - w0[k] for k, v in weights_of(merged, keys).items()}


# ------------------------------------------------------------------------------------------------ main


def as_lists(d: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in d.items()}


def record(case: dict[str, Any], factors: list[Factors], output: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**case, "factors": [{k: {"A": A.tolist(), "B": B.tolist()} for k, (A, B) in f.items()} for f in factors],
            "output": as_lists(output)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--knots", type=Path, required=True, help="checkout of github.com/gstoica27/KnOTS")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/merge_references.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    opcm = []
    for case in OPCM_CASES:
        f = draw_factors(case["seed"], case["shapes"], case["ranks"], case["tasks"])
        opcm.append(record(case, f, fusion_bench_opcm(case, f)))
    tm = import_knots(args.knots)
    knots = []
    for case in KNOTS_CASES:
        f = draw_factors(case["seed"], case["shapes"], case["ranks"], case["tasks"])
        knots.append(record(case, f, official_knots(tm, case, f)))
    meta = {"fusion_bench": importlib.metadata.version("fusion_bench"),
            "torch": torch.__version__, "knots_commit": "baa35e8", "script": "scripts/make_merge_references.py"}
    args.out.write_text(json.dumps({"meta": meta, "opcm": opcm, "knots": knots}, indent=None) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
