"""Activation statistics: hooks vs. an independent hidden-state computation, grouping, padding, store I/O."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from osrm_lora.errors import OsrmError
from osrm_lora.stats import StatsStore, collect_statistics, model_fingerprint, sample_indices

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer() -> BertTokenizer:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizer(vocab=vocab)


def make_model(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def make_texts(seed: int = 0, n: int = 9) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for t, (lo, hi) in {"a": (0, 20), "b": (20, 40), "c": (40, 60)}.items():
        out[t] = [" ".join(rng.choice(WORDS[lo:hi]) for _ in range(rng.randint(2, 11))) for _ in range(n)]
    return out


@pytest.fixture(scope="module")
def setup():
    # float64 model: batching/padding changes only round-off, so comparisons can be tight
    return make_model().double(), make_tokenizer(), make_texts()


def direct_inputs(model, tok, texts, layer, max_length=32, pad_to_max=False):
    """Inputs of layer ``layer``'s query module via output_hidden_states (independent of the hooks)."""
    enc = tok(texts, padding="max_length" if pad_to_max else True, truncation=True, max_length=max_length,
              return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    return hs[layer].double(), enc["attention_mask"].bool()


def test_hook_statistics_match_hidden_states_and_batching(setup):
    model, tok, texts = setup
    s_small = collect_statistics(model, tok, texts, ["query", "value"], n_samples=7, max_length=32, batch_size=3,
                                 dtype=torch.float64)
    s_big = collect_statistics(model, tok, texts, ["query", "value"], n_samples=7, max_length=32, batch_size=100,
                               dtype=torch.float64)
    assert s_small.tasks == ["a", "b", "c"]
    for task in s_small.tasks:
        idx = sample_indices(len(texts[task]), 7, 0)  # the default seed, as the pipeline
        assert len(set(idx)) == 7
        for layer in range(2):
            group = s_small.group_of(f"bert.encoder.layer.{layer}.attention.self.query")
            for kind in ("sum", "gram", "sample_means"):
                torch.testing.assert_close(getattr(s_small, kind)(task, group), getattr(s_big, kind)(task, group))
            H, mask = direct_inputs(model, tok, [texts[task][i] for i in idx], layer)
            X = H[mask]
            assert s_small.count(task, group) == X.shape[0]
            torch.testing.assert_close(s_small.gram(task, group), X.T @ X, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(s_small.sum(task, group), X.sum(0), rtol=1e-9, atol=1e-9)
            means = torch.stack([H[k][mask[k]].mean(0) for k in range(H.shape[0])])
            torch.testing.assert_close(s_small.sample_means(task, group), means, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(s_small.second_moment(task, group), X.T @ X / X.shape[0])


def test_query_value_share_one_group_and_other_modules_do_not(setup):
    model, tok, texts = setup
    store = collect_statistics(model, tok, {"a": texts["a"]}, ["query", "value", "dense"], n_samples=3, batch_size=2)
    m2g = store.module_to_group
    for layer in range(2):
        p = f"bert.encoder.layer.{layer}"
        assert m2g[f"{p}.attention.self.query"] == m2g[f"{p}.attention.self.value"]
        assert m2g[f"{p}.attention.self.query"] == f"{p}.attention.self.query+value"
        others = {m2g[f"{p}.attention.output.dense"], m2g[f"{p}.intermediate.dense"], m2g[f"{p}.output.dense"]}
        assert len(others) == 3 and m2g[f"{p}.attention.self.query"] not in others
    assert len(store.groups) == 2 * 4 + 1  # + the pooler, whose (batch, n) input counts one token per sample
    assert store.count("a", "bert.pooler.dense") == 3
    assert store.meta["group_dims"][m2g["bert.encoder.layer.0.output.dense"]] == 37
    assert store.gram("a", m2g["bert.encoder.layer.0.output.dense"]).shape == (37, 37)
    assert store.group_of("encoder.layer.0.attention.self.value") == m2g["bert.encoder.layer.0.attention.self.query"]


def test_padding_rule(setup):
    model, tok, texts = setup
    kw = dict(n_samples=5, max_length=16, batch_size=2, dtype=torch.float64, pad_to_max_length=True)
    excl = collect_statistics(model, tok, texts, ["query", "value"], include_padding=False, **kw)
    incl = collect_statistics(model, tok, texts, ["query", "value"], include_padding=True, **kw)
    g = excl.group_of("bert.encoder.layer.1.attention.self.query")
    for task in excl.tasks:
        idx = sample_indices(len(texts[task]), 5, 0)
        H, mask = direct_inputs(model, tok, [texts[task][i] for i in idx], 1, max_length=16, pad_to_max=True)
        assert incl.count(task, g) == 5 * 16
        assert excl.count(task, g) == int(mask.sum())
        P = H[~mask]
        # including padding adds exactly the padding positions' contribution
        torch.testing.assert_close(incl.gram(task, g) - excl.gram(task, g), P.T @ P, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(incl.sum(task, g) - excl.sum(task, g), P.sum(0), rtol=1e-9, atol=1e-9)
        # reference code: per-sample mean over all max_length positions, padding included
        torch.testing.assert_close(incl.sample_means(task, g), H.mean(dim=1), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(incl.sample_means(task, g), excl.sample_means(task, g))


def test_hooks_removed_and_mode_restored_even_on_error(setup):
    model, tok, texts = setup
    targets = [m for n, m in model.named_modules() if n.endswith(("query", "value"))]
    model.train()
    collect_statistics(model, tok, texts, ["query", "value"], n_samples=2)
    assert model.training
    assert all(not m._forward_pre_hooks for m in targets)

    calls = {"n": 0}

    def bad_tok(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return tok(*args, **kwargs)

    with pytest.raises(RuntimeError, match="boom"):
        collect_statistics(model, bad_tok, texts, ["query", "value"], n_samples=4, batch_size=2)
    assert model.training
    assert all(not m._forward_pre_hooks for m in targets)
    model.eval()


def test_text_pairs_and_float32(setup):
    model, tok, texts = setup
    pairs = {"a": (texts["a"], texts["b"]), "c": (texts["c"], None)}
    store = collect_statistics(model, tok, pairs, ["query"], n_samples=4, batch_size=3)
    g = store.groups[0]
    idx = sample_indices(len(texts["a"]), 4, 0)
    enc = tok([texts["a"][i] for i in idx], [texts["b"][i] for i in idx], padding=True, truncation=True,
              max_length=128, return_tensors="pt")
    assert store.count("a", g) == int(enc["attention_mask"].sum())
    assert store.gram("a", g).dtype == torch.float32
    assert store.meta["dtype"] == "float32"


def test_store_round_trip_and_refusals(setup, tmp_path):
    model, tok, texts = setup
    store = collect_statistics(model, tok, texts, ["query", "value"], n_samples=3, max_length=24)
    path = store.save(tmp_path / "stats")
    assert (path / "stats.safetensors").exists() and (path / "stats.json").exists()
    loaded = StatsStore.load(path)
    assert loaded.meta == store.meta
    for k, v in store.tensors.items():
        torch.testing.assert_close(loaded.tensors[k], v)
    fp = model_fingerprint(model)
    loaded.check_matches(fp, {"max_length": 24, "n_samples": 3, "seed": 0, "include_padding": False,
                              "dtype": torch.float32, "tasks": ["a", "b"]})
    # the head does not enter the fingerprint: a 3-label classifier on the same backbone matches
    other_head = make_model(seed=5, num_labels=3).double()
    other_head.bert.load_state_dict(model.bert.state_dict())
    assert model_fingerprint(other_head) == fp
    with pytest.raises(OsrmError, match="another model") as err:
        loaded.check_matches(model_fingerprint(make_model(seed=1).double()))
    assert "\n" not in str(err.value)
    with pytest.raises(OsrmError, match="max_length=24"):
        loaded.check_matches(fp, {"max_length": 128})
    with pytest.raises(OsrmError, match="lacks tasks"):
        loaded.check_matches(fp, {"tasks": ["zzz"]})
    with pytest.raises(OsrmError, match="not a statistics store"):
        StatsStore.load(tmp_path / "nowhere")
    with pytest.raises(OsrmError, match="not in the statistics store"):
        loaded.gram("zzz", loaded.groups[0])


def test_bad_inputs(setup):
    model, tok, texts = setup
    with pytest.raises(OsrmError, match="no linear module"):
        collect_statistics(model, tok, texts, ["nope"])
    with pytest.raises(OsrmError, match="has no texts"):
        collect_statistics(model, tok, {"a": []}, ["query"])


def test_a_module_called_twice_per_forward_counts_both_calls() -> None:
    """Shared layers (ALBERT-style): one Linear applied twice per forward. Every call's tokens count,
    per-sample means cover both calls, and the per-batch counts shared by modules stay correct."""
    from torch import nn

    from osrm_lora.stats import collect_statistics

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(20, 4)
            self.shared = nn.Linear(4, 4)
            self.other = nn.Linear(4, 3)
            self.seen: list[tuple[torch.Tensor, ...]] = []

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            h0 = self.emb(input_ids)
            h1 = torch.tanh(self.shared(h0))
            h2 = self.shared(h1)
            self.seen.append((h0.detach().clone(), h1.detach().clone(), h2.detach().clone()))
            return self.other(h2)

    class Tok:
        def __call__(self, a, b=None, padding=True, truncation=True, max_length=8, return_tensors="pt"):  # noqa: ANN001, ANN204
            ids = [[int(w) for w in t.split()][:max_length] for t in a]
            width = max(len(i) for i in ids)
            return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                    "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}

    model = Shared()
    texts = {"t": ["1 2 3", "4 5", "6 7 8 9", "3"], "u": ["2 2", "9 8 7"]}
    store = collect_statistics(model, Tok(), texts, ["shared", "other"], n_samples=4, batch_size=3,
                               dtype=torch.float64, seed=0)
    # recompute task t by hand from the inputs the forward passes saw (both calls of "shared")
    idx = sample_indices(4, 4, 0)
    toks, per_sample, other_means = [], [], []
    for start, (h0, h1, h2) in zip(range(0, 4, 3), model.seen[:2]):
        chunk = [texts["t"][i] for i in idx[start:start + 3]]
        for row, text in enumerate(chunk):
            n = len(text.split())
            rows = torch.cat([h0[row, :n], h1[row, :n]]).double()
            toks.append(rows)
            per_sample.append(rows.mean(0))
            other_means.append(h2[row, :n].double().mean(0))
    X = torch.cat(toks)
    group = store.meta["module_to_group"]["shared"]
    assert int(store.tensors[f"t::{group}::count"]) == X.shape[0]
    torch.testing.assert_close(store.tensors[f"t::{group}::gram"], X.T @ X)
    torch.testing.assert_close(store.tensors[f"t::{group}::sum"], X.sum(0))
    torch.testing.assert_close(store.tensors[f"t::{group}::sample_means"], torch.stack(per_sample))
    # the other module (called once) still counts each token once
    other = store.meta["module_to_group"]["other"]
    assert int(store.tensors[f"t::{other}::count"]) == X.shape[0] // 2
    torch.testing.assert_close(store.tensors[f"t::{other}::sample_means"], torch.stack(other_means))
