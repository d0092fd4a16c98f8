"""SSRF guard for crawling: a urllib opener that only reaches public http(s) addresses, checked at connect time.

Why at connect time: a URL's host can be a name that resolves to 10.0.0.5, a redirect can point at
http://169.254.169.254/ (a cloud metadata service), and DNS can answer differently on a second lookup (rebinding).
So every connection, including each redirect hop, resolves its host once, checks every resolved address, and
connects only to an address it checked. Requests never go through environment proxies (the guard would check the
proxy instead of the target). Only http and https are opened; any other scheme (file:, ftp:, data:) is refused.

Beyond the address check the opener bounds what one download may cost: a byte cap, a total deadline (a server
that trickles one byte per second never trips a socket timeout), and a refusal of non-image content types.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance-metadata services. They stay blocked even inside an allowed range unless the allow-list names the
# exact address (/32 or /128): allowing "169.254.0.0/16" for a lab network should not also hand out credentials.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IPv6 metadata
        "fd00:ec2::23",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Error messages start with "clipline:<reason>:" so that crawl results can map them back to a reason exactly,
# after img2dataset has turned the exception into a string.
REASON_PREFIX = "clipline:"


class FetchRefused(OSError):
    """A request the guard refuses; ``reason`` is the normalised crawl reason (blocked_private_address, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{REASON_PREFIX}{reason}: {detail}")
        self.reason = reason


def _ip(value: str) -> IPAddress:
    return ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ::ffff:a.b.c.d, 6to4, NAT64), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``"loopback"``, ``"private"``, ...), or None when it is."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        cat = address_category(inner)
        return f"{cat} (embedded in {ip})" if cat else None
    if ip in METADATA_ADDRESSES:
        return "cloud-metadata"
    for name in ("is_loopback", "is_link_local", "is_multicast", "is_unspecified", "is_reserved", "is_private"):
        if getattr(ip, name):
            return name[3:].replace("_", "-")
    if not ip.is_global:  # shared address space 100.64/10, benchmarking, documentation ranges...
        return "non-global"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a crawl may connect to: public unicast ones, plus exactly the ``allow_cidrs`` ranges."""

    allow_cidrs: tuple[str, ...] = ()

    def __post_init__(self):
        nets = []
        for cidr in self.allow_cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise ValueError(f"allow_cidrs: {cidr!r} is not an IP network in CIDR form ({exc})") from None
        object.__setattr__(self, "_networks", tuple(nets))

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks  # type: ignore[attr-defined]

    def _allowed_by_list(self, ip: IPAddress) -> bool:
        for net in self.networks:
            if ip.version == net.version and ip in net:
                if ip in METADATA_ADDRESSES and net.num_addresses > 1:
                    continue  # metadata services need an exact /32 or /128 entry
                return True
        return False

    def check(self, ip: IPAddress | str) -> str | None:
        """None when a connection to ``ip`` is allowed, else the category that blocks it."""
        ip = _ip(ip) if isinstance(ip, str) else ip
        if self._allowed_by_list(ip):
            return None
        inner = _embedded_ipv4(ip)
        if inner is not None and self._allowed_by_list(inner):
            return None
        return address_category(ip)


def resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[tuple]:
    """Resolve ``host`` and return its getaddrinfo entries if every resolved address is allowed.

    One blocked address blocks the host: a name with both a public and a private record is a classic rebinding
    set-up, and which record a connection would use is not ours to predict.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchRefused("dns_error", f"cannot resolve {host!r} ({exc})") from None
    if not infos:
        raise FetchRefused("dns_error", f"{host!r} resolves to no address")
    for info in infos:
        addr = info[4][0]
        why = policy.check(addr)
        if why is not None:
            shown = host if host == addr else f"{host} resolves to {addr}"
            raise FetchRefused("blocked_private_address", f"{shown} is {why}, not in allow_cidrs {list(policy.allow_cidrs)}")
    return infos


