"""Dense TA/TIES with mergekit vs ours, over densified models (CPU; mergekit lives in its own venv).

    python bench/mergekit_speed.py --mergekit-python /path/to/venv/bin/python [--preset cpu] [--out bench/results]

mergekit (LGPL) is never imported here: it runs as a subprocess (``python -m mergekit.scripts.run_yaml``)
from a separate virtual environment, so our environment stays untouched. A small random Llama model
(the merge_speed cpu shapes) is the base; each of the 8 random LoRA adapters is densified into a
full fine-tuned model (``W0 + s B A``) saved as safetensors. mergekit's ``task_arithmetic`` and
``ties`` (density 0.2, weight 1, ``normalize: true``) run end to end (read 9 models, merge, write
one); ours run (a) in memory on the LoRA factors and (b) end to end from PEFT adapter directories to
a written dense delta file. Outputs are compared (merged - base vs our delta).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import osrm_lora  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bu  # noqa: E402
import merge_speed as ms  # noqa: E402
import torch

from osrm_lora.adapters import load_adapter, save_adapter
from osrm_lora.merge import merge

logger = logging.getLogger("bench.mergekit_speed")
NAME = "mergekit_speed"
SEED = ms.SEED


def build_models(p: ms.Preset, adapters: list[Any], root: Path) -> tuple[Path, list[Path], list[Path]]:
    """Write the base model, the densified models and the PEFT adapters under ``root``."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = 64 if p.hidden % 64 == 0 and p.kv % 64 == 0 else math.gcd(p.hidden, p.kv)
    cfg = LlamaConfig(hidden_size=p.hidden, intermediate_size=p.mlp, num_hidden_layers=p.layers,
                      num_attention_heads=p.hidden // head_dim, num_key_value_heads=p.kv // head_dim,
                      head_dim=head_dim, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    base = LlamaForCausalLM(cfg).float()
    base_dir = root / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    sd = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    tuned = []
    for ad in adapters:
        d = root / f"ft_{ad.name}"
        d.mkdir()
        out = dict(sd)
        for key, mod in ad.modules.items():
            out[key + ".weight"] = (sd[key + ".weight"] + mod.delta()).contiguous()
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base_dir / "config.json", d / "config.json")
        tuned.append(d)
    peft_dirs = []
    for ad in adapters:
        d = root / f"lora_{ad.name}"
        save_adapter(ad, d)
        peft_dirs.append(d)
    return base_dir, tuned, peft_dirs


