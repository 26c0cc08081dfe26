"""The paper's protocol config (RoBERTa-large, 8 GLUE tasks) runs offline on tiny stand-ins."""

from __future__ import annotations

from pathlib import Path

from test_data_hf import glue_standin
from tinymodels import write_tiny_model

from osrm_lora.config import config_to_dict, load_config, parse_config
from osrm_lora.pipeline import run_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "glue-roberta-large.yaml"


def test_paper_config_matches_the_paper() -> None:
    cfg = load_config(CONFIG)
    assert cfg.model == "FacebookAI/roberta-large"
    assert [t if isinstance(t, str) else t.name for t in cfg.tasks] == [
        "glue/cola", "glue/sst2", "glue/mrpc", "glue/qqp", "glue/stsb", "glue/mnli", "glue/qnli", "glue/rte"]
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.0, ["query", "value"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_length, cfg.train.epochs, cfg.train.warmup_ratio) == (
        4e-4, 64, 128, 10, 0.06)
    assert set(cfg.merge.methods) == {"task_arithmetic", "ties", "dare_ties", "fisher", "regmean", "emr"}
    assert {i.mode for i in cfg.inits} == {"standard", "paper"}


def test_paper_protocol_runs_offline_on_stand_ins(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny-roberta", "roberta")
    raw = config_to_dict(load_config(CONFIG))
    raw["model"] = str(model)
    raw["tasks"] = ["glue/cola", "glue/mrpc", "glue/stsb"]  # single-text, pair, regression
    raw["train"].update(epochs=1, batch_size=16, max_length=16)
    raw["merge"]["lambdas"] = [0.5, 1.0]
    raw["profile"]["n_samples"] = 16
    cfg = parse_config(raw)

    def loader(name: str, config: str | None):
        assert name == "nyu-mll/glue"
        return glue_standin(config)

    results = run_pipeline(cfg, tmp_path / "run", hf_loader=loader)
    assert results["metrics"] == {"glue/cola": "matthews", "glue/mrpc": "acc_f1", "glue/stsb": "pearson_spearman"}
    got = {(r["init"], r["method"]) for r in results["merged"]}
    assert got == {(i, m) for i in ("standard", "osrm-paper")
                   for m in ("task_arithmetic", "ties", "dare_ties", "fisher", "regmean", "emr")}
    for rec in results["merged"]:
        assert rec["selected_on"] == "validation"
        assert set(rec["test"]) == {"glue/cola", "glue/mrpc", "glue/stsb"}
        assert all(v == v for v in rec["test"].values()), rec  # no NaN
    # selection split is the held-out part of GLUE train; the reported split is GLUE validation (12 rows)
    for _task, meta in results["manifest"]["tasks"].items():
        assert meta["n_test"] == 12 and meta["n_train"] + meta["n_validation"] == 60
