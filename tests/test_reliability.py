"""Reliability: a run killed with SIGKILL mid-stage resumes to the same result; runs are bit-reproducible;
the manifest records what produced the outputs; weights load only from safe formats, remote code stays off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tinymodels import keyword_task, write_tiny_model

from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_dir, remove_stale_temporaries, sha256_file

TIMING_KEYS = {"merge_seconds", "merge_peak_mb", "seconds", "wall_seconds", "stage_seconds",
               "stages_cached"}  # measurements, and which stages this invocation found finished

# Loaded by the child interpreter (PYTHONPATH): when OSRM_TEST_HANG_TASK is set, training of that task
# stops inside its atomic output directory (after the head is written, before the rename) and waits to
# be killed, so SIGKILL lands in the middle of a stage deterministically, whatever the machine's speed.
SITECUSTOMIZE = '''
import os
if os.environ.get("OSRM_TEST_HANG_TASK"):
    import time
    from pathlib import Path
    import osrm_lora.train as _train
    _save_head = _train.save_head
    def save_head(directory, state, info):
        _save_head(directory, state, info)
        if info.task == os.environ["OSRM_TEST_HANG_TASK"]:
            Path(os.environ["OSRM_TEST_HANG_MARKER"]).write_text(str(directory))
            time.sleep(600)
    _train.save_head = save_head
'''


def _write_task(path: Path, name: str, keywords: list[str], seed: int) -> dict[str, str]:
    task = keyword_task(name, keywords, n=48, seed=seed)
    with path.open("w") as fh:
        for split in ("train", "validation", "test"):
            s = task.split(split)
            for x, y in zip(s.texts, s.labels):
                fh.write(json.dumps({"text": x, "label": ["no", "yes"][y]}) + "\n")
    return {"name": name, "source": "local", "path": str(path)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("rel")
    model = write_tiny_model(root / "model", "bert", seed=0)
    cfg = {
        "name": "rel",
        "model": str(model),
        "seed": 3,
        "device": "cpu",
        "tasks": [_write_task(root / "colours.jsonl", "colours", ["red", "green", "blue"], 1),
                  _write_task(root / "polar.jsonl", "polar", ["good", "bad"], 2)],
        "lora": {"rank": 2, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 16, "eval_batch_size": 64},
        "inits": [{"name": "osrm-own", "mode": "own"}],
        "diagnose": False,
        "profile": {"n_samples": 16},
        "merge": {"methods": ["task_arithmetic", "ties"], "lambdas": [0.5, 1.0]},
    }
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSRM_TEST_")}
    env.update({"PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OSRM_LORA_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_VERBOSITY": "error", "OSRM_LORA_CACHE": str(root / "cache")})
    return root, cfg_path, env


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "osrm_lora.cli", "-q", "run", str(cfg), "--out", str(out), *extra]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _normalised(run_dir: Path) -> Any:
    """results.json without timing fields, with the run directory's path replaced by a placeholder."""
    text = (run_dir / "results.json").read_text().replace(str(run_dir), "<RUN>")

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads(text))


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def _leftovers(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(run_dir).as_posix(): load_file(str(p))
            for sub in ("adapters", "merges") for p in sorted((run_dir / sub).rglob("*.safetensors"))}


def _assert_same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}:{key} differs"


