"""Cost of activation statistics and OSRM initialisation.

    python bench/stats_cost.py --preset cpu|h100 [--out bench/results] [--model default]

1. ``collect_statistics`` (full Gram matrices) against a plain forward pass over the same seeded
   samples, batches and tokenisation (ratio; target <= 1.10x), for the default LoRA targets and for
   every Linear module of the encoder.
2. PEFT's CorDA covariance collection (``peft.tuners.lora.corda.calib_cov_distribution``, the step
   ``preprocess_corda`` runs) on the same model and samples. Its hook squeezes the batch dimension,
   so it is fed one sample at a time; ours is timed at batch 1 and at its default batch size.
3. OSRM initialisation, modes paper and own, for 8 tasks on ``osrm_layers`` q/v input groups of
   size n from random SPD second moments (n = 4096 x 32 layers, Llama-3-8B q/v, on h100; n = 1024 x 2
   layers on cpu): the old per-(task, group) loop (timed on ``osrm_legacy_layers`` layers and scaled
   linearly), the batched exact path (``solver="eigh"``, the default) and the subset solver
   (``solver="subset"``), with the principal angles between their subspaces.

``--osrm-only`` runs part 3 alone and writes it as preset ``<preset>-osrm`` (its own JSON and
BENCHMARKS.md section), e.g. ``python bench/stats_cost.py --preset h100 --osrm-only`` on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import osrm_lora  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import benchlib as bu  # noqa: E402
import numpy as np
import torch

from osrm_lora.errors import OsrmError
from osrm_lora.osrm import compute_osrm_bases, fix_row_signs, principal_angles
from osrm_lora.stats import STORE_VERSION, StatsStore, collect_statistics, sample_indices

logger = logging.getLogger("bench.stats_cost")

NAME = "stats_cost"
SEED = 42
ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
WORDS = ("the a of to and in is that it for on with as was by this be are from at or an have not they which one "
         "you had her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


@dataclass(frozen=True)
class Preset:
    device: str
    tasks: int
    n_samples: int
    batch_size: int
    max_length: int
    corda_samples: int
    osrm_n: int
    osrm_tasks: int
    rank: int
    repeats: int
    osrm_layers: int = 1
    osrm_legacy_layers: int = 1


PRESETS = {
    "smoke": Preset("cpu", tasks=2, n_samples=8, batch_size=4, max_length=32, corda_samples=4, osrm_n=64, osrm_tasks=3,
                    rank=4, repeats=1, osrm_layers=2, osrm_legacy_layers=1),
    "cpu": Preset("cpu", tasks=4, n_samples=64, batch_size=16, max_length=128, corda_samples=32, osrm_n=1024,
                  osrm_tasks=8, rank=16, repeats=3, osrm_layers=2, osrm_legacy_layers=1),
    "h100": Preset("cuda", tasks=8, n_samples=256, batch_size=32, max_length=128, corda_samples=128, osrm_n=4096,
                   osrm_tasks=8, rank=16, repeats=3, osrm_layers=32, osrm_legacy_layers=2),
}


# ------------------------------------------------------------------------------------------------ data/model


def make_texts(tasks: int, per_task: int, seed: int) -> dict[str, list[str]]:
    """Seeded synthetic sentences (8-100 words) per task; tasks differ in their word distributions."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in range(tasks):
        probs = rng.dirichlet(np.full(len(WORDS), 0.3))
        texts = []
        for _ in range(per_task):
            n = int(rng.integers(8, 100))
            texts.append(" ".join(WORDS[i] for i in rng.choice(len(WORDS), size=n, p=probs)))
        out[f"task{t}"] = texts
    return out


