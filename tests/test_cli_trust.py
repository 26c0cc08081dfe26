"""Trust in what the command line reports: refused single-class data, `evaluate` that reproduces the
run, `evaluate-lm` only on causal LMs (and fast offline), logs on stderr and results on stdout,
readable projection reports, one-line errors for rejected settings and clear messages for missing
paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinymodels import WORDS, tiny_config, write_tokenizer

from osrm_lora import inference
from osrm_lora.cli import main
from osrm_lora.config import LoraSettings, TrainSettings
from osrm_lora.data import load_task
from osrm_lora.errors import DataError
from osrm_lora.train import train_task

LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = 60, word: str = "red") -> list[dict]:
    """A learnable two-class task: label 1 iff ``word`` occurs."""
    return [{"text": f"alpha {word if i % 2 else 'golf'} bravo {WORDS[i % 20]}", "label": i % 2} for i in range(n)]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line) and not line.startswith(" ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    _jsonl(root / "a.jsonl", _rows())
    _jsonl(root / "b.jsonl", _rows(word="blue"))
    return root


@pytest.fixture(scope="module")
def trained(work: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters a and b trained through the CLI on local files (max_length 8)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("OSRM_LORA_CACHE", str(cache))
    try:
        out = {}
        for name in ("a", "b"):
            out[name] = work / "adapters" / name
            assert main(["-q", "train", "--task", str(work / f"{name}.jsonl"), "--model", str(tiny_bert), "--out", str(out[name]),
                         "--epochs", "2", "--rank", "2", "--max-length", "8", "--lr", "0.01", "--batch-size", "8"]) == 0
    finally:
        mp.undo()
    return out


# ---------------------------------------------------------------------------------------------- item 4: one class
def test_single_class_file_is_refused_naming_task_and_file(work: Path, tiny_bert: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    one = _jsonl(tmp_path / "onelabel.jsonl", [{"text": f"alpha {w}", "label": "pos"} for w in WORDS])
    out = tmp_path / "out"
    rc = main(["train", "--task", str(one), "--model", str(tiny_bert), "--out", str(out), "--epochs", "1"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "task onelabel" in line and str(one) in line and "only one class ('pos')" in line
    assert not out.exists()


def test_single_class_is_refused_even_with_two_label_names(tmp_path: Path) -> None:
    one = _jsonl(tmp_path / "one.jsonl", [{"text": f"alpha {w}", "label": "yes"} for w in WORDS])
    with pytest.raises(DataError, match=r"task one: .*one\.jsonl has only one class \('yes'\)"):
        load_task({"name": "one", "source": "local", "path": str(one), "label_names": ["no", "yes"]})
    two = _jsonl(tmp_path / "two.jsonl", [{"text": f"alpha {w}", "label": "yes" if i % 2 else "no"} for i, w in enumerate(WORDS)])
    assert load_task({"name": "two", "source": "local", "path": str(two)}).num_labels == 2


# ---------------------------------------------------------------------------------------------- item 8: evaluate
def test_training_records_the_task_spec(trained: dict[str, Path], work: Path) -> None:
    metrics = json.loads((trained["a"] / "metrics.json").read_text())
    assert metrics["task_spec"]["source"] == "local"
    assert Path(metrics["task_spec"]["path"]) == (work / "a.jsonl").resolve()


def test_evaluate_reproduces_the_runs_scores_of_local_tasks(trained: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere else than where the adapters were trained
    for split in ("test", "validation"):
        assert main(["evaluate", str(trained["a"]), str(trained["b"]), "--split", split]) == 0, capsys.readouterr().err
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2
        for line, name in zip(lines, ("a", "b")):
            metrics = json.loads((trained[name] / "metrics.json").read_text())
            recorded = f"{metrics[split]:.2f}"
            n = metrics[f"n_{split}"]
            assert line == f"{name}: {split} accuracy {recorded} ({n} examples); at training {recorded}"


def test_evaluate_uses_the_runs_max_length_unless_given(trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import osrm_lora.encoding as encoding

    seen: list[int] = []
    real = encoding.encode_split

    def spy(tok, split, max_length, regression):  # type: ignore[no-untyped-def]
        seen.append(max_length)
        return real(tok, split, max_length, regression)

    monkeypatch.setattr(encoding, "encode_split", spy)
    assert main(["evaluate", str(trained["a"])]) == 0
    assert main(["evaluate", str(trained["a"]), "--max-length", "16"]) == 0
    assert seen == [8, 16]
    capsys.readouterr()


def test_evaluate_reuses_the_runs_capped_split_sizes(work: Path, tiny_bert: Path, tmp_path: Path) -> None:
    spec = {"name": "capped", "source": "local", "path": str(work / "a.jsonl"), "max_train": 20, "max_eval": 3}
    task = load_task(spec)
    res = train_task(task, tmp_path / "capped", model=str(tiny_bert), lora=LoraSettings(rank=2),
                     train=TrainSettings(epochs=1, max_length=8))
    scores = inference.score_adapters([str(tmp_path / "capped")])
    assert [(s.task, s.split, s.metric, s.n) for s in scores] == [("capped", "test", "accuracy", 3)]
    assert scores[0].value == pytest.approx(res.test)


def test_run_max_length_defaults(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"train": {"max_length": 24}}))
    assert inference.run_max_length(tmp_path) == 24
    assert inference.run_max_length(tmp_path, 40) == 40
    assert inference.run_max_length(tmp_path / "nowhere") == inference.DEFAULT_MAX_LENGTH


def test_predict_works_on_a_local_task_adapter(trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--adapter", str(trained["a"]), "alpha red bravo", "golf"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["alpha red bravo", "golf"]
    assert {line.split("\t")[0] for line in lines} <= {"0", "1"}


def test_predict_scores_and_json_give_probabilities(trained: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from osrm_lora.inference import predict

    monkeypatch.chdir(tmp_path)
    texts = ["alpha red bravo", "golf", "alpha red"]
    reference = predict(str(trained["a"]), texts, batch_size=2)  # batches of 2 and 1 agree with one batch of 3
    for batched, whole in zip(reference, predict(str(trained["a"]), texts)):
        assert batched.scores == pytest.approx(whole.scores, abs=1e-6) and batched.label == whole.label
    assert main(["predict", "--adapter", str(trained["a"]), "--json", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == texts
    for row, ref in zip(rows, reference):
        assert set(row["scores"]) == {"0", "1"} and sum(row["scores"].values()) == pytest.approx(1.0)
        assert row["label"] == max(row["scores"], key=row["scores"].get) == ref.label
    assert main(["predict", "--adapter", str(trained["a"]), "--scores", texts[0]]) == 0
    label, prob, every, text = capsys.readouterr().out.strip().split("\t")
    assert (label, text) == (rows[0]["label"], texts[0])
    assert float(prob) == pytest.approx(rows[0]["scores"][label], abs=1e-4) and f"{label}=" in every


def test_help_and_version_read_as_a_user_expects(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"osrm-lora {version('osrm-lora')}"
    for argv in (["--help"], ["run", "--help"], ["train", "--help"], ["merge", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "<bool>" not in out and "{config}" not in out and "-v <int>" not in out, out
    assert main(["run", "--help"]) == 0
    assert "CONFIG" in capsys.readouterr().out
    assert main(["-vv", "tasks", "list"]) == 0  # -v is a counted flag and takes no value


# ---------------------------------------------------------------------------------------------- item 11: evaluate-lm
@pytest.fixture(scope="module")
def texts(work: Path) -> Path:
    path = work / "texts.txt"
    path.write_text("alpha bravo charlie delta\necho golf hotel india\n")
    return path


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_evaluate_lm_refuses_models_that_are_not_causal_lms(model: str, tiny_bert: Path, texts: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate-lm", str(texts), "--model", str(tiny_bert) if model == "tiny" else model])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "not a causal language model" in line and ("BertForSequenceClassification" in line or "BertModel" in line)


def test_evaluate_lm_scores_a_causal_lm(tmp_path: Path, texts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(str(tmp_path / "lm"))
    write_tokenizer(tmp_path / "lm")
    assert main(["evaluate-lm", str(texts), "--model", str(tmp_path / "lm")]) == 0
    first = capsys.readouterr().out
    assert main(["evaluate-lm", str(texts), "--model", str(tmp_path / "lm")]) == 0
    assert capsys.readouterr().out == first  # the same loss on the same file: nothing random in the model
    assert re.fullmatch(rf"{re.escape(str(texts))}\tloss \d+\.\d{{4}}\tperplexity \d+\.\d{{2}}\n", first)


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to load from the Hub fail the test (it would retry for most of a minute)."""
    import transformers

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("tried to load from the Hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)


def test_evaluate_lm_hub_id_offline_fails_fast(texts: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_loading(monkeypatch)
    rc = main(["evaluate-lm", str(texts), "--model", "some-org/no-such-model"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "some-org/no-such-model" in line and "Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_evaluate_lm_hub_id_without_network_fails_fast(texts: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts: list[tuple] = []

    def unreachable(address: tuple, *_a: object, **_k: object) -> None:
        attempts.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    _no_loading(monkeypatch)
    rc = main(["evaluate-lm", str(texts), "--model", "some-org/no-such-model"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "cannot be reached" in line and "some-org/no-such-model" in line
    assert attempts and attempts[0][0] == "huggingface.co"


# ---------------------------------------------------------------------------------------------- item 18: stdout / stderr
def test_logs_go_to_stderr_and_results_to_stdout(work: Path, tiny_bert: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OSRM_LORA_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OSRM_LORA_NO_PROGRESS="")
    proc = subprocess.run([sys.executable, "-m", "osrm_lora.cli", "-v", "train", "--task", str(work / "a.jsonl"),
                           "--model", str(tiny_bert), "--out", str(tmp_path / "a"), "--epochs", "1", "--rank", "2",
                           "--max-length", "8"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"a: validation \d+\.\d\d \(epoch 1\), test \d+\.\d\d; saved to .*\n", proc.stdout), proc.stdout
    assert "INFO" in proc.stderr and "training a" in proc.stderr  # the log is there, on stderr


def test_tasks_show_logs_on_stderr(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "show", str(work / "b.jsonl")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("b: classification, metric accuracy")
    assert "stored split" not in captured.out and "stored split" in captured.err


# ---------------------------------------------------------------------------------------------- item 19: project
@pytest.fixture(scope="module")
def stats(work: Path, tiny_bert: Path, trained: dict[str, Path]) -> Path:
    out = work / "stats"
    assert main(["-q", "profile", "--tasks", f"{work / 'a.jsonl'},{work / 'b.jsonl'}", "--model", str(tiny_bert),
                 "--out", str(out), "--n-samples", "16", "--max-length", "8"]) == 0
    return out


def test_project_prints_energy_kept_per_task_and_warns_when_little(trained: dict[str, Path], stats: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["project", str(trained["a"]), str(trained["b"]), "--stats", str(stats), "--out", str(tmp_path / "p1"),
                 "--rank", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "p1" / "projection.json").read_text())
    lines = captured.out.strip().splitlines()
    assert lines[0] == "projected onto the rank-1 OSRM subspace (paper mode):"
    for task, line in zip(("a", "b"), lines[1:]):
        kept = 100 * report["tasks"][task]["energy_kept"]
        assert line.startswith(f"{task}: update energy kept {kept:.1f}% (4 modules, weakest module ")
        assert line.endswith(f"-> {tmp_path / 'p1' / task}")
    assert len(lines) == 3 and "{" not in captured.out and "reference_scaling_bug" not in captured.out
    low = [t for t in ("a", "b") if report["tasks"][t]["energy_kept"] < 0.25]
    assert low, report  # rank 1 of 32 keeps little
    for task in low:
        assert f"the projection of {task} keeps only" in captured.err
    assert "keeps only" not in captured.out


def test_project_does_not_warn_when_the_energy_is_kept(trained: dict[str, Path], stats: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["project", str(trained["a"]), str(trained["b"]), "--stats", str(stats), "--out", str(tmp_path / "p32"),
                 "--rank", "32"]) == 0  # the whole input space: everything is kept
    captured = capsys.readouterr()
    assert "a: update energy kept 100.0%" in captured.out and "b: update energy kept 100.0%" in captured.out
    assert "keeps only" not in captured.err


# ---------------------------------------------------------------------------------------------- item 20: settings
@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "--task", "mr", "--lr", "5"], "error: lr: Input should be less than 1 (got 5.0)"),
    (["train", "--task", "mr", "--alpha", "0"], "error: alpha: Input should be greater than 0 (got 0.0)"),
    (["init", "--stats", "{stats}", "--alpha", "0"], "error: alpha: Input should be greater than 0 (got 0.0)"),
])
def test_settings_rejected_by_validation_are_one_line_errors(argv: list[str], expected: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main([a.replace("{stats}", str(tmp_path)) for a in argv] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert _error_line(err) == expected
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- item 21: messages
def test_missing_local_model_directory_is_named_as_a_path(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for argv in (["train", "--task", str(work / "a.jsonl"), "--model", "runs/my-base", "--out", "o1"],
                 ["profile", "--tasks", str(work / "a.jsonl"), "--model", "runs/my-base", "--out", "o2"],
                 ["evaluate-lm", str(work / "a.jsonl"), "--model", "models/v2/base"]):
        rc = main(argv)
        line = _error_line(capsys.readouterr().err)
        assert rc == 2 and "the local path does not exist" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_missing_base_model_of_merge_is_named_as_a_path(trained: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    rc = main(["merge", "--method", "task_arithmetic", str(trained["a"]), str(trained["b"]), "--out", "m",
               "--format", "full", "--base-model", "runs/base"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error: --base-model runs/base: the local path does not exist")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_missing_adapter_directory_says_it_does_not_exist(command: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-adapter"
    argv = {"evaluate": ["evaluate", str(missing)], "predict": ["predict", "--adapter", str(missing), "a text"],
            "export": ["export", str(missing), "--out", str(tmp_path / "exp")]}[command]
    rc = main(argv)
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and line == f"error: adapter directory {missing} does not exist; check the path"
    assert not (tmp_path / "exp").exists()


def test_init_target_modules_not_in_statistics_names_the_held_modules(stats: Path, tiny_bert: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "init"
    rc = main(["init", "--stats", str(stats), "--model", str(tiny_bert), "--out", str(out), "--target-modules", "key,dense"])
    line = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert "--target-modules key,dense not in the statistics store" in line
    assert "holds the modules query, value" in line and "--target-modules query,value" in line
    assert not out.exists()


def test_emr_output_as_merged_names_its_per_task_subfolders(trained: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    emr = tmp_path / "emr"
    assert main(["-q", "merge", "--method", "emr", str(trained["a"]), str(trained["b"]), "--out", str(emr)]) == 0
    subdirs = sorted(p.name for p in emr.iterdir() if p.is_dir())
    assert len(subdirs) == 2
    capsys.readouterr()
    for argv in (["evaluate", str(trained["a"]), "--merged", str(emr)],
                 ["predict", "--adapter", str(trained["a"]), "--merged", str(emr), "a text"],
                 ["export", str(trained["a"]), "--merged", str(emr), "--out", str(tmp_path / "exp")]):
        rc = main(argv)
        line = _error_line(capsys.readouterr().err)
        assert rc == 2 and "is an EMR (per-task) merge output" in line
        for sub in subdirs:
            assert str(emr / sub) in line
    assert not (tmp_path / "exp").exists()
    # the per-task subfolder it names works
    assert main(["evaluate", str(trained["a"]), "--merged", str(emr / subdirs[0])]) == 0
    assert capsys.readouterr().out.startswith("a: test accuracy ")


def test_progress_on_a_pipe_is_plain_lines_with_an_eta(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from osrm_lora import logutil

    monkeypatch.delenv("OSRM_LORA_NO_PROGRESS", raising=False)
    logutil.setup_logging(0)
    with logutil.Progress("work", 20, {"loss": "loss {:.2f}"}, step_pct=25) as progress:
        for _ in range(20):
            progress.advance(1, loss=0.25)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["25%", "50%", "75%", "100%"]
    assert "about" in lines[0] and "left" in lines[0] and lines[0].endswith("loss 0.25")
    assert "left" not in lines[-1]
    assert logutil.plain_progress_line("a", 12, 30, 80.0) == "a: 40% (12/30), 1m20s elapsed, about 2m00s left"


def test_evaluate_takes_a_full_model_merge_and_reproduces_the_adapter_merge(
        trained: dict[str, Path], tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from osrm_lora.inference import score_adapters

    dirs = [str(trained["a"]), str(trained["b"])]
    full, peft = tmp_path / "full", tmp_path / "peft"
    for out, extra in ((full, ["--format", "full", "--base-model", str(tiny_bert)]), (peft, [])):
        assert main(["-q", "merge", "--method", "task_arithmetic", "-p", "scaling=0.8", *dirs, "--out", str(out),
                     *extra]) == 0
    capsys.readouterr()
    by_full = score_adapters(dirs, merged=str(full), split="validation")
    by_peft = score_adapters(dirs, merged=str(peft), split="validation")
    own = score_adapters(dirs, split="validation")
    assert [s.value for s in by_full] == pytest.approx([s.value for s in by_peft], abs=1e-9)
    assert [s.n for s in by_full] == [s.n for s in own]
    assert main(["evaluate", *dirs, "--merged", str(full), "--split", "validation"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
