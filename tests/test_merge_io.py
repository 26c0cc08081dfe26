"""Merge outputs load in plain PEFT/transformers and reproduce the in-memory result; CLI glue."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from osrm_lora.adapters import load_adapter
from osrm_lora.errors import OsrmError
from osrm_lora.merge import format_method_list, list_methods, merge, run_merge, save_merge_result

pytest.importorskip("peft")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ads")
    dirs = []
    for i, r in enumerate((2, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(tiny_bert(), LoraConfig(r=r, lora_alpha=4, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        pm.save_pretrained(str(root / f"task{i}"))
        dirs.append(str(root / f"task{i}"))
    return dirs


def reference_logits(deltas, ids):
    model = tiny_bert()
    with torch.no_grad():
        for k, d in deltas.items():
            model.get_submodule(k).weight += d
        return model(input_ids=ids).logits


def peft_logits(path, ids):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(tiny_bert(), str(path)).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize("method,params,svd_rank", [
    ("task_arithmetic", {"scaling": 0.7, "weights": [1.0, 0.5]}, None),
    ("ties", {"density": 0.5}, 32),
    ("iso_c", {}, None),
])
def test_peft_output_reproduces_result(tmp_path, adapter_dirs, method, params, svd_rank):
    ads = [load_adapter(d) for d in adapter_dirs]
    res = merge(ads, method, params, ignore_extra=True)
    out = save_merge_result(res, tmp_path / "out", svd_rank=svd_rank)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(peft_logits(out, ids), reference_logits(res.deltas_for(), ids), atol=1e-4, rtol=1e-4)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == method
    if res.adapter is None:
        assert info["svd_relative_error_max"] < 1e-5  # full rank -> lossless


def test_truncated_svd_reports_error(tmp_path, adapter_dirs):
    ads = [load_adapter(d) for d in adapter_dirs]
    res = merge(ads, "ties", {"density": 0.3}, ignore_extra=True)
    out = save_merge_result(res, tmp_path / "o", svd_rank=2)
    info = json.loads((out / "merge_info.json").read_text())
    assert 0 < info["svd_relative_error_max"] < 1
    assert max(res.info["svd_relative_error"].values()) == pytest.approx(info["svd_relative_error_max"])
    back = load_adapter(out)
    assert all(m.rank == 2 for m in back.modules.values())


def test_full_format_and_per_task(tmp_path, adapter_dirs):
    from transformers import BertForSequenceClassification

    base = tmp_path / "base"
    tiny_bert().save_pretrained(str(base))
    ads = [load_adapter(d) for d in adapter_dirs]
    res = merge(ads, "emr", ignore_extra=True)
    out = save_merge_result(res, tmp_path / "emr", format="full", base_model_path=str(base))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    info = json.loads((out / "merge_info.json").read_text())
    for t, entry in enumerate(info["per_task"]):
        model = BertForSequenceClassification.from_pretrained(str(out / entry["dir"])).eval()
        assert (out / entry["dir"] / "model.safetensors").exists()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference_logits(res.deltas_for(t), ids),
                                       atol=1e-4, rtol=1e-4)
    peft_out = save_merge_result(res, tmp_path / "emr_peft", svd_rank=32)
    d0 = json.loads((peft_out / "merge_info.json").read_text())["per_task"][0]["dir"]
    torch.testing.assert_close(peft_logits(peft_out / d0, ids), reference_logits(res.deltas_for(0), ids),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(OsrmError, match="base_model_path"):
        save_merge_result(res, tmp_path / "x", format="full")
    assert not (tmp_path / "x").exists()


def test_run_merge_cli(tmp_path, adapter_dirs):
    res = run_merge(adapter_dirs, "ties", ["density=0.4", "threshold=matrix"], str(tmp_path / "m"),
                    weights=[1.0, 2.0])
    assert res.params["density"] == 0.4 and res.params["weights"] == [1.0, 2.0]
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()
    with pytest.raises(OsrmError, match="not a valid float"):
        run_merge(adapter_dirs, "ties", ["density=abc"], str(tmp_path / "z"))
    with pytest.raises(OsrmError, match="valid parameters"):
        run_merge(adapter_dirs, "iso_c", ["density=0.3"], str(tmp_path / "z"))
    with pytest.raises(OsrmError, match="no parameter 'weights'"):
        run_merge(adapter_dirs, "iso_c", [], str(tmp_path / "z"), weights=[1.0, 1.0])
    with pytest.raises(OsrmError, match="needs grams"):
        run_merge(adapter_dirs, "regmean", [], str(tmp_path / "z"))
    assert not (tmp_path / "z").exists()
    table = format_method_list()
    for m in list_methods():
        assert m.name in table and m.paper in table
    # the merge searches follow, with their papers, commands and default settings
    import osrm_lora.rmm as rmm_lib
    import osrm_lora.search as search_lib
    from osrm_lora.merge.cli import _search_rows

    searches = table.split("merge searches")[1]
    for (name, _params, description, paper), lib in zip(_search_rows(), (rmm_lib, search_lib)):
        assert f"\n{name} " in searches and lib.PAPER == paper and paper in searches
        assert f"command: osrm-lora {name}; in a run: merge.{name}" in description
    assert "episodes=300" in _search_rows()[0][1] and "pruner=hyperband" in _search_rows()[1][1]