class HashTokenizer:
    """Word-level tokenizer hashing words into a vocabulary; used only when no real tokenizer is installed."""

    name_or_path = "hash-tokenizer"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def _ids(self, text: str) -> list[int]:
        return [101] + [1000 + zlib.crc32(w.encode()) % (self.vocab_size - 1000) for w in text.split()] + [102]

    def __call__(self, a: Sequence[str], b: Sequence[str] | None = None, *, padding: Any = True,
                 truncation: bool = True, max_length: int = 128, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        seqs = [self._ids(x)[:max_length] for x in a]
        width = max_length if padding == "max_length" else max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def load_model(name: str, device: torch.device) -> tuple[Any, Any, str]:
    """The backbone (sequence classifier, 2 labels) and tokenizer; random-init MiniLM shapes if the
    embedded model is not installed (stated in the results)."""
    from osrm_lora.backbone import load_classifier, load_tokenizer, resolve_model_path

    try:
        path = resolve_model_path(name)
        model = load_classifier(path, 2, device=device)
        return model, load_tokenizer(path), path
    except OsrmError as exc:
        if name not in ("default", None):
            raise
        logger.warning("%s; using a random-init BERT with all-MiniLM-L6-v2 shapes and a hash tokenizer", exc)
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(SEED)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         vocab_size=30522, num_labels=2)
        model = BertForSequenceClassification(cfg).to(device).eval()
        return model, HashTokenizer(cfg.vocab_size), "random-init BERT (all-MiniLM-L6-v2 shapes), hash tokenizer"


def plain_forward(model: Any, tokenizer: Any, texts: dict[str, list[str]], *, n_samples: int, max_length: int,
                  batch_size: int, seed: int) -> int:
    """The forward passes ``collect_statistics`` makes (same samples, batches, tokenisation), without hooks."""
    dev = next(model.parameters()).device
    tokens = 0
    model.eval()
    with torch.no_grad():
        for task_texts in texts.values():
            idx = sample_indices(len(task_texts), n_samples, seed)
            for start in range(0, len(idx), batch_size):
                chunk = [task_texts[i] for i in idx[start:start + batch_size]]
                enc = tokenizer(chunk, None, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                enc = {k: v.to(dev) for k, v in enc.items()}
                model(**enc)
                tokens += int(enc["attention_mask"].sum())
    return tokens


def corda_covariance(model: Any, tokenizer: Any, texts: dict[str, list[str]], targets: list[str], n_samples: int,
                     max_length: int, seed: int) -> int:
    """PEFT CorDA's covariance collection over the same samples, one sample per forward (its hook needs batch 1)."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution, target_modules

    cfg = LoraConfig(r=16, target_modules=targets, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method="ipm"))
    dev = next(model.parameters()).device

    def run_model() -> None:
        for task_texts in texts.values():
            for i in sample_indices(len(task_texts), n_samples, seed):
                enc = tokenizer([task_texts[i]], None, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                model(**{k: v.to(dev) for k, v in enc.items()})

    calib_cov_distribution(model, cfg, run_model, None, None)
    mods = list(target_modules(model, cfg))
    for _, mod in mods:  # free the temporary fields CorDA attaches
        for attr in ("covariance_matrix", "sample_count"):
            if hasattr(mod, attr):
                delattr(mod, attr)
    return len(mods)


# ------------------------------------------------------------------------------------------------ OSRM

TARGET_OSRM = "OSRM init, 8 tasks x 32 layers Llama-3-8B q/v shapes <= 5 s on one H200, principal angles <= 1e-3 rad"


def synthetic_store(tasks: int, n: int, seed: int, device: torch.device, layers: int = 1) -> StatsStore:
    """A statistics store with ``layers`` q/v input groups of size ``n`` (one per layer, as a Llama
    q_proj/v_proj pair reads one input) and random SPD Gram matrices (spectra decaying over five
    orders of magnitude), made on ``device`` and kept as float32 on CPU. Layer 0 is the same as
    before this function took ``layers``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    count = 4096
    tensors: dict[str, torch.Tensor] = {}
    decay = torch.exp(-torch.linspace(0, math.log(1e5) / 2, n, device=device))
    names = [f"t{i}" for i in range(tasks)]
    groups, members_of, module_to_group = [], {}, {}
    for layer in range(layers):
        group = f"model.layers.{layer}.self_attn.q_proj+v_proj"
        members = [f"model.layers.{layer}.self_attn.q_proj", f"model.layers.{layer}.self_attn.v_proj"]
        groups.append(group)
        members_of[group] = members
        module_to_group.update({m: group for m in members})
        for t in names:
            W = torch.randn(n, n, generator=gen, device=device) * decay / math.sqrt(n)
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, device=device))
            W = Q @ W
            G = (W @ W.T) * count + 1e-6 * count * torch.eye(n, device=device)
            tensors[f"{t}::{group}::count"] = torch.tensor(count, dtype=torch.int64)
            tensors[f"{t}::{group}::sum"] = torch.zeros(n)
            tensors[f"{t}::{group}::gram"] = G.float().cpu()
            tensors[f"{t}::{group}::sample_means"] = torch.zeros(1, n)
    meta = {"version": STORE_VERSION, "model_fingerprint": "synthetic", "model_class": "synthetic", "tokenizer": "",
            "vocab_size": None, "max_length": None, "n_samples": None, "seed": seed, "include_padding": False,
            "pad_to_max_length": False, "dtype": "float32", "target_modules": ["q_proj", "v_proj"], "tasks": names,
            "per_task": {t: {"samples": 1, "tokens": count} for t in names}, "groups": groups,
            "group_members": members_of, "group_dims": {g: n for g in groups}, "module_to_group": module_to_group}
    return StatsStore(tensors=tensors, meta=meta)


