"""Shared helpers for the benchmarks under ``bench/`` (not part of the installed package): machine description, timing, peak memory,
memory bandwidth, and the result writer.

Benchmarks never assert timings and nobody types figures by hand: a benchmark calls
:func:`write_results`, which writes its JSON file atomically and (re)writes its own section of
``BENCHMARKS.md`` between the markers ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->``, leaving
every other section untouched. Each section states the date, the machine/card, the exact command
and the seeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_file, json_default
from osrm_lora.memory import PeakMemory, free_memory, measure_peak, sync

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_MD_HEADER = (
    "# Benchmarks\n\n"
    "Every section below is written by the command it names (see `bench/README.md`); do not edit the\n"
    "figures by hand. Rerun the command to refresh its section.\n"
)


# ----------------------------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        module = __import__(mod)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return str(getattr(module, "__version__", "?"))


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Description of the machine (CPU, usable cores, RAM, GPU card and driver stack, package versions)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count() or 1
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": ram,
        "device": str(dev),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        })
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line: the card (GPU runs) or the CPU with its usable cores (CPU runs)."""
    if info.get("gpu"):
        return f"{info['gpu']} ({info.get('gpu_memory_gib')} GiB), CUDA {info.get('cuda')}, torch {info.get('torch')}"
    return (f"CPU {info.get('cpu')} ({info.get('cpu_cores_usable')} usable cores, {info.get('torch_threads')} torch "
            f"threads, {info.get('ram_gib')} GiB RAM), torch {info.get('torch')}")


