#!/usr/bin/env bash
# Source on a lent GPU machine (no network): install the carried wheels of whatever the image lacks,
# point the package at the carried data cache and half-precision MiniLM copy.
# `bench/prepare_gpu_carry.sh` builds .gpu/ here first.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_need() {  # module wheel-prefix...
  local mod=$1; shift
  python3 -c "import $mod" 2>/dev/null && return 0
  for w in "$@"; do python3 -m pip install -q --no-index --no-deps "$ROOT"/.gpu/wheels/${w}-*.whl 2>&1 | grep -vi warning; done
}
if [ -d "$ROOT/.gpu/wheels" ]; then
  _need pydantic pydantic pydantic_core annotated_types typing_inspection
  _need yaml PyYAML pyyaml
  _need peft peft
  _need rich rich markdown_it_py mdurl
  _need typer typer shellingham annotated_doc
  _need optuna optuna alembic mako colorlog sqlalchemy
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export OSRM_LORA_CACHE="$ROOT/.gpu/cache"
export OSRM_LORA_MODEL="$ROOT/.gpu/minilm-fp16"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OSRM_LORA_NO_PROGRESS=1
