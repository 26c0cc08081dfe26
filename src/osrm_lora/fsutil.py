"""Filesystem helpers: atomic writes, output ownership and locks, cache locations, hashing.
All I/O helpers live here.

Output safety
-------------
* **Ownership marker.** Every directory that :func:`atomic_dir` writes, and every container directory
  claimed with :func:`claim_output` (``init``/``export``/``project``/``diagnose`` outputs, run
  directories), holds a small file named ``.osrm-lora-output`` (:data:`OUTPUT_MARKER`). It is how
  osrm-lora recognises its own earlier outputs. An existing path is replaced only when it is one
  of them; an existing *file*, or a non-empty directory without the marker, is refused and never
  touched (not even with ``--overwrite``). An empty directory may be written into.
* **Overwrite policy.** On the command line an earlier output of ours at ``--out`` is refused unless
  ``--overwrite`` is given (:func:`claim_output`); a pipeline run directory is resumed instead.
  Library calls of :func:`atomic_dir` without a claim replace an earlier output of ours.
* **Atomic replacement.** Outputs are written into ``.<name>.tmp-<pid>-*`` next to the target and
  swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it (else two
  renames via ``.<name>.old-<pid>``, undone on failure and restored by the next writer if the process
  was killed in between). A full disk or a kill at any moment leaves the previous output readable.
* **Locks.** While a process writes ``<dir>/<name>`` it holds ``<dir>/.<name>.osrm-lora.lock``
  (``flock`` plus a JSON line naming its PID and host); a second writer of the same output refuses.
  A lock left by a dead process on this host is taken over with a warning. The lock file is removed
  when the writer finishes.
* **Permissions.** Written files get ``0666 & ~umask`` (executables ``0777 & ~umask``) and directories
  ``0777 & ~umask``, whatever mode the writing library chose (safetensors writes ``0600``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from osrm_lora.errors import OsrmError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: locks rely on the PID recorded in the lock file
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CACHE_ENV = "OSRM_LORA_CACHE"
OUTPUT_MARKER = ".osrm-lora-output"
"""Name of the marker file in every output directory osrm-lora writes (constant content)."""
LOCK_SUFFIX = ".osrm-lora.lock"
"""``<dir>/.<name>`` + this suffix is the write lock of the output ``<dir>/<name>``."""
_MARKER_TEXT = '{"written_by": "osrm-lora", "format": 1}\n'


class WriteError(OsrmError):
    """Writing an output failed (disk full, no permission); ``path`` is the output, ``reason`` the OS error."""

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str = "check free space and permissions") -> None:
        self.path, self.reason, self.fix = Path(path), reason, fix
        super().__init__(f"cannot write {path}: {reason}; {fix}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason, self.fix))


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


# --------------------------------------------------------------------------- checksums
CHECKSUM_FILE = "SHA256SUMS"
"""Checksum sidecar written by :func:`write_checksums` (``sha256sum -c`` format)."""


def write_checksums(directory: str | os.PathLike[str], names: Sequence[str]) -> Path:
    """Write ``directory/SHA256SUMS`` with the sha256 of each file ``names`` (``sha256sum`` format)."""
    directory = Path(directory)
    lines = "".join(f"{sha256_file(directory / name)}  {name}\n" for name in sorted(names))
    path = directory / CHECKSUM_FILE
    with atomic_file(path) as fh:
        fh.write(lines)
    return path


def verify_checksums(directory: str | os.PathLike[str]) -> list[str] | None:
    """The names in ``directory/SHA256SUMS`` whose content does not match (missing files count);
    ``None`` when there is no (readable) checksum file."""
    path = Path(directory) / CHECKSUM_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    expected = parse_checksums(text)
    if expected is None:
        return [CHECKSUM_FILE]
    bad = []
    for name, digest in expected.items():
        target = Path(directory) / name
        try:
            ok = target.is_file() and sha256_file(target) == digest
        except OSError:
            ok = False
        if not ok:
            bad.append(name)
    return bad


def parse_checksums(text: str) -> dict[str, str] | None:
    """``{name: sha256}`` from ``sha256sum`` lines; ``None`` if a line is malformed."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if m is None:
            return None
        out[m.group(2)] = m.group(1)
    return out


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OsrmError(
            f"cannot write {path}: {probe} is a file, not a directory; choose another output path"
        )


def _make_parent(target: Path) -> None:
    _check_parent_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OsrmError(f"cannot write to {target.parent}: {exc.strerror}; choose a writable output directory") from exc


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


def _real(target: str | os.PathLike[str]) -> Path:
    """``target`` with symlinks resolved (a link to a directory is written through, never replaced)."""
    return Path(os.path.realpath(os.path.abspath(target)))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# --------------------------------------------------------------------------- ownership
