"""osrm-lora: fine-tune one LoRA adapter per task, initialise with OSRM, merge, evaluate, diagnose."""

from __future__ import annotations

__version__ = "0.1.0"

from osrm_lora.errors import OsrmError

__all__ = ["OsrmError", "__version__"]
