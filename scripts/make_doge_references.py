"""Regenerate tests/fixtures/doge_references.json: outputs of FusionBench's DOGE-TA on fixed task vectors.

Runs OUTSIDE the project venv, in a separate one holding FusionBench; nothing of osrm_lora is
imported, and the tests read the JSON only (CI has no FusionBench)::

    python3 -m venv /tmp/fbenv
    /tmp/fbenv/bin/pip install torch==2.13.0 fusion_bench==0.2.33 "transformers<5" "datasets<4.5"
    /tmp/fbenv/bin/python scripts/make_doge_references.py --out tests/fixtures/doge_references.json

``DOGE_TA_Algorithm(subspace, K, lamda).run`` (``fusion_bench.method.doge_ta``, the class behind
the ``doge_ta/doge_ta`` method config; its Adam learning rate 1e-4 and 400 steps are fixed in the
code) is run end to end on CPU on toy models made of bias-free ``nn.Linear`` layers under an
``encoder`` submodule (DOGE-TA merges the ``encoder`` weights only): base ``W0``, task model ``t`` =
``W0 + tau_t``. The output is the merged model minus ``W0``.

Task vectors are small integers times a power of two, so they, ``W0 + tau_t`` and FusionBench's
``(W0 + tau_t) - W0`` are exact in float64 (and, with a zero base, in float32), and the project's
float32 LoRA adapters hold exactly the same task vectors: dense ones as ``B = tau, A = I``, low-rank
ones as their integer factors. The JSON holds the integers, the settings and the outputs (10
significant digits).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm
from torch import nn

TAU_BITS = 17  # dense task vectors: integers in [-2000, 2000] times 2^-17 (|entries| < 0.016)
FACTOR_BITS = 9  # low-rank factors: integers in [-127, 127] times 2^-9 each

CASES: list[dict[str, Any]] = [
    # full-rank task vectors (full fine-tuning, the authors' setting), FusionBench's defaults
    {"name": "dense", "seed": 1, "shapes": {"encoder.q": [12, 12], "encoder.v": [8, 12]}, "tasks": 3,
     "subspace": 6, "K": 30, "lamda": 0.07, "dtype": "float64"},
    # the same task vectors, FusionBench in float32 (zero base: its task vectors stay exact)
    {"name": "dense_float32", "seed": 1, "shapes": {"encoder.q": [12, 12], "encoder.v": [8, 12]}, "tasks": 3,
     "subspace": 6, "K": 30, "lamda": 0.07, "dtype": "float32", "zero_base": True},
    # other settings: a larger subspace, a looser mask, larger coefficients, four tasks
    {"name": "params", "seed": 2, "shapes": {"encoder.q": [12, 10], "encoder.v": [9, 12]}, "tasks": 4,
     "subspace": 3, "K": 50, "lamda": 0.3, "dtype": "float64"},
    # low-rank (LoRA) task vectors with rank >= int(min(m, n) / T), where FusionBench's basis is defined
    {"name": "lowrank", "seed": 3, "shapes": {"encoder.q": [12, 12], "encoder.v": [8, 12]}, "tasks": 3,
     "rank": 4, "subspace": 6, "K": 30, "lamda": 0.07, "dtype": "float64"},
]


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


def draw_inputs(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task and module: ``{"tau": ints}`` (dense) or ``{"A": ints, "B": ints}`` (low rank)."""
    rng = np.random.default_rng(case["seed"])
    out = []
    for _ in range(case["tasks"]):
        task = {}
        for key, (m, n) in case["shapes"].items():
            if "rank" in case:
                r = case["rank"]
                task[key] = {"A": rng.integers(-127, 128, size=(r, n)), "B": rng.integers(-127, 128, size=(m, r))}
            else:
                task[key] = {"tau": rng.integers(-2000, 2001, size=(m, n))}
        out.append(task)
    return out


def task_vector(entry: dict[str, Any]) -> np.ndarray:
    if "tau" in entry:
        return np.asarray(entry["tau"], dtype=np.float64) * 2.0 ** -TAU_BITS
    B = np.asarray(entry["B"], dtype=np.float64) * 2.0 ** -FACTOR_BITS
    A = np.asarray(entry["A"], dtype=np.float64) * 2.0 ** -FACTOR_BITS
    return B @ A


def base_weights(case: dict[str, Any]) -> dict[str, np.ndarray]:
    if case.get("zero_base"):
        return {k: np.zeros((m, n)) for k, (m, n) in case["shapes"].items()}
    rng = np.random.default_rng(1000 + case["seed"])
    return {k: rng.standard_normal((m, n)).astype(np.float32).astype(np.float64)
            for k, (m, n) in case["shapes"].items()}


def fusion_bench_doge(case: dict[str, Any], inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = list(case["shapes"])
    dtype = {"float64": torch.float64, "float32": torch.float32}[case["dtype"]]
    w0 = base_weights(case)
    pool: dict[str, nn.Module] = {"_pretrained_": ToyModel(w0, dtype)}
    for t, task in enumerate(inputs):
        pool[f"task{t}"] = ToyModel({k: w0[k] + task_vector(task[k]) for k in keys}, dtype)
    algo = DOGE_TA_Algorithm(subspace=case["subspace"], K=case["K"], lamda=case["lamda"])
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)  # no logger, no GPU
    merged = algo.run(pool)
    return {k: merged.get_submodule(k).weight.detach().double().numpy() - w0[k] for k in keys}


def record(case: dict[str, Any], inputs: list[dict[str, Any]], output: dict[str, np.ndarray]) -> dict[str, Any]:
    ints = [{k: {name: v.tolist() for name, v in entry.items()} for k, entry in task.items()} for task in inputs]
    out = {k: [[float(f"{x:.10g}") for x in row] for row in v] for k, v in output.items()}
    return {**case, "inputs": ints, "output": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/doge_references.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [record(c, inp, fusion_bench_doge(c, inp)) for c in CASES for inp in [draw_inputs(c)]]
    doc = {"fusion_bench": importlib.metadata.version("fusion_bench"), "torch": torch.__version__,
           "tau_bits": TAU_BITS, "factor_bits": FACTOR_BITS, "adam": {"lr": 1e-4, "steps": 400},
           "cases": cases}
    args.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
