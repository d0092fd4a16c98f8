"""robots.txt, fetched once per host (shared by a machine's crawl processes and the crawl's rounds through
:mod:`pipelines.crawl.robots_store`), parsed with ``urllib.robotparser``.

Conventions (RFC 9309 and what large crawlers do): a 2xx answer is parsed and obeyed; a 4xx answer (404, 403, 410
...) means there are no rules, allow all; a 5xx answer, a timeout, a connection error or a body that is not text
means the site could not tell us, so nothing of it is fetched in this crawl (``robots_unavailable``, retryable in a
later round). A host whose name does not resolve, or that the SSRF guard blocks, gets no robots decision: its
image requests fail on their own with ``dns_error`` / ``blocked_private_address``, the reason a person expects.

The fetch goes through the same guarded opener as images (the guard, the DNS cache, a deadline of
``robots_timeout`` seconds, 500 KB at most as RFC 9309 allows), and counts as a request to the host for
politeness: the scheduler gives the host's first URL to one thread, which fetches robots.txt before anything else.
"""
from __future__ import annotations

import urllib.error
import urllib.request
import urllib.robotparser
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipelines.core import reasons as R
from pipelines.crawl.reasons import normalise_reason

MAX_ROBOTS_BYTES = 500 * 1024

ALLOW_ALL, DISALLOW_ALL, RULES = "allow_all", "disallow_all", "rules"


@dataclass
class RobotsPolicy:
    """The decision for one host: ``kind`` is allow_all, disallow_all or rules (then ``parser`` decides)."""

    kind: str
    detail: str = ""
    parser: urllib.robotparser.RobotFileParser | None = None
    status: int | None = None
    text: str | None = None  # robots.txt's body as fetched (rules only), until it is stored

    def can_fetch(self, user_agent_token: str, url: str) -> tuple[bool, str | None]:
        """(allowed, reason when not)."""
        if self.kind == ALLOW_ALL:
            return True, None
        if self.kind == DISALLOW_ALL:
            return False, R.ROBOTS_UNAVAILABLE
        ok = self.parser.can_fetch(user_agent_token, url)  # type: ignore[union-attr]
        return (True, None) if ok else (False, R.ROBOTS_DISALLOWED)


def robots_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/robots.txt"


def parse_robots(text: str) -> RobotsPolicy:
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(text.splitlines())
    return RobotsPolicy(RULES, parser=parser, status=200)


def fetch_robots(opener: urllib.request.OpenerDirector, url: str, *, user_agent: str, timeout: float) \
        -> RobotsPolicy | None:
    """The robots policy of ``url``'s host, or None when the host cannot be reached at all for a reason its image
    requests will report themselves (DNS failure, blocked address, unsupported scheme)."""
    request = urllib.request.Request(robots_url(url), headers={"User-Agent": user_agent})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_ROBOTS_BYTES)
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        if 400 <= exc.code < 500:
            return RobotsPolicy(ALLOW_ALL, f"robots.txt answered {exc.code}", status=exc.code)
        return RobotsPolicy(DISALLOW_ALL, f"robots.txt answered {exc.code}", status=exc.code)
    except Exception as exc:  # noqa: BLE001 - every failure is classified below
        reason = normalise_reason(str(exc))
        if reason in (R.DNS_ERROR, R.BLOCKED_PRIVATE_ADDRESS, R.UNSUPPORTED_SCHEME):
            return None
        if reason == R.REDIRECT_ERROR:  # a redirect loop on robots.txt: treated like "not found" by Google
            return RobotsPolicy(ALLOW_ALL, f"robots.txt redirects in a loop ({exc})")
        return RobotsPolicy(DISALLOW_ALL, f"robots.txt not available: {reason} ({exc})")
    try:
        text = body.decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - cannot happen with errors="replace"; kept for clarity
        return RobotsPolicy(DISALLOW_ALL, "robots.txt is not text")
    policy = parse_robots(text)
    policy.status, policy.text = status, text
    return policy
