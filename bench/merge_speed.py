"""Merge speed: our merge methods against PEFT's ``add_weighted_adapter`` on the same random adapters.

    python bench/merge_speed.py --preset cpu|h100 [--out bench/results] [--methods ties,cat,...]

Random LoRA adapters (seeded) with Llama-style module names and shapes: on ``h100`` Llama-3-8B
(q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336, 32 layers), on ``cpu`` 2 layers of
hidden 768 (kv 192, mlp 2688: the same proportions). 8 adapters of rank 16 (alpha 32).

What is compared (see the notes the script writes into BENCHMARKS.md):
- ``cat``: ours vs PEFT ``cat`` (the same sum of products; deltas compared).
- task arithmetic: ours (factor space, exact) vs PEFT ``svd`` with ``svd_rank = T*r`` (lossless, the
  same output) and vs PEFT ``linear`` (a different output: PEFT sums the A's and the B's separately).
- ``ties`` / ``dare_ties``: ours (dense deltas, per-matrix threshold for parity) vs PEFT's own dense
  functions (``peft.utils.merge_utils``) applied per module to ``get_delta_weight`` (the dense part of
  ``ties_svd``/``dare_ties_svd`` before its SVD; compared entry by entry; DARE masks drawn from the same
  seed in the same order) and vs the whole ``add_weighted_adapter(ties_svd/dare_ties_svd)``.
PEFT's SVD-based types take minutes per full model: they are timed on ``svd_layers`` layers and
scaled linearly to the full model; the output says so.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import osrm_lora  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import benchlib as bu  # noqa: E402
import torch
from torch import nn

from osrm_lora.adapters import LoraAdapter, LoraModule
from osrm_lora.merge import list_methods, merge

logger = logging.getLogger("bench.merge_speed")

NAME = "merge_speed"
SEED = 1234
ALPHA = 32


@dataclass(frozen=True)
class Preset:
    device: str
    layers: int
    hidden: int
    kv: int
    mlp: int
    adapters: int
    rank: int
    svd_layers: int  # layers on which PEFT's svd-based types (and our slow dense-SVD methods) are timed
    repeats: int
    dense_repeats: int
    bandwidth_bytes: int
    subset_methods: tuple[str, ...]  # our methods timed on svd_layers layers and scaled
    skip_methods: tuple[str, ...]


PRESETS = {
    "smoke": Preset("cpu", layers=2, hidden=64, kv=16, mlp=224, adapters=4, rank=4, svd_layers=1, repeats=1,
                    dense_repeats=1, bandwidth_bytes=1 << 24, subset_methods=("opcm",), skip_methods=()),
    "cpu": Preset("cpu", layers=2, hidden=768, kv=192, mlp=2688, adapters=8, rank=16, svd_layers=1, repeats=2,
                  dense_repeats=1, bandwidth_bytes=1 << 28, subset_methods=("opcm",), skip_methods=()),
    "h100": Preset("cuda", layers=32, hidden=4096, kv=1024, mlp=14336, adapters=8, rank=16, svd_layers=1,
                   repeats=3, dense_repeats=1, bandwidth_bytes=1 << 32, subset_methods=("emr", "do_merging"),
                   skip_methods=("opcm",)),
}

DATA_METHODS = ("regmean", "fisher", "adamerging")  # need statistics / data: not part of this benchmark
SHAPES = {  # leaf name -> (out, in) in units of (hidden, kv, mlp)
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("mlp", "hidden"),
    "mlp.up_proj": ("mlp", "hidden"),
    "mlp.down_proj": ("hidden", "mlp"),
}


# ------------------------------------------------------------------------------------------------ setup


def module_shapes(p: Preset, layers: int) -> dict[str, tuple[int, int]]:
    dims = {"hidden": p.hidden, "kv": p.kv, "mlp": p.mlp}
    return {f"model.layers.{i}.{leaf}": (dims[o], dims[n]) for i in range(layers) for leaf, (o, n) in SHAPES.items()}


def make_adapters(shapes: dict[str, tuple[int, int]], T: int, r: int, seed: int, device: torch.device) -> list[LoraAdapter]:
    """T random adapters (A ~ N(0, 1/n), B ~ N(0, 0.02^2)), seeded, generated on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": ALPHA, "target_modules": sorted({k.rsplit(".", 1)[1] for k in shapes}),
           "base_model_name_or_path": "bench/skeleton"}
    out = []
    for t in range(T):
        mods = {}
        for key, (m, n) in shapes.items():
            A = torch.randn(r, n, generator=gen, device=device) / math.sqrt(n)
            B = torch.randn(m, r, generator=gen, device=device) * 0.02
            mods[key] = LoraModule(A, B, ALPHA / r)
        out.append(LoraAdapter(mods, dict(cfg), name=f"t{t}"))
    return out


