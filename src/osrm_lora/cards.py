"""Model cards: a README.md next to every merged adapter or model, enough to reproduce it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from osrm_lora import __version__
from osrm_lora.fsutil import sha256_file


def adapter_hash(path: str | Path) -> str:
    """sha256 of an adapter directory's weights file (``adapter_model.safetensors`` or ``.bin``)."""
    p = Path(path)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (p / name).exists():
            return sha256_file(p / name)
    return "-"


def merge_card(
    *,
    method: str,
    params: Mapping[str, Any],
    base_model: str | None,
    inputs: Sequence[str | Path] = (),
    task_names: Sequence[str] = (),
    paper: str = "",
    scores: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    output_format: str = "peft",
) -> str:
    """Markdown card: base model, inputs with hashes, method and parameters, validation scores."""
    lines = [
        f"# Merged LoRA: {method}",
        "",
        f"Written by osrm-lora {__version__}. Output format: {'PEFT adapter' if output_format == 'peft' else 'full model (HF layout)'}.",
        "",
        f"- base model: `{base_model or 'unknown'}`",
        f"- method: `{method}`" + (f" ({paper})" if paper else ""),
        f"- parameters: `{json.dumps(dict(params), sort_keys=True, default=str)}`",
        "",
        "## Input adapters",
        "",
        "| # | task | path | sha256 (adapter weights) |",
        "|---|---|---|---|",
    ]
    for i, path in enumerate(inputs):
        name = task_names[i] if i < len(task_names) else Path(path).name
        lines.append(f"| {i} | {name} | `{path}` | `{adapter_hash(path)}` |")
    if scores:
        lines += ["", "## Scores", ""]
        split = scores.get("split", "validation")
        lam = scores.get("lambda")
        if lam is not None:
            lines.append(f"Scaling coefficient λ = {lam:g}, chosen on the {split} split.")
            lines.append("")
        per_task = scores.get("scores", {})
        lines += ["| task | " + split + " score |", "|---|---|"]
        lines += [f"| {t} | {v:.2f} |" for t, v in per_task.items()]
        if "test" in scores:
            lines += ["", "Test scores (reported once, for this selection):", "", "| task | test score |", "|---|---|"]
            lines += [f"| {t} | {v:.2f} |" for t, v in scores["test"].items()]
    if info:
        keep = {k: v for k, v in info.items() if isinstance(v, (int, float, str)) and k != "seconds"}
        if keep:
            lines += ["", "## Merge info", "", "```json", json.dumps(keep, indent=2, sort_keys=True, default=str), "```"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "osrm-lora merge --method " + method + "".join(
            f" -p {k}={v}" for k, v in sorted(params.items()) if not isinstance(v, (list, dict))
        ) + " " + " ".join(str(p) for p in inputs) + " --out OUT_DIR",
        "```",
        "",
        "Load with PEFT: `PeftModel.from_pretrained(base_model, THIS_DIR)`; task heads stay with each task's adapter.",
    ]
    return "\n".join(lines) + "\n"
