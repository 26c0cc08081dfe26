"""Trust fixes of the pipeline: config-time validation, ``run --check``, every merge method through the
pipeline, honest ``--force``, fixed scalings, relative task paths, stage timings on reruns, stable
adapter configs and lambdas at the edge of the grid."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from tinymodels import write_keyword_tasks

from osrm_lora.cli import main
from osrm_lora.config import load_config, parse_config
from osrm_lora.errors import ConfigError
from osrm_lora.fsutil import read_json
from osrm_lora.merge import list_methods
from osrm_lora.pipeline import (
    LEDGER_STAGES,
    STAGES,
    StageLedger,
    edge_lambda_warnings,
    run_pipeline,
    validate_force,
)
from osrm_lora.report.summary import print_results, results_rows
from osrm_lora.report.tables import grid_edge, summary_table
from osrm_lora.report.writer import markdown_report

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SRC = Path(__file__).resolve().parents[1] / "src"


def _write_cfg(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- item 6: validation at load, --check
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_run_check_resolves_every_shipped_config_offline(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``run --check`` needs no network (HF_HUB_OFFLINE=1, empty data cache) and writes nothing."""
    monkeypatch.chdir(tmp_path)
    rc = main(["run", str(config), "--check"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cfg = load_config(config)
    lines = out.splitlines()
    assert lines[0].startswith(f"config {cfg.name}: OK")
    assert any(line.startswith("model: ") for line in lines)
    for method in cfg.merge.methods:
        assert any(line.startswith(f"merge {method}: ") for line in lines), method
    n_tasks = sum(line.startswith("task ") for line in lines)
    assert n_tasks == len(cfg.tasks) + (6 if cfg.suite == "offline6" else 0)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # nothing fetched, nothing written


def test_offline6_dare_ties_uses_the_registry_parameter() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "offline6.yaml")
    assert cfg.merge.params["dare_ties"] == {"p": 0.8}  # drop 80% = keep 20%, as ties' density 0.2


def test_unknown_merge_parameter_fails_when_the_config_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_cfg(tmp_path / "c.yaml", {"suite": "demo", "merge": {"methods": ["dare_ties"],
                                                                      "params": {"dare_ties": {"density": 0.2}}}})
    with pytest.raises(ConfigError, match=r"method dare_ties has no parameter 'density'; valid parameters: .*\bp\b"):
        load_config(cfg)
    assert main(["run", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no parameter 'density'" in err and "\n" not in err


def test_per_adapter_weights_are_checked_against_the_number_of_tasks(tmp_path: Path) -> None:
    data = {"suite": "demo", "merge": {"methods": ["task_arithmetic"], "params": {"task_arithmetic": {"weights": [1, 1]}}}}
    with pytest.raises(ConfigError, match="has 2 values but 4 adapters"):
        parse_config(data)
    data["merge"]["params"]["task_arithmetic"]["weights"] = [1, 1, 1, 1]
    assert parse_config(data).merge.params["task_arithmetic"]["weights"] == [1, 1, 1, 1]


def test_check_fails_in_one_line_for_a_missing_local_task_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_cfg(tmp_path / "c.yaml", {"tasks": [{"name": "a", "source": "local", "path": "missing.jsonl"}, "mr"]})
    assert main(["run", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.jsonl" in err and "\n" not in err


def test_check_rejects_a_model_that_is_neither_a_directory_nor_a_hub_id(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_cfg(tmp_path / "c.yaml", {"suite": "demo", "model": "not a model id"})
    assert main(["run", str(cfg), "--check"]) == 2
    assert "neither an existing model directory nor a Hugging Face Hub id" in capsys.readouterr().err


# --------------------------------------------------------------------------- unclear message: unknown task key
def test_unknown_task_key_names_the_task_the_key_and_the_allowed_keys(tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path / "c.yaml", {"tasks": ["mr", {"name": "mine", "source": "local", "path": "d.jsonl",
                                                            "text_col": "text"}]})
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert "task 1 ('mine'): unknown key(s) text_col; allowed keys: name, source" in msg and "text_column" in msg
    assert "valid string" not in msg and "\n" not in msg


def test_bad_value_in_a_task_names_the_task_and_the_field() -> None:
    with pytest.raises(ConfigError, match=r"task 0 \('x'\): max_train: Input should be greater than 0"):
        parse_config({"tasks": [{"name": "x", "max_train": 0}]})


# --------------------------------------------------------------------------- item 13: relative task paths
def test_relative_task_files_resolve_against_the_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf_dir = tmp_path / "project" / "configs"
    conf_dir.mkdir(parents=True)
    specs = write_keyword_tasks(tmp_path / "project", [("colours", ["red", "green"], 1)], n=20)
    one = {"name": "one", "source": "local", "path": "../colours.jsonl"}
    split = {"name": "split", "source": "local", "train_file": "../colours.jsonl", "validation_file": "../colours.jsonl",
             "test_file": str(Path(specs[0]["path"]).resolve())}
    cfg_path = _write_cfg(conf_dir / "c.yaml", {"tasks": [one, split]})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "project" / "configs" / "c.yaml")
    data = str((tmp_path / "project" / "colours.jsonl").resolve())
    assert cfg.tasks[0].path == data
    assert cfg.tasks[1].train_file == data and cfg.tasks[1].validation_file == data and cfg.tasks[1].test_file == data
    assert main(["run", str(cfg_path), "--check"]) == 0  # the check reads the files from there
    assert "task one: local " + data in capsys.readouterr().out


# --------------------------------------------------------------------------- item 12: --force, STAGES
def test_force_accepts_exactly_the_ledger_stages(tmp_path: Path) -> None:
    assert STAGES == LEDGER_STAGES
    for stage in (*STAGES, "all"):
        assert validate_force([stage]) == {stage}
    for stage in ("data", "init", "report"):  # accepted once, and did nothing
        with pytest.raises(ConfigError, match=rf"unknown stage\(s\) \['{stage}'\]"):
            validate_force([stage])
    with pytest.raises(ConfigError, match="unknown stage"):
        run_pipeline(parse_config({"suite": "demo"}), tmp_path / "run", force=("report",))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="not one of the ledger's stages"):
        StageLedger(tmp_path).run("report", "report", {}, [], lambda: None)


# --------------------------------------------------------------------------- item 22: lambda at the edge
def test_grid_edge() -> None:
    grid = [0.1, 0.5, 1.0, 1.5]
    assert grid_edge(grid, 1.5) == "upper" and grid_edge(grid, 0.1) == "lower"
    assert grid_edge(grid, 1.0) is None and grid_edge([1.0], 1.0) is None and grid_edge(grid, None) is None


def _results(lam: float, source: str | None = "validation") -> dict[str, Any]:
    curve = [{"lambda": x, "validation": {"a": 50.0}, "test": {"a": 50.0}, "avg_validation": 50.0 + x,
              "avg_test": 50.0, "avg_normalised_test": 90.0} for x in (0.5, 1.0, 1.5)]
    rec = {"init": "standard", "method": "emr", "params": {}, "seed": 0, "lambda": lam, "lambda_source": source,
           "lambda_at_edge": grid_edge([0.5, 1.0, 1.5], lam) if source == "validation" else None,
           "validation": {"a": 51.0}, "test": {"a": 50.0}, "avg_validation": 51.0, "avg_test": 50.0,
           "normalised_test": {"a": 90.0}, "avg_normalised_test": 90.0, "merge_seconds": 0.1, "curve": curve}
    return {"name": "t", "tasks": ["a"], "metrics": {"a": "accuracy"}, "inits": [{"name": "standard", "mode": "standard"}],
            "single_task": {"standard": {"a": {"test": 55.0, "validation": 56.0}}}, "merged": [rec], "notes": []}


def test_edge_lambda_is_warned_and_noted_in_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    edge, inside = _results(1.5), _results(1.0)
    [line] = edge_lambda_warnings(edge["merged"])
    assert line.startswith("standard/emr: lambda 1.5") and "largest" in line and "extend merge.lambdas" in line
    assert edge_lambda_warnings(inside["merged"]) == []
    assert summary_table(edge).rows[0][2].note == "edge: largest in grid"
    assert summary_table(inside).rows[0][2].note == ""
    md = markdown_report(edge)
    assert "| 1.5 (edge: largest in grid) |" in md and "1.5 (edge" not in markdown_report(inside)
    assert results_rows(edge)[1][0][2] == "1.5 (edge: largest in grid)"
    print_results(edge)
    out = capsys.readouterr().out
    assert "λ=1.5*" in out and "edge of its grid" in out
    print_results(inside)
    assert "edge of its grid" not in capsys.readouterr().out


def test_edge_is_found_for_results_written_before_the_field() -> None:
    old = _results(0.5)
    del old["merged"][0]["lambda_at_edge"], old["merged"][0]["lambda_source"]
    assert summary_table(old).rows[0][2].note == "edge: smallest in grid"
    assert edge_lambda_warnings(old["merged"])


def test_fixed_scaling_is_not_reported_as_an_edge() -> None:
    fixed = _results(1.5, source="config")
    assert edge_lambda_warnings(fixed["merged"]) == []
    assert summary_table(fixed).rows[0][2].note == "fixed in config"


# --------------------------------------------------------------------------- item 16: stable adapter_config.json
_WRITE_ADAPTER = """
import json, sys
from pathlib import Path
from osrm_lora.backbone import load_classifier
from osrm_lora.config import LoraSettings
from osrm_lora.train import build_peft_model, write_peft_adapter
model = load_classifier(sys.argv[1], 2, device="cpu")
peft_model = build_peft_model(model, LoraSettings(rank=2, target_modules=["value", "query", "key", "dense"]), "bert")
out = Path(sys.argv[2]); out.mkdir()
write_peft_adapter(peft_model, dict(peft_model.state_dict()), out)
print(json.dumps(json.loads((out / "adapter_config.json").read_text())["target_modules"]))
"""


def test_adapter_config_target_modules_sorted_whatever_the_hash_seed(tiny_bert: Path, tmp_path: Path) -> None:
    written = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SRC)}
        proc = subprocess.run([sys.executable, "-c", _WRITE_ADAPTER, str(tiny_bert), str(tmp_path / f"a{seed}")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        written.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert written[0] == sorted(["value", "query", "key", "dense"])
    assert written[0] == written[1]


# --------------------------------------------------------------------------- item 7 (+12, 14): every method, tiny run
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def every_method(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import osrm_lora.merge_inputs as merge_inputs

    root = tmp_path_factory.mktemp("every-method")
    tasks = write_keyword_tasks(root, [("colours", ["red", "green", "blue"], 1), ("polar", ["good", "bad"], 2)], n=40)
    methods = [m.name for m in list_methods()]
    raw = {
        "name": "every-method", "model": str(tiny_bert), "tasks": tasks, "seed": 0, "device": "cpu",
        "lora": {"rank": 2, "alpha": 4}, "inits": ["standard"], "diagnose": False,  # RegMean alone needs the stats
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 12, "eval_batch_size": 64},
        "profile": {"n_samples": 8, "batch_size": 8},
        "merge": {"methods": methods, "lambdas": [0.5, 1.0, 1.5],
                  "params": {"task_arithmetic": {"scaling": 0.7}, "adamerging": {"steps": 2}}},
    }
    fisher_lengths: list[int] = []
    real_encode = merge_inputs.encode_split

    def spy(tokenizer: Any, split: Any, max_length: int, *args: Any, **kwargs: Any) -> Any:
        fisher_lengths.append(max_length)
        return real_encode(tokenizer, split, max_length, *args, **kwargs)

    handler = _Records()
    logging.getLogger("osrm_lora.pipeline").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(merge_inputs, "encode_split", spy)
            results = run_pipeline(parse_config(raw), root / "run")
        first_manifest = read_json(root / "run" / "manifest.json")
        rerun = run_pipeline(parse_config(raw), root / "run")
    finally:
        logging.getLogger("osrm_lora.pipeline").removeHandler(handler)
    return {"root": root, "raw": raw, "methods": methods, "results": results, "rerun": rerun,
            "first_manifest": first_manifest, "fisher_lengths": fisher_lengths, "warnings": handler.lines}


def test_every_registered_method_runs_through_the_pipeline(every_method: dict[str, Any]) -> None:
    run_dir = every_method["root"] / "run"
    by_method = {r["method"]: r for r in every_method["results"]["merged"]}
    assert sorted(by_method) == sorted(every_method["methods"]) and len(by_method) == 19
    for method, rec in by_method.items():
        assert (run_dir / "merges" / "standard" / method / "sweep.json").is_file(), method
        assert sorted(rec["test"]) == ["colours", "polar"], method
        assert all(math.isfinite(v) for v in rec["test"].values()) and math.isfinite(rec["avg_test"]), method


def test_fisher_uses_the_configured_max_length(every_method: dict[str, Any]) -> None:
    assert every_method["fisher_lengths"] == [12, 12]  # one encoding per task, at train.max_length


def test_configured_scaling_is_used_without_a_sweep(every_method: dict[str, Any]) -> None:
    by_method = {r["method"]: r for r in every_method["results"]["merged"]}
    ta = by_method["task_arithmetic"]
    assert ta["lambda"] == 0.7 and ta["lambda_source"] == "config" and [p["lambda"] for p in ta["curve"]] == [0.7]
    assert [p["lambda"] for p in by_method["ties"]["curve"]] == [0.5, 1.0, 1.5]
    assert by_method["ties"]["lambda_source"] == "validation"
    assert by_method["adamerging"]["lambda"] is None and by_method["adamerging"]["lambda_source"] is None


def test_edge_lambdas_of_the_run_are_warned(every_method: dict[str, Any]) -> None:
    records = every_method["results"]["merged"]
    for rec in records:
        expected = grid_edge([0.5, 1.0, 1.5], rec["lambda"]) if rec["lambda_source"] == "validation" else None
        assert rec["lambda_at_edge"] == expected, rec["method"]
    edged = {r["method"] for r in records if r["lambda_at_edge"]}
    warned = {line.split(":")[0].split("/")[1] for line in every_method["warnings"] if "chosen on validation" in line}
    assert warned == edged


def test_rerun_keeps_the_stage_timings_of_cached_stages(every_method: dict[str, Any]) -> None:
    first = every_method["first_manifest"]["stage_seconds"]
    again = every_method["rerun"]["manifest"]
    assert first and set(first) >= {"profile", "train/standard/colours", "merge/standard/emr"}
    assert again["stage_seconds"] == first  # every stage was skipped as finished: the first run's times
    assert read_json(every_method["root"] / "run" / "manifest.json")["stage_seconds"] == first
    assert every_method["first_manifest"]["stages_cached"] == []  # a fresh run skips nothing
    assert again["stages_cached"] == sorted(first)  # the rerun skipped every stage, and says so


def test_adapters_of_the_run_list_sorted_target_modules(every_method: dict[str, Any]) -> None:
    for task in ("colours", "polar"):
        conf = read_json(every_method["root"] / "run" / "adapters" / "standard" / task / "adapter_config.json")
        assert conf["target_modules"] == sorted(conf["target_modules"]) and len(conf["target_modules"]) == 2
