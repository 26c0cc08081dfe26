from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # benchlib and the bench scripts
os.environ.setdefault("OSRM_LORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodels import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own data cache unless it sets one."""
    monkeypatch.setenv("OSRM_LORA_CACHE", str(tmp_path / "cache"))
