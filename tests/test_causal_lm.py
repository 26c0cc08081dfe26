"""Adapters without heads (causal LM): merge them and evaluate loss / perplexity on text files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tinymodels import WORDS, tiny_config, write_tokenizer

from osrm_lora.errors import OsrmError
from osrm_lora.inference import evaluate_causal_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"))
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    write_tokenizer(root / "base")
    adapters = []
    for i in range(2):
        torch.manual_seed(10 + i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(root / "base")),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 20.0)
        m.save_pretrained(str(root / f"a{i}"))
        adapters.append(root / f"a{i}")
    return root / "base", adapters


def test_perplexity_of_a_merged_causal_lm_matches_peft(lm: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapters = lm
    from osrm_lora.merge import run_merge

    run_merge([str(a) for a in adapters], "task_arithmetic", ["scaling=1.0"], str(tmp_path / "merged"))
    texts = tmp_path / "task.txt"
    texts.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, 20, 2)) + "\n")
    ours = evaluate_causal_lm([str(texts)], model=str(base), adapter=str(tmp_path / "merged"))[str(texts)]

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "merged")).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    total, count = 0.0, 0
    for line in texts.read_text().splitlines():
        ids = tok(line, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = ref(input_ids=ids, labels=ids)
        n = ids.shape[1] - 1
        total += float(out.loss) * n
        count += n
    assert ours["loss"] == pytest.approx(total / count, rel=1e-4)
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    base_only = evaluate_causal_lm([str(texts)], model=str(base))[str(texts)]
    assert base_only["loss"] != pytest.approx(ours["loss"], rel=1e-3)  # the merged update matters


def test_empty_text_file_is_a_clear_error(lm: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, _ = lm
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(OsrmError, match="is empty"):
        evaluate_causal_lm([str(tmp_path / "empty.txt")], model=str(base))