def output_state(path: str | os.PathLike[str], ours_if: Sequence[str] = (), assume_ours: bool = False) -> str:
    """What is at ``path``: ``absent``, ``empty`` (an empty directory), ``ours`` (a directory with
    :data:`OUTPUT_MARKER`, or with one of the legacy names ``ours_if``, or any non-empty directory
    when ``assume_ours``), ``foreign`` (any other non-empty directory) or ``file`` (a file, a
    dangling link, anything not a directory)."""
    p = Path(path)
    if not p.exists():
        return "file" if p.is_symlink() else "absent"
    if not p.is_dir():
        return "file"
    try:
        names = set(os.listdir(p))
    except OSError as exc:
        raise OsrmError(f"cannot read {p}: {exc.strerror}; choose another output path") from exc
    if not names:
        return "empty"
    if assume_ours or OUTPUT_MARKER in names or names & set(ours_if):
        return "ours"
    return "foreign"


def check_output(target: str | os.PathLike[str], *, overwrite: bool, ours_if: Sequence[str] = (),
                 assume_ours: bool = False, option: str = "--out") -> str:
    """Refuse to write ``target`` unless that is safe; returns its :func:`output_state`.

    Refused (one-line :class:`OsrmError` naming the path and the way out): an existing file, a
    non-empty directory osrm-lora did not write, and - unless ``overwrite`` - an earlier output of ours.
    """
    state = output_state(target, ours_if, assume_ours)
    if state == "file":
        raise OsrmError(f"{target} is an existing file, not an osrm-lora output directory; "
                        f"choose another {option} path or move the file away")
    if state == "foreign":
        raise OsrmError(f"{target} is a non-empty directory that osrm-lora did not write (it has no {OUTPUT_MARKER}); "
                        f"choose another {option} path or empty the directory")
    if state == "ours" and not overwrite:
        raise OsrmError(f"{target} holds an earlier osrm-lora output; pass --overwrite to replace it, "
                        f"or choose another {option} path")
    return state


def write_marker(directory: str | os.PathLike[str]) -> None:
    """Mark ``directory`` as an osrm-lora output (see the module docstring)."""
    path = Path(directory) / OUTPUT_MARKER
    try:
        path.write_text(_MARKER_TEXT, encoding="utf-8")
        os.chmod(path, 0o666 & ~_umask())
    except OSError as exc:
        raise WriteError(directory, exc.strerror or str(exc)) from exc


# --------------------------------------------------------------------------- locks
@dataclass
class _Held:
    """A lock this process holds on one output (re-entrant) and the policy of its claim, if any."""

    fd: int
    target: Path
    count: int = 1
    overwrite: bool | None = None  # set by claim_output
    resume: bool = False  # a claimed tree whose children are the claimant's (pipeline run directory)


_HELD: dict[Path, _Held] = {}
_HELD_LOCK = threading.RLock()


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of the output ``target``: ``<parent>/.<name>.osrm-lora.lock``."""
    target = Path(target)
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def _flock(fd: int) -> bool:
    """Try to take the exclusive advisory lock of ``fd`` without waiting."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # e.g. a filesystem without flock: fall back to the PID in the file
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _busy(target: Path, holder: dict[str, Any] | None, lock: Path) -> OsrmError:
    who = f"PID {holder['pid']} on {holder.get('host', '?')}" if holder else "another process"
    return OsrmError(f"{target} is being written by another osrm-lora process ({who}); wait for it to finish "
                     f"or choose another output path (remove {lock} only if that process is gone)")


def _check_holder(target: Path, holder: dict[str, Any] | None, lock: Path) -> None:
    """Raise if the lock file names a live writer; warn when taking over a dead one's lock."""
    if holder is None:
        return
    pid, host = int(holder["pid"]), str(holder.get("host", ""))
    if host != socket.gethostname():
        raise _busy(target, holder, lock)  # cannot tell whether it still runs
    if pid == os.getpid():
        return
    if _pid_alive(pid):
        raise _busy(target, holder, lock)
    logger.warning("taking over the stale lock %s of PID %d on %s (that process is no longer running)", lock, pid, host)


def _take_lock(target: Path) -> int:
    """Open, ``flock`` and fill ``target``'s lock file; returns its descriptor (see :func:`output_lock`)."""
    lock = lock_path(target)
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise WriteError(target, exc.strerror or str(exc)) from exc
        ok = False
        try:
            if not _flock(fd):
                raise _busy(target, _read_holder(fd), lock)
            if not _same_file(fd, lock):  # removed (or replaced) by its previous holder meanwhile: retry
                continue
            _check_holder(target, _read_holder(fd), lock)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": str(target)}) + "\n"
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode("utf-8"), 0)
            except OSError as exc:
                raise WriteError(target, exc.strerror or str(exc)) from exc
            ok = True
            return fd
        finally:
            if not ok:
                os.close(fd)
    raise OsrmError(f"cannot lock {target}: its lock file {lock} keeps changing; retry")


