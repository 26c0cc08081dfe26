#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for a GPU machine without registry access: a float16 copy of the embedded
# MiniLM (43 MiB), the canonical task files and fixed splits of the six offline tasks, and wheels of
# the pure-Python packages the GPU image lacks. Run from the repository root after `make setup`.
set -euo pipefail
PY=.venv/bin/python
mkdir -p .gpu/wheels .gpu/cache
$PY - <<'PYEOF'
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from osrm_lora.backbone import resolve_model_path
src = Path(resolve_model_path("default")); dst = Path(".gpu/minilm-fp16"); dst.mkdir(parents=True, exist_ok=True)
sd = load_file(str(src / "model.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, str(dst / "model.safetensors"),
          metadata={"format": "pt"})
for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
    shutil.copy(src / f, dst / f)
from osrm_lora.data import load_suite, load_task
for spec in load_suite("offline6"):
    load_task(spec)  # fetch once into the user cache
PYEOF
CACHE="${OSRM_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/osrm-lora}"
rm -rf .gpu/cache/canonical .gpu/cache/splits
cp -r "$CACHE/canonical" "$CACHE/splits" .gpu/cache/
# wheels of what the GPU image lacks (its package list: peft, typer, rich, pyyaml, ... are there)
(cd .gpu/wheels && ../../.venv/bin/pip download -q --no-deps optuna==5.0.0 alembic colorlog mako && ../../.venv/bin/pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection sqlalchemy)
du -sh .gpu/*
