"""Record filters of the curation stage: caption checks, URL checks and the deterministic pair uid.

Each check is a pure function returning ``None`` (keep) or a reason string (reject), so every dropped row is
counted under exactly one reason.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

# Reasons (stable names: stats.json and rejected/*.parquet use them), from the one vocabulary of every stage.
from pipelines.core.reasons import (BAD_URL_HOST, BAD_URL_SCHEME, DUPLICATE_URL, DUPLICATE_URL_CAPTION,  # noqa: F401
                                    EMPTY_CAPTION, INVALID_TEXT, INVALID_UTF8, LOW_LANG_SCORE, MALFORMED_RECORD,
                                    MISSING_URL, NO_MATCH, NOT_SAMPLED, TOO_FEW_CHARS, TOO_FEW_WORDS, TOO_LONG,
                                    WRONG_LANGUAGE)

if TYPE_CHECKING:
    import numpy as np


_HOST_LABELS = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")
_SPACE = re.compile(r"\s")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class CaptionFilterConfig:
    min_words: int = 2
    min_chars: int = 5
    max_chars: int = 1000
    max_words: int = 200


def pair_uid(url: str, caption: str) -> str:
    """Deterministic 128-bit uid of a pair (hex): blake2b of url and caption separated by NUL."""
    return hashlib.blake2b(f"{url}\x00{caption}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _bad_char(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return ch == "\ufffd" or (cat == "Cc" and ch not in "\t\n\r") or cat == "Cs"


def check_caption(caption, cfg: CaptionFilterConfig) -> str | None:
    """Reason to reject a caption, or None. Length is checked before anything scans the text."""
    if caption is None:
        return EMPTY_CAPTION
    if len(caption) > cfg.max_chars:
        return TOO_LONG
    stripped = caption.strip()
    if not stripped:
        return EMPTY_CAPTION
    if "\ufffd" in caption or (not caption.isprintable() and any(_bad_char(ch) for ch in caption)):
        return INVALID_TEXT
    if _LETTER.search(stripped) is None:
        return INVALID_TEXT
    if len(stripped) < cfg.min_chars:
        return TOO_FEW_CHARS
    n_words = len(stripped.split())
    if n_words < cfg.min_words:
        return TOO_FEW_WORDS
    if n_words > cfg.max_words:
        return TOO_LONG
    return None


def check_url(url) -> str | None:
    """Reason to reject an image URL, or None: http/https only, with a host that parses."""
    if url is None or not url.strip():
        return MISSING_URL
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return BAD_URL_HOST
    if parts.scheme.lower() not in ("http", "https"):
        return BAD_URL_SCHEME
    if not host or _SPACE.search(url):
        return BAD_URL_HOST
    if host.startswith("[") or ":" in host:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return BAD_URL_HOST
        return None
    if len(host) > 253 or (_HOST_LABELS.fullmatch(host) is None and not _idn_ok(host)):
        return BAD_URL_HOST
    return None


def _idn_ok(host: str) -> bool:
    """A non-ASCII host is fine when each label is letters/digits/hyphens (IDNA encodes it)."""
    labels = host.rstrip(".").split(".")
    return all(0 < len(label) <= 63 and all(ch.isalnum() or ch in "-_" for ch in label) for label in labels)


# ------------------------------------------------------------------------------------ vectorised fast paths
#
# Over a whole batch (pyarrow.compute), these find the rows that the checks above certainly keep; only the
# other rows (rejections and unusual text, a small share of real data) go through the per-row functions, so the
# result is exactly theirs (tests compare both on adversarial rows).

# http(s)://host[:port][/ ? # rest]: a host of [A-Za-z0-9_-] labels with an optional trailing dot, a port of at
# most 4 digits, no whitespace and only printable ASCII anywhere. urlsplit then finds exactly this host and port,
# raises nothing, and check_url returns None as long as every label has at most 63 characters: the fast path also
# asks for a host (everything up to the first of : / ? # or the end) of at most 63 characters (_FAST_HOST); longer
# hosts take the per-row check. Two match-only patterns are ~3x faster than one extracting the host.
_FAST_URL = (r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?(?::[0-9]{1,4})?"
             r"(?:[/?#][!-~]*)?$")
_FAST_HOST = r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9_.-]{1,63}(?:[:/?#]|$)"


def _to_bool(arr) -> "np.ndarray":
    import numpy as np
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def url_ok_fast(urls) -> "np.ndarray":
    """Boolean mask over a pyarrow string array: True where ``check_url(url)`` is certainly None and the URL has
    no surrounding whitespace (so ``url.strip() == url``). False means "check this row with check_url"."""
    import pyarrow.compute as pc

    return _to_bool(pc.and_(pc.match_substring_regex(urls, _FAST_URL), pc.match_substring_regex(urls, _FAST_HOST)))


def caption_ok_fast(captions, cfg: CaptionFilterConfig) -> "np.ndarray":
    """Boolean mask over a pyarrow string array: True where ``check_caption(caption, cfg)`` is certainly None.

    Decided for printable-ASCII captions without a double space (there: whitespace is only " ", a letter is
    [A-Za-z], ``strip()`` trims spaces and the words are the spaces + 1); every other caption is False, i.e.
    "check this row with check_caption"."""
    import pyarrow.compute as pc

    ascii_printable = pc.and_(pc.string_is_ascii(captions), pc.ascii_is_printable(captions))
    trimmed = pc.utf8_trim(captions, " ")
    spaces = pc.count_substring(trimmed, " ")
    conds = [
        ascii_printable,
        pc.less_equal(pc.binary_length(captions), cfg.max_chars),
        pc.greater_equal(pc.binary_length(trimmed), max(1, cfg.min_chars)),
        pc.match_substring_regex(captions, "[A-Za-z]"),
        pc.invert(pc.match_substring(trimmed, "  ")),
        pc.greater_equal(spaces, cfg.min_words - 1),
        pc.less_equal(spaces, cfg.max_words - 1),
    ]
    ok = conds[0]
    for c in conds[1:]:
        ok = pc.and_(ok, c)
    return _to_bool(ok)
