"""Constraints of constraint-aware merging: a task whose validation score must not drop below a floor.

Written ``TASK>=FLOOR`` (absolute, in score points) or ``TASK>=single-TOL`` (its own adapter's
validation score minus ``TOL``). Used by the merge search, RMM and the pipeline's merge stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from osrm_lora.errors import OsrmError

_CONSTRAINT = re.compile(r"^(?P<task>.+?)\s*>=\s*(?P<rhs>.+)$")
_SINGLE = re.compile(r"^single\s*(?:-\s*(?P<tol>[0-9.eE+-]+))?$")


@dataclass(frozen=True)
class Constraint:
    """Task ``task``'s validation score must stay at or above a floor: ``floor`` (absolute, in score
    points) or, with ``tolerance``, its own adapter's validation score minus ``tolerance``."""

    task: str
    floor: float | None = None
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if (self.floor is None) == (self.tolerance is None):
            raise OsrmError(f"constraint on {self.task}: give either an absolute floor or a tolerance below the "
                            "single-task score, e.g. '{0}>=80' or '{0}>=single-2'".format(self.task))
        for v in (self.floor, self.tolerance):
            if v is not None and not math.isfinite(v):
                raise OsrmError(f"constraint on {self.task}: the floor must be a finite number, got {v!r}")
        if self.tolerance is not None and self.tolerance < 0:
            raise OsrmError(f"constraint on {self.task}: the tolerance must be >= 0, got {self.tolerance:g}; "
                            f"write e.g. {self.task}>=single-2")

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``TASK>=FLOOR`` (absolute) or ``TASK>=single`` / ``TASK>=single-TOL`` (relative)."""
        m = _CONSTRAINT.match(text.strip())
        hint = "write TASK>=FLOOR (e.g. mr>=80) or TASK>=single-TOL (e.g. mr>=single-2)"
        if m is None:
            raise OsrmError(f"constraint {text!r} is not valid; {hint}")
        task, rhs = m.group("task").strip(), m.group("rhs").strip()
        rel = _SINGLE.match(rhs)
        try:
            if rel is not None:
                return cls(task, tolerance=float(rel.group("tol") or 0.0))
            return cls(task, floor=float(rhs))
        except ValueError:
            raise OsrmError(f"constraint {text!r} is not valid; {hint}") from None

    def text(self) -> str:
        if self.floor is not None:
            return f"{self.task}>={self.floor:g}"
        return f"{self.task}>=single-{self.tolerance:g}"

    def resolve(self, single: Mapping[str, float]) -> float:
        """The floor in score points, given the tasks' single-task validation scores."""
        if self.floor is not None:
            return float(self.floor)
        assert self.tolerance is not None
        return float(single[self.task]) - float(self.tolerance)


def check_constraint_tasks(constraints: Sequence[Constraint], tasks: Sequence[str]) -> None:
    """OsrmError naming the first constraint on a task that is not merged."""
    unknown = [c.task for c in constraints if c.task not in tasks]
    if unknown:
        raise OsrmError(f"constraint task {unknown[0]!r} is not one of the merged tasks ({', '.join(tasks)})")


def shortfalls(constraints: Sequence[Constraint], floors: Mapping[str, float],
               scores: Mapping[str, float]) -> list[float]:
    """Per constraint, its floor minus the task's score (``<= 0``: met); ``floors`` by ``Constraint.text()``."""
    return [floors[c.text()] - scores[c.task] for c in constraints]