@pytest.fixture(scope="module")
def runs(setup: tuple[Path, Path, dict[str, str]]) -> dict[str, Any]:
    """Run A: killed (SIGKILL) while training task 'polar' (after profiling and task 'colours'), then resumed.
    Run B: the same config uninterrupted into another directory."""
    root, cfg, env = setup
    a, b = root / "A", root / "B"
    marker = root / "hang-marker"
    hang_env = {**env, "OSRM_TEST_HANG_TASK": "polar", "OSRM_TEST_HANG_MARKER": str(marker)}
    proc = subprocess.Popen(_cmd(cfg, a), env=hang_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    state = {
        "markers": sorted(p.name for p in (a / ".stages").iterdir()),
        "temporaries": _leftovers(a),
        "polar_done": (a / "adapters" / "osrm-own" / "polar" / "metrics.json").exists(),
        "results": (a / "results.json").exists(),
    }
    finished = sorted((a / "stats").iterdir()) + sorted((a / "adapters" / "osrm-own" / "colours").iterdir()) + [
        a / ".stages" / "profile.json", a / ".stages" / "train__osrm-own__colours.json"]
    before = _mtimes(finished)
    _run(_cmd(cfg, a), env)  # resume
    after = _mtimes(finished)
    _run(_cmd(cfg, b), env)  # uninterrupted
    return {"A": a, "B": b, "killed": state, "before": before, "after": after, "cfg": cfg, "env": env}


def test_kill_lands_mid_stage(runs: dict[str, Any]) -> None:
    killed = runs["killed"]
    assert killed["markers"] == ["profile.json", "train__osrm-own__colours.json"]
    assert not killed["polar_done"] and not killed["results"]
    assert any("/adapters/osrm-own/.polar.tmp-" in t for t in killed["temporaries"]), killed["temporaries"]


def test_resume_skips_finished_stages_and_redoes_the_interrupted_one(runs: dict[str, Any]) -> None:
    a: Path = runs["A"]
    assert runs["after"] == runs["before"], "finished stages were recomputed"
    assert (a / "adapters" / "osrm-own" / "polar" / "metrics.json").exists()
    assert (a / ".stages" / "train__osrm-own__polar.json").exists()
    assert _leftovers(a) == [], "temporary directories of the killed run remain"
    assert (a / "results.json").exists() and (a / "report.md").exists()


def test_resumed_run_equals_uninterrupted_run(runs: dict[str, Any]) -> None:
    a, b = runs["A"], runs["B"]
    assert _normalised(a) == _normalised(b)
    _assert_same_weights(_weights(a), _weights(b))  # bit-identical adapters, heads and merges
    for metrics in (a / "adapters").rglob("metrics.json"):
        ma, mb = (json.loads(p.read_text()) for p in (metrics, b / metrics.relative_to(a)))
        ma.pop("seconds"), mb.pop("seconds")
        assert ma == mb


def test_manifest_records_inputs_outputs_and_environment(runs: dict[str, Any]) -> None:
    import peft
    import transformers

    a: Path = runs["A"]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["device"] == "cpu"
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["transformers"] == transformers.__version__
    assert manifest["versions"]["peft"] == peft.__version__
    assert manifest["versions"]["python"] == sys.version.split()[0]
    assert set(manifest["tasks"]) == {"colours", "polar"}
    assert all(len(t["fingerprint"]) == 64 for t in manifest["tasks"].values())
    assert len(manifest["config_hash"]) == 64
    hashes = manifest["output_hashes"]
    expected = {f"adapters/{i}/{t}/{f}" for i in ("osrm-own",) for t in ("colours", "polar")
                for f in ("adapter_model.safetensors", "head.safetensors")}
    expected |= {f"merges/{i}/{m}/adapter_model.safetensors" for i in ("osrm-own",) for m in ("task_arithmetic", "ties")}
    assert expected <= set(hashes)
    for rel, digest in hashes.items():
        assert sha256_file(a / rel) == digest, rel
    assert hashes == json.loads((runs["B"] / "manifest.json").read_text())["output_hashes"]


def test_force_train_recomputes_training(runs: dict[str, Any]) -> None:
    b: Path = runs["B"]
    adapters = sorted((b / "adapters").rglob("adapter_model.safetensors"))
    stats = sorted((b / "stats").iterdir())
    markers = sorted((b / ".stages").glob("train__*.json"))
    before, stats_before, weights = _mtimes(adapters + markers), _mtimes(stats), _weights(b)
    expected = _normalised(b)
    _run(_cmd(runs["cfg"], b, "--force", "train"), runs["env"])
    after = _mtimes(adapters + markers)
    assert all(after[p] != before[p] for p in before), "training was not recomputed"
    assert _mtimes(stats) == stats_before  # profiling was not forced
    _assert_same_weights(_weights(b), weights)  # deterministic on CPU
    assert _normalised(b) == expected
    assert _leftovers(b) == []


# ---------------------------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a process that has exited
    stale = tmp_path / f".out.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"  # a running writer: left alone
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abc"  # another target's: left alone
    other.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists() and not old.exists() and live.exists() and other.exists()
    assert (target / "f").read_text() == "ok"
    assert remove_stale_temporaries(tmp_path / "other") == [other]


# ---------------------------------------------------------------------------------------------- least reach
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def test_pickled_model_checkpoint_is_refused(tmp_path: Path) -> None:
    """A model directory with only a pickled ``pytorch_model.bin`` is not loaded (safetensors only)."""
    from transformers import AutoModelForSequenceClassification

    from osrm_lora.backbone import load_classifier

    src = write_tiny_model(tmp_path / "src", "bert")
    model = AutoModelForSequenceClassification.from_pretrained(str(src))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model.config.save_pretrained(str(pickled))
    marker = tmp_path / "pwned"
    torch.save({**model.state_dict(), "evil": _Exploit(marker)}, pickled / "pytorch_model.bin")
    with pytest.raises(OsrmError, match="cannot load model") as exc:
        load_classifier(str(pickled), 2, device="cpu")
    assert "\n" not in str(exc.value)
    assert not marker.exists()
    assert load_classifier(str(src), 2, device="cpu") is not None  # the safetensors copy loads


def _remote_code_model(path: Path, marker: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "evilbert", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}}))
    (path / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    return path


@pytest.mark.parametrize("value", [None, "0", "true", "yes"])
def test_remote_code_is_off_unless_explicitly_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    from osrm_lora import backbone

    if value is None:
        monkeypatch.delenv("OSRM_LORA_TRUST_REMOTE_CODE", raising=False)
    else:
        monkeypatch.setenv("OSRM_LORA_TRUST_REMOTE_CODE", value)
    marker = tmp_path / "remote-code-ran"
    model_dir = _remote_code_model(tmp_path / "evil", marker)
    with pytest.raises(OsrmError):
        backbone.load_classifier(str(model_dir), 2, device="cpu")
    with pytest.raises(OsrmError):
        backbone.load_tokenizer(str(model_dir))
    assert not marker.exists()
    assert backbone._trust_remote_code() is False


def test_remote_code_flag_is_passed_only_with_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from osrm_lora import backbone

    seen: list[object] = []

    def fake(*_a: object, **kw: object) -> object:
        seen.append(kw.get("trust_remote_code"))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    for value, expected in ((None, False), ("1", True)):
        if value is None:
            monkeypatch.delenv("OSRM_LORA_TRUST_REMOTE_CODE", raising=False)
        else:
            monkeypatch.setenv("OSRM_LORA_TRUST_REMOTE_CODE", value)
        for fn in (lambda: backbone.load_classifier("some/hub-id", 2, device="cpu"), lambda: backbone.load_tokenizer("some/hub-id")):
            with pytest.raises(OsrmError):
                fn()
        assert seen[-2:] == [expected, expected]
