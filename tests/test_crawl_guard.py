"""The crawl's SSRF guard, DNS cache and download limits (a deadline that bounds wall time), against real HTTP
servers on 127.0.0.x."""
from __future__ import annotations

import ipaddress
import time
import urllib.error

import pyarrow.parquet as pq
import pytest

from pipelines.core.errors import ConfigError
from pipelines.crawl.config import CrawlConfig
from pipelines.crawl.reasons import normalise_reason
from pipelines.crawl.ssrf import AddressPolicy, DnsCache, FetchRefused, address_category, build_guarded_opener
from pipelines.crawl.worker import fetch_image, parse_retry_after
from pipelines.synthweb import SynthWebServer, generate_web
from pipelines.synthweb.hostile import HostileWeb

LOCAL = AddressPolicy(("127.0.0.1/32",))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guardweb")
    generate_web(root, 60, seed=2, n_kinds=3, n_colours=2, heldout_per_class=1)
    with SynthWebServer(root, stall_seconds=3, drip_seconds=4, drip_interval=0.1) as srv:
        srv.materialise_url_list()
        srv.rows = {}
        for row in pq.read_table(root / "raw" / "pairs.parquet").to_pylist():
            srv.rows.setdefault(row["failure_mode"], row)
        yield srv


def _reason_of(opener, url: str, timeout: float = 2.0) -> str | None:
    """Fetch like img2dataset does and return the normalised reason of the failure (None on success)."""
    try:
        with opener.open(url, timeout=timeout) as r:
            r.read()
        return None
    except Exception as exc:  # noqa: BLE001 - img2dataset keeps str(exc); so do we
        return normalise_reason(str(exc))