def pick_device(preset_device: str) -> torch.device:
    """``"cuda"`` presets need a visible GPU (OsrmError otherwise); anything else is the CPU."""
    if preset_device == "cuda":
        if not torch.cuda.is_available():
            raise OsrmError("this preset needs a CUDA GPU but torch sees none; run it on a GPU machine or use --preset cpu")
        return torch.device("cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# timing and memory


@dataclass
class Timing:
    """Wall times (seconds) of ``repeats`` timed calls after ``warmup`` untimed ones."""

    times: list[float]
    warmup: int

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return float(statistics.median(self.times))

    def to_json(self) -> dict[str, Any]:
        return {"best_s": self.best, "median_s": self.median, "repeats": len(self.times), "warmup": self.warmup,
                "times_s": list(self.times)}


def time_call(fn: Callable[[], Any], *, device: torch.device | str | None = None, warmup: int = 1,
              repeats: int = 3, keep_result: bool = False,
              measure_memory: bool = True) -> tuple[Timing, PeakMemory | None, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (CUDA synchronised before and
    after each call; garbage collected before each call). Peak memory is measured in the timed calls
    on GPU and in one extra untimed call on CPU (its RSS sampler thread would distort the timing).

    The previous call's result is dropped before the next call starts, so a large result never
    exists twice. Peak memory (see :func:`measure_peak`) is the maximum over the timed calls. The
    last result is returned when ``keep_result``.
    """
    if repeats < 1 or warmup < 0:
        raise OsrmError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup}); fix the benchmark settings")
    result: Any = None
    for _ in range(warmup):
        result = None
        result = fn()
        sync(device)
    times: list[float] = []
    peak: PeakMemory | None = None
    box: dict[str, float] = {}

    def timed() -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        box["t"] = time.perf_counter() - t0
        return out

    on_gpu = device is not None and torch.device(device).type == "cuda"
    for _ in range(repeats):
        result = None
        if measure_memory and on_gpu:  # the CUDA peak counter costs nothing: measure in the timed calls
            pk, result = measure_peak(timed, device=device)
            peak = pk if peak is None or pk.bytes > peak.bytes else peak
        else:
            free_memory(device)
            result = timed()
        times.append(box["t"])
    if measure_memory and not on_gpu:
        # the CPU sampler thread competes for the GIL and would slow the timed calls: one extra call
        result = None
        peak, result = measure_peak(fn, device=device)
    return Timing(times, warmup), peak, (result if keep_result else None)


def measure_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Device memory bandwidth from a large tensor copy: ``2 * nbytes`` (read + write) / best time."""
    dev = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    free_memory(dev)
    moved = 2 * n * 4
    return {"bytes_per_s": moved / best, "gb_per_s": moved / best / 1e9, "copy_bytes": n * 4,
            "method": f"best of {repeats} copies of a {n * 4 / 2**30:.2f} GiB float32 tensor (read + write)"}


# ----------------------------------------------------------------------------------------------
# output


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command that ran, relative to the repository root when possible."""
    args = list(sys.argv if argv is None else argv)
    if args:
        with contextlib.suppress(ValueError):
            args[0] = str(Path(args[0]).resolve().relative_to(REPO_ROOT))
    return "python " + " ".join(shlex.quote(a) for a in args)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells converted with ``str``; ``|`` escaped)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(s: float | None) -> str:
    """Compact seconds: ``0.0123 s``, ``1.23 s``, ``123 s``; ``-`` for None."""
    if s is None:
        return "-"
    if s < 0.1:
        return f"{s * 1000:.2f} ms"
    if s < 100:
        return f"{s:.3g} s"
    return f"{s:.0f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


def _markers(key: str) -> tuple[str, str]:
    if not _KEY_RE.match(key):
        raise OsrmError(f"benchmark section key {key!r} may only contain letters, digits and _.:-; rename it")
    return f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"


def replace_section(text: str, key: str, body: str) -> str:
    """Return ``text`` with the section ``key`` replaced by ``body`` (appended if absent).

    The section is everything between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->`` (markers
    kept); other text and sections are untouched. A start marker without its end marker raises.
    """
    start, end = _markers(key)
    block = f"{start}\n{body.strip()}\n{end}"
    i = text.find(start)
    if i < 0:
        if not text.strip():
            text = _MD_HEADER
        return text.rstrip("\n") + "\n\n" + block + "\n"
    j = text.find(end, i + len(start))
    if j < 0:
        raise OsrmError(f"BENCHMARKS.md has {start} without {end}; restore the end marker or delete the section")
    if text.find(start, i + len(start)) >= 0:
        raise OsrmError(f"BENCHMARKS.md has {start} twice; delete one copy of the section")
    return text[:i] + block + text[j + len(end):]


def read_section(text: str, key: str) -> str | None:
    """The body of section ``key`` in ``text`` (None when absent)."""
    start, end = _markers(key)
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i)
    return None if j < 0 else text[i + len(start):j].strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"osrm-lora-bench-{digest}.lock"  # outside the repository
    with open(lock, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def update_markdown_section(path: str | os.PathLike[str], key: str, body: str) -> None:
    """Atomically rewrite section ``key`` of the markdown file ``path`` (created if missing), under a
    file lock so that two benchmarks finishing together do not lose each other's sections."""
    path = Path(path)
    with _locked(path):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        new = replace_section(old, key, body)
        with atomic_file(path) as fh:
            fh.write(new)


@dataclass
class BenchRecord:
    """What a benchmark writes: its name, preset, settings, results and the markdown summary."""

    name: str
    preset: str
    command: str
    seeds: dict[str, int]
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: dict[str, Any]
    summary_md: str
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    @property
    def key(self) -> str:
        return f"{self.name}:{self.preset}"


def section_markdown(rec: BenchRecord, json_path: Path, md_path: Path) -> str:
    """The markdown section of a record: title, provenance lines, the summary and notes."""
    try:
        rel = os.path.relpath(json_path, md_path.parent)
    except ValueError:  # pragma: no cover - different drives
        rel = str(json_path)
    seeds = ", ".join(f"{k}={v}" for k, v in rec.seeds.items()) or "none"
    lines = [
        f"## {rec.name} ({rec.preset})",
        "",
        f"- date: {rec.date}",
        f"- machine: {describe_machine(rec.machine)}",
        f"- command: `{rec.command}`",
        f"- seeds: {seeds}",
        f"- raw results: [{rel}]({rel})",
        "",
        rec.summary_md.strip(),
    ]
    if rec.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in rec.notes]
    return "\n".join(lines)


def write_results(rec: BenchRecord, out_dir: str | os.PathLike[str], *,
                  benchmarks_md: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>_<preset>.json`` atomically and rewrite the record's section of
    ``benchmarks_md`` (default: ``BENCHMARKS.md`` at the repository root). Returns both paths."""
    out = Path(out_dir)
    md = Path(benchmarks_md) if benchmarks_md is not None else BENCHMARKS_MD
    json_path = out / f"{rec.name}_{rec.preset}.json"
    payload = asdict(rec)
    payload["key"] = rec.key
    text = json.dumps(payload, indent=2, default=json_default) + "\n"  # fails before any file is touched
    with atomic_file(json_path) as fh:
        fh.write(text)
    update_markdown_section(md, rec.key, section_markdown(rec, json_path.resolve(), md.resolve()))
    logger.info("wrote %s and section %s of %s", json_path, rec.key, md)
    return json_path, md


def setup_logging(verbose: bool = False) -> None:
    """Plain logging to stderr for the benchmark scripts."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
