"""The stage commands chained by hand, as a user would: profile -> init -> train --init -> diagnose -> project."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tinymodels import keyword_task

from osrm_lora.cli import main
from osrm_lora.fsutil import read_json


def _jsonl(task, path: Path) -> Path:
    with path.open("w") as fh:
        for split in ("train", "validation", "test"):
            s = task.split(split)
            for x, y in zip(s.texts, s.labels):
                fh.write(json.dumps({"text": x, "label": ["no", "yes"][y]}) + "\n")
    return path


def test_profile_init_train_diagnose_project(tiny_bert: Path, tmp_path: Path) -> None:
    from osrm_lora.adapters import load_adapter
    from osrm_lora.osrm import compute_osrm_A
    from osrm_lora.stats import StatsStore

    a = _jsonl(keyword_task("colours", ["red", "green"], n=60, seed=1), tmp_path / "colours.jsonl")
    b = _jsonl(keyword_task("letters", ["alpha", "bravo"], n=60, seed=2), tmp_path / "letters.jsonl")
    m = str(tiny_bert)
    assert main(["-q", "profile", "--tasks", f"{a},{b}", "--out", str(tmp_path / "stats"), "--model", m,
                 "--n-samples", "20", "--max-length", "16"]) == 0
    assert main(["-q", "init", "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "init"), "--mode", "own",
                 "--model", m, "--rank", "2", "--alpha", "4"]) == 0

    # the initial adapters carry exactly the OSRM subspaces, with B = 0
    expected = compute_osrm_A(StatsStore.load(tmp_path / "stats"), ["colours", "letters"], 2, "own")
    for task in ("colours", "letters"):
        init = load_adapter(tmp_path / "init" / task)
        for key, mod in init.modules.items():
            assert torch.allclose(mod.A, expected[task][key], atol=1e-6)
            assert torch.count_nonzero(mod.B) == 0

    outs = []
    for task, path in (("colours", a), ("letters", b)):
        out = tmp_path / "adapters" / task
        assert main(["-q", "train", "--task", str(path), "--out", str(out), "--model", m, "--init",
                     str(tmp_path / "init" / task), "--rank", "2", "--alpha", "4", "--epochs", "1",
                     "--batch-size", "8", "--max-length", "16", "--freeze-a"]) == 0
        trained = load_adapter(out)
        init = load_adapter(tmp_path / "init" / task)
        assert all(torch.equal(trained.modules[k].A, init.modules[k].A) for k in init.modules)  # frozen A
        assert read_json(out / "metrics.json")["a_drift_mean"] == 0.0
        outs.append(out)

    assert main(["-q", "diagnose", *map(str, outs), "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "diag")]) == 0
    diag = read_json(tmp_path / "diag" / "interference.json")
    assert diag["tasks"] == ["colours", "letters"] and (tmp_path / "diag" / "interference.png").exists()

    assert main(["-q", "project", *map(str, outs), "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "proj"),
                 "--rank", "2", "--mode", "own"]) == 0
    # projecting onto the subspace the frozen A already spans keeps the whole update
    for out in outs:
        proj = load_adapter(tmp_path / "proj" / out.name)
        orig = load_adapter(out)
        for key in orig.modules:
            assert torch.allclose(proj.modules[key].delta(), orig.modules[key].delta(), atol=1e-5)
        assert (tmp_path / "proj" / out.name / "head.safetensors").exists()


def test_profile_command_equals_the_pipeline_profile_stage(tiny_bert: Path, tmp_path: Path) -> None:
    """`osrm-lora profile` with its defaults computes the store of the pipeline's profile stage with the
    config's defaults (same seeded sample, targets, padding rule, precision)."""
    from safetensors.torch import load_file

    from osrm_lora.config import parse_config
    from osrm_lora.data import load_task
    from osrm_lora.pipeline.stages import profile_stage

    paths = [_jsonl(keyword_task(n, kws, n=60, seed=s), tmp_path / f"{n}.jsonl")
             for n, kws, s in (("colours", ["red", "green"], 1), ("letters", ["alpha", "bravo"], 2))]
    m = str(tiny_bert)
    assert main(["-q", "profile", "--tasks", ",".join(map(str, paths)), "--out", str(tmp_path / "cli"),
                 "--model", m, "--n-samples", "20", "--max-length", "16"]) == 0
    cfg = parse_config({"name": "p", "model": m, "tasks": [str(p) for p in paths], "train": {"max_length": 16},
                        "profile": {"n_samples": 20}})
    profile_stage(cfg, [load_task(str(p)) for p in paths], m, tmp_path / "stage")
    files = sorted(f.name for f in (tmp_path / "cli").glob("*.safetensors"))
    assert files and files == sorted(f.name for f in (tmp_path / "stage").glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(tmp_path / "cli" / name)), load_file(str(tmp_path / "stage" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