def subset(adapters: list[LoraAdapter], layers: int) -> list[LoraAdapter]:
    keep = {f"model.layers.{i}." for i in range(layers)}
    return [LoraAdapter({k: m for k, m in a.modules.items() if any(k.startswith(p) for p in keep)}, a.config, a.name)
            for a in adapters]


class _Attn(nn.Module):
    def __init__(self, mk: Callable[[int, int], nn.Linear], p: Preset) -> None:
        super().__init__()
        self.q_proj, self.k_proj = mk(p.hidden, p.hidden), mk(p.hidden, p.kv)
        self.v_proj, self.o_proj = mk(p.hidden, p.kv), mk(p.hidden, p.hidden)


class _MLP(nn.Module):
    def __init__(self, mk: Callable[[int, int], nn.Linear], p: Preset) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mk(p.hidden, p.mlp), mk(p.hidden, p.mlp), mk(p.mlp, p.hidden)


class _Layer(nn.Module):
    def __init__(self, mk: Callable[[int, int], nn.Linear], p: Preset) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attn(mk, p), _MLP(mk, p)


class _Body(nn.Module):
    def __init__(self, mk: Callable[[int, int], nn.Linear], p: Preset, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(mk, p) for _ in range(layers))


class Skeleton(nn.Module):
    """A Llama-shaped stack of bias-free Linear modules whose weights take no memory (a broadcast zero)."""

    def __init__(self, p: Preset, layers: int, device: torch.device) -> None:
        super().__init__()

        def mk(n_in: int, n_out: int) -> nn.Linear:
            lin = nn.Linear(n_in, n_out, bias=False, device="meta")
            lin.weight = nn.Parameter(torch.zeros((), device=device).expand(n_out, n_in), requires_grad=False)
            return lin

        self.model = _Body(mk, p, layers)


def peft_model_with(adapters: list[LoraAdapter], p: Preset, layers: int, device: torch.device) -> Any:
    """A PeftModel over :class:`Skeleton` holding ``adapters`` (names t0..), their factors shared, not copied."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=p.rank, lora_alpha=ALPHA, target_modules=sorted({k.split(".")[-1] for k in SHAPES}),
                     lora_dropout=0.0, init_lora_weights=True)
    base = Skeleton(p, layers, device)
    model: PeftModel = get_peft_model(base, cfg, adapter_name=adapters[0].name)
    for ad in adapters[1:]:
        model.add_adapter(ad.name, cfg)
    inner = model.base_model.model
    for ad in adapters:
        for key, mod in ad.modules.items():
            layer = inner.get_submodule(key)
            layer.lora_A[ad.name].weight.data = mod.A
            layer.lora_B[ad.name].weight.data = mod.B
            if abs(layer.scaling[ad.name] - mod.scaling) > 1e-12:
                raise RuntimeError(f"PEFT scaling {layer.scaling[ad.name]} != {mod.scaling} for {key}")
    return model


# ------------------------------------------------------------------------------------------------ helpers


def rel_err(ref: torch.Tensor, x: torch.Tensor) -> float:
    n = torch.linalg.norm(ref.float())
    return 0.0 if n == 0 else float(torch.linalg.norm(ref.float() - x.float()) / n)


def peft_lora_delta(model: Any, key: str, name: str) -> torch.Tensor:
    layer = model.base_model.model.get_submodule(key)
    return layer.get_delta_weight(name).float()


def compare_factor_result(ours: LoraAdapter, model: Any, name: str) -> float:
    """Max over modules of the relative Frobenius difference between our delta and PEFT's adapter ``name``."""
    worst = 0.0
    for key, mod in ours.modules.items():
        worst = max(worst, rel_err(peft_lora_delta(model, key, name), mod.delta()))
    return worst


