"""Scale-out: the distributed paths on 1..N processes, each launched with torchrun, compared with 1.

    python bench/scale_out.py --preset gpu [--nprocs 1,2,4]     # one process per GPU (NCCL)
    python bench/scale_out.py --preset cpu [--nprocs 1,2]       # CPU processes (gloo)

For every process count W the same worker runs under ``torchrun --nproc_per_node W`` and measures:

1. DDP training of one adapter (``mr``, a capped train split, 1 epoch) with the same GLOBAL batch:
   wall time, examples/s, train loss, validation and test score (the same up to numerics for all W).
2. Sharded statistics profiling of 4 tasks: wall time; the store is compared with W=1's
   (largest relative difference of the Gram matrices).
3. Parallel per-task training (``parallel: tasks``): 4 adapters dealt to the processes; wall time.
4. Streamed merge (``osrm_lora.merge.stream``) of 8 random rank-16 adapters: task arithmetic at the
   full shapes (Llama-3-8B on gpu) and TIES (task-wide threshold, dense, SVD back to rank 128) on a
   few layers; wall time and peak memory of one process, against the in-memory merge of the same
   adapters; outputs compared with W=1's bit for bit.

The process counts are launched by this script with ``python -m torch.distributed.run`` (the
product itself has no launcher). Results go to bench/results/scale_out_<preset>.json and the
``scale_out`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import osrm_lora  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(ROOT / "src"))

import benchlib as bu  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("bench.scale_out")

LLAMA_SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
                "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
                "mlp.down_proj": (4096, 14336)}
SMALL_SHAPES = {"self_attn.q_proj": (768, 768), "self_attn.k_proj": (192, 768), "self_attn.v_proj": (192, 768),
                "self_attn.o_proj": (768, 768), "mlp.gate_proj": (2688, 768), "mlp.up_proj": (2688, 768),
                "mlp.down_proj": (768, 2688)}

PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"device": "cuda", "train_cap": 4096, "batch": 64, "max_length": 64, "profile_samples": 1024,
            "task_cap": 1024, "shapes": "llama", "layers": 32, "ties_layers": 2, "adapters": 8, "rank": 16},
    "cpu": {"device": "cpu", "train_cap": 256, "batch": 32, "max_length": 32, "profile_samples": 96,
            "task_cap": 128, "shapes": "small", "layers": 4, "ties_layers": 2, "adapters": 8, "rank": 16},
}
TASKS = ["mr", "hedge", "bbc", "spam"]
SEED = 0


# ------------------------------------------------------------------------------------------ worker
def _capped(task: Any, n: int) -> Any:
    import random
    from dataclasses import replace

    from osrm_lora.data.task import Split

    tr = task.train
    idx = sorted(random.Random(SEED).sample(range(len(tr)), min(n, len(tr))))  # a seeded random subset
    pick = lambda xs: tuple(xs[i] for i in idx)  # noqa: E731
    return replace(task, train=Split(pick(tr.texts), pick(tr.labels), None if tr.text_pairs is None else pick(tr.text_pairs)))


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


def merge_difference(a: Path, b: Path) -> float:
    """Largest relative difference between the dense updates of two merged adapters (0.0 = equal)."""
    from osrm_lora.adapters import load_adapter

    x, y = load_adapter(a), load_adapter(b)
    if set(x.modules) != set(y.modules):
        return float("inf")
    worst = 0.0
    for k, m in x.modules.items():
        d1, d2 = m.delta(), y.modules[k].delta()
        worst = max(worst, float((d1 - d2).abs().max() / d1.abs().max().clamp_min(1e-30)))
    return worst


def worker(preset_name: str, work: Path, adapters_dir: Path) -> None:
    from osrm_lora import distributed as D
    from osrm_lora.backbone import load_classifier, load_tokenizer, resolve_model_path
    from osrm_lora.config import LoraSettings, TrainSettings
    from osrm_lora.data import load_task
    from osrm_lora.merge.stream import stream_merge
    from osrm_lora.pipeline import run_jobs
    from osrm_lora.stats import collect_statistics
    from osrm_lora.train import train_task

    p = PRESETS[preset_name]
    env = D.init_distributed(p["device"])
    dev = D.rank_device(p["device"])
    W = env.world_size
    out = work / f"w{W}"
    res: dict[str, Any] = {"world_size": W, "backend": env.backend, "device": str(dev)}
    model = resolve_model_path("default")
    lora = LoraSettings(rank=8, alpha=16)

    with D.main_first():
        tasks = {name: load_task(name) for name in TASKS}

    # 1. DDP training of one adapter, the same global batch for every W
    tcfg = TrainSettings(epochs=1, batch_size=p["batch"], lr=2e-3, head_lr=1e-2, max_length=p["max_length"],
                         eval_batch_size=256)
    D.barrier()
    t0 = time.perf_counter()
    r = train_task(_capped(tasks["mr"], p["train_cap"]), out / "ddp", model=model, lora=lora, train=tcfg, seed=SEED,
                   device=p["device"])
    D.barrier()
    secs = time.perf_counter() - t0
    res["ddp"] = {"seconds": secs, "train_seconds": r.train_seconds,
                  "examples_per_s": min(p["train_cap"], len(tasks["mr"].train)) / r.train_seconds,
                  "validation": r.validation, "test": r.test, "train_loss": r.history[0]["train_loss"]}

    # 2. sharded profiling
    tok = load_tokenizer(model)
    m = load_classifier(model, 2, device=dev, pad_token_id=tok.pad_token_id)
    texts = {n: list(t.train.texts) for n, t in tasks.items()}
    D.barrier()
    t0 = time.perf_counter()
    store = collect_statistics(m, tok, texts, ["query", "value"], n_samples=p["profile_samples"], batch_size=32,
                               max_length=p["max_length"], seed=SEED)
    D.barrier()
    res["profile"] = {"seconds": time.perf_counter() - t0}
    if env.is_main:
        store.save(out / "stats")
    del m

    # 3. parallel per-task training: adapters dealt to the processes
    D.barrier()
    t0 = time.perf_counter()
    run_jobs(TASKS, lambda name: train_task(_capped(tasks[name], p["task_cap"]), out / "tasks" / name, model=model,
                                            lora=lora, train=tcfg, seed=SEED, device=p["device"],
                                            data_parallel=False))
    res["parallel_tasks"] = {"seconds": time.perf_counter() - t0, "tasks": len(TASKS)}

    # 4. streamed merges
    dirs = sorted(str(d) for d in (adapters_dir / "full").iterdir())
    for label, method, params, src in (("task_arithmetic", "task_arithmetic", {"scaling": 1.0}, "full"),
                                       ("ties", "ties", {"density": 0.2, "threshold": "task"}, "few")):
        dirs = sorted(str(d) for d in (adapters_dir / src).iterdir())
        _peak_reset(dev)
        D.barrier()
        t0 = time.perf_counter()
        stream_merge(dirs, method, params, out / f"merge_{label}", device=p["device"], modules_per_step=1)
        D.barrier()
        peak = _peak(dev)
        peaks = D.all_gather_objects(peak)
        res[f"stream_{label}"] = {"seconds": time.perf_counter() - t0, "peak_bytes_per_rank": peaks}
    if env.is_main:
        (work / f"result_w{W}.json").write_text(json.dumps(res, indent=1))
    D.barrier()
    D.shutdown()


# ------------------------------------------------------------------------------------------ driver
def _make_adapters(root: Path, p: dict[str, Any], layers: int, name: str) -> Path:
    from osrm_lora.adapters import LoraAdapter, LoraModule, save_adapter

    shapes = LLAMA_SHAPES if p["shapes"] == "llama" else SMALL_SHAPES
    base = root / name
    if base.exists():
        return base
    g = torch.Generator().manual_seed(SEED)
    r = p["rank"]
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted({k.split(".")[-1] for k in shapes}),
           "base_model_name_or_path": "llama-3-8b-shapes", "task_type": "CAUSAL_LM"}
    for t in range(p["adapters"]):
        mods = {}
        for layer in range(layers):
            for key, (m, n) in shapes.items():
                A = torch.randn(r, n, generator=g) / n**0.5
                B = torch.randn(m, r, generator=g) * 0.01
                mods[f"model.layers.{layer}.{key}"] = LoraModule(A, B, 2.0)
        save_adapter(LoraAdapter(mods, dict(cfg), name=f"task{t}"), base / f"task{t}")
    return base


def _in_memory_reference(adapters: Path, p: dict[str, Any]) -> dict[str, Any]:
    """The same TA merge done in memory (all adapters loaded, merged, saved) for the peak-memory comparison."""
    from osrm_lora.adapters import load_adapter
    from osrm_lora.merge import merge, save_merge_result

    dev = torch.device(p["device"])
    _peak_reset(dev)
    t0 = time.perf_counter()
    ads = [load_adapter(d).to(dev) for d in sorted(adapters.iterdir())]
    res = merge(ads, "task_arithmetic", {"scaling": 1.0})
    save_merge_result(res, adapters.parent / "inmem_ta")
    return {"seconds": time.perf_counter() - t0, "peak_bytes": _peak(dev)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(n: int, preset: str, work: Path, adapters: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NCCL_NVLS_ENABLE="0", OSRM_LORA_NO_PROGRESS="1")
    if preset == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--preset", preset,
           "--work", str(work), "--adapters", str(adapters)]
    logger.info("launching %s", " ".join(cmd[1:7]))
    subprocess.run(cmd, env=env, check=True)


def summarise(results: list[dict[str, Any]], ref: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    base = results[0]
    rows, checks = [], {}
    for r in results:
        W = r["world_size"]
        diff = max(r[f"stream_{m}"]["rel_diff_vs_w1"] for m in ("task_arithmetic", "ties"))
        checks[f"w{W}"] = {"stream_max_rel_diff_vs_w1": diff,
                           "ddp_test_minus_w1": r["ddp"]["test"] - base["ddp"]["test"],
                           "ddp_loss_minus_w1": r["ddp"]["train_loss"] - base["ddp"]["train_loss"],
                           "gram_max_rel_diff_vs_w1": r.get("gram_max_rel_diff_vs_w1", 0.0)}
        rows.append([W, r["backend"] or "-", f"{r['ddp']['train_seconds']:.1f}", f"{r['ddp']['examples_per_s']:.0f}",
                     f"{r['ddp']['train_loss']:.4f}", f"{r['ddp']['test']:.2f}",
                     f"{r['profile']['seconds']:.2f}", f"{checks[f'w{W}']['gram_max_rel_diff_vs_w1']:.1e}",
                     f"{r['parallel_tasks']['seconds']:.1f}",
                     f"{r['stream_task_arithmetic']['seconds']:.2f}",
                     bu.fmt_bytes(max(x or 0 for x in r["stream_task_arithmetic"]["peak_bytes_per_rank"]) or None),
                     f"{r['stream_ties']['seconds']:.2f}", f"{diff:.1e}"])
    headers = ["processes", "backend", "DDP train steps s", "ex/s", "train loss", "test", "profile s", "Gram rel. diff vs 1",
               "4 tasks parallel s", "stream TA s", "TA peak/rank", "stream TIES s", "merge rel. diff vs 1"]
    md = bu.markdown_table(headers, rows)
    md += (f"\n\nIn-memory TA merge of the same adapters (all loaded, merged, saved): {ref['seconds']:.2f} s, "
           f"peak {bu.fmt_bytes(ref['peak_bytes']) if ref['peak_bytes'] else 'n/a (CPU)'}; streamed TA differs from "
           f"it by {ref['stream_vs_in_memory_rel_diff']:.1e} (relative).")
    return md, checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--nprocs", default=None, help="comma-separated process counts (default: 1..GPUs, or 1,2 on cpu)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "runs" / "scale_out"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        bu.setup_logging()
        worker(args.preset, Path(args.work), Path(args.adapters))
        return 0
    bu.setup_logging()
    p = PRESETS[args.preset]
    if args.nprocs:
        counts = [int(x) for x in args.nprocs.split(",")]
    elif args.preset == "gpu":
        counts = list(range(1, max(1, torch.cuda.device_count()) + 1))
    else:
        counts = [1, 2]
    work = Path(args.work) / args.preset
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapters = work / "adapters"
    _make_adapters(adapters, p, p["layers"], "full")
    _make_adapters(adapters, p, p["ties_layers"], "few")
    ref = _in_memory_reference(adapters / "full", p)
    results = []
    for n in counts:
        _launch(n, args.preset, work, adapters)
        results.append(json.loads((work / f"result_w{n}.json").read_text()))
    from osrm_lora.stats import StatsStore

    s1 = StatsStore.load(work / "w1" / "stats") if (work / "w1" / "stats").exists() else None
    for r in results:
        if s1 is not None:
            sw = StatsStore.load(work / f"w{r['world_size']}" / "stats")
            r["gram_max_rel_diff_vs_w1"] = max(
                float((sw.tensors[k] - v).abs().max() / v.abs().max().clamp_min(1e-30))
                for k, v in s1.tensors.items() if k.endswith("gram"))
    for r in results:
        for m in ("task_arithmetic", "ties"):
            r[f"stream_{m}"]["rel_diff_vs_w1"] = merge_difference(work / "w1" / f"merge_{m}",
                                                                  work / f"w{r['world_size']}" / f"merge_{m}")
    ref["stream_vs_in_memory_rel_diff"] = merge_difference(adapters / "inmem_ta", work / "w1" / "merge_task_arithmetic")
    md, checks = summarise(results, ref)
    print(md)
    machine = bu.machine_info(p["device"])
    rec = bu.BenchRecord(
        name="scale_out", preset=args.preset, command=bu.command_line(), seeds={"train": SEED, "adapters": SEED},
        machine=machine,
        settings={k: v for k, v in p.items()} | {"process_counts": counts, "tasks": TASKS},
        results={"per_world_size": results, "checks": checks, "in_memory_ta": ref},
        summary_md=md,
        notes=["each process count is one torchrun launch of this script's worker; the DDP run uses the same "
               "global batch for every count; MiniLM has dropout 0.1, so ranks draw other dropout masks than one "
               "process and loss/test differ by that noise (tests/test_distributed.py checks equality without "
               "dropout)",
               "merge rel. diff: largest relative difference of the merged dense updates against 1 process (TIES "
               "output is SVD-truncated; thread counts differ between process counts on CPU)",
               "TIES is merged on the first layers only (dense SVD back to rank 128 per module dominates its time)"])
    bu.write_results(rec, args.out, benchmarks_md=args.benchmarks_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
