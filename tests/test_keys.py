"""The module-key rules of osrm_lora.model.keys, and that every former call site follows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tinymodels import write_tiny_model
from torch import nn

from osrm_lora.adapters import LoraAdapter, LoraModule, adapter_state_dict, extra_kind, load_adapter, save_adapter
from osrm_lora.backbone import apply_deltas, default_target_modules, load_classifier, resolve_module_key
from osrm_lora.config import ALL_LINEAR
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.merge import merge, save_merge_result
from osrm_lora.merge.io import BaseCheckpoint
from osrm_lora.model import keys
from osrm_lora.osrm import apply_A_to_peft, project_adapter
from osrm_lora.stats import StatsStore, target_linear_modules

QUERY = "bert.encoder.layer.0.attention.self.query"
BARE_QUERY = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sequence classifier (tensor names ``bert.*``)."""
    return write_tiny_model(tmp_path_factory.mktemp("keys-task") / "bert", "bert")


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory: pytest.TempPathFactory, task_dir: Path) -> Path:
    """The same backbone saved as ``BertModel``: tensor names WITHOUT the architecture prefix
    (``encoder.*``), as the embedded all-MiniLM-L6-v2 stores them."""
    from transformers import AutoModelForSequenceClassification

    path = tmp_path_factory.mktemp("keys-bare") / "bert"
    AutoModelForSequenceClassification.from_pretrained(str(task_dir)).bert.save_pretrained(str(path))
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        names = list(fh.keys())
    assert BARE_QUERY + ".weight" in names and not any(n.startswith("bert.") for n in names)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    return path


def task_model(task_dir: Path) -> nn.Module:
    return load_classifier(str(task_dir), 2, device="cpu").eval()


def query_value_adapter(seed: int, keys_: list[str], hidden: int = 32, rank: int = 2) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    mods = {k: LoraModule(0.3 * torch.randn(rank, hidden, generator=g), 0.3 * torch.randn(hidden, rank, generator=g),
                          2.0) for k in keys_}
    return LoraAdapter(mods, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["query", "value"]},
                       name=f"t{seed}")


QV_KEYS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


# ------------------------------------------------------------------------------------------ target matching
def test_target_rule_is_peft_suffix_matching() -> None:
    assert keys.matches_target(QUERY, ["query"])
    assert keys.matches_target("query", ["query"])  # the name itself
    assert not keys.matches_target("bert.encoder.layer.0.attention.self.query_proj", ["query"])  # whole components
    assert not keys.matches_target("bert.encoder.layer.0.attention.self.myquery", ["query"])
    ffn_out, attn_out = "bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.attention.output.dense"
    assert keys.matches_target(ffn_out, ["output.dense"]) and keys.matches_target(attn_out, ["output.dense"])
    assert not keys.matches_target("bert.encoder.layer.0.intermediate.dense", ["output.dense"])
    assert keys.matches_target("bert.encoder.layer.0.intermediate.dense", ["intermediate.dense"])
    # one string is a regular expression over the whole name, as in PEFT
    assert keys.matches_target(QUERY, r".*layer\.0\..*query")
    assert not keys.matches_target(QUERY, "query")
    assert keys.select_targets(["a.query", "a.key", "b.value"], ("query", "value")) == ["a.query", "b.value"]


@pytest.mark.parametrize("targets", [list(ALL_LINEAR), ["query", "value"], ["dense"], r".*\.(query|value)"])
def test_target_rule_agrees_with_peft(task_dir: Path, targets: list[str] | str) -> None:
    """The modules PEFT wraps are exactly the ones the statistics are collected for."""
    from peft import LoraConfig, get_peft_model

    model = task_model(task_dir)
    ours = list(keys.linear_targets(model, targets))
    peft_model = get_peft_model(task_model(task_dir), LoraConfig(r=2, target_modules=targets))
    wrapped = sorted(keys.lora_module_key(n) for n, _ in peft_model.named_parameters() if keys.lora_factor(n) == "lora_A")
    assert sorted(ours) == wrapped
    assert list(target_linear_modules(model, targets)) == ours  # the stats module uses the same rule


def test_all_linear_selects_six_modules_per_layer(task_dir: Path) -> None:
    found = keys.linear_targets(task_model(task_dir), list(ALL_LINEAR))
    per_layer = sorted(k.split(".", 4)[-1] for k in found if k.startswith("bert.encoder.layer.0."))
    assert per_layer == ["attention.output.dense", "attention.self.key", "attention.self.query",
                         "attention.self.value", "intermediate.dense", "output.dense"]
    assert len(found) == 12 and not any("pooler" in k or "classifier" in k for k in found)


