"""The command line as a user sees it: help texts, one-line errors, exit codes, no partial outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from osrm_lora.cli import app, main

# every registered subcommand, so a new one cannot ship without help and an example
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_the_command_list_is_complete() -> None:
    expected = {"demo", "run", "report", "train", "profile", "init", "project", "diagnose", "merge", "evaluate",
                "evaluate-lm", "predict", "export", "search", "rmm"}
    assert expected <= set(COMMANDS), sorted(expected - set(COMMANDS))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osrm_lora.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example:" in out and "osrm-lora" in out


def test_unknown_method_is_one_line_error(tmp_path: Path) -> None:
    proc = _cli("merge", "--method", "no_such_method", str(tmp_path / "a"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config_and_bad_config(tmp_path: Path) -> None:
    proc = _cli("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: demo\nlora: {rank: -3}\n")
    proc = _cli("run", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "lora.rank" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_merge_list_names_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("task_arithmetic", "ties", "dare_ties", "emr", "regmean", "tsv_m", "iso_c", "core_space"):
        assert name in out


def test_usage_error_exit_code() -> None:
    proc = _cli("train")
    assert proc.returncode == 2 and "Missing" in proc.stderr and "--task" in proc.stderr


def test_report_without_results(tmp_path: Path) -> None:
    proc = _cli("report", str(tmp_path))
    assert proc.returncode == 2 and "no results.json" in proc.stderr


def test_unknown_task_is_clear(tmp_path: Path) -> None:
    proc = _cli("tasks", "show", "no_such_task")
    assert proc.returncode == 2 and "no_such_task" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_quiet_and_verbose_flags_parse() -> None:
    assert main(["-q", "tasks", "list"]) == 0
    assert main(["-v", "tasks", "list"]) == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["--warmup-ratio", "2"], "error: Invalid value for '--warmup-ratio': "),  # outside the option's range
    (["--warmup-ratio", "1"], "error: warmup_ratio: Input should be less than 1 (got 1.0)"),  # the settings' strict bound
    (["--head-lr", "0"], "error: head_lr: Input should be greater than 0 (got 0.0)"),
    (["--max-grad-norm", "0"], "error: max_grad_norm: Input should be greater than 0 (got 0.0)"),
    (["--eval-batch-size", "0"], "error: Invalid value for '--eval-batch-size': "),
    (["--weight-decay", "-1"], "error: Invalid value for '--weight-decay': "),
])
def test_bad_train_setting_is_one_line_error(args: list[str], expected: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["train", "--task", "mr", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), err
    assert "Traceback" not in err and not out.exists()