@pytest.mark.parametrize("address, category", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "cloud-metadata"), ("169.254.1.1", "link-local"),
    ("fd00:ec2::254", "cloud-metadata"), ("::1", "loopback"), ("fe80::1", "link-local"), ("fc00::5", "private"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("100.64.0.1", "non-global"),
    ("::ffff:127.0.0.1", "loopback (embedded in ::ffff:7f00:1)"), ("64:ff9b::a00:1", "private (embedded in 64:ff9b::a00:1)"),
    ("2002:a00:1::", "private (embedded in 2002:a00:1::)"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_categories(address, category):
    assert address_category(ipaddress.ip_address(address)) == category


def test_allow_list_allows_exactly_its_range():
    assert AddressPolicy().check("127.0.0.1") == "loopback"
    assert LOCAL.check("127.0.0.1") is None
    assert LOCAL.check("127.0.0.2") == "loopback"
    assert LOCAL.check("169.254.169.254") == "cloud-metadata"
    assert LOCAL.check("::ffff:127.0.0.1") is None  # the same address spelled as IPv6
    lab = AddressPolicy(("169.254.0.0/16", "10.0.0.0/8"))
    assert lab.check("169.254.1.1") is None and lab.check("10.9.9.9") is None
    assert lab.check("169.254.169.254") == "cloud-metadata"  # a metadata service needs its exact address listed
    assert AddressPolicy(("169.254.169.254/32",)).check("169.254.169.254") is None
    with pytest.raises(ValueError, match="not an IP network"):
        AddressPolicy(("localhost",))
    with pytest.raises(ConfigError, match="allow_cidrs"):
        CrawlConfig(allow_cidrs=("300.1.1.1/8",))


def test_direct_private_urls_are_blocked_before_any_connection(server):
    path = server.rows["ok"]["path"]
    server.reset_hits()
    default = build_guarded_opener(AddressPolicy())
    assert _reason_of(default, server.url(path)) == "blocked_private_address"  # 127.0.0.1 not allowed by default
    assert _reason_of(build_guarded_opener(LOCAL), f"http://127.0.0.2:{server.private_port}{path}") \
        == "blocked_private_address"
    assert server.hits[path] == 0 and sum(server.private_hits.values()) == 0
    # The allow-list lets exactly 127.0.0.1 through.
    assert _reason_of(build_guarded_opener(LOCAL), server.url(path)) is None
    assert server.hits[path] == 1


def test_dns_names_are_checked_after_resolution(server):
    path = server.rows["ok"]["path"]
    url = f"http://localhost:{server.port}{path}"
    assert _reason_of(build_guarded_opener(AddressPolicy()), url) == "blocked_private_address"
    # localhost resolves to 127.0.0.1 (and maybe ::1): allowed once every resolved address is allowed.
    assert _reason_of(build_guarded_opener(AddressPolicy(("127.0.0.1/32", "::1/128"))), url) is None
    assert _reason_of(build_guarded_opener(AddressPolicy()), "http://no-such-host.invalid/x.jpg") == "dns_error"


def test_redirect_to_a_private_address_is_blocked(server):
    row = server.rows["redirect_private"]
    server.reset_hits()
    assert _reason_of(build_guarded_opener(LOCAL), row["url"]) == "blocked_private_address"
    assert server.hits[row["path"]] == 1  # the public hop was fetched...
    assert sum(server.private_hits.values()) == 0  # ...the private target never was
    # An ordinary redirect chain within the allowed range still works.
    assert _reason_of(build_guarded_opener(LOCAL), server.rows["redirect"]["url"]) is None


def test_only_http_and_https(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    opener = build_guarded_opener(AddressPolicy(("0.0.0.0/0", "::/0")))
    for url in (secret.as_uri(), "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AAAA"):
        assert _reason_of(opener, url) == "unsupported_scheme", url


def test_limits_on_size_time_and_content(server):
    rows = server.rows
    capped = build_guarded_opener(LOCAL, max_bytes=1000, max_seconds=10)
    assert _reason_of(capped, rows["ok"]["url"]) == "too_large"  # Content-Length over the cap
    hurried = build_guarded_opener(LOCAL, max_bytes=10**8, max_seconds=1.0)
    assert _reason_of(hurried, rows["slow_drip"]["url"]) == "timeout_body"  # trickle stopped by the deadline
    loose = build_guarded_opener(LOCAL, max_bytes=10**8, max_seconds=10)
    assert _reason_of(loose, rows["not_image"]["url"]) == "not_image"
    assert _reason_of(loose, rows["truncated"]["url"]) == "truncated"
    assert _reason_of(loose, rows["http_404"]["url"]) == "http_404"
    assert _reason_of(loose, rows["http_500"]["url"]) == "http_5xx"
    assert _reason_of(loose, rows["redirect_loop"]["url"]) == "redirect_error"
    assert _reason_of(loose, rows["timeout"]["url"], timeout=0.5) == "timeout_headers"


def test_fetch_refused_message_round_trips_through_urllib():
    err = urllib.error.URLError(FetchRefused("blocked_private_address", "10.0.0.1 is private"))
    assert normalise_reason(str(err)) == "blocked_private_address"


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_5xx"),
    ("HTTP Error 410: Gone", "http_4xx"),
    ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.", "redirect_error"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("IncompleteRead(10 bytes read, 5 more expected)", "truncated"),
    ("Image decoding error", "decode_error"),
    ("image area too large", "too_large"),
    ("Use of image disallowed by X-Robots-Tag directive", "opt_out"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("Remote end closed connection without response", "connection_error"),
    ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed (_ssl.c:1006)>", "tls_error"),
    ("something odd\nhappened", "other:something odd happened"),
    (None, "other:no error message"),
])
def test_normalise_reason(message, reason):
    assert normalise_reason(message) == reason


def test_https_goes_through_the_same_guard(server):
    # Blocked before any connection: no TLS server is needed to see it.
    assert _reason_of(build_guarded_opener(LOCAL), f"https://127.0.0.2:{server.private_port}/x.jpg") \
        == "blocked_private_address"
    # Allowed: the connection is made and TLS is attempted (against a plain-HTTP port, so the handshake fails).
    reason = _reason_of(build_guarded_opener(LOCAL), f"https://127.0.0.1:{server.port}/x.jpg")
    assert reason in ("tls_error", "connection_error"), reason


# ---------------------------------------------------------------------------------- a deadline that bounds time

HOSTS = ("127.0.0.10", "127.0.0.11")
LOOPBACK_TEST_HOSTS = AddressPolicy(("127.0.0.8/29", "127.0.0.16/28"))  # 127.0.0.8-.31: the test hosts, not .1/.2


@pytest.fixture(scope="module")
def hostile():
    with HostileWeb(HOSTS, stall_seconds=30) as web:
        yield web


def _timed_fetch(opener, url, timeout=5.0):
    t0 = time.monotonic()
    res = fetch_image(opener, url, user_agent="clipline-test", user_agent_token="clipline", directives=None,
                      timeout=timeout)
    return res, time.monotonic() - t0


@pytest.mark.parametrize("path, reason", [
    ("/drip/20/a.jpg", "timeout_body"),  # headers at once, then ~5 KB over 20 s: every gap < the socket timeout
    ("/drip/20/big/b.jpg", "timeout_body"),  # the same with a body of tens of KB (< 64 KB)
    ("/slow_headers/20/c.jpg", "timeout_headers"),  # nothing for 20 s
    ("/stall/d.jpg", "timeout_headers"),
    ("/redirect/50/0.3/e.jpg", "timeout_headers"),  # a chain of 50 redirects, 0.3 s each
])
def test_deadline_bounds_wall_time(hostile, path, reason):
    # Per-operation timeout 5 s (longer than the deadline): only the total deadline can stop these.
    opener = build_guarded_opener(LOOPBACK_TEST_HOSTS, max_bytes=10**8, max_seconds=1.5)
    res, elapsed = _timed_fetch(opener, hostile.url(HOSTS[0], path))
    assert res.reason == reason, res
    assert 1.4 <= elapsed <= 1.5 + 1.0, elapsed
    assert res.seconds <= 1.5 + 1.0


def test_deadline_leaves_fast_downloads_alone(hostile):
    opener = build_guarded_opener(LOOPBACK_TEST_HOSTS, max_bytes=10**8, max_seconds=1.5)
    res, _ = _timed_fetch(opener, hostile.url(HOSTS[0], "/drip/0.5/big/f.jpg"))  # finishes within the deadline
    assert res.reason is None and res.data == hostile.image("f.jpg", noise=True) and len(res.data) > 16 * 1024
    res, _ = _timed_fetch(opener, hostile.url(HOSTS[0], "/redirect/3/0.1/g.jpg"))
    assert res.reason is None and res.data == hostile.image("g.jpg")


def test_the_per_operation_timeout_still_applies_within_the_deadline(hostile):
    opener = build_guarded_opener(LOOPBACK_TEST_HOSTS, max_bytes=10**8, max_seconds=10)
    res, elapsed = _timed_fetch(opener, hostile.url(HOSTS[0], "/slow_headers/20/h.jpg"), timeout=0.5)
    assert res.reason == "timeout_headers" and elapsed < 2.0


def test_server_sees_the_connection_closed_at_the_deadline(hostile):
    hostile.reset()
    opener = build_guarded_opener(LOOPBACK_TEST_HOSTS, max_bytes=10**8, max_seconds=1.0)
    _timed_fetch(opener, hostile.url(HOSTS[1], "/drip/30/i.jpg"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not all(r.end for r in hostile.records(HOSTS[1])):
        time.sleep(0.05)
    (rec,) = hostile.records(HOSTS[1])
    assert rec.end and rec.end - rec.start <= 1.0 + 1.0  # the drip ended because we hung up, not after 30 s


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 9 <= parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) <= 11


# --------------------------------------------------------------------------------------------------------- DNS

def test_dns_is_resolved_once_per_host_and_still_checked_on_every_connection(server):
    path = server.rows["ok"]["path"]
    url = f"http://localhost:{server.port}{path}"
    cache = DnsCache(ttl=60)
    allowed = build_guarded_opener(AddressPolicy(("127.0.0.1/32", "::1/128")), resolver=cache)
    for _ in range(3):
        assert _reason_of(allowed, url) is None
    assert cache.lookups == 1
    # The cached answer (127.0.0.1) is checked again by a policy that does not allow it: no connection.
    server.reset_hits()
    strict = build_guarded_opener(AddressPolicy(), resolver=cache)
    assert _reason_of(strict, url) == "blocked_private_address"
    assert server.hits[path] == 0 and cache.lookups == 1
    # Failures are cached too (for at most the negative TTL), and answers expire with the TTL.
    bad = build_guarded_opener(AddressPolicy(), resolver=cache)
    assert _reason_of(bad, "http://no-such-host.invalid/x.jpg") == "dns_error"
    assert _reason_of(bad, "http://no-such-host.invalid/y.jpg") == "dns_error"
    assert cache.lookups == 2
    short = DnsCache(ttl=0.2)
    opener = build_guarded_opener(AddressPolicy(("127.0.0.1/32", "::1/128")), resolver=short)
    assert _reason_of(opener, url) is None and _reason_of(opener, url) is None and short.lookups == 1
    time.sleep(0.3)
    assert _reason_of(opener, url) is None and short.lookups == 2


# ------------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("field, value, message", [
    ("timeout", 0, "timeout: must be > 0"), ("max_download_seconds", -1, "max_download_seconds: must be > 0"),
    ("per_host_connections", 0, "per_host_connections: must be >= 1"), ("per_host_rps", 0, "per_host_rps"),
    ("thread_count", 1.5, "thread_count: expected an integer"), ("retries", -1, "retries: must be >= 0"),
    ("image_size", "big", "image_size: expected an integer"), ("host_failure_limit", 0, "host_failure_limit"),
    ("robots_timeout", float("nan"), "robots_timeout: expected a finite number"),
    ("encode_quality", 101, "encode_quality: must be <= 100"), ("resize_mode", "stretch", "resize_mode"),
    ("user_agent_token", "my bot", "user_agent_token"), ("contact_url", "me@example.org", "contact_url"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        CrawlConfig(**{field: value})


def test_config_from_mapping_names_unknown_keys_and_round_trips():
    with pytest.raises(ConfigError, match="crawl.timout: unknown key"):
        CrawlConfig.from_mapping({"timout": 3}, "crawl")
    cfg = CrawlConfig.from_mapping({"allow_cidrs": ["127.0.0.1/32"], "per_host_rps": None, "processes": 4,
                                    "per_host_connections": 2})
    assert cfg.allow_cidrs == ("127.0.0.1/32",) and CrawlConfig.from_mapping(cfg.to_dict()) == cfg
    assert cfg.per_process_connections() == 1 and cfg.per_process_rps() is None
    assert CrawlConfig(per_host_rps=5.0, processes=2).per_process_rps() == 2.5
    assert "clipline" in cfg.user_agent and cfg.contact_url in cfg.user_agent
    assert "noml" in cfg.disallowed_header_directives