def test_target_errors(task_dir: Path) -> None:
    model = task_model(task_dir)
    with pytest.raises(ConfigError, match="no target modules given"):
        keys.linear_targets(model, [])
    with pytest.raises(ConfigError, match=r"no linear module named \['q_proj'\]"):
        keys.linear_targets(model, ["q_proj"])
    assert keys.linear_targets(model, default_target_modules("bert")).keys() == set(QV_KEYS)


def test_modules_to_save_rule() -> None:
    assert keys.in_modules("classifier", ["classifier"])
    assert keys.in_modules("classifier.dense", ["classifier"])
    assert keys.in_modules("bert.pooler.dense", ["pooler"])
    assert not keys.in_modules("bert.encoder.layer.0.output.dense", ["classifier", "pooler"])
    assert extra_kind("classifier.out_proj.weight", ("classifier",)) == "head"
    assert extra_kind("bert.encoder.layer.0.attention.self.query.base_layer.bias") == "bias"
    assert extra_kind("bert.encoder.layer.0.attention.self.query.lora_magnitude_vector") == "other"


# ------------------------------------------------------------------------------------------ prefix resolution
def test_prefix_resolution_rules() -> None:
    bare = {BARE_QUERY, "pooler.dense"}
    full = {"bert." + n for n in bare}
    assert keys.match_key(QUERY, full, "bert") == QUERY  # exact
    assert keys.match_key(BARE_QUERY, full, "bert") == QUERY  # prefix added
    assert keys.match_key(QUERY, bare, "bert") == BARE_QUERY  # prefix removed
    assert keys.match_key(QUERY, bare) == BARE_QUERY  # unknown prefix: leading components
    assert keys.match_key(keys.peft_name(QUERY), full) == QUERY  # a PEFT-wrapped spelling
    assert keys.match_key("model.layers.0.q_proj", bare, "bert") is None
    assert keys.match_key("encoder.layer.0.attention.self", full) is None  # not a module of the set
    # several candidates: no match, and key_candidates lists them
    two = {"a.encoder.x", "b.encoder.x"}
    assert keys.match_key("encoder.x", two) is None
    assert sorted(keys.key_candidates("encoder.x", two)) == sorted(two)
    # the known prefix wins over a longer-suffix candidate
    assert keys.key_candidates("encoder.x", {"bert.encoder.x", "other.encoder.x"}, "bert") == ["bert.encoder.x"]
    assert keys.module_paths(["a.b.weight", "a.b.bias", "weight", "c.weight_g"]) == {"a.b", ""}
    assert keys.param_name(QUERY, [BARE_QUERY + ".weight", BARE_QUERY + ".bias"], "bert", "bias") == BARE_QUERY + ".bias"
    assert keys.param_of("") == "weight" and keys.param_of("a.b", "bias") == "a.b.bias"


def test_architecture_prefix() -> None:
    assert keys.architecture_prefix({"model_type": "bert"}) == "bert"
    assert keys.architecture_prefix({"model_type": "roberta"}) == "roberta"
    assert keys.architecture_prefix({"model_type": "llama"}) == "model"
    assert keys.architecture_prefix({"model_type": "no-such-arch"}) == ""
    assert keys.architecture_prefix({}) == ""
    assert keys.model_prefix(nn.Linear(2, 2)) == ""


def test_checkpoint_without_the_architecture_prefix(task_dir: Path, bare_dir: Path) -> None:
    """Adapter keys made on the task model (``bert.*``) resolve in a bare checkpoint (``encoder.*``)
    and fold into it to the same weights as into the task model."""
    ckpt = BaseCheckpoint(bare_dir)
    assert ckpt.prefix == "bert"
    assert ckpt.tensor_name(QUERY) == BARE_QUERY + ".weight"
    assert ckpt.tensor_name(BARE_QUERY, "bias") == BARE_QUERY + ".bias"
    assert ckpt.tensor_name("bert.encoder.layer.9.attention.self.query") is None

    adapter = query_value_adapter(0, QV_KEYS)
    deltas = adapter.deltas()
    state = load_file(str(bare_dir / "model.safetensors"))
    before = {n: t.clone() for n, t in state.items()}
    plan = keys.fold_deltas(state, deltas, prefix=ckpt.prefix)
    assert [(f.key, f.name) for f in plan] == [(k, k.removeprefix("bert.") + ".weight") for k in QV_KEYS]

    model = task_model(task_dir)
    originals = apply_deltas(model, deltas)
    assert sorted(originals) == sorted(QV_KEYS)
    for key in QV_KEYS:
        bare = key.removeprefix("bert.") + ".weight"
        torch.testing.assert_close(state[bare], before[bare] + deltas[key], rtol=0, atol=0)
        assert torch.equal(model.get_parameter(key + ".weight").detach(), state[bare])
    untouched = [n for n in state if n not in {f.name for f in plan}]
    assert untouched and all(torch.equal(state[n], before[n]) for n in untouched)