def dense_size(shapes: dict[str, tuple[int, int]]) -> int:
    return sum(m * n for m, n in shapes.values())


def peft_dense_loop(model: Any, adapters: list[LoraAdapter], kind: str, density: float, seed: int,
                    keep: bool = True) -> dict[str, torch.Tensor]:
    """PEFT's dense merge functions applied module by module (sorted keys, as ours) to ``get_delta_weight``."""
    from peft.utils import merge_utils

    names = [a.name for a in adapters]
    dev = next(iter(adapters[0].modules.values())).A.device
    w = torch.ones(len(adapters), device=dev)
    torch.manual_seed(seed)
    out = {}
    inner = model.base_model.model
    for key in sorted(adapters[0].modules):
        layer = inner.get_submodule(key)
        deltas = [layer.get_delta_weight(n) for n in names]
        if kind == "ties":
            res = merge_utils.ties(deltas, w, density, "total")
        elif kind == "dare_ties":
            res = merge_utils.dare_ties(deltas, w, density, "total")
        else:
            raise ValueError(kind)
        if keep:
            out[key] = res
    return out


# ------------------------------------------------------------------------------------------------ benchmark


def our_params(method: str, seed: int) -> dict[str, Any]:
    """Parameters used for our methods (PEFT-parity settings where a PEFT counterpart exists)."""
    params: dict[str, Any] = {}
    info = {m.name: m for m in list_methods()}[method]
    names = {p.name for p in info.params}
    if "threshold" in names:
        params["threshold"] = "matrix"
    if "seed" in names:
        params["seed"] = seed
    if method == "opcm":
        params["alpha"] = 0.5
    return params


