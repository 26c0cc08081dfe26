"""Label normalisation shared by local-file and Hugging Face sources."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from osrm_lora.errors import DataError


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def label_key(value: Any, where: str) -> int | str:
    """Canonical form of a raw class label: an ``int`` for integer-like values, else a stripped string."""
    if _is_missing(value):
        raise DataError(f"{where} has no label; fill in every label or drop the row")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise DataError(f"{where} has label {value!r}, a fraction; use class names or integers, or set problem_type: regression")
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)  # text files (CSV/TSV) hold numbers as text: "1.0" is class 1, "0.5" no class
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    if number.is_integer():
        return int(number)
    raise DataError(f"{where} has label {text!r}, a fraction; use class names or integers, or set problem_type: regression")


def regression_value(value: Any, where: str) -> float:
    """A regression target as float; DataError if missing or not a number."""
    if _is_missing(value):
        raise DataError(f"{where} has no label; fill in every label or drop the row")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where} has label {value!r}, which is not a number; fix it or use problem_type: classification") from None
    if not math.isfinite(out):
        raise DataError(f"{where} has a non-finite label {value!r}; fix or drop the row")
    return out


def build_label_mapping(
    keys: Sequence[int | str], label_names: Sequence[str] | None = None, where: str = "data"
) -> tuple[dict[int | str, int], tuple[str, ...]]:
    """Map canonical label keys to class indices; return ``(mapping, label_names)``.

    - ``label_names`` given: string labels map to their position in it; integer labels must be
      valid indices into it.
    - integers exactly ``0..K-1``: kept as indices, named ``"0".."K-1"``.
    - otherwise: sorted label values (numbers numerically, else as strings) map to ``0..K-1``.
    """
    distinct = set(keys)
    if not distinct:
        raise DataError(f"{where} has no labelled examples; add data")
    if label_names:
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names):
            raise DataError(f"label_names {list(names)} contain duplicates; list each class once")
        mapping: dict[int | str, int] = {}
        for key in distinct:
            if isinstance(key, int):
                if not 0 <= key < len(names):
                    raise DataError(f"{where} has label {key}, outside 0..{len(names) - 1} for label_names {list(names)}; fix the labels or label_names")
                mapping[key] = key
            elif key in names:
                mapping[key] = names.index(key)
            else:
                raise DataError(f"{where} has label {key!r}, which is not in label_names {list(names)}; add it or fix the data")
        return mapping, names
    if all(isinstance(k, int) for k in distinct):
        ints = sorted(cast("set[int]", distinct))
        if ints == list(range(len(ints))):
            return {k: k for k in ints}, tuple(str(k) for k in ints)
        return {k: i for i, k in enumerate(ints)}, tuple(str(k) for k in ints)
    ordered = sorted(distinct, key=str)
    return {k: i for i, k in enumerate(ordered)}, tuple(str(k) for k in ordered)


def check_given_label_sets(per_split: Mapping[str, set[Any]], where: str) -> None:
    """Raise DataError naming both splits if the given splits' label sets differ."""
    names = list(per_split)
    ref = names[0]
    for other in names[1:]:
        if per_split[other] != per_split[ref]:
            only_ref = sorted(map(str, per_split[ref] - per_split[other]))
            only_other = sorted(map(str, per_split[other] - per_split[ref]))
            detail = "; ".join(
                x for x in (f"only in {ref}: {only_ref}" if only_ref else "", f"only in {other}: {only_other}" if only_other else "") if x
            )
            raise DataError(
                f"{where}: label sets differ between given splits ({detail}); every split needs the same classes - "
                "fix the files or give one file and let osrm-lora split it"
            )
