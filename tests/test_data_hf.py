"""Hugging Face / GLUE path, tested offline on local DatasetDict stand-ins with GLUE's columns."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk

from osrm_lora.data import load_task
from osrm_lora.data.sources.hf import GLUE_DATASET, GLUE_TASKS
from osrm_lora.errors import DataError, OsrmError


def _cls(n: int, names: list[str], cols: dict[str, str], offset: int = 0, hidden: bool = False) -> Dataset:
    data = {col: [f"{col} {offset + i}" for i in range(n)] for col in cols}
    data["label"] = [-1 if hidden else i % len(names) for i in range(n)]
    data["idx"] = list(range(n))
    feats = Features({**{c: Value("string") for c in cols}, "label": ClassLabel(names=names), "idx": Value("int32")})
    return Dataset.from_dict(data, features=feats)


def glue_standin(task: str) -> DatasetDict:
    preset = GLUE_TASKS[task]
    cols = {preset.text_column: "", **({preset.text_pair_column: ""} if preset.text_pair_column else {})}
    if task == "stsb":
        def reg(n: int, off: int) -> Dataset:
            d = {c: [f"{c} {off + i}" for i in range(n)] for c in cols}
            d["label"] = [round((i * 0.37) % 5, 2) for i in range(n)]
            return Dataset.from_dict(d, features=Features({**{c: Value("string") for c in cols}, "label": Value("float32")}))
        return DatasetDict(train=reg(60, 0), validation=reg(12, 1000), test=reg(8, 2000))
    names = ["entailment", "neutral", "contradiction"] if task == "mnli" else ["no", "yes"]
    splits = {"train": _cls(60, names, cols), "test": _cls(8, names, cols, 2000, hidden=True)}
    if task == "mnli":
        splits["validation_matched"] = _cls(12, names, cols, 1000)
        splits["validation_mismatched"] = _cls(12, names, cols, 3000)
    else:
        splits["validation"] = _cls(12, names, cols, 1000)
    return DatasetDict(splits)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_glue_presets_offline(task: str, tmp_path: Path) -> None:
    calls: list[tuple[str, str | None]] = []

    def loader(name: str, config: str | None) -> DatasetDict:
        calls.append((name, config))
        return glue_standin(task)

    t = load_task(f"glue/{task}", tmp_path, hf_loader=loader)
    assert calls == [(GLUE_DATASET, task)]
    preset = GLUE_TASKS[task]
    assert t.metric == preset.metric and t.problem_type == preset.problem_type
    assert t.is_pair == (preset.text_pair_column is not None)
    # test = GLUE validation (validation_matched for MNLI); validation = held-out part of GLUE train
    assert len(t.test) == 12 and all(" 10" in x for x in t.test.texts)
    assert len(t.train) + len(t.validation) == 60 and len(t.validation) >= 6
    assert not set(t.validation.texts) & set(t.train.texts)
    if preset.problem_type == "classification":
        assert t.label_names == (("entailment", "neutral", "contradiction") if task == "mnli" else ("no", "yes"))
        assert set(t.validation.labels) == set(t.train.labels)
    else:
        assert t.label_names == () and isinstance(t.test.labels[0], float)
    again = load_task(f"glue/{task}", tmp_path, hf_loader=lambda *_: glue_standin(task))
    assert again.validation.texts == t.validation.texts  # stored split reused


def test_metric_presets_match_glue() -> None:
    assert {k: v.metric for k, v in GLUE_TASKS.items()} == {
        "cola": "matthews", "sst2": "accuracy", "mrpc": "acc_f1", "qqp": "acc_f1", "stsb": "pearson_spearman",
        "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    assert GLUE_TASKS["mnli"].test_split == "validation_matched"
    assert (GLUE_TASKS["qnli"].text_column, GLUE_TASKS["qnli"].text_pair_column) == ("question", "sentence")
    assert (GLUE_TASKS["qqp"].text_column, GLUE_TASKS["qqp"].text_pair_column) == ("question1", "question2")


def test_generic_hf_from_disk_with_caps(tmp_path: Path) -> None:
    dd = DatasetDict(train=_cls(80, ["a", "b"], {"review": ""}), test=_cls(20, ["a", "b"], {"review": ""}, 500))
    dd.save_to_disk(str(tmp_path / "ds"))

    def loader(name: str, config: str | None) -> DatasetDict:
        assert (name, config) == ("someone/reviews", "default")
        return load_from_disk(str(tmp_path / "ds"))

    spec = {"name": "reviews", "source": "hf", "dataset": "someone/reviews", "config": "default",
            "text_column": "review", "max_train": 10, "max_eval": 6}
    t = load_task(spec, tmp_path / "cache", hf_loader=loader)
    assert t.label_names == ("a", "b") and len(t.test) == 6 and Counter(t.test.labels) == {0: 3, 1: 3}
    assert t.meta["full_sizes"]["test"] == 20 and len(t.train) == 10
    spec2 = dict(spec, hf_splits={"train": "train", "validation": "test"})
    t2 = load_task(spec2, tmp_path / "cache", hf_loader=loader)
    assert t2.meta["full_sizes"]["validation"] == 20


def test_hf_errors(tmp_path: Path) -> None:
    dd = DatasetDict(train=_cls(30, ["a", "b"], {"sentence": ""}))
    with pytest.raises(DataError, match=r"no column 'text' \(columns found: sentence, label, idx\)"):
        load_task({"name": "x", "source": "hf", "dataset": "d"}, tmp_path, hf_loader=lambda *_: dd)
    with pytest.raises(DataError, match="no split"):
        load_task({"name": "x", "source": "hf", "dataset": "d", "text_column": "sentence",
                   "hf_splits": {"train": "training"}}, tmp_path, hf_loader=lambda *_: dd)
    with pytest.raises(OsrmError, match="unknown task 'glue/wnli'.*glue/cola"):
        load_task("glue/wnli", tmp_path)