def run(preset_name: str, out_dir: Path, methods: list[str] | None, md_path: Path | None) -> dict[str, Any]:
    p = PRESETS[preset_name]
    dev = bu.pick_device(p.device)
    torch.manual_seed(SEED)
    machine = bu.machine_info(dev)
    logger.info("machine: %s", bu.describe_machine(machine))
    bw = bu.measure_bandwidth(dev, p.bandwidth_bytes)
    logger.info("copy bandwidth %.1f GB/s", bw["gb_per_s"])

    shapes = module_shapes(p, p.layers)
    N = dense_size(shapes)
    T, r = p.adapters, p.rank
    t0 = time.perf_counter()
    adapters = make_adapters(shapes, T, r, SEED, dev)
    logger.info("made %d adapters x %d modules (%d dense params per adapter) in %.1fs", T, len(shapes), N,
                time.perf_counter() - t0)
    sub = subset(adapters, p.svd_layers)
    sub_scale = p.layers / p.svd_layers
    results: dict[str, Any] = {"ours": {}, "peft": {}, "comparisons": [], "bandwidth": bw}
    notes: list[str] = []
    names = [a.name for a in adapters]
    ones = [1.0] * T

    # warm up kernels (cuBLAS handles, allocator) on a tiny problem
    merge(subset(adapters, 1), "task_arithmetic")
    merge(subset(adapters, 1), "ties", {"threshold": "matrix"})
    bu.sync(dev)

    peft_full = peft_model_with(adapters, p, p.layers, dev)
    peft_sub = peft_model_with(sub, p, p.svd_layers, dev)
    counter = [0]

    def time_awa(model: Any, kind: str, repeats: int, **kw: Any) -> tuple[bu.Timing, bu.PeakMemory | None, str]:
        made: list[str] = []

        def fn() -> None:
            counter[0] += 1
            made.append(f"m{counter[0]}")
            model.add_weighted_adapter(names, ones, made[-1], combination_type=kind, **kw)

        timing, peak, _ = bu.time_call(fn, device=dev, warmup=0, repeats=repeats)
        for old in made[:-1]:
            model.delete_adapter(old)
        return timing, peak, made[-1]

    def peft_entry(timing: bu.Timing, peak: bu.PeakMemory | None, scaled: bool, **extra: Any) -> dict[str, Any]:
        return {"timing": timing.to_json(), "peak": peak.to_json() if peak else None,
                "layers_timed": p.svd_layers if scaled else p.layers, "scaled_from_subset": scaled,
                "seconds_full_model": timing.best * (sub_scale if scaled else 1.0), **extra}

    def ours_delta(res: Any, key: str) -> torch.Tensor:
        return res.adapter.modules[key].delta() if res.adapter is not None else res.deltas[key]

    def peft_svd_type(kind: str, kw: dict[str, Any], ours_res: Any) -> None:
        logger.info("peft: %s on %d layer(s)", kind, p.svd_layers)
        tm, pk, nm = time_awa(peft_sub, kind, 1, **kw)
        errs = [rel_err(ours_delta(ours_res, key), peft_lora_delta(peft_sub, key, nm)) for key in sub[0].modules]
        results["peft"][kind] = peft_entry(tm, pk, True, kwargs=kw, max_rel_diff_to_ours=max(errs))
        peft_sub.delete_adapter(nm)

    def peft_dense_check(kind: str, density: float, ours_res: Any) -> None:
        from peft.utils import merge_utils

        torch.manual_seed(SEED)
        worst, exact = 0.0, True
        w = torch.ones(T, device=dev)
        inner = peft_full.base_model.model
        for key in sorted(adapters[0].modules):
            layer = inner.get_submodule(key)
            ref = getattr(merge_utils, kind)([layer.get_delta_weight(n) for n in names], w, density, "total")
            worst = max(worst, rel_err(ref, ours_res.deltas[key]))
            exact = exact and bool(torch.equal(ref, ours_res.deltas[key]))
            del ref
        results["comparisons"].append({"combination": kind, "ours": f"{kind} (threshold=matrix)" if kind == "ties"
                                       else kind, "peft": f"merge_utils.{kind} per module", "same_output": True,
                                       "max_rel_err": worst, "bitwise_equal": exact})

    def after_ours(method: str, res: Any) -> None:
        """PEFT counterparts of ``method`` that need our result (compared while it is held)."""
        if method == "cat":
            logger.info("peft: cat")
            tm, pk, nm = time_awa(peft_full, "cat", p.repeats)
            results["peft"]["cat"] = peft_entry(tm, pk, False)
            results["comparisons"].append({"combination": "cat", "ours": "cat", "peft": "cat", "same_output": True,
                                           "max_rel_err": compare_factor_result(res.adapter, peft_full, nm)})
            peft_full.delete_adapter(nm)
        elif method == "task_arithmetic":
            logger.info("peft: linear")
            tm, pk, nm = time_awa(peft_full, "linear", p.repeats)
            results["peft"]["linear"] = peft_entry(tm, pk, False)
            results["comparisons"].append({
                "combination": "linear", "ours": "task_arithmetic", "peft": "linear", "same_output": False,
                "max_rel_err": compare_factor_result(res.adapter, peft_full, nm),
                "why": "PEFT 'linear' returns (sum_t sqrt(w_t s_t) B_t)(sum_t sqrt(w_t s_t) A_t); the cross terms "
                       "B_i A_j make it differ from task arithmetic"})
            peft_full.delete_adapter(nm)
            peft_svd_type("svd", {"svd_rank": T * r}, res)
            results["comparisons"].append({"combination": "svd", "ours": "task_arithmetic", "peft": "svd (svd_rank=T*r)",
                                           "same_output": True,
                                           "max_rel_err": results["peft"]["svd"]["max_rel_diff_to_ours"]})
        elif method in ("ties", "dare_ties"):
            density = 0.2 if method == "ties" else 0.5
            peft_svd_type(f"{method}_svd", {"density": density}, res)
            logger.info("peft: merge_utils.%s per module (check)", method)
            peft_dense_check(method, density, res)

    def peft_after_drop(method: str) -> None:
        """PEFT timings that need memory for their own outputs (run after our result is dropped)."""
        if method in ("ties", "dare_ties"):
            density = 0.2 if method == "ties" else 0.5
            logger.info("peft: merge_utils.%s per module (timed)", method)
            tm, pk, _ = bu.time_call(lambda: peft_dense_loop(peft_full, adapters, method, density, SEED), device=dev,
                                     warmup=0, repeats=p.dense_repeats)
            results["peft"][f"dense_{method}"] = peft_entry(
                tm, pk, False, what=f"peft.utils.merge_utils.{method} per module on get_delta_weight (no SVD)")

    # --- our methods (and PEFT counterparts while our result is held) -------------------------
    all_methods = [m.name for m in list_methods()]
    chosen = methods or [m for m in all_methods if m not in DATA_METHODS and m not in p.skip_methods]
    unknown = [m for m in chosen if m not in all_methods]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(all_methods)}")
    info_by = {m.name: m for m in list_methods()}
    for method in chosen:
        scaled = method in p.subset_methods
        ads = sub if scaled else adapters
        params = our_params(method, SEED)
        dense = not info_by[method].exact_in_factor_space
        repeats = 1 if scaled else (p.dense_repeats if dense else p.repeats)
        logger.info("ours: %s%s", method, " (subset)" if scaled else "")
        timing, peak, res = bu.time_call(lambda ads=ads, method=method, params=params: merge(ads, method, params), device=dev, warmup=0, repeats=repeats,
                                         keep_result=True)
        entry = {"params": params, "timing": timing.to_json(), "peak": peak.to_json() if peak else None,
                 "exact_in_factor_space": info_by[method].exact_in_factor_space,
                 "layers_timed": p.svd_layers if scaled else p.layers,
                 "seconds_full_model": timing.best * (sub_scale if scaled else 1.0),
                 "scaled_from_subset": scaled}
        if dense and not info_by[method].per_task:
            floor_bytes = (2 * T + 1) * N * 4
            entry["floor_s"] = floor_bytes / bw["bytes_per_s"]
            entry["floor_bytes"] = floor_bytes
            entry["x_floor"] = entry["seconds_full_model"] / entry["floor_s"]
        results["ours"][method] = entry
        if not scaled:
            after_ours(method, res)
        res = None
        bu.free_memory(dev)
        if not scaled:
            peft_after_drop(method)
        bu.free_memory(dev)
    peft_full = peft_sub = None  # release them (the closures above read these names)
    bu.free_memory(dev)

    # --- summary --------------------------------------------------------------------------------
    ours, peft = results["ours"], results["peft"]
    speed_rows = []

    def ratio_row(label: str, ours_m: str, peft_k: str, same: bool) -> None:
        if ours_m not in ours or peft_k not in peft:
            return
        o, q = ours[ours_m]["seconds_full_model"], peft[peft_k]["seconds_full_model"]
        speed_rows.append({"combination": label, "ours": ours_m, "peft": peft_k, "ours_s": o, "peft_s": q,
                           "speedup": q / o if o > 0 else float("inf"), "same_output": same,
                           "peft_scaled": peft[peft_k]["scaled_from_subset"]})

    ratio_row("cat", "cat", "cat", True)
    ratio_row("linear/TA", "task_arithmetic", "svd", True)
    ratio_row("linear/TA", "task_arithmetic", "linear", False)
    ratio_row("ties", "ties", "dense_ties", True)
    ratio_row("ties", "ties", "ties_svd", False)
    ratio_row("dare_ties", "dare_ties", "dense_dare_ties", True)
    ratio_row("dare_ties", "dare_ties", "dare_ties_svd", False)
    results["speedups"] = speed_rows

    targets = []
    same = [r for r in speed_rows if r["same_output"] and r["peft"] != "cat"]
    for r_ in same:
        targets.append({"target": f">= 10x faster than PEFT for the same output ({r_['combination']}: ours "
                                  f"{r_['ours']} vs PEFT {r_['peft']})", "value": r_["speedup"],
                        "met": r_["speedup"] >= 10, "by": r_["speedup"] / 10})
    if "task_arithmetic" in ours:
        ta = ours["task_arithmetic"]["seconds_full_model"]
        targets.append({"target": "exact factor-space TA under 1 s" + (" (Llama-3-8B shapes, GPU)" if p.device == "cuda"
                                                                       else " (CPU preset shapes; the target is for GPU)"),
                        "value": ta, "met": ta < 1.0, "by": 1.0 / ta if ta > 0 else float("inf")})
    if "ties" in ours and "x_floor" in ours["ties"]:
        xf = ours["ties"]["x_floor"]
        targets.append({"target": "dense TIES within 3x of the memory-bandwidth floor", "value": xf, "met": xf <= 3.0,
                        "by": 2.0 / xf})
    results["targets"] = targets

    md = summary_markdown(p, results, N)
    notes += [
        f"Adapters: {T} random LoRAs (seed {SEED}), rank {r}, alpha {ALPHA}, {len(shapes)} modules over {p.layers} layers "
        f"(hidden {p.hidden}, kv {p.kv}, mlp {p.mlp}); {N / 1e6:.1f} M dense parameters per adapter; float32.",
        "Peak memory: above the level before the call (adapters excluded); "
        + ("torch.cuda.max_memory_allocated." if dev.type == "cuda" else
           "CPU resident set size sampled by a thread every 5 ms in one extra untimed call (short spikes may be missed)."),
        f"PEFT svd-based types (svd, ties_svd, dare_ties_svd) were timed on {p.svd_layers} of {p.layers} layers and "
        f"scaled linearly (x{sub_scale:g}); likewise our methods {', '.join(p.subset_methods) or '(none)'}.",
        "PEFT 'linear' is a different output than task arithmetic (it sums the A's and the B's separately); the "
        "same-output PEFT counterpart of our exact task arithmetic is 'svd' with svd_rank = T*r.",
        "PEFT 'ties'/'dare_ties' (non-svd) apply TIES to the A and B factors separately (a different output); "
        "their dense counterpart is the part of 'ties_svd'/'dare_ties_svd' before the SVD, timed here as "
        "peft.utils.merge_utils.<fn> per module; our ties/dare_ties used threshold=matrix for that parity.",
        "PEFT add_weighted_adapter(dare_ties_svd) draws its masks in named_modules order, ours in sorted key order, "
        "so its masks differ from ours (the per-module dense comparison uses the same order and seed).",
        "Floor = (2T+1) x dense size x 4 bytes (each task delta written once and read once, the result written "
        "once) / measured copy bandwidth; a lower bound that ignores top-k/sort work.",
        "Our per-task method emr returns T dense deltas; data-aware methods (regmean, fisher, adamerging) are not "
        "part of this benchmark." + (f" Skipped here: {', '.join(p.skip_methods)}." if p.skip_methods else ""),
    ]
    notes.append(mergekit_note())
    rec = bu.BenchRecord(name=NAME, preset=preset_name, command=bu.command_line(), seeds={"adapters": SEED, "dare": SEED},
                         machine=machine, settings={"preset": p.__dict__, "dense_params_per_adapter": N},
                         results=results, summary_md=md, notes=notes)
    bu.write_results(rec, out_dir, benchmarks_md=md_path)
    return results


