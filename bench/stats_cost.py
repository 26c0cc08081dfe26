"""Cost of activation statistics and OSRM initialisation.

    python bench/stats_cost.py --preset cpu|h100 [--out bench/results] [--model default]

1. ``collect_statistics`` (full Gram matrices) against a plain forward pass over the same seeded
   samples, batches and tokenisation (ratio; target <= 1.10x), for the default LoRA targets and for
   every Linear module of the encoder.
2. PEFT's CorDA covariance collection (``peft.tuners.lora.corda.calib_cov_distribution``, the step
   ``preprocess_corda`` runs) on the same model and samples. Its hook squeezes the batch dimension,
   so it is fed one sample at a time; ours is timed at batch 1 and at its default batch size.
3. OSRM initialisation (``compute_osrm_A``, modes paper and own) for 8 tasks on one q/v input group
   of size n from random SPD second moments (n = 4096, Llama-3-8B q/v, on h100; smaller on cpu).
"""

from __future__ import annotations

import argparse
import logging
import math
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

import numpy as np
import torch

import benchlib as bu  # noqa: E402
from osrm_lora.errors import OsrmError
from osrm_lora.osrm import compute_osrm_A
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


PRESETS = {
    "smoke": Preset("cpu", tasks=2, n_samples=8, batch_size=4, max_length=32, corda_samples=4, osrm_n=64, osrm_tasks=3,
                    rank=4, repeats=1),
    "cpu": Preset("cpu", tasks=4, n_samples=64, batch_size=16, max_length=128, corda_samples=32, osrm_n=1024,
                  osrm_tasks=8, rank=16, repeats=3),
    "h100": Preset("cuda", tasks=8, n_samples=256, batch_size=32, max_length=128, corda_samples=128, osrm_n=4096,
                   osrm_tasks=8, rank=16, repeats=3),
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


def synthetic_store(tasks: int, n: int, seed: int, device: torch.device) -> StatsStore:
    """A statistics store with one q/v input group of size ``n`` and random SPD Gram matrices
    (spectra decaying over five orders of magnitude), made on ``device`` and kept as float32 on CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group = "model.layers.0.self_attn.q_proj+v_proj"
    members = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    count = 4096
    tensors: dict[str, torch.Tensor] = {}
    decay = torch.exp(-torch.linspace(0, math.log(1e5) / 2, n, device=device))
    names = [f"t{i}" for i in range(tasks)]
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
            "per_task": {t: {"samples": 1, "tokens": count} for t in names}, "groups": [group],
            "group_members": {group: members}, "group_dims": {group: n}, "module_to_group": {m: group for m in members}}
    return StatsStore(tensors=tensors, meta=meta)


# ------------------------------------------------------------------------------------------------ run


def run(preset_name: str, out_dir: Path, model_name: str, md_path: Path | None) -> dict[str, Any]:
    p = PRESETS[preset_name]
    dev = bu.pick_device(p.device)
    torch.manual_seed(SEED)
    machine = bu.machine_info(dev)
    logger.info("machine: %s", bu.describe_machine(machine))
    model, tok, model_desc = load_model(model_name, dev)
    texts = make_texts(p.tasks, p.n_samples, SEED)
    from osrm_lora.backbone import default_target_modules

    default_targets = default_target_modules(getattr(model.config, "model_type", "bert"))
    results: dict[str, Any] = {"profile": [], "corda": {}, "osrm": []}
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
    del model
    bu.free_memory(dev)

    # OSRM init
    store = synthetic_store(p.osrm_tasks, p.osrm_n, SEED, dev)
    for mode in ("paper", "own"):
        tm, pk, A = bu.time_call(lambda mode=mode: compute_osrm_A(store, store.tasks, p.rank, mode, device=dev), device=dev,
                                 warmup=0, repeats=1 if p.osrm_n >= 4096 else p.repeats, keep_result=True)
        A0 = A[store.tasks[0]][store.modules[0]].double()
        orth = float(torch.linalg.norm(A0 @ A0.T - torch.eye(p.rank, dtype=torch.float64)))
        results["osrm"].append({"mode": mode, "n": p.osrm_n, "tasks": p.osrm_tasks, "rank": p.rank,
                                "timing": tm.to_json(), "peak": pk.to_json() if pk else None,
                                "orthonormality_err": orth, "met_10s": tm.best <= 10.0})
        logger.info("osrm %s n=%d: %.2fs", mode, p.osrm_n, tm.best)

    md, notes = summary(p, results, model_desc, tokens, machine)
    rec = bu.BenchRecord(name=NAME, preset=preset_name, command=bu.command_line(), seeds={"data": SEED, "osrm": SEED},
                         machine=machine, settings={"preset": p.__dict__, "model": model_desc, "tokens": tokens},
                         results=results, summary_md=md, notes=notes)
    bu.write_results(rec, out_dir, benchmarks_md=md_path)
    return results


def summary(p: Preset, res: dict[str, Any], model_desc: str, tokens: int, machine: dict[str, Any]) -> tuple[str, list[str]]:
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
    lines += ["", "### OSRM initialisation (compute_osrm_A, one q/v input group)", ""]
    rows = [[o["mode"], o["n"], o["tasks"], o["rank"], bu.fmt_seconds(o["timing"]["best_s"]),
             bu.fmt_seconds(o["timing"]["best_s"] * 32), f"{o['orthonormality_err']:.1e}",
             ("met" if o["met_10s"] else "missed") + ("" if o["n"] >= 4096 else " (n < 4096: not the target size)")]
            for o in res["osrm"]]
    lines.append(bu.markdown_table(["mode", "n", "tasks", "rank", "time (1 group, all tasks)", "x32 layers",
                                    "||AA^T-I||", "target <= 10 s"], rows))
    notes = [
        f"Model: {model_desc}; {p.tasks} synthetic tasks (seeded random sentences), {p.n_samples} samples each, "
        f"max_length {p.max_length}, batch {p.batch_size}, {tokens} non-padding tokens per pass; float32 Gram.",
        "Times are medians of the timed repeats; forward and profile use the same seeded samples, batches and "
        "tokenisation (tokenisation included in both).",
        "CorDA's hook squeezes the batch dimension, so it only works with one sample per forward; it normalises "
        "each sample by its max |x| and keeps one covariance per module (not per shared-input group), so its "
        "values are not comparable to ours, only its cost.",
        f"OSRM: {p.osrm_tasks} tasks with random SPD second moments (n={p.osrm_n}, float32 Gram); "
        f"compute_osrm_A runs its float64 eigen-decompositions on {machine.get('device', 'the benchmark device')} "
        f"({machine.get('cpu_cores_usable')} usable CPU cores here); 'x32 layers' is a linear extrapolation to all "
        "Llama-3-8B layers (one q/v group per layer).",
    ]
    if p.osrm_n < 4096:
        notes.append(f"The <= 10 s OSRM target is stated for n=4096 on an H100 machine; this preset uses n={p.osrm_n}.")
    return "\n".join(lines), notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--model", default="default", help="model name or path (default: the embedded MiniLM)")
    ap.add_argument("--benchmarks-md", default=None, help="markdown file to update (default: BENCHMARKS.md)")
    args = ap.parse_args(argv)
    bu.setup_logging()
    t0 = time.perf_counter()
    res = run(args.preset, Path(args.out), args.model, Path(args.benchmarks_md) if args.benchmarks_md else None)
    print(f"\nstats_cost --preset {args.preset}: {time.perf_counter() - t0:.0f} s total")
    for r in res["profile"]:
        print(f"  profile/forward ({r['targets']}): {r['ratio']:.3f}x [{'met' if r['met'] else 'MISSED'} <= 1.10x]")
    c = res["corda"]
    if c.get("available"):
        print(f"  batch 1: ours {c['ours_ratio']:.3f}x forward, CorDA {c['corda_ratio']:.3f}x forward")
    else:
        print(f"  CorDA not timed: {c.get('why')}")
    for o in res["osrm"]:
        print(f"  osrm {o['mode']} n={o['n']} x{o['tasks']} tasks: {o['timing']['best_s']:.2f} s "
              f"[{'met' if o['met_10s'] else 'MISSED'} <= 10 s]")


if __name__ == "__main__":
    main()