def guarded_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                              policy: AddressPolicy):
    """Drop-in for socket.create_connection that connects only to addresses ``policy`` allows."""
    host, port = address
    last_error: OSError | None = None
    for family, socktype, proto, _canon, sockaddr in resolve_checked(host, port, policy):
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)  # the checked address itself, never the name again
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error if last_error else OSError(f"cannot connect to {host}:{port}")


def _guarded(base: type, policy: AddressPolicy) -> type:
    class Guarded(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # http.client keeps this hook per instance precisely so it can be replaced.
            self._create_connection = lambda addr, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, src=None: \
                guarded_create_connection(addr, timeout, src, policy=policy)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self._conn = _guarded(http.client.HTTPConnection, policy)

    def http_open(self, req):
        return self.do_open(self._conn, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy, context=None):
        super().__init__(context=context)
        self._conn = _guarded(http.client.HTTPSConnection, policy)

    def https_open(self, req):
        return self.do_open(self._conn, req, context=self._context)


class _OnlyHTTP(urllib.request.BaseHandler):
    """Refuses every scheme no other handler opened (file:, ftp:, data: ...): the opener has no handler for them."""

    handler_order = 10000

    def unknown_open(self, req):
        raise FetchRefused("unsupported_scheme", f"scheme {req.type!r} is not allowed (only http and https)")


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = newurl.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise FetchRefused("redirect_error", f"redirect to scheme {scheme!r} refused: {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# Content types that are certainly not an image; anything else (image/*, octet-stream, missing) is decoded and
# judged by the decoder.
_NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript")


class _BoundedResponse(urllib.request.BaseHandler):
    """Runs on final 2xx responses (after redirects): refuses non-image content types and caps the body's size
    and total download time."""

    handler_order = 2000  # after HTTPErrorProcessor (1000), so redirects and errors are already handled

    def __init__(self, max_bytes: int | None, max_seconds: float | None):
        self.max_bytes, self.max_seconds = max_bytes, max_seconds

    def http_response(self, req, response):
        if getattr(response, "_clipline_bounded", False):
            return response  # a redirect's final response passes through this processor once per hop
        response._clipline_bounded = True
        ctype = (response.headers.get("Content-Type") or "").lower()
        if ctype.startswith(_NOT_IMAGE_TYPES):
            response.close()
            raise FetchRefused("not_image", f"Content-Type {ctype!r} is not an image")
        length = response.headers.get("Content-Length")
        if self.max_bytes is not None and length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise FetchRefused("too_large", f"Content-Length {length} exceeds the {self.max_bytes}-byte cap")
        response.read = _bounded_read(response, self.max_bytes, self.max_seconds)
        return response

    https_response = http_response


def _bounded_read(response, max_bytes: int | None, max_seconds: float | None):
    """A replacement for ``response.read`` that enforces the byte cap and the total deadline on every call."""
    raw_read = response.read
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    received = 0

    def read_piece(amt: int) -> bytes:
        nonlocal received
        if deadline is not None and time.monotonic() > deadline:
            raise FetchRefused("timeout", f"body not complete after {max_seconds:g} s (total download deadline)")
        piece = raw_read(amt)
        received += len(piece)
        if max_bytes is not None and received > max_bytes:
            raise FetchRefused("too_large", f"body exceeds the {max_bytes}-byte cap")
        return piece

    def read(amt: int | None = None) -> bytes:
        if amt is not None:
            return read_piece(amt)
        chunks = []
        while chunk := read_piece(65536):
            chunks.append(chunk)
        data = b"".join(chunks)
        # read(amt) reports a short body as a plain EOF; a Content-Length not met is a truncated download.
        remaining = getattr(response, "length", None)
        if remaining:
            raise http.client.IncompleteRead(data, remaining)
        return data

    return read


def build_guarded_opener(policy: AddressPolicy, *, max_bytes: int | None = None,
                         max_seconds: float | None = None) -> urllib.request.OpenerDirector:
    """An OpenerDirector with only the guarded http/https handlers (no proxies, no file:/ftp:/data:)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _RedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _BoundedResponse(max_bytes, max_seconds),
        _OnlyHTTP(),
    ):
        opener.add_handler(handler)
    return opener
