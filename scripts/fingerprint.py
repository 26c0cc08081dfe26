"""Fingerprint what the package writes, to check that a reshape left every output byte-identical.

    python scripts/fingerprint.py --out before.json            # on the code before the change
    python scripts/fingerprint.py --out after.json --compare before.json

Runs, in a fixed work directory (``--work``, wiped first; paths in the outputs are then the same
from run to run), a fixed tiny pipeline on a random two-layer BERT and two keyword tasks (CPU,
seed 0; inits standard and OSRM own; task_arithmetic, ties, dare_ties and emr over two lambdas),
(its stage ledger, whose input hashes cover timing fields, is left out), then a fixed set of merges of its adapters: every registered method that needs no task data, in
memory to the PEFT format, ties and task_arithmetic to a full model, and ties, dare_ties and emr
streamed. It records the SHA-256 of every file written (JSON files with their timing, memory, date, host
and version fields removed; adapter, head and model files as they are). ``--compare`` lists the files that differ, or are
only on one side, and exits 1 if any do.

The package is imported from the environment (``PYTHONPATH=OLD/src`` fingerprints another
checkout's code with this script). Fingerprints are only comparable on one machine and one torch
build: float kernels differ across CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models and tasks of the test suite

from tinymodels import write_keyword_tasks, write_tiny_model  # noqa: E402

from osrm_lora.adapters import load_adapter  # noqa: E402
from osrm_lora.config import parse_config  # noqa: E402
from osrm_lora.merge import list_methods, merge, save_merge_result, stream_merge  # noqa: E402
from osrm_lora.pipeline import run_pipeline  # noqa: E402

logger = logging.getLogger("fingerprint")

# fields that change from run to run (wall time, memory, dates, hosts, versions)
VOLATILE = ("seconds", "_s", "peak", "time", "date", "host", "machine", "version", "python", "torch", "started",
            "finished", "elapsed", "duration", "pid")


def _volatile(key: str) -> bool:
    k = key.lower()
    return any(k.endswith(v) or v in k for v in VOLATILE)


def clean(obj: Any) -> Any:
    """``obj`` without the volatile fields (at any depth)."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items() if not _volatile(str(k))}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return obj


def file_digest(path: Path) -> str:
    if path.suffix == ".json":
        data = json.dumps(clean(json.loads(path.read_text(encoding="utf-8"))), sort_keys=True).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def digests(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(rel.startswith(s) for s in skip) and p.suffix not in (".log", ".png", ".html"):
            out[rel] = file_digest(p)
    return out


def run_all(work: Path) -> dict[str, str]:
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    os.environ["OSRM_LORA_CACHE"] = str(work / "cache")
    model = write_tiny_model(work / "model", "bert")
    tasks = write_keyword_tasks(work / "data", [("colours", ["red", "green", "blue"], 1),
                                                ("polar", ["good", "bad"], 2)], n=64)
    cfg = parse_config({
        "name": "fingerprint", "model": str(model), "tasks": tasks, "device": "cpu", "seed": 0,
        "lora": {"rank": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "max_length": 16},
        "inits": ["standard", {"name": "osrm-own", "mode": "own"}],
        "profile": {"n_samples": 16},
        "merge": {"methods": ["task_arithmetic", "ties", "dare_ties", "emr"], "lambdas": [0.5, 1.0]},
    })
    run_dir = work / "run"
    run_pipeline(cfg, run_dir)
    dirs = [str(run_dir / "adapters" / "osrm-own" / t) for t in ("colours", "polar")]
    adapters = [load_adapter(d) for d in dirs]
    merges = work / "merges"
    for info in list_methods():
        if info.needs:
            continue
        result = merge(adapters, info.name, {}, ignore_extra=True)
        save_merge_result(result, merges / "peft" / info.name, inputs=dirs)
    for name in ("task_arithmetic", "ties"):
        save_merge_result(merge(adapters, name, {}, ignore_extra=True), merges / "full" / name, format="full",
                          base_model_path=str(model), inputs=dirs)
    for name in ("ties", "dare_ties", "emr"):
        stream_merge(dirs, name, {}, merges / "stream" / name, device="cpu", ignore_extra=True)
    return {**{f"run/{k}": v for k, v in digests(run_dir, skip=("report", ".stages/")).items()},
            **{f"merges/{k}": v for k, v in digests(merges).items()}}


def compare(new: dict[str, str], old: dict[str, str]) -> list[str]:
    lines = [f"differs: {k}" for k in sorted(new.keys() & old.keys()) if new[k] != old[k]]
    lines += [f"only after: {k}" for k in sorted(new.keys() - old.keys())]
    lines += [f"only before: {k}" for k in sorted(old.keys() - new.keys())]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="fingerprint JSON to write")
    ap.add_argument("--compare", help="an earlier fingerprint JSON to compare with")
    ap.add_argument("--work", default="/tmp/osrm-lora-fingerprint", help="work directory (wiped first)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    fp = run_all(Path(args.work))
    Path(args.out).write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(fp)} files fingerprinted into {args.out}")
    if args.compare:
        diff = compare(fp, json.loads(Path(args.compare).read_text(encoding="utf-8")))
        for line in diff:
            print(line)
        print("identical" if not diff else f"{len(diff)} difference(s)")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
