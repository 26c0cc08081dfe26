"""Local task files: every format, label mapping, given vs generated splits, and the clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from osrm_lora.data import TaskSpec, load_task
from osrm_lora.errors import ConfigError, DataError

ROWS = [{"text": f"sentence {i}", "label": ["neg", "pos", "neutral"][i % 3]} for i in range(30)]


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    frame = pd.DataFrame(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_each_format_one_file_generated_splits(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / f"data.{fmt}", ROWS, fmt)
    task = load_task({"name": "toy", "source": "local", "path": str(path)}, tmp_path / "cache")
    assert task.label_names == ("neg", "neutral", "pos")  # sorted label names
    assert [len(task.split(s)) for s in ("train", "validation", "test")] == [24, 3, 3]
    texts = task.train.texts + task.validation.texts + task.test.texts
    assert sorted(texts) == sorted(r["text"] for r in ROWS)
    by_text = {r["text"]: r["label"] for r in ROWS}
    for split in (task.train, task.validation, task.test):
        assert all(task.label_names[y] == by_text[t] for t, y in zip(split.texts, split.labels))
    assert task.metric == "accuracy" and task.problem_type == "classification" and not task.is_pair


def test_same_split_for_every_format(tmp_path: Path) -> None:
    tests = set()
    for fmt in ("jsonl", "csv", "parquet"):
        path = _write(tmp_path / f"d.{fmt}", ROWS, fmt)
        tests.add(load_task({"name": "toy", "source": "local", "path": str(path)}, tmp_path / "c").test.texts)
    assert len(tests) == 1


def test_given_splits_pairs_renamed_columns_and_int_labels(tmp_path: Path) -> None:
    def rows(n: int, off: int) -> list[dict]:
        return [{"premise": f"p{off + i}", "hyp": f"h{off + i}", "y": i % 2} for i in range(n)]

    train = _write(tmp_path / "train.csv", rows(10, 0), "csv")
    val = _write(tmp_path / "val.csv", rows(4, 100), "csv")
    test = _write(tmp_path / "test.jsonl", rows(4, 200), "jsonl")
    spec = {"name": "pairs", "source": "local", "train_file": str(train), "validation_file": str(val), "test_file": str(test),
            "text_column": "premise", "text_pair_column": "hyp", "label_column": "y", "metric": "acc_f1"}
    task = load_task(spec, tmp_path / "cache")
    assert task.is_pair and task.label_names == ("0", "1") and task.metric == "acc_f1"
    assert task.test.texts == ("p200", "p201", "p202", "p203") and task.test.text_pairs == ("h200", "h201", "h202", "h203")
    assert task.test.labels == (0, 1, 0, 1) and len(task.train) == 10


def test_given_train_and_test_carves_validation(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", ROWS, "jsonl")
    test = _write(tmp_path / "test.jsonl", ROWS[:6], "jsonl")
    task = load_task({"name": "t", "source": "local", "train_file": str(train), "test_file": str(test)}, tmp_path / "c")
    assert len(task.test) == 6 and len(task.train) + len(task.validation) == 30 and len(task.validation) >= 3


def test_regression_and_label_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", [{"text": f"s{i}", "label": i / 10} for i in range(20)], "jsonl")
    task = load_task({"name": "r", "source": "local", "path": str(path), "problem_type": "regression"}, tmp_path / "c")
    assert task.metric == "pearson_spearman" and task.label_names == () and task.num_labels == 1
    assert all(isinstance(y, float) for y in task.train.labels)
    path2 = _write(tmp_path / "n.jsonl", ROWS, "jsonl")
    named = load_task({"name": "n", "source": "local", "path": str(path2), "label_names": ["pos", "neg", "neutral"]}, tmp_path / "c")
    assert named.label_names == ("pos", "neg", "neutral")
    assert Counter(named.train.labels + named.validation.labels + named.test.labels) == {0: 10, 1: 10, 2: 10}


def test_non_contiguous_int_labels_are_sorted(tmp_path: Path) -> None:
    path = _write(tmp_path / "pm.csv", [{"text": f"s{i}", "label": [-1, 1][i % 2]} for i in range(20)], "csv")
    task = load_task({"name": "pm", "source": "local", "path": str(path)}, tmp_path / "c")
    assert task.label_names == ("-1", "1")


# ---------------------------------------------------------------------------------------------- errors


def _spec(path: Path, **kw: object) -> dict:
    return {"name": "bad", "source": "local", "path": str(path), **kw}


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_task(_spec(tmp_path / "nope.jsonl"), tmp_path / "c")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_task(_spec(tmp_path / "empty.csv"), tmp_path / "c")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no examples"):
        load_task(_spec(tmp_path / "header.csv"), tmp_path / "c")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_task(_spec(tmp_path / "blank.jsonl"), tmp_path / "c")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_task(_spec(tmp_path / "data.xlsx"), tmp_path / "c")


def test_missing_column_names_found_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "cols.csv", [{"sentence": "a", "target": 0}] * 10, "csv")
    with pytest.raises(DataError) as err:
        load_task(_spec(path), tmp_path / "c")
    msg = str(err.value)
    assert "no column 'text'" in msg and "sentence, target" in msg and "text_column" in msg
    with pytest.raises(DataError, match="no column 'label'.*label_column"):
        load_task(_spec(path, text_column="sentence"), tmp_path / "c")


def test_undecodable_text_says_encoding_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\n" + "".join(f"caf\u00e9 {i},{i % 2}\n" for i in range(20)).encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_task(_spec(path), tmp_path / "c")
    msg = str(err.value)
    assert "as utf-8" in msg and "0xe9" in msg and "encoding: latin-1" in msg
    task = load_task(_spec(path, encoding="latin-1"), tmp_path / "c")
    assert any("caf\u00e9" in t for t in task.train.texts)


def test_utf8_bom_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n" + b"".join(f"s{i},{i % 2}\n".encode() for i in range(20)))
    assert len(load_task(_spec(path), tmp_path / "c").train) == 16


def test_label_sets_differ_between_given_splits(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", ROWS, "jsonl")
    test = _write(tmp_path / "test.jsonl", [{"text": "x", "label": "neg"}, {"text": "y", "label": "other"}], "jsonl")
    with pytest.raises(DataError) as err:
        load_task({"name": "d", "source": "local", "train_file": str(train), "test_file": str(test)}, tmp_path / "c")
    assert "label sets differ between given splits" in str(err.value) and "other" in str(err.value)


def test_row_level_errors(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_task(_spec(bad_json), tmp_path / "c")
    missing_label = _write(tmp_path / "ml.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}], "jsonl")
    with pytest.raises(DataError, match="row 2 has no label"):
        load_task(_spec(missing_label), tmp_path / "c")
    reg = _write(tmp_path / "reg.jsonl", [{"text": "a", "label": "high"}], "jsonl")
    with pytest.raises(DataError, match="not a number"):
        load_task(_spec(reg, problem_type="regression"), tmp_path / "c")
    unknown = _write(tmp_path / "u.jsonl", ROWS, "jsonl")
    with pytest.raises(DataError, match="not in label_names"):
        load_task(_spec(unknown, label_names=["neg", "pos"]), tmp_path / "c")


def test_spec_validation_for_local(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs path"):
        load_task({"name": "x", "source": "local"})
    with pytest.raises(ConfigError, match="not both"):
        load_task({"name": "x", "source": "local", "path": "a.csv", "train_file": "b.csv"})
    with pytest.raises(ConfigError, match="metric accuracy is for classification"):
        TaskSpec.parse({"name": "x", "source": "local", "path": "a.csv", "problem_type": "regression", "metric": "accuracy"})
