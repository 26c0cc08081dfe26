"""Logging set-up shared by the CLI and the Python API.

Log messages, warnings and progress bars go to stderr; results (the commands' output) to stdout."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

_CONFIGURED = False


def setup_logging(verbosity: int = 0) -> None:
    """Configure the ``osrm_lora`` logger: -1 quiet (warnings), 0 info, 1+ debug.

    Started as one of several processes (torchrun): messages carry ``[rank R]`` and ranks other than
    0 log warnings and errors only, unless ``-v`` is given."""
    global _CONFIGURED
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and rank > 0 and verbosity <= 0:
        level = logging.WARNING
    logger = logging.getLogger("osrm_lora")
    logger.setLevel(level)
    if not _CONFIGURED:
        try:
            from rich.logging import RichHandler

            handler: logging.Handler = RichHandler(
                console=stderr_console(), show_path=verbosity > 0, show_time=False, markup=False,
                rich_tracebacks=False,
            )
        except ImportError:  # pragma: no cover
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if world > 1 else "%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*")
    # Quieten chatty libraries: their load reports and progress bars are not ours.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "datasets", "accelerate", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        # transformers leaves these helpers unannotated
        transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    except Exception:  # pragma: no cover
        pass


def stderr_console() -> Any:
    """A rich console on stderr: logs, warnings and progress bars never mix with results (stdout)."""
    from rich.console import Console

    return Console(stderr=True)


def progress_enabled() -> bool:
    """Progress bars are shown unless logging is quiet or OSRM_LORA_NO_PROGRESS is set."""
    if os.environ.get("OSRM_LORA_NO_PROGRESS"):
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        return False  # one progress bar per run, rank 0's
    return logging.getLogger("osrm_lora").getEffectiveLevel() <= logging.INFO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress of long work on stderr (nothing when quiet or OSRM_LORA_NO_PROGRESS is set): a rich
    bar with elapsed time and ETA on a terminal; on a pipe or file, one plain line per ``step_pct``
    percent (``label: 40% (12/30), 8s elapsed, about 12s left``), since a bar would print blank lines.

    ``fields`` names extra values shown after the bar, e.g. ``{"loss": "loss {:.4f}"}``; pass their
    values to :meth:`advance`.
    """

    def __init__(self, label: str, total: int, fields: dict[str, str] | None = None, step_pct: int = 10) -> None:
        self._bar: Any = None
        self._plain = False
        self._fields = fields or {}
        self._label, self._total, self._done, self._step = label, total, 0, max(1, step_pct)
        self._next_pct = self._step
        self._start = time.monotonic()
        self._texts: dict[str, str] = {}
        if not (progress_enabled() and total > 0):
            return
        console = stderr_console()
        if not console.is_terminal:
            self._plain = True
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("{task.fields[" + name + "_text]}") for name in self._fields]
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, transient=True, console=console)
        self._bar.start()
        init = {f"{name}_text": "" for name in self._fields}
        self._id = self._bar.add_task(label, total=total, **init)

    def advance(self, n: int = 1, **values: float) -> None:
        texts = {f"{k}_text": self._fields[k].format(v) for k, v in values.items() if k in self._fields}
        if self._bar is not None:
            self._bar.update(self._id, advance=n, **texts)
        elif self._plain:
            self._done += n
            self._texts.update(texts)
            pct = 100 * self._done // self._total
            if pct >= self._next_pct and n:
                self._next_pct = (pct // self._step + 1) * self._step
                sys.stderr.write(plain_progress_line(self._label, self._done, self._total,
                                                     time.monotonic() - self._start, list(self._texts.values())) + "\n")
                sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._plain = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plain_progress_line(label: str, done: int, total: int, elapsed: float, extras: list[str] | None = None) -> str:
    """``label: 40% (12/30), 8s elapsed, about 12s left[, extras]`` (the ETA assumes a steady rate)."""
    left = elapsed * (total - done) / done if done else float("nan")
    eta = f", about {_duration(left)} left" if done and done < total else ""
    tail = "".join(f", {e}" for e in extras or [] if e)
    return f"{label}: {100 * done // total}% ({done}/{total}), {_duration(elapsed)} elapsed{eta}{tail}"
