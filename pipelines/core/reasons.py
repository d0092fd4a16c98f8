"""The one vocabulary of reasons a row can be rejected with, per stage.

Every check in the data plane returns ``None`` (keep) or one of these strings (reject), and every rejected row
carries ``stage`` and ``reason``; the manifest's funnel counts rows per ``stage:reason``. Crawl failures that no
rule recognises are kept as ``other:<message>`` so nothing is hidden.
"""
from __future__ import annotations

# ---- stage names (the ``stage`` column of rejected rows and the keys of the funnel)
CURATE, CRAWL, IMAGES, DEDUP, DECONTAM, CLIP_SCORE, BALANCE, SHARD = (
    "curate", "crawl", "images", "dedup", "decontam", "clip_score", "balance", "shard")

# ---- curate: record, caption and URL checks, matching, exact dedup, language, balancing
MALFORMED_RECORD = "malformed_record"
INVALID_UTF8 = "invalid_utf8"
INVALID_TEXT = "invalid_text"
EMPTY_CAPTION = "empty_caption"
TOO_FEW_WORDS = "too_few_words"
TOO_FEW_CHARS = "too_few_chars"
TOO_LONG = "too_long"
MISSING_URL = "missing_url"
BAD_URL_SCHEME = "bad_url_scheme"
BAD_URL_HOST = "bad_url_host"
NO_MATCH = "no_match"
DUPLICATE_URL = "duplicate_url"
DUPLICATE_URL_CAPTION = "duplicate_url_caption"
WRONG_LANGUAGE = "wrong_language"
LOW_LANG_SCORE = "low_lang_score"
NOT_SAMPLED = "not_sampled"  # MetaCLIP balancing draw (curation and the second pass)
TAKEDOWN = "takedown"

# ---- crawl (normalised from img2dataset's error messages and clipline's guarded fetcher)
HTTP_403, HTTP_404, HTTP_429, HTTP_4XX, HTTP_5XX = "http_403", "http_404", "http_429", "http_4xx", "http_5xx"
TIMEOUT = "timeout"  # a timeout whose phase is unknown (messages of plain img2dataset output)
TIMEOUT_HEADERS = "timeout_headers"  # no (final) response headers in time: stalled server, slow redirect chain
TIMEOUT_BODY = "timeout_body"  # headers came, the body did not finish within the total download deadline
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
NOT_IMAGE = "not_image"
OPT_OUT = "opt_out"  # X-Robots-Tag noai / noimageai / noml / ...
ROBOTS_DISALLOWED = "robots_disallowed"  # robots.txt disallows the URL for our user agent: never requested
ROBOTS_UNAVAILABLE = "robots_unavailable"  # robots.txt answered 5xx / timed out: disallow all, for this crawl
HOST_UNAVAILABLE = "host_unavailable"  # the host was paused after repeated connect errors / timeouts
BLOCKED_PRIVATE_ADDRESS = "blocked_private_address"
UNSUPPORTED_SCHEME = "unsupported_scheme"
TOO_LARGE = "too_large"  # declared pixels over the limit (decompression bombs) or bytes over the limit
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
REDIRECT_ERROR = "redirect_error"
DNS_ERROR = "dns_error"
CONNECTION_REFUSED = "connection_refused"
CONNECTION_ERROR = "connection_error"
TLS_ERROR = "tls_error"
HASH_MISMATCH = "hash_mismatch"
MISSING_FROM_OUTPUT = "missing_from_output"

CRAWL_REASONS: tuple[str, ...] = (
    HTTP_404, HTTP_403, HTTP_429, HTTP_4XX, HTTP_5XX, TIMEOUT, TIMEOUT_HEADERS, TIMEOUT_BODY, TRUNCATED,
    DECODE_ERROR, NOT_IMAGE, OPT_OUT, ROBOTS_DISALLOWED, ROBOTS_UNAVAILABLE, HOST_UNAVAILABLE,
    BLOCKED_PRIVATE_ADDRESS, UNSUPPORTED_SCHEME, TOO_LARGE, TOO_SMALL, BAD_ASPECT_RATIO, REDIRECT_ERROR, DNS_ERROR,
    CONNECTION_REFUSED, CONNECTION_ERROR, TLS_ERROR, HASH_MISMATCH, MISSING_FROM_OUTPUT,
)
# Worth another try later: the server or the network may answer differently next time.
RETRYABLE_CRAWL_REASONS: frozenset[str] = frozenset(
    {HTTP_429, HTTP_5XX, TIMEOUT, TIMEOUT_HEADERS, TIMEOUT_BODY, TRUNCATED, DNS_ERROR, CONNECTION_REFUSED,
     CONNECTION_ERROR, HOST_UNAVAILABLE, ROBOTS_UNAVAILABLE})
# Timeouts: a URL that hit one of these in two attempts (rounds included) is not tried again in this crawl.
TIMEOUT_CRAWL_REASONS: frozenset[str] = frozenset({TIMEOUT, TIMEOUT_HEADERS, TIMEOUT_BODY})

# ---- images (checks on the decoded image; decode errors and sizes use the crawl names above)
# ---- dedup
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

# ---- decontam: "eval_overlap:<eval set name>"
EVAL_OVERLAP = "eval_overlap"


def eval_overlap(eval_set: str) -> str:
    return f"{EVAL_OVERLAP}:{eval_set}"


# ---- clip_score (model-based filter of the build's pool, after decontamination)
LOW_CLIP_SCORE = "low_clip_score"

# ---- shard
UNREADABLE_IMAGE = "unreadable_image"
