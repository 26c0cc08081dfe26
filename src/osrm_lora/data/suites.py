"""Named task suites: lists of task specs that run together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from osrm_lora.data.spec import TaskSpec, resolve_specs
from osrm_lora.errors import OsrmError

#: Demo caps: small enough for a CPU demo (the lead tunes them).
DEMO_MAX_TRAIN = 320
DEMO_MAX_EVAL = 100

SUITES: dict[str, list[dict[str, Any]]] = {
    "demo": [
        {"name": name, "source": "builtin", "max_train": DEMO_MAX_TRAIN, "max_eval": DEMO_MAX_EVAL}
        for name in ("mr", "hedge", "bbc", "spam")
    ],
    "offline6": [
        {"name": name, "source": "builtin"} for name in ("mr", "movie_docs", "hedge", "bbc", "spam", "foods")
    ],
    "glue": [{"name": f"glue/{t}", "source": "glue"} for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")],
}


def load_suite(name: str, suites: Mapping[str, list[Any]] | None = None) -> list[TaskSpec]:
    """The task specs of suite ``name``; OsrmError listing the known suites if unknown."""
    table = SUITES if suites is None else suites
    if name not in table:
        raise OsrmError(f"unknown suite {name!r}; known suites: {', '.join(sorted(table))}")
    return resolve_specs(table[name])