def _drop_lock(held: _Held) -> None:
    lock = lock_path(held.target)
    try:
        if _same_file(held.fd, lock):
            lock.unlink()
    except OSError:
        logger.debug("could not remove lock %s", lock)
    finally:
        os.close(held.fd)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the write lock of the output ``target`` (re-entrant within this process).

    Another process holding it (or a lock file naming a live PID of this host, or any PID of another
    host) raises a one-line :class:`OsrmError` naming the holder; a lock left by a dead process is
    taken over with a warning. Yields the resolved target path.
    """
    target = _real(target)
    with _HELD_LOCK:
        held = _HELD.get(target)
        if held is not None:
            held.count += 1
        else:
            _make_parent(target)
            held = _HELD[target] = _Held(_take_lock(target), target)
    try:
        yield target
    finally:
        with _HELD_LOCK:
            held.count -= 1
            if held.count == 0:
                del _HELD[target]
                _drop_lock(held)


def _policy(target: Path) -> tuple[bool | None, bool]:
    """``(overwrite, inside_resumed_tree)`` from this process's claims on ``target`` and its parents."""
    with _HELD_LOCK:
        held = _HELD.get(target)
        overwrite = held.overwrite if held is not None else None
        resumed = any(h.resume and _inside(target, p) and p != target for p, h in _HELD.items())
    return overwrite, resumed


def _launch_rank() -> int:
    """The global rank a launcher (torchrun / accelerate launch) gave this process; 0 otherwise."""
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0


def overlapping_input(target: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The first of ``inputs`` that ``target`` is, contains or lies inside (paths resolved), or None:
    writing such an output would replace or change what the command reads."""
    out = Path(target).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or out in src.parents or src in out.parents:
            return Path(item)
    return None


@contextlib.contextmanager
def claim_output(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    container: bool = False,
    ours_if: Sequence[str] = (),
    option: str = "--out",
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Check and lock the output ``target`` of a whole command, before any work is done.

    Refuses what :func:`check_output` refuses (an earlier output of ours only without ``overwrite``;
    ``resume`` accepts it: the command continues it). A ``container`` (one output per task below it)
    or ``resume`` directory is created with its :data:`OUTPUT_MARKER` now and removed again if the
    command fails before writing anything into it. :func:`atomic_dir` calls for ``target`` inside
    the claim follow its ``overwrite``; those below a ``resume`` claim may replace what is there.
    Only the launcher's rank 0 claims (the other processes of a torchrun job do not write outputs).
    An output that is, contains or lies inside one of the command's ``inputs`` is refused, with or
    without ``overwrite``.
    """
    clash = overlapping_input(target, inputs)
    if clash is not None:
        raise OsrmError(f"{option} {target} would overwrite the input {clash}; write the output somewhere else")
    if _launch_rank() != 0:
        yield Path(target)
        return
    with output_lock(target) as real:
        with _HELD_LOCK:
            held = _HELD[real]
            previous = (held.overwrite, held.resume)
            held.overwrite, held.resume = overwrite or resume, resume
        try:
            state = check_output(target, overwrite=overwrite or resume, ours_if=ours_if, option=option)
            if container or resume:
                if state == "absent":
                    try:
                        real.mkdir()
                    except OSError as exc:
                        raise WriteError(target, exc.strerror or str(exc)) from exc
                if not (real / OUTPUT_MARKER).exists():
                    write_marker(real)
            try:
                yield real
            except BaseException:
                if (container or resume) and state in ("absent", "empty"):
                    _undo_fresh_dir(real, remove_dir=state == "absent")
                raise
        finally:
            with _HELD_LOCK:
                held.overwrite, held.resume = previous


def _undo_fresh_dir(path: Path, remove_dir: bool) -> None:
    """Remove the marker (and the directory) of a claimed directory the failed command left empty."""
    with contextlib.suppress(OSError):
        if set(os.listdir(path)) <= {OUTPUT_MARKER}:
            (path / OUTPUT_MARKER).unlink(missing_ok=True)
            if remove_dir:
                path.rmdir()


# --------------------------------------------------------------------------- atomic writes
def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary/old copies of ``target`` left by a writer that was killed mid-write.

    :func:`atomic_dir`/:func:`atomic_file` name them ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>``;
    only those whose process no longer exists are removed (a live concurrent writer is left alone).
    An old copy whose writer died between moving it aside and moving the new output in is the
    previous output: if ``target`` is missing it is restored instead of removed.
    Returns the removed (or restored) paths.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)(?:-.*)?", re.DOTALL)
    removed = []
    for item in sorted(parent.iterdir()):
        m = pattern.fullmatch(item.name)
        if m is None or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists() and not target.is_symlink():
            os.replace(item, target)
            logger.warning("restored %s from %s (its writer was killed while replacing it)", target, item.name)
        elif item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
        removed.append(item)
    return removed