def test_full_merge_onto_a_bare_checkpoint(tmp_path: Path, bare_dir: Path) -> None:
    """``merge --format full`` on a checkpoint without the prefix (the embedded MiniLM case)."""
    from transformers import BertModel

    dirs = []
    for seed in (1, 2):
        save_adapter(query_value_adapter(seed, QV_KEYS), tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    adapters = [load_adapter(d) for d in dirs]
    result = merge(adapters, "task_arithmetic", {"scaling": 1.0})
    save_merge_result(result, tmp_path / "full", base_model_path=str(bare_dir), format="full")
    merged = load_file(str(tmp_path / "full" / "model.safetensors"))
    base = load_file(str(bare_dir / "model.safetensors"))
    for key in QV_KEYS:
        name = key.removeprefix("bert.") + ".weight"
        want = base[name] + adapters[0].modules[key].delta() + adapters[1].modules[key].delta()
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-6)
    assert BertModel.from_pretrained(str(tmp_path / "full")) is not None


# ------------------------------------------------------------------------------------------ folding
def test_fan_in_fan_out_fold_against_a_hand_computed_reference() -> None:
    # a weight stored (in=2, out=3), as GPT-2's Conv1D stores it; the update is (out=3, in=2)
    W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    delta = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    by_hand = torch.tensor([[11.0, 32.0, 53.0], [24.0, 45.0, 66.0]])  # W[i][o] + delta[o][i]
    for flag in (True, {"transformer.h.0.attn.c_attn"}):
        state = {"transformer.h.0.attn.c_attn.weight": W.clone()}
        plan = keys.fold_deltas(state, {"h.0.attn.c_attn": delta}, prefix="transformer", fan_in_fan_out=flag)
        assert plan == [keys.Fold("h.0.attn.c_attn", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn.weight",
                                  True)]
        assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], by_hand)
    # the same update on an (out, in) weight is added as is
    state = {"lin.weight": torch.zeros(3, 2)}
    keys.fold_deltas(state, {"lin": delta})
    assert torch.equal(state["lin.weight"], delta)
    # single-tensor fold (the streaming writer's)
    w = W.clone()
    keys.fold_delta(w, delta, "c_attn", fan_in_fan_out=True)
    assert torch.equal(w, by_hand)
    with pytest.raises(OsrmError, match=r"weight shape \(2, 3\) but the delta is \(3, 2\)"):
        keys.fold_delta(W.clone(), delta, "c_attn", fan_in_fan_out=False)


def test_conv1d_modules_fold_transposed_in_a_live_model() -> None:
    from transformers.pytorch_utils import Conv1D

    net = nn.Sequential()
    net.add_module("c_attn", Conv1D(3, 2))  # weight (in=2, out=3)
    net.add_module("proj", nn.Linear(3, 3))
    assert keys.transposed_modules(net) == {"c_attn"}
    W0 = net.c_attn.weight.detach().clone()
    delta = torch.arange(6.0).reshape(3, 2)
    originals = apply_deltas(net, {"c_attn": delta})
    assert torch.equal(net.c_attn.weight.detach(), W0 + delta.T) and torch.equal(originals["c_attn"], W0)


def test_fold_checks_everything_before_changing_anything() -> None:
    state = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}
    good = torch.ones(2, 2)
    for bad, match in ((torch.full((2, 2), float("nan")), "NaN or Inf"), (torch.ones(3, 2), "weight shape")):
        with pytest.raises(OsrmError, match=match):
            keys.fold_deltas(state, {"a": good, "b": bad})
        assert all(torch.equal(t, torch.zeros(2, 2)) for t in state.values())
    with pytest.raises(OsrmError, match="does not exist in the base model"):
        keys.fold_deltas(state, {"a": good, "zz": good})
    with pytest.raises(OsrmError, match="matches several modules"):
        keys.fold_deltas({"x.a.weight": torch.zeros(2, 2), "y.a.weight": torch.zeros(2, 2)}, {"a": good})
    assert all(torch.equal(t, torch.zeros(2, 2)) for t in state.values())


