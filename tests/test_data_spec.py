"""Task specs, suites and the public API of osrm_lora.data."""

from __future__ import annotations

import pytest

import osrm_lora.data as data
from osrm_lora.data import SUITES, TaskSpec, load_suite, load_task, resolve_specs
from osrm_lora.errors import ConfigError, OsrmError


def test_public_api() -> None:
    for name in ("load_task", "load_suite", "TaskSpec", "Task", "Split", "compute_metric", "SUITES", "BUILTIN_TASKS"):
        assert hasattr(data, name)
    assert sorted(data.BUILTIN_TASKS) == ["bbc", "foods", "hedge", "movie_docs", "mr", "spam"]


def test_parse_names_and_mappings() -> None:
    assert TaskSpec.parse("mr") == TaskSpec(name="mr", source="builtin")
    assert TaskSpec.parse("glue/cola").source == "glue"
    spec = TaskSpec.parse({"name": "mr_small", "dataset": "mr", "max_train": 10})
    assert spec.data_name == "mr" and spec.max_train == 10
    with pytest.raises(OsrmError) as err:
        TaskSpec.parse("imdb")
    assert "mr" in str(err.value) and "glue/rte" in str(err.value)
    with pytest.raises(OsrmError, match="unknown built-in task 'imdb'.*bbc"):
        load_task({"name": "imdb"})


def test_spec_errors_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="typo_field"):
        TaskSpec.parse({"name": "mr", "typo_field": 1})
    with pytest.raises(ConfigError, match="split_ratios"):
        TaskSpec.parse({"name": "mr", "split_ratios": [0.5, 0.1, 0.1]})
    with pytest.raises(ConfigError, match="max_train"):
        TaskSpec.parse({"name": "mr", "max_train": 0})
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        TaskSpec.parse({"name": "mr", "metric": "bleu"})
    with pytest.raises(ConfigError, match=r"\['path'\] do not apply to source 'builtin'"):
        TaskSpec.parse({"name": "mr", "path": "x.csv"})
    with pytest.raises(ConfigError) as err:
        TaskSpec.parse({"name": "mr", "typo": 1, "seed": "x"})
    assert "\n" not in str(err.value)


def test_duplicates_and_suites() -> None:
    with pytest.raises(ConfigError, match="'mr' is listed twice"):
        resolve_specs(["mr", {"name": "mr", "max_train": 5}])
    demo = load_suite("demo")
    assert [s.name for s in demo] == ["mr", "hedge", "bbc", "spam"]
    assert all(s.max_train == 320 and s.max_eval == 100 for s in demo)
    full = load_suite("offline6")
    assert [s.name for s in full] == ["mr", "movie_docs", "hedge", "bbc", "spam", "foods"]
    assert all(s.max_train is None and s.max_eval is None for s in full)
    with pytest.raises(OsrmError, match="unknown suite 'nope'.*demo.*offline6"):
        load_suite("nope")
    assert "glue" in SUITES