@functools.cache
def _renameat2() -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover
        return None


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` at ``target``; the previous ``target`` stays whole until then."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _normalise_modes(root: Path) -> None:
    """Give every directory ``0777 & ~umask`` and every file ``0666 & ~umask`` (``0777`` if executable)."""
    umask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if st.st_mode & 0o111 else 0o666) & ~umask)


def _write_failure(target: Path, tmp: Path, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` (naming ``target``) for an I/O failure while writing ``tmp``, else None."""
    if isinstance(exc, WriteError):
        return WriteError(target, exc.reason) if _inside(exc.path, tmp) or exc.path == target else None
    if isinstance(exc, OSError):
        where = getattr(exc, "filename", None)
        named = isinstance(where, (str, os.PathLike)) and not _inside(_real(where), tmp)
        extra = f" ({where})" if named else ""
        return WriteError(target, f"{exc.strerror or exc}{extra}")
    why = _foreign_io_error(exc)
    return None if why is None else WriteError(target, why)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool | None = None, *,
               ours_if: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success rename it to ``target``.

    On any exception the temporary directory is removed and ``target`` is left untouched. An I/O
    failure (disk full, ...) is raised as a one-line :class:`WriteError` naming ``target``.

    ``target`` may be absent or an empty directory; an earlier output of ours (:data:`OUTPUT_MARKER`,
    or a legacy name in ``ours_if``) is replaced when ``overwrite`` allows it (default: the policy of
    the :func:`claim_output` on ``target``, else yes); an existing file or a foreign non-empty
    directory is refused. The output is locked while it is written (:func:`output_lock`), gets the
    marker, and modes from the umask (see the module docstring).
    """
    with output_lock(target) as real:
        claimed, resumed = _policy(real)
        allow = overwrite if overwrite is not None else (claimed if claimed is not None else True)
        try:
            remove_stale_temporaries(real)
        except OSError as exc:
            raise WriteError(target, exc.strerror or str(exc)) from exc
        check_output(target, overwrite=allow, ours_if=ours_if, assume_ours=resumed)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent))
            os.chmod(tmp, 0o777 & ~_umask())
        except OSError as exc:
            raise OsrmError(f"cannot write to {real.parent}: {exc.strerror}; choose a writable output directory") from exc
        try:
            yield tmp
            write_marker(tmp)
            _normalise_modes(tmp)
            check_output(target, overwrite=allow, ours_if=ours_if, assume_ours=resumed)  # still (nothing else locks)
            _swap_in(tmp, real)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = _write_failure(Path(target), tmp, exc)
            if failure is not None:
                raise failure from exc
            raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``target``; on success fsync and rename it onto ``target``.

    The file gets mode ``0666 & ~umask``; an I/O failure is a one-line :class:`WriteError` naming
    ``target`` and leaves the previous ``target`` as it was.
    """
    target = Path(target)
    _make_parent(target)
    if target.is_dir():
        raise OsrmError(f"cannot write {target}: it is a directory; move it away or choose another path")
    try:
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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(target, exc.strerror or str(exc)) from exc
        why = _foreign_io_error(exc)
        if why is not None:
            raise WriteError(target, why) from exc
        raise


def _umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.exists():
        raise OsrmError(f"{path} does not exist; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OsrmError(f"{path} is not valid JSON ({exc}); regenerate or fix the file") from exc


def json_default(obj: Any) -> Any:
    """The project's one JSON encoder (the ``default=`` of ``json.dump``; :func:`write_json`,
    :func:`to_jsonable`, the benchmark records): numpy scalars and arrays and torch tensors as numbers
    and lists, torch dtypes and devices and paths as strings; TypeError for anything else.

    numpy and torch are only looked at when already imported (an object of theirs cannot exist
    otherwise), so writing JSON never imports them."""
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"a value of type {type(obj).__name__} is not JSON serialisable; convert it first")


def to_jsonable(obj: Any, *, strict: bool = True) -> Any:
    """``obj`` as plain JSON data (dicts with string keys, lists, str, int, float, bool, None),
    converted by :func:`json_default`; anything else is a TypeError, or with ``strict=False`` its
    ``str()`` (for free-form metadata such as ``merge_info.json``)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, strict=strict) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    try:
        return to_jsonable(json_default(obj), strict=strict)
    except TypeError:
        if strict:
            raise
        return str(obj)