def mergekit_note() -> str:
    return ("mergekit is not timed here (it is not installed with our pinned stack, and the GPU machines have no "
            "network): bench/mergekit_speed.py times its dense TA/TIES on CPU from a separate venv.")


def summary_markdown(p: Preset, results: dict[str, Any], N: int) -> str:
    ours, peft = results["ours"], results["peft"]
    lines = ["### Our methods (full model unless marked)", ""]
    rows = []
    for m, e in ours.items():
        rows.append([m, "factor" if e["exact_in_factor_space"] else "dense",
                     bu.fmt_seconds(e["seconds_full_model"]) + (" *" if e["scaled_from_subset"] else ""),
                     bu.fmt_bytes(e["peak"]["peak_bytes"]) if e["peak"] else "-",
                     f"{e['x_floor']:.1f}x" if "x_floor" in e else "-"])
    lines.append(bu.markdown_table(["method", "space", "time", "peak mem", "time / floor"], rows))
    lines += ["", "`*` timed on a subset of layers and scaled linearly.", "", "### PEFT add_weighted_adapter and merge_utils", ""]
    rows = []
    for k, e in peft.items():
        rows.append([k, bu.fmt_seconds(e["seconds_full_model"]) + (" *" if e["scaled_from_subset"] else ""),
                     bu.fmt_bytes(e["peak"]["peak_bytes"]) if e["peak"] else "-",
                     f"{e['max_rel_diff_to_ours']:.2e}" if "max_rel_diff_to_ours" in e else "-"])
    lines.append(bu.markdown_table(["PEFT", "time (full model)", "peak mem", "rel. diff to ours"], rows))
    lines += ["", "### Speed ratios (PEFT time / our time)", ""]
    rows = [[r["combination"], r["ours"], r["peft"] + (" *" if r["peft_scaled"] else ""), bu.fmt_seconds(r["ours_s"]),
             bu.fmt_seconds(r["peft_s"]), f"{r['speedup']:.1f}x", "yes" if r["same_output"] else "no"]
            for r in results["speedups"]]
    lines.append(bu.markdown_table(["combination", "ours", "PEFT", "ours", "PEFT", "speed-up", "same output"], rows))
    lines += ["", "### Output agreement", ""]
    rows = [[c["combination"], c["ours"], c["peft"], "yes" if c["same_output"] else "no", f"{c['max_rel_err']:.2e}",
             {True: "yes", False: "no"}.get(c.get("bitwise_equal"), "-")] for c in results["comparisons"]]
    lines.append(bu.markdown_table(["combination", "ours", "PEFT", "same math", "max rel. Frobenius diff", "bitwise"], rows))
    bw = results["bandwidth"]
    lines += ["", f"Measured copy bandwidth: {bw['gb_per_s']:.1f} GB/s ({bw['method']}).", "", "### Targets", ""]
    rows = [[t["target"], f"{t['value']:.3g}", "met" if t["met"] else "missed", f"{t['by']:.2f}"] for t in results["targets"]]
    lines.append(bu.markdown_table(["target", "value", "status", "margin (>1 = met by that factor)"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--methods", default=None, help="comma-separated subset of our methods (default: all data-free)")
    ap.add_argument("--benchmarks-md", default=None, help="markdown file to update (default: BENCHMARKS.md)")
    args = ap.parse_args(argv)
    bu.setup_logging()
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    t0 = time.perf_counter()
    with torch.no_grad():
        res = run(args.preset, Path(args.out), methods, Path(args.benchmarks_md) if args.benchmarks_md else None)
    # short table last
    print(f"\nmerge_speed --preset {args.preset}: {time.perf_counter() - t0:.0f} s total")
    for r in res["speedups"]:
        print(f"  {r['combination']:10s} ours {r['ours']:16s} {bu.fmt_seconds(r['ours_s']):>10s} | PEFT {r['peft']:16s} "
              f"{bu.fmt_seconds(r['peft_s']):>10s}{'*' if r['peft_scaled'] else ' '} | {r['speedup']:8.1f}x "
              f"{'same' if r['same_output'] else 'diff'}")
    for t in res["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.3g}")


if __name__ == "__main__":
    main()
