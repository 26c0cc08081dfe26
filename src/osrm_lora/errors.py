"""User-facing errors.

Every problem caused by the user's input (files, configs, adapters, parameters) is raised as an
:class:`OsrmError` whose message is ONE line that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero.
"""

from __future__ import annotations


class OsrmError(Exception):
    """A problem with the user's input; ``str(err)`` is a one-line message naming problem and fix."""

    def __init__(self, message: str) -> None:
        one_line = " ".join(str(message).split())
        super().__init__(one_line)


class DataError(OsrmError):
    """Bad or unavailable task data."""


class ConfigError(OsrmError):
    """Malformed or invalid configuration."""


class AdapterError(OsrmError):
    """Malformed, incompatible or unsupported adapter."""


class SourceUnavailableError(DataError):
    """A built-in data source cannot be fetched (e.g. its registry client is missing)."""


def validation_message(exc: Exception) -> str:
    """One line ``<field>: <message> (got <value>)[; ...]`` for a pydantic ``ValidationError``."""
    parts: list[str] = []
    errors = exc.errors() if callable(getattr(exc, "errors", None)) else []  # type: ignore[attr-defined]
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return " ".join("; ".join(parts).split()) or " ".join(str(exc).split())
