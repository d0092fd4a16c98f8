"""Normalised crawl failure reasons (the vocabulary lives in :mod:`pipelines.core.reasons`), mapped from
img2dataset's free-text ``error_message`` or read from clipline's own ``clipline:<reason>:`` tags."""
from __future__ import annotations

import re

from pipelines.core import reasons as R
from pipelines.crawl.ssrf import REASON_PREFIX

# The reasons a crawl row can end with (plus "other:<message>" for anything unrecognised).
REASONS: tuple[str, ...] = R.CRAWL_REASONS
# Worth another try later: the server or the network may answer differently next time.
RETRYABLE_REASONS: frozenset[str] = R.RETRYABLE_CRAWL_REASONS
TIMEOUT_REASONS: frozenset[str] = R.TIMEOUT_CRAWL_REASONS

_OURS = re.compile(re.escape(REASON_PREFIX) + r"([a-z0-9_]+)")
_HTTP = re.compile(r"HTTP Error (\d{3})")
# Substring rules, checked in order after our own tags and HTTP status codes.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (R.OPT_OUT, ("disallowed by x-robots-tag",)),
    (R.REDIRECT_ERROR, ("redirect error", "redirection to url", "infinite loop")),
    (R.TRUNCATED, ("incompleteread", "incomplete read")),
    (R.TIMEOUT, ("timed out", "timeout")),
    (R.DECODE_ERROR, ("image decoding error", "cannot identify image", "broken data stream",
                      "image file is truncated")),
    (R.TOO_LARGE, ("image area too large", "decompression bomb")),
    (R.TOO_SMALL, ("image too small",)),
    (R.BAD_ASPECT_RATIO, ("aspect ratio too large",)),
    (R.UNSUPPORTED_SCHEME, ("unknown url type",)),
    (R.DNS_ERROR, ("name or service not known", "nodename nor servname", "temporary failure in name resolution",
                   "no address associated")),
    (R.CONNECTION_REFUSED, ("connection refused",)),
    (R.CONNECTION_ERROR, ("connection reset", "remote end closed", "remotedisconnected", "broken pipe",
                          "connection aborted", "network is unreachable", "no route to host")),
    (R.TLS_ERROR, ("[ssl", "certificate verify failed", "ssl:", "tlsv1")),
    (R.HASH_MISMATCH, ("hash mismatch",)),
)


def http_reason(code: int) -> str:
    """The reason of a final HTTP status that is not a success."""
    if 300 <= code < 400:
        return R.REDIRECT_ERROR
    if code in (403, 404, 429):
        return f"http_{code}"
    return R.HTTP_5XX if code >= 500 else R.HTTP_4XX


def normalise_reason(error_message: str | None) -> str:
    """Map one img2dataset ``error_message`` to a reason from :data:`REASONS`, or ``other:<message>``."""
    msg = (error_message or "").strip()
    if not msg:
        return "other:no error message"
    ours = _OURS.search(msg)
    if ours:
        return ours.group(1)
    http = _HTTP.search(msg)
    if http:
        return http_reason(int(http.group(1)))
    low = msg.lower()
    for reason, needles in _RULES:
        if any(n in low for n in needles):
            return reason
    return "other:" + " ".join(msg.split())[:120]


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE_REASONS