# ------------------------------------------------------------------------------------------ PEFT names
def test_peft_name_parsing() -> None:
    saved = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    live = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    assert keys.lora_module_key(saved) == keys.lora_module_key(live) == QUERY
    assert keys.lora_module_key(QUERY + ".lora_A.weight") == QUERY  # prefix already stripped
    assert keys.lora_factor(saved) == "lora_A" and keys.lora_factor(live) == "lora_B"
    assert keys.lora_factor("base_model.model.classifier.weight") is None
    assert keys.split_lora_factor(keys.strip_peft_prefix(saved)) == (QUERY, "lora_A")
    assert keys.split_lora_factor(QUERY + ".lora_A.default.weight") is None  # a live name, not a saved one
    assert keys.split_lora_factor("classifier.weight") is None
    assert keys.strip_peft_prefix("classifier.weight") == "classifier.weight"
    assert keys.peft_name(keys.lora_factor_name(QUERY, "lora_A")) == saved
    assert keys.peft_name(keys.lora_factor_name(QUERY, "lora_B", "default")) == live
    with pytest.raises(ValueError):
        keys.lora_factor_name(QUERY, "lora_C")
    assert keys.is_lora_tensor(live) and keys.is_lora_tensor("x.lora_magnitude_vector")
    assert not keys.is_lora_tensor("bert.flora_dense.weight") and not keys.is_lora_tensor("classifier.weight")
    A = {keys.peft_name(keys.lora_factor_name(k, "lora_A", "default")): i for i, k in enumerate(QV_KEYS)}
    B = {n.replace(".lora_A.", ".lora_B."): -i for n, i in A.items()}
    assert keys.lora_pairs(A, B) == [(k, i, -i) for i, k in enumerate(QV_KEYS)]


def test_peft_key_round_trip(tmp_path: Path) -> None:
    """Save with our writer, read the raw file, parse its names back: the same module keys."""
    adapter = query_value_adapter(3, QV_KEYS)
    adapter.extra["classifier.weight"] = torch.zeros(2, 32)
    save_adapter(adapter, tmp_path / "ad")
    raw = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(raw) == set(adapter_state_dict(adapter))
    assert all(n.startswith(keys.PEFT_PREFIX) for n in raw)
    factors = {keys.split_lora_factor(keys.strip_peft_prefix(n)) for n in raw} - {None}
    assert factors == {(k, f) for k in QV_KEYS for f in keys.LORA_FACTORS}
    assert {keys.lora_module_key(n) for n in raw if keys.lora_factor(n)} == set(QV_KEYS)
    back = load_adapter(tmp_path / "ad")
    assert sorted(back.modules) == sorted(QV_KEYS) and list(back.extra) == ["classifier.weight"]
    for k in QV_KEYS:
        assert torch.equal(back.modules[k].A, adapter.modules[k].A) and torch.equal(back.modules[k].B, adapter.modules[k].B)


def test_live_peft_names_parse_to_model_modules(task_dir: Path, tmp_path: Path) -> None:
    """The parameter names of a live PeftModel and the file PEFT itself writes give the module keys
    of the un-wrapped model, which load_adapter reads back."""
    from peft import LoraConfig, get_peft_model

    model = task_model(task_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    live = {keys.lora_module_key(n) for n, _ in peft_model.named_parameters() if keys.lora_factor(n)}
    assert live == set(QV_KEYS)
    inner = peft_model.base_model.model
    assert all(inner.get_submodule(k) is not None for k in live)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert sorted(load_adapter(tmp_path / "peft").modules) == sorted(QV_KEYS)


# ------------------------------------------------------------------------------------------ call sites agree
def test_former_call_sites_agree(task_dir: Path, bare_dir: Path) -> None:
    model = task_model(task_dir)
    targets = list(ALL_LINEAR)
    stats_targets = list(target_linear_modules(model, targets))
    assert stats_targets == list(keys.linear_targets(model, targets))

    # the statistics store, the backbone and the bare checkpoint resolve every spelling alike
    store = StatsStore(tensors={}, meta={"module_to_group": {k: k for k in stats_targets}})
    ckpt = BaseCheckpoint(bare_dir)
    for key in stats_targets:
        for spelling in (key, key.removeprefix("bert.")):
            assert store.resolve_module(spelling) == key
            assert resolve_module_key(model, spelling) == key
            assert ckpt.tensor_name(spelling) == key.removeprefix("bert.") + ".weight"
    with pytest.raises(OsrmError, match="matches several modules"):
        store.resolve_module("attention.self.query")
    with pytest.raises(OsrmError, match="another base model"):
        resolve_module_key(model, "attention.self.query")

    # OSRM: A keyed without the prefix reaches the PEFT layers and the projection bases
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(0)
    A = {k.removeprefix("bert."): torch.linalg.qr(torch.randn(32, 2, generator=g))[0].T.contiguous() for k in QV_KEYS}
    peft_model = get_peft_model(task_model(task_dir), LoraConfig(r=2, target_modules=["query", "value"]))
    assert sorted(apply_A_to_peft(peft_model, A)) == sorted(QV_KEYS)
    projected, report = project_adapter(query_value_adapter(0, QV_KEYS), A)
    assert sorted(projected.modules) == sorted(QV_KEYS) and sorted(report["modules"]) == sorted(QV_KEYS)
