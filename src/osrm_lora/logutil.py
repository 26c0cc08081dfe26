"""Logging set-up shared by the CLI and the Python API."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def setup_logging(verbosity: int = 0) -> None:
    """Configure the ``osrm_lora`` logger: -1 quiet (warnings), 0 info, 1+ debug."""
    global _CONFIGURED
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger = logging.getLogger("osrm_lora")
    logger.setLevel(level)
    if not _CONFIGURED:
        try:
            from rich.logging import RichHandler

            handler: logging.Handler = RichHandler(
                show_path=verbosity > 0, show_time=False, markup=False, rich_tracebacks=False
            )
        except ImportError:  # pragma: no cover
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*")
    # Quieten chatty libraries: their load reports and progress bars are not ours.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "peft", "datasets", "accelerate", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def progress_enabled() -> bool:
    """Progress bars are shown unless logging is quiet or OSRM_LORA_NO_PROGRESS is set."""
    if os.environ.get("OSRM_LORA_NO_PROGRESS"):
        return False
    return logging.getLogger("osrm_lora").getEffectiveLevel() <= logging.INFO
