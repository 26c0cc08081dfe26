"""Filesystem helpers: atomic writes, cache locations, hashing. All I/O helpers live here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from osrm_lora.errors import OsrmError

CACHE_ENV = "OSRM_LORA_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the user cache directory: ``override`` > ``$OSRM_LORA_CACHE`` > ``$XDG_CACHE_HOME/osrm-lora``."""
    if override:
        path = Path(override)
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "osrm-lora"
    return path.expanduser()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OsrmError(
            f"cannot write {path}: {probe} is a file, not a directory; choose another output path"
        )


_FOREIGN_IO = re.compile(r"(?:I/O error|failed writing file)[^\n]*?(?:: (?P<msg>[^()\n]+?))?\s*\(os error (?P<errno>\d+)\)")


def _foreign_io_error(exc: BaseException) -> str | None:
    """The OS error text of an I/O failure that a library wrapped in its own exception type
    (safetensors' ``SafetensorError: ... I/O error: No space left on device (os error 28)``), else None."""
    if isinstance(exc, OsrmError) or not isinstance(exc, Exception):
        return None
    m = _FOREIGN_IO.search(str(exc))
    if m is None:
        return None
    return (m.group("msg") or "").strip() or os.strerror(int(m.group("errno")))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: the process exists
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary/old copies of ``target`` left by a writer that was killed mid-write.

    :func:`atomic_dir`/:func:`atomic_file` name them ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>``;
    only those whose process no longer exists are removed (a live concurrent writer is left alone).
    Returns the removed paths.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?", re.DOTALL)
    removed = []
    for item in parent.iterdir():
        m = pattern.fullmatch(item.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success rename it to ``target``.

    On any exception the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    _check_parent_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as exc:
        raise OsrmError(f"cannot write to {target.parent}: {exc.strerror}; choose a writable output directory") from exc
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise OsrmError(f"{target} already exists; remove it or pass an overwrite option")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OsrmError(f"cannot write {target}: {exc.strerror}; check free space and permissions") from exc
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _foreign_io_error(exc)
        if why is not None:
            raise OsrmError(f"cannot write {target}: {why}; check free space and permissions") from exc
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``target``; on success fsync and rename it onto ``target``."""
    target = Path(target)
    _check_parent_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    except OSError as exc:
        raise OsrmError(f"cannot write to {target.parent}: {exc.strerror}; choose a writable output directory") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OsrmError(f"cannot write {target}: {exc.strerror}; check free space and permissions") from exc
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        why = _foreign_io_error(exc)
        if why is not None:
            raise OsrmError(f"cannot write {target}: {why}; check free space and permissions") from exc
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.exists():
        raise OsrmError(f"{path} does not exist; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OsrmError(f"{path} is not valid JSON ({exc}); regenerate or fix the file") from exc


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)!r}")
