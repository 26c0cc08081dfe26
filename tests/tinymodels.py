"""Tiny random models + a tiny WordPiece tokenizer, written to disk like real HF model dirs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import torch

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "red", "green", "blue", "good", "bad",
]


def write_tokenizer(path: Path) -> None:
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    # transformers 5 ignores vocab_file for the fast tokenizer: pass the vocabulary itself
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(path))


def tiny_config(arch: str):
    from transformers import BertConfig, LlamaConfig, RobertaConfig, T5Config

    vocab = 5 + len(WORDS)
    if arch == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=64, pad_token_id=0)
    if arch == "roberta":
        return RobertaConfig(vocab_size=vocab + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=37, max_position_embeddings=70, pad_token_id=0)
    if arch == "t5":
        return T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_decoder_layers=2,
                        num_heads=2, pad_token_id=0, decoder_start_token_id=0, eos_token_id=3)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    raise ValueError(arch)


def write_tiny_model(path: Path, arch: str = "bert", seed: int = 0) -> Path:
    """A random ``arch`` sequence classifier + tokenizer saved to ``path`` (safetensors)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch))
    model.save_pretrained(str(path), safe_serialization=True)
    write_tokenizer(path)
    return path


def keyword_task(name: str, keywords: list[str], n: int = 120, seed: int = 0):
    """A separable toy task: label 1 iff the sentence contains one of ``keywords``."""
    from osrm_lora.data.task import Split, Task

    rng = random.Random(seed)
    pool = [w for w in WORDS if w not in keywords]

    def make(count: int) -> Split:
        texts, labels = [], []
        for i in range(count):
            words = [rng.choice(pool) for _ in range(rng.randint(3, 8))]
            label = i % 2
            if label:
                words.insert(rng.randrange(len(words) + 1), rng.choice(keywords))
            texts.append(" ".join(words))
            labels.append(label)
        return Split(tuple(texts), tuple(labels))

    return Task(name, "classification", "accuracy", ("no", "yes"), make(n), make(n // 2), make(n // 2), source="toy")


def write_keyword_tasks(root: Path, tasks: list[tuple[str, list[str], int]], n: int) -> list[dict]:
    """Write ``keyword_task(name, keywords, n, seed)`` for each ``(name, keywords, seed)`` as a local JSONL
    file (all splits in one file, labels "no"/"yes") and return the pipeline task specs."""
    import json

    specs = []
    for name, kws, seed in tasks:
        t = keyword_task(name, kws, n=n, seed=seed)
        path = root / f"{name}.jsonl"
        with path.open("w") as fh:
            for split in ("train", "validation", "test"):
                s = t.split(split)
                for x, y in zip(s.texts, s.labels):
                    fh.write(json.dumps({"text": x, "label": ["no", "yes"][y]}) + "\n")
        specs.append({"name": name, "source": "local", "path": str(path)})
    return specs


KEYWORD_TASKS = [("colours", ["red", "green", "blue"], 1), ("polar", ["good", "bad"], 2), ("nato", ["alpha", "bravo"], 3)]


def trained_keyword_adapters(model: Path, root: Path, tasks: list[tuple[str, list[str], int]] = KEYWORD_TASKS) -> dict:
    """Rank-2 adapters trained on local keyword tasks under ``root`` and a MergedEvaluator over them:
    ``{"root", "dirs", "evaluator", "adapters", "model", "tasks"}`` (shared by the search and RMM tests)."""
    import os

    from osrm_lora.adapters import load_adapter
    from osrm_lora.config import LoraSettings, TrainSettings
    from osrm_lora.data import load_task
    from osrm_lora.merged_eval import MergedEvaluator
    from osrm_lora.train import train_task

    old = os.environ.get("OSRM_LORA_CACHE")
    os.environ["OSRM_LORA_CACHE"] = str(root / "cache")
    try:
        specs = write_keyword_tasks(root, tasks, n=80)
        loaded = [load_task(s) for s in specs]
        dirs = []
        for t in loaded:
            train_task(t, root / "adapters" / t.name, model=str(model), lora=LoraSettings(rank=2),
                       train=TrainSettings(epochs=6, max_length=12, lr=0.05, batch_size=8))
            dirs.append(root / "adapters" / t.name)
    finally:
        if old is None:
            os.environ.pop("OSRM_LORA_CACHE", None)
        else:
            os.environ["OSRM_LORA_CACHE"] = old
    evaluator = MergedEvaluator(str(model), loaded, dirs, max_length=12, splits=("validation", "test"))
    adapters = [load_adapter(d, name=t.name) for d, t in zip(dirs, loaded)]
    return {"root": root, "dirs": dirs, "evaluator": evaluator, "adapters": adapters, "model": str(model),
            "tasks": [t.name for t in loaded]}


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script that is not on the import path (a bench command, a fixture generator) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