def legacy_osrm_bases(store: StatsStore, tasks: Sequence[str], rank: int, mode: str, groups: Sequence[str], *,
                      ridge: float = 1e-3, device: torch.device | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The per-task, per-group OSRM code before batching (osrm.py at commit 1e9f22e), kept verbatim
    for timing and comparison: S_-i summed on the CPU for every task, one full eigh per problem.
    ``{task: {group: A (float64, CPU)}}``."""

    def sym64(S: torch.Tensor) -> torch.Tensor:
        S = S.detach().to(dtype=torch.float64)
        return (S + S.T) / 2

    def paper(S_other: torch.Tensor) -> torch.Tensor:
        _, vecs = torch.linalg.eigh(sym64(S_other))
        return fix_row_signs(vecs[:, :rank].T.contiguous())

    def own(S_own: torch.Tensor, S_other: torch.Tensor) -> torch.Tensor:
        Si, So = sym64(S_own), sym64(S_other)
        n = So.shape[0]
        tr = float(torch.trace(So))
        eps = ridge * tr / n if tr > 0 else ridge
        L = torch.linalg.cholesky(So + eps * torch.eye(n, dtype=torch.float64, device=So.device))
        C = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, Si, upper=False).T, upper=False)
        _, Y = torch.linalg.eigh((C + C.T) / 2)
        V = torch.linalg.solve_triangular(L.T, Y[:, -rank:].flip(1), upper=True)
        return fix_row_signs(torch.linalg.qr(V)[0].T.contiguous())

    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for t in tasks:
        others = [j for j in tasks if j != t]
        for g in groups:
            S_other = sum(store.second_moment(j, g) for j in others)
            assert isinstance(S_other, torch.Tensor)
            if device is not None:
                S_other = S_other.to(device)
            if mode == "paper":
                out[t][g] = paper(S_other).cpu()
            else:
                out[t][g] = own(store.second_moment(t, g).to(S_other.device), S_other).cpu()
    return out


def _max_angle(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> float:
    return max(float(principal_angles(a[t][g], b[t][g]).max()) for t in a for g in a[t])


def _warm_up(dev: torch.device) -> None:
    """Load the solver libraries (cuSOLVER/cuBLAS handles) before anything is timed."""
    x = torch.randn(4, 64, 64, dtype=torch.float64, device=dev)
    s = x @ x.mT + torch.eye(64, dtype=torch.float64, device=dev)
    chol = torch.linalg.cholesky(s)
    torch.linalg.solve_triangular(chol, s, upper=False)
    torch.linalg.eigh(s)
    torch.linalg.eigh(s[:, :40, :40])
    torch.linalg.qr(x[..., :8])
    torch.linalg.svdvals(x[..., :8])
    bu.sync(dev)


def run_osrm(p: Preset, dev: torch.device) -> dict[str, Any]:
    """Old per-module path (on ``osrm_legacy_layers`` layers, scaled linearly to all layers: it is a
    sequential loop over (task, layer)), the batched exact path (``solver="eigh"``) and the subset
    solver, on ``osrm_layers`` q/v groups; principal angles between them."""
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    store = synthetic_store(p.osrm_tasks, p.osrm_n, SEED, dev, layers=p.osrm_layers)
    made_s = time.perf_counter() - t0
    _warm_up(dev)
    groups = store.groups
    legacy_groups = groups[:p.osrm_legacy_layers]
    scale = len(groups) / len(legacy_groups)
    mem = dev.type == "cuda"  # the CPU peak sampler would need one more (long) call
    rows = []
    for mode in ("paper", "own"):
        leg_t, leg_pk, legacy = bu.time_call(
            lambda mode=mode: legacy_osrm_bases(store, store.tasks, p.rank, mode, legacy_groups, device=dev),
            device=dev, warmup=0, repeats=1, keep_result=True, measure_memory=mem)
        row: dict[str, Any] = {"mode": mode, "n": p.osrm_n, "tasks": p.osrm_tasks, "layers": len(groups),
                               "rank": p.rank, "problems": p.osrm_tasks * len(groups),
                               "legacy": {"timing": leg_t.to_json(), "layers_timed": len(legacy_groups),
                                          "scaled_s": leg_t.best * scale,
                                          "peak": leg_pk.to_json() if leg_pk else None}}
        new: dict[str, Any] = {}
        for solver in ("eigh", "subset"):
            tm, pk, (bases, report) = bu.time_call(
                lambda mode=mode, solver=solver: compute_osrm_bases(store, store.tasks, p.rank, mode, device=dev,
                                                                    solver=solver),
                device=dev, warmup=0, repeats=1, keep_result=True, measure_memory=mem)
            new[solver] = bases
            A0 = bases[store.tasks[0]][groups[0]]
            orth = float(torch.linalg.norm(A0 @ A0.T - torch.eye(p.rank, dtype=torch.float64)))
            row[solver] = {"timing": tm.to_json(), "peak": pk.to_json() if pk else None, "orthonormality_err": orth,
                           "speedup_vs_legacy": leg_t.best * scale / tm.best,
                           "report": {k: v for k, v in report.items()}}
            logger.info("osrm %s %s n=%d x%d layers: %.2fs (legacy %.2fs scaled)", mode, solver, p.osrm_n,
                        len(groups), tm.best, leg_t.best * scale)
        sub_legacy = {t: {g: new["eigh"][t][g] for g in legacy_groups} for t in store.tasks}
        row["angle_eigh_vs_legacy"] = _max_angle(legacy, sub_legacy)
        row["angle_subset_vs_eigh"] = _max_angle(new["eigh"], new["subset"])
        rows.append(row)
        del legacy, new
        bu.free_memory(dev)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"rows": rows, "store_seconds": made_s, "target": osrm_target(p, rows, dev),
            "load_average": {"start": load_start, "end": load_end}}


def osrm_target(p: Preset, rows: list[dict[str, Any]], dev: torch.device) -> dict[str, Any]:
    """The Targets row. Met/missed only when measured on an H200 at the target shapes; otherwise
    'not measured on GPU' (or on which GPU it was measured)."""
    worst_s = max(r["subset"]["timing"]["best_s"] for r in rows)
    worst_angle = max(r["angle_subset_vs_eigh"] for r in rows)
    target_shape = p.osrm_n == 4096 and p.osrm_tasks == 8 and p.osrm_layers == 32
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    if dev.type != "cuda":
        status = "not measured on GPU"
    elif not target_shape:
        status = f"not measured at the target shapes ({name})"
    elif "H200" not in name:
        status = ("met" if worst_s <= 5.0 and worst_angle <= 1e-3 else "missed") + f" on {name}, not an H200"
    else:
        status = "met" if worst_s <= 5.0 and worst_angle <= 1e-3 else "missed"
    return {"target": TARGET_OSRM, "seconds": worst_s, "angle": worst_angle, "status": status,
            "shape": f"{p.osrm_tasks} tasks x {p.osrm_layers} layers, n={p.osrm_n}, rank {p.rank}", "device": name}


# ------------------------------------------------------------------------------------------------ run


def run(preset_name: str, out_dir: Path, model_name: str, md_path: Path | None,
        osrm_only: bool = False) -> dict[str, Any]:
    p = PRESETS[preset_name]
    dev = bu.pick_device(p.device)
    torch.manual_seed(SEED)
    machine = bu.machine_info(dev)
    logger.info("machine: %s", bu.describe_machine(machine))
    if osrm_only:
        results: dict[str, Any] = {"profile": [], "corda": {}, "osrm": run_osrm(p, dev)}
        md, notes = summary(p, results, "-", 0, machine, osrm_only=True)
        rec = bu.BenchRecord(name=NAME, preset=f"{preset_name}-osrm", command=bu.command_line(),
                             seeds={"osrm": SEED}, machine=machine, settings={"preset": p.__dict__},
                             results=results, summary_md=md, notes=notes)
        bu.write_results(rec, out_dir, benchmarks_md=md_path)
        return results
    model, tok, model_desc = load_model(model_name, dev)
    texts = make_texts(p.tasks, p.n_samples, SEED)
    from osrm_lora.backbone import default_target_modules

    default_targets = default_target_modules(getattr(model.config, "model_type", "bert"))
    results = {"profile": [], "corda": {}, "osrm": {}}
    kw = dict(n_samples=p.n_samples, max_length=p.max_length, seed=SEED)

    tokens = plain_forward(model, tok, texts, batch_size=p.batch_size, **kw)  # warm-up
    fwd_t, fwd_pk, _ = bu.time_call(lambda: plain_forward(model, tok, texts, batch_size=p.batch_size, **kw),
                                    device=dev, warmup=0, repeats=p.repeats)
    for label, targets in (("default targets " + "/".join(default_targets), default_targets),
                           ("all Linear modules", ALL_LINEAR)):
        st_t, st_pk, store = bu.time_call(
            lambda targets=targets: collect_statistics(model, tok, texts, targets, batch_size=p.batch_size, **kw),
            device=dev, warmup=0, repeats=p.repeats, keep_result=True)
        ratio = st_t.median / fwd_t.median
        results["profile"].append({"targets": label, "groups": len(store.groups),
                                   "gram_dims": sorted(set(store.meta["group_dims"].values())),
                                   "forward": fwd_t.to_json(), "profile": st_t.to_json(),
                                   "forward_peak": fwd_pk.to_json() if fwd_pk else None,
                                   "profile_peak": st_pk.to_json() if st_pk else None,
                                   "ratio": ratio, "met": ratio <= 1.10})
        logger.info("profile (%s): %.3fs vs forward %.3fs -> %.3fx", label, st_t.median, fwd_t.median, ratio)
        store = None

    # CorDA vs ours at batch 1 on the same (fewer) samples
    ckw = dict(n_samples=p.corda_samples, max_length=p.max_length, seed=SEED)
    f1_t, _, _ = bu.time_call(lambda: plain_forward(model, tok, texts, batch_size=1, **ckw), device=dev, warmup=0,
                              repeats=p.repeats, measure_memory=False)
    o1_t, _, _ = bu.time_call(lambda: collect_statistics(model, tok, texts, default_targets, batch_size=1, **ckw),
                              device=dev, warmup=0, repeats=p.repeats, measure_memory=False)
    try:
        c_t, c_pk, n_mods = bu.time_call(
            lambda: corda_covariance(model, tok, texts, default_targets, p.corda_samples, p.max_length, SEED),
            device=dev, warmup=0, repeats=p.repeats, keep_result=True)
        results["corda"] = {"available": True, "samples_per_task": p.corda_samples, "batch_size": 1,
                            "modules": n_mods, "forward_b1": f1_t.to_json(), "ours_b1": o1_t.to_json(),
                            "corda": c_t.to_json(), "corda_peak": c_pk.to_json() if c_pk else None,
                            "ours_ratio": o1_t.median / f1_t.median, "corda_ratio": c_t.median / f1_t.median,
                            "speedup_vs_corda": c_t.median / o1_t.median}
    except (ImportError, AttributeError, TypeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "attr":
            why += (" (peft.tuners.lora.corda imports `attr` from the attrs package, which peft does not declare "
                    "as a dependency; `pip install attrs` enables this comparison)")
        results["corda"] = {"available": False, "why": why}
    model = None  # release it (the closures above read this name)
    bu.free_memory(dev)

    # OSRM init
    results["osrm"] = run_osrm(p, dev)

    md, notes = summary(p, results, model_desc, tokens, machine)
    rec = bu.BenchRecord(name=NAME, preset=preset_name, command=bu.command_line(), seeds={"data": SEED, "osrm": SEED},
                         machine=machine, settings={"preset": p.__dict__, "model": model_desc, "tokens": tokens},
                         results=results, summary_md=md, notes=notes)
    bu.write_results(rec, out_dir, benchmarks_md=md_path)
    return results


def summary(p: Preset, res: dict[str, Any], model_desc: str, tokens: int, machine: dict[str, Any],
            osrm_only: bool = False) -> tuple[str, list[str]]:
    if osrm_only:
        md, notes = osrm_summary(p, res["osrm"], machine)
        return "\n".join(md), notes
    lines = ["### Statistics collection vs plain forward", ""]
    rows = [[r["targets"], r["groups"], ",".join(map(str, r["gram_dims"])), bu.fmt_seconds(r["forward"]["median_s"]),
             bu.fmt_seconds(r["profile"]["median_s"]), f"{r['ratio']:.3f}x", "met" if r["met"] else "missed",
             bu.fmt_bytes(r["profile_peak"]["peak_bytes"]) if r["profile_peak"] else "-"]
            for r in res["profile"]]
    lines.append(bu.markdown_table(["targets", "groups", "Gram n", "forward", "profile", "ratio", "target <= 1.10x",
                                    "profile peak mem"], rows))
    c = res["corda"]
    lines += ["", "### PEFT CorDA covariance collection (batch 1, same samples)", ""]
    if c.get("available"):
        rows = [["plain forward", bu.fmt_seconds(c["forward_b1"]["median_s"]), "1.00x"],
                ["ours (collect_statistics)", bu.fmt_seconds(c["ours_b1"]["median_s"]), f"{c['ours_ratio']:.3f}x"],
                [f"PEFT CorDA calib_cov_distribution ({c['modules']} modules)", bu.fmt_seconds(c["corda"]["median_s"]),
                 f"{c['corda_ratio']:.3f}x"]]
        lines.append(bu.markdown_table(["", "time", "vs forward"], rows))
        lines += ["", f"CorDA time / our time: {c['speedup_vs_corda']:.2f}x."]
    else:
        lines.append(f"Not available in this PEFT: {c.get('why')}")
    osrm_md, osrm_notes = osrm_summary(p, res["osrm"], machine)
    lines += [""] + osrm_md
    notes = [
        f"Model: {model_desc}; {p.tasks} synthetic tasks (seeded random sentences), {p.n_samples} samples each, "
        f"max_length {p.max_length}, batch {p.batch_size}, {tokens} non-padding tokens per pass; float32 Gram.",
        "Times are medians of the timed repeats; forward and profile use the same seeded samples, batches and "
        "tokenisation (tokenisation included in both).",
        "CorDA's hook squeezes the batch dimension, so it only works with one sample per forward; it normalises "
        "each sample by its max |x| and keeps one covariance per module (not per shared-input group), so its "
        "values are not comparable to ours, only its cost.",
    ]
    notes += osrm_notes
    return "\n".join(lines), notes


def osrm_summary(p: Preset, o: dict[str, Any], machine: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown lines and notes of the OSRM part."""
    lines = [f"### OSRM initialisation ({p.osrm_tasks} tasks x {p.osrm_layers} q/v groups, n={p.osrm_n}, "
             f"rank {p.rank}: {p.osrm_tasks * p.osrm_layers} eigenproblems per mode)", ""]
    rows = []
    for r in o["rows"]:
        leg = r["legacy"]
        rows.append([r["mode"], "old per-module loop",
                     bu.fmt_seconds(leg["scaled_s"]) + (" *" if leg["layers_timed"] < r["layers"] else ""),
                     "1.00x", "-", "-"])
        for solver in ("eigh", "subset"):
            x = r[solver]
            rep_ = x["report"]
            angle = r["angle_eigh_vs_legacy"] if solver == "eigh" else r["angle_subset_vs_eigh"]
            against = "vs old" if solver == "eigh" else "vs eigh"
            extra = (f"{rep_['by_subset']}/{rep_['problems']} by subset, {len(rep_['fallback'])} fell back"
                     + (f", max bound {rep_['max_bound']:.1e}" if rep_.get("max_bound") is not None else "")
                     if solver == "subset" else "exact")
            rows.append([r["mode"], f"batched {solver}", bu.fmt_seconds(x["timing"]["best_s"]),
                         f"{x['speedup_vs_legacy']:.2f}x", f"{angle:.1e} ({against})", extra])
    lines.append(bu.markdown_table(["mode", "path", "time (all tasks, all groups)", "speed-up vs old",
                                    "max principal angle (rad)", "solver"], rows))
    t = o["target"]
    lines += ["", "`*` old path timed on a subset of layers and scaled linearly (it loops over tasks and layers).",
              "", "### Targets", ""]
    value = (f"{t['seconds']:.3g} s, {t['angle']:.1e} rad" if t["status"] != "not measured on GPU"
             else f"- (here: {t['seconds']:.3g} s, {t['angle']:.1e} rad at {t['shape']} on CPU)")
    lines.append(bu.markdown_table(["target", "value", "status"], [[t["target"], value, t["status"]]]))
    notes = [
        f"OSRM: {p.osrm_tasks} tasks x {p.osrm_layers} q/v input groups with random SPD second moments "
        f"(n={p.osrm_n}, float32 Gram, spectra decaying over 5 orders of magnitude), rank {p.rank}; float64 solves on "
        f"{machine.get('device', 'the benchmark device')} ({machine.get('cpu_cores_usable')} usable CPU cores); "
        f"one timed call each (store generation, {o['store_seconds']:.0f} s, not timed).",
        "Old path: osrm.py before batching (per task and group: S_-i summed on the CPU, one full eigh). Batched eigh: "
        "all tasks and groups of one size stacked, S_-i = total - S_i, batched Cholesky/triangular solves/eigh; "
        "must agree with the old path to float64 rounding. Subset: Chebyshev-filtered subspace iteration for the r "
        "needed eigenvectors with a residual bound per problem, falling back to eigh above subset_tol=1e-6 rad.",
        "Principal angles from the sines (svdvals of (I - P_A) Q_B), float64 bases before the float32 cast.",
    ]
    la = o.get("load_average") or {}
    cores = machine.get("cpu_cores_usable")
    if la.get("start") is not None and cores and max(la["start"], la["end"]) > 1.25 * cores:
        notes.append(f"The CPU was shared while this ran (1-min load average {la['start']:.1f} at the start, "
                     f"{la['end']:.1f} at the end, on {cores} usable cores): absolute times are inflated and the "
                     "ratios between paths are indicative only.")
    if t["status"] == "not measured on GPU":
        notes.append(f"The target is for n=4096 x 32 layers on an H200 and is not measured here; this CPU run uses "
                     f"n={p.osrm_n} x {p.osrm_layers} layers. The GPU figure comes from "
                     "`python bench/stats_cost.py --preset h100 --osrm-only` on that machine.")
    return lines, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--model", default="default", help="model name or path (default: the embedded MiniLM)")
    ap.add_argument("--benchmarks-md", default=None, help="markdown file to update (default: BENCHMARKS.md)")
    ap.add_argument("--osrm-only", action="store_true", help="only the OSRM part (written as preset <preset>-osrm)")
    args = ap.parse_args(argv)
    bu.setup_logging()
    t0 = time.perf_counter()
    res = run(args.preset, Path(args.out), args.model, Path(args.benchmarks_md) if args.benchmarks_md else None,
              osrm_only=args.osrm_only)
    print(f"\nstats_cost --preset {args.preset}: {time.perf_counter() - t0:.0f} s total")
    for r in res["profile"]:
        print(f"  profile/forward ({r['targets']}): {r['ratio']:.3f}x [{'met' if r['met'] else 'MISSED'} <= 1.10x]")
    c = res["corda"]
    if c.get("available"):
        print(f"  batch 1: ours {c['ours_ratio']:.3f}x forward, CorDA {c['corda_ratio']:.3f}x forward")
    elif not args.osrm_only:
        print(f"  CorDA not timed: {c.get('why')}")
    for o in res["osrm"]["rows"]:
        print(f"  osrm {o['mode']} n={o['n']} x{o['tasks']} tasks x{o['layers']} layers: old {o['legacy']['scaled_s']:.2f} s, "
              f"eigh {o['eigh']['timing']['best_s']:.2f} s ({o['eigh']['speedup_vs_legacy']:.2f}x, "
              f"{o['angle_eigh_vs_legacy']:.1e} rad), subset {o['subset']['timing']['best_s']:.2f} s "
              f"({o['subset']['speedup_vs_legacy']:.2f}x, {o['angle_subset_vs_eigh']:.1e} rad)")
    t = res["osrm"]["target"]
    print(f"  [{t['status']}] {t['target']}: {t['seconds']:.3g} s, {t['angle']:.1e} rad ({t['shape']}, {t['device']})")


if __name__ == "__main__":
    main()
