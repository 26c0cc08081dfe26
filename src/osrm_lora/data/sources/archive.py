"""Safe, selective extraction from tar, zip and Debian (``ar``) archives.

Only members chosen by a ``select`` function are written, only as regular files, only below the
target directory: absolute names, ``..`` components, links and device files are never extracted.
Callers wrap the target in :func:`osrm_lora.fsutil.atomic_dir` so an interrupted extraction leaves
nothing behind.
"""

from __future__ import annotations

import io
import logging
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from osrm_lora.errors import DataError

logger = logging.getLogger(__name__)

#: ``select(member_name) -> relative output path`` or ``None`` to skip the member.
Selector = Callable[[str], "str | None"]

MAX_TOTAL_BYTES = 2 << 30  # refuse to write more than 2 GiB from one archive (decompression bombs)


def safe_relpath(name: str) -> PurePosixPath:
    """Validate an output path relative to the extraction root; raise DataError if it could escape it."""
    if not name or "\x00" in name or "\\" in name:
        raise DataError(f"archive member name {name!r} is not a plain relative path; refusing to extract it")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", "") for part in path.parts) or path.parts[:1] == (".",):
        raise DataError(f"archive member {name!r} points outside the extraction directory; refusing to extract it")
    return path


def _normalise_member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _write_member(dest: Path, rel: str, data: bytes) -> Path:
    relpath = safe_relpath(rel)
    target = dest.joinpath(*relpath.parts)
    root = dest.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    resolved_parent = target.parent.resolve()
    if resolved_parent != root and root not in resolved_parent.parents:
        raise DataError(f"archive member {rel!r} resolves outside {dest}; refusing to extract it")
    if target.is_symlink():
        raise DataError(f"{target} is a link; refusing to overwrite it")
    target.write_bytes(data)
    return target


def _extract_members(
    members: Iterator[tuple[str, bool, Callable[[], bytes]]], dest: Path, select: Selector, archive: Path | str
) -> list[Path]:
    written: list[Path] = []
    total = 0
    for raw_name, is_file, read in members:
        name = _normalise_member_name(raw_name)
        rel = select(name)
        if rel is None:
            continue
        if not is_file:
            raise DataError(f"archive member {raw_name!r} in {archive} is not a regular file (link or device); refusing to extract it")
        data = read()
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"{archive} expands to more than {MAX_TOTAL_BYTES >> 30} GiB; refusing to extract it")
        written.append(_write_member(dest, rel, data))
    return written


def extract_tar(archive: str | Path | bytes, dest: str | Path, select: Selector) -> list[Path]:
    """Extract the selected regular-file members of a (possibly compressed) tar into ``dest``."""
    dest = Path(dest)
    fileobj = io.BytesIO(archive) if isinstance(archive, bytes) else None
    label: str | Path = "<tar bytes>" if isinstance(archive, bytes) else archive
    try:
        tf = tarfile.open(name=None if fileobj else str(archive), fileobj=fileobj, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{label} is not a readable tar archive ({exc}); delete it and fetch again") from exc
    with tf:

        def members() -> Iterator[tuple[str, bool, Callable[[], bytes]]]:
            for m in tf:
                if m.isdir():
                    continue

                def read(m: tarfile.TarInfo = m) -> bytes:
                    fh = tf.extractfile(m)
                    assert fh is not None
                    return fh.read()

                yield m.name, m.isreg(), read

        try:
            return _extract_members(members(), dest, select, label)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise DataError(f"{label} is a truncated or corrupt tar archive ({exc}); delete it and fetch again") from exc


def extract_zip(archive: str | Path | bytes, dest: str | Path, select: Selector) -> list[Path]:
    """Extract the selected regular-file members of a zip (e.g. a wheel) into ``dest``."""
    dest = Path(dest)
    src = io.BytesIO(archive) if isinstance(archive, bytes) else str(archive)
    label = "<zip bytes>" if isinstance(archive, bytes) else archive
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{label} is not a readable zip archive ({exc}); delete it and fetch again") from exc
    with zf:

        def members() -> Iterator[tuple[str, bool, Callable[[], bytes]]]:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                mode = (info.external_attr >> 16) & 0o170000
                is_file = mode in (0, 0o100000)  # 0: no unix mode recorded

                def read(info: zipfile.ZipInfo = info) -> bytes:
                    return zf.read(info)

                yield info.filename, is_file, read

        try:
            return _extract_members(members(), dest, select, label)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{label} is a corrupt zip archive ({exc}); delete it and fetch again") from exc


def read_ar_members(data: bytes) -> dict[str, bytes]:
    """Parse a Unix ``ar`` archive (the container of a Debian ``.deb``) into ``{name: bytes}``."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError("not an ar archive (Debian package) - missing '!<arch>' magic; delete it and fetch again")
    out: dict[str, bytes] = {}
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DataError(f"truncated or corrupt ar archive at byte {pos}; delete it and fetch again")
        name = header[:16].decode("ascii", "replace").strip()
        if name.endswith("/"):
            name = name[:-1]
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise DataError(f"corrupt ar member size at byte {pos}; delete the package and fetch again") from exc
        start = pos + 60
        body = data[start : start + size]
        if len(body) != size:
            raise DataError(f"truncated ar member {name!r}; delete the package and fetch again")
        out[name] = body
        pos = start + size + (size % 2)  # members are 2-byte aligned
    return out


def extract_deb(archive: str | Path | bytes, dest: str | Path, select: Selector) -> list[Path]:
    """Extract selected files of a Debian package's ``data.tar.*`` (like ``dpkg -x``, without dpkg)."""
    data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
    members = read_ar_members(data)
    payload = next((body for name, body in members.items() if name.startswith("data.tar")), None)
    if payload is None:
        raise DataError(f"Debian package has no data.tar member (found {sorted(members)}); delete it and fetch again")
    return extract_tar(payload, dest, select)
