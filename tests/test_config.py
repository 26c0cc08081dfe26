from __future__ import annotations

from pathlib import Path

import pytest

from osrm_lora.config import PipelineConfig, load_config, parse_config
from osrm_lora.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "suite: demo\n"))
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 16 and cfg.lora.target_modules is None
    # the recommended configuration (chosen on validation by bench/quality.py) next to the baseline
    assert [(i.name, i.mode, i.freeze_A) for i in cfg.inits] == [("standard", "standard", False),
                                                                 ("osrm-own-frozenA", "own", True)]
    assert cfg.merge.methods == ["task_arithmetic", "emr"]
    assert cfg.parallel == "auto" and cfg.train.strategy == "ddp"
    assert cfg.merge.lambdas == sorted(cfg.merge.lambdas)


def test_inits_from_strings(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "suite: demo\ninits: [standard, paper, own]\n"))
    assert [(i.name, i.mode) for i in cfg.inits] == [("standard", "standard"), ("osrm-paper", "paper"), ("osrm-own", "own")]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("suite: demo\nlearning_rate: 3\n", "learning_rate: unknown key"),
        ("suite: demo\nlora: {rank: 0}\n", "lora.rank"),
        ("suite: demo\nlora: {rank: 8, dropout: 1.5}\n", "lora.dropout"),
        ("suite: demo\ninits: [{name: x, mode: nope}]\n", "inits.0.mode"),
        ("suite: demo\ninits: [{name: x, mode: paper, freeze_A: true, freeze_B: true}]\n", "nothing to train"),
        ("suite: demo\nmerge: {lambdas: []}\n", "merge.lambdas"),
        ("seed: 1\n", "name a suite or list tasks"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("suite: demo\ntrain: {epochs: -1}\n", "train.epochs"),
        ("suite: demo\ninits: [{name: x, mode: standard, subspace_dim: 32}]\n", "subspace_dim needs an OSRM mode"),
        ("suite: demo\ninits: [{name: x, mode: own, subspace_dim: 0}]\n", "inits.0.subspace_dim"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(_write(tmp_path, "suite: demo\nlora: {rank: [\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ ships example configs"
    for f in files:
        assert isinstance(load_config(f), PipelineConfig)


def test_parse_config_round_trip() -> None:
    from osrm_lora.config import config_to_dict

    cfg = parse_config({"suite": "demo", "lora": {"rank": 4}})
    assert parse_config(config_to_dict(cfg)) == cfg


def test_init_solver_setting() -> None:
    cfg = parse_config({"suite": "demo", "inits": [{"name": "p", "mode": "paper", "solver": "subset"}, "standard"]})
    assert cfg.inits[0].solver == "subset" and cfg.inits[1].solver == "eigh"
    with pytest.raises(ConfigError, match="solver"):
        parse_config({"suite": "demo", "inits": [{"name": "p", "mode": "paper", "solver": "lobpcg"}]})