def mergekit_config(method: str, base: Path, tuned: list[Path]) -> str:
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "parameters:",
             "  normalize: " + ("false" if method == "task_arithmetic" else "true"), "models:"]
    for d in tuned:
        lines.append(f"  - model: {d}")
        lines.append("    parameters:")
        lines += [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def run_mergekit(py: str, cfg_path: Path, out: Path, threads: int) -> float:
    cmd = [py, "-m", "mergekit.scripts.run_yaml", str(cfg_path), str(out), "--no-cuda", "--quiet",
           "--random-seed", str(SEED), "-j", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return dt


def merged_delta(out: Path, base: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if key + ".weight" in fh.keys():
                return fh.get_tensor(key + ".weight").float() - base[key + ".weight"].float()
    raise KeyError(key)


def run(preset: str, mk_python: str, out_dir: Path, md_path: Path | None) -> dict[str, Any]:
    p = ms.PRESETS[preset]
    if p.device != "cpu":
        raise SystemExit("mergekit_speed runs on CPU presets only")
    dev = torch.device("cpu")
    machine = bu.machine_info(dev)
    mk_version = subprocess.run([mk_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    shapes = ms.module_shapes(p, p.layers)
    adapters = ms.make_adapters(shapes, p.adapters, p.rank, SEED, dev)
    results: dict[str, Any] = {"mergekit_version": mk_version, "rows": []}
    with tempfile.TemporaryDirectory(prefix="mk-bench-") as tmp:
        root = Path(tmp)
        base_dir, tuned, peft_dirs = build_models(p, adapters, root)
        from safetensors.torch import load_file

        base_sd = load_file(str(next(base_dir.glob("*.safetensors"))))
        for method, ours_params in (("task_arithmetic", {}), ("ties", {"threshold": "matrix", "density": 0.2})):
            cfg = root / f"{method}.yml"
            cfg.write_text(mergekit_config(method, base_dir, tuned))
            times = []
            for i in range(p.dense_repeats):
                out = root / f"out_{method}_{i}"
                times.append(run_mergekit(mk_python, cfg, out, torch.get_num_threads()))
            mk_out = root / f"out_{method}_{p.dense_repeats - 1}"

            t_mem, _, res = bu.time_call(lambda method=method, ours_params=ours_params: merge(adapters, method, ours_params), warmup=0,
                                         repeats=p.dense_repeats, keep_result=True, measure_memory=False)

            def end_to_end(method: str = method, ours_params: dict[str, Any] = ours_params) -> None:
                from safetensors.torch import save_file

                ads = [load_adapter(d) for d in peft_dirs]
                r = merge(ads, method, ours_params)
                deltas = r.deltas if r.deltas is not None else r.adapter.deltas()
                save_file({k: v.contiguous() for k, v in deltas.items()}, str(root / f"ours_{method}.safetensors"))

            t_e2e, _, _ = bu.time_call(end_to_end, warmup=0, repeats=p.dense_repeats, measure_memory=False)
            worst = 0.0
            for key in shapes:
                ours_d = res.adapter.modules[key].delta() if res.adapter is not None else res.deltas[key]
                worst = max(worst, ms.rel_err(ours_d, merged_delta(mk_out, base_sd, key)))
            results["rows"].append({"method": method, "ours_params": ours_params, "mergekit_s": min(times),
                                    "mergekit_times_s": times, "ours_in_memory": t_mem.to_json(),
                                    "ours_end_to_end": t_e2e.to_json(), "max_rel_diff": worst,
                                    "speedup_in_memory": min(times) / t_mem.best,
                                    "speedup_end_to_end": min(times) / t_e2e.best})
            logger.info("%s: mergekit %.2fs, ours %.3fs in memory / %.2fs end to end, rel diff %.2e", method,
                        min(times), t_mem.best, t_e2e.best, worst)
            res = None
    rows = [[r["method"], bu.fmt_seconds(r["mergekit_s"]), bu.fmt_seconds(r["ours_end_to_end"]["best_s"]),
             bu.fmt_seconds(r["ours_in_memory"]["best_s"]), f"{r['speedup_end_to_end']:.1f}x",
             f"{r['speedup_in_memory']:.1f}x", f"{r['max_rel_diff']:.2e}"] for r in results["rows"]]
    md = bu.markdown_table(["method", "mergekit (end to end)", "ours (end to end)", "ours (in memory)",
                            "speed-up e2e", "speed-up in memory", "max rel. diff of deltas"], rows)
    notes = [
        f"mergekit {mk_version} ran as a subprocess from a separate venv (`--no-cuda -j {torch.get_num_threads()}`), "
        f"reading the base and {p.adapters} densified float32 models and writing the merged model; its time includes "
        "process start-up and all file I/O.",
        f"Models: random LlamaForCausalLM with the merge_speed '{preset}' shapes ({p.layers} layers, hidden {p.hidden}, "
        f"kv {p.kv}, mlp {p.mlp}, vocab 512); fine-tuned models = base + the dense delta of each random LoRA (seed {SEED}).",
        "Ours end to end: load the 8 PEFT adapter directories, merge, write the dense deltas (TIES) or their dense "
        "product (TA) to safetensors. Ours in memory: merge() on the loaded factors (TA stays in factor form).",
        "TIES parity: mergekit ties with density 0.2, weight 1, normalize true vs ours threshold=matrix density 0.2.",
    ]
    rec = bu.BenchRecord(name=NAME, preset=preset, command=bu.command_line(), seeds={"adapters": SEED, "base": SEED},
                         machine=machine, settings={"preset": p.__dict__}, results=results, summary_md=md, notes=notes)
    bu.write_results(rec, out_dir, benchmarks_md=md_path)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=[k for k, v in ms.PRESETS.items() if v.device == "cpu"], default="cpu")
    ap.add_argument("--mergekit-python", required=True, help="python of a venv where mergekit is installed")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--benchmarks-md", default=None)
    args = ap.parse_args(argv)
    bu.setup_logging()
    with torch.no_grad():
        res = run(args.preset, args.mergekit_python, Path(args.out), Path(args.benchmarks_md) if args.benchmarks_md else None)
    print(f"\nmergekit_speed --preset {args.preset} (mergekit {res['mergekit_version']})")
    for r in res["rows"]:
        print(f"  {r['method']:16s} mergekit {r['mergekit_s']:.2f} s | ours e2e {r['ours_end_to_end']['best_s']:.2f} s "
              f"| ours in memory {r['ours_in_memory']['best_s']:.3f} s | rel diff {r['max_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
