"""Model cards: a README.md next to every merged adapter or model, enough to reproduce it."""

from __future__ import annotations

import json
import shlex
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


def _param_text(value: Any) -> str:
    """A parameter value as ``-p key=VALUE`` parses it back to the same value (floats exactly: repr)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def reproduce_command(*, method: str, params: Mapping[str, Any], inputs: Sequence[str | Path],
                      task_names: Sequence[str] = (), output_format: str = "peft", base_model: str | None = None,
                      svd_rank: int | None = None, max_error: float | None = None, stream: bool = False,
                      seed: int | None = None, out: str = "OUT_DIR") -> str:
    """The ``osrm-lora merge`` command line that writes the same merge (shell-quoted).

    Every resolved parameter that is set is passed (``-p key=value``; per-adapter weights as
    ``--weights``), so later changes of the defaults do not change the result; ``seed`` is the seed
    the method drew from when its ``seed`` parameter was unset. Inputs that were not recorded are
    placeholders named after the tasks.
    """
    args = ["osrm-lora", "merge", "--method", method]
    for key, value in sorted(params.items()):
        if key == "seed" and value is None and seed is not None:
            value = seed
        if value is None:
            continue
        if key == "weights":
            args += ["--weights", ",".join(repr(float(w)) for w in value)]
        else:
            args += ["-p", f"{key}={_param_text(value)}"]
    if stream:
        args.append("--stream")
    if output_format == "full":
        args += ["--format", "full"] + (["--base-model", str(base_model)] if base_model else [])
    if svd_rank is not None:
        args += ["--svd-rank", str(int(svd_rank))]
    if max_error is not None:
        args += ["--max-error", repr(float(max_error))]
    paths = [str(p) for p in inputs] or [f"ADAPTER_{(n or str(i)).upper()}" for i, n in enumerate(task_names)]
    args += paths + ["--out", out]
    return shlex.join(args)


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
    svd_rank: int | None = None,
    max_error: float | None = None,
    stream: bool = False,
    seed: int | None = None,
    needs: Sequence[str] = (),
) -> str:
    """Markdown card: base model, inputs with hashes, method and parameters, validation scores, and the
    command that reproduces the merge (:func:`reproduce_command`; data-aware methods, ``needs``, are
    reproduced with ``osrm-lora run`` instead)."""
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
    lines += ["", "## Reproduce", ""]
    if needs:
        lines.append(f"Method `{method}` needs {', '.join(sorted(needs))} computed from task data, which "
                     "`osrm-lora merge` cannot compute: rerun the `osrm-lora run` configuration that wrote it.")
    else:
        if not inputs:
            lines.append("The input paths were not recorded: replace each `ADAPTER_<TASK>` by that task's adapter "
                         "directory, in this order.")
            lines.append("")
        lines += ["```bash",
                  reproduce_command(method=method, params=params, inputs=inputs, task_names=task_names,
                                    output_format=output_format, base_model=base_model, svd_rank=svd_rank,
                                    max_error=max_error, stream=stream, seed=seed),
                  "```"]
    load = ("Load with transformers: `AutoModel.from_pretrained(THIS_DIR)` (or the task model class)"
            if output_format == "full" else "Load with PEFT: `PeftModel.from_pretrained(base_model, THIS_DIR)`")
    lines += ["", f"{load}; task heads stay with each task's adapter (see `non_lora` in merge_info.json)."]
    return "\n".join(lines) + "\n"
