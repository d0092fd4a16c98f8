"""Normalised crawl failure reasons, mapped from img2dataset's free-text ``error_message``."""
from __future__ import annotations

import re

from pipelines.crawl.ssrf import REASON_PREFIX

# The reasons a crawl row can end with (plus "other:<message>" for anything unrecognised).
REASONS: tuple[str, ...] = (
    "http_404", "http_403", "http_429", "http_4xx", "http_5xx", "timeout", "truncated", "decode_error",
    "not_image", "opt_out", "blocked_private_address", "unsupported_scheme", "too_large", "too_small",
    "bad_aspect_ratio", "redirect_error", "dns_error", "connection_refused", "connection_error", "tls_error",
    "hash_mismatch",
    "missing_from_output",
)
# Worth another try later: the server or the network may answer differently next time.
RETRYABLE_REASONS: frozenset[str] = frozenset(
    {"http_429", "http_5xx", "timeout", "truncated", "dns_error", "connection_refused", "connection_error"})

_OURS = re.compile(re.escape(REASON_PREFIX) + r"([a-z0-9_]+)")
_HTTP = re.compile(r"HTTP Error (\d{3})")
# Substring rules, checked in order after our own tags and HTTP status codes.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("opt_out", ("disallowed by x-robots-tag",)),
    ("redirect_error", ("redirect error", "redirection to url", "infinite loop")),
    ("truncated", ("incompleteread", "incomplete read")),
    ("timeout", ("timed out", "timeout")),
    ("decode_error", ("image decoding error", "cannot identify image", "broken data stream", "image file is truncated")),
    ("too_large", ("image area too large", "decompression bomb")),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("unsupported_scheme", ("unknown url type",)),
    ("dns_error", ("name or service not known", "nodename nor servname", "temporary failure in name resolution",
                   "no address associated")),
    ("connection_refused", ("connection refused",)),
    ("connection_error", ("connection reset", "remote end closed", "remotedisconnected", "broken pipe",
                          "connection aborted", "network is unreachable", "no route to host")),
    ("tls_error", ("[ssl", "certificate verify failed", "ssl:", "tlsv1")),
    ("hash_mismatch", ("hash mismatch",)),
)


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
        code = int(http.group(1))
        if 300 <= code < 400:
            return "redirect_error"
        if code in (403, 404, 429):
            return f"http_{code}"
        return "http_5xx" if code >= 500 else "http_4xx"
    low = msg.lower()
    for reason, needles in _RULES:
        if any(n in low for n in needles):
            return reason
    return "other:" + " ".join(msg.split())[:120]
