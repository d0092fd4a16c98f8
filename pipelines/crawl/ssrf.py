"""SSRF guard for crawling: a urllib opener that only reaches public http(s) addresses, checked at connect time.

Why at connect time: a URL's host can be a name that resolves to 10.0.0.5, a redirect can point at
http://169.254.169.254/ (a cloud metadata service), and DNS can answer differently on a second lookup (rebinding).
So every connection, including each redirect hop, resolves its host once, checks every resolved address, and
connects only to an address it checked. Requests never go through environment proxies (the guard would check the
proxy instead of the target). Only http and https are opened; any other scheme (file:, ftp:, data:) is refused.

Beyond the address check the opener bounds what one download may cost: a byte cap, a refusal of non-image content
types, and a total deadline that truly bounds wall time. The deadline is set when ``open()`` starts and travels
with every socket the download opens (each redirect hop): before each connect, send and read the socket's timeout
is set to ``min(timeout, time left)``, reads are at most 16 KiB, and an operation at or past the deadline raises at
once, after which the response is closed. So a server that trickles one byte per second, stalls before its
headers, or redirects forever costs at most ``max_seconds`` (plus one scheduler tick), whatever it does. DNS
resolution, which no socket timeout bounds, runs on a helper thread that is waited for at most the time left.
Failures carry their reason: ``timeout_headers`` (no final response headers in time) or ``timeout_body``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
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


READ_PIECE = 16 * 1024  # the most one socket read asks for: a deadline is checked at least this often


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
            except (ValueError, TypeError) as exc:
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



# ------------------------------------------------------------------------------------------------------ deadlines

_scope = threading.local()


def current_deadline() -> float | None:
    """The ``time.monotonic()`` deadline of the download running in this thread, if any."""
    return getattr(_scope, "deadline", None)


@contextlib.contextmanager
def deadline_scope(deadline: float | None):
    """Within this block, sockets this thread opens carry ``deadline`` (the earlier one wins when nested)."""
    previous = current_deadline()
    if previous is not None and (deadline is None or previous < deadline):
        deadline = previous
    _scope.deadline = deadline
    try:
        yield deadline
    finally:
        _scope.deadline = previous


class DeadlineExceeded(TimeoutError):
    """A socket operation started at or after its download's deadline."""


def _bounded_timeout(op_timeout: float | None, deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return op_timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"total download deadline reached before {what}")
    return left if op_timeout is None else min(op_timeout, left)


class _DeadlineMixin:
    """Arms the socket's timeout with min(per-operation timeout, time left) before every send and read."""

    _clipline_deadline: float | None = None
    _clipline_op_timeout: float | None = None

    def _arm(self, what: str) -> None:
        if self._clipline_deadline is not None:
            self.settimeout(_bounded_timeout(self._clipline_op_timeout, self._clipline_deadline, what))

    def recv_into(self, buffer, nbytes=0, flags=0):
        self._arm("a read")
        size = nbytes or memoryview(buffer).nbytes
        return super().recv_into(buffer, min(size, READ_PIECE), flags)

    def recv(self, bufsize=READ_PIECE, flags=0):
        self._arm("a read")
        return super().recv(min(bufsize, READ_PIECE), flags)

    def send(self, data, flags=0):
        self._arm("a write")
        return super().send(data, flags)

    def sendall(self, data, flags=0):
        # One bounded send at a time, so a server that stops reading cannot hold us past the deadline.
        with memoryview(data) as view, view.cast("B") as flat:
            sent = 0
            while sent < len(flat):
                sent += self.send(flat[sent:], flags)


class DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    @classmethod
    def _create(cls, sock, *args, **kwargs):
        # The handshake runs inside _create, bounded (as a whole, by CPython) by the timeout sock has now.
        deadline, op = getattr(sock, "_clipline_deadline", None), getattr(sock, "_clipline_op_timeout", None)
        sock.settimeout(_bounded_timeout(op, deadline, "the TLS handshake"))
        self = super()._create(sock, *args, **kwargs)
        self._clipline_deadline, self._clipline_op_timeout = deadline, op
        return self


# ------------------------------------------------------------------------------------------------------------ DNS

_dns_pool: concurrent.futures.ThreadPoolExecutor | None = None
_dns_pool_lock = threading.Lock()


def _resolver_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _dns_pool
    with _dns_pool_lock:
        if _dns_pool is None:
            _dns_pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="clipline-dns")
        return _dns_pool


def _is_ip_literal(host: str) -> bool:
    try:
        _ip(host.strip("[]"))
        return True
    except ValueError:
        return False


class DnsCache:
    """getaddrinfo answers per (host, port), kept for at most ``ttl`` seconds (failures for at most 60 s).

    The system resolver does not report record TTLs, so ``ttl`` is an upper bound chosen by the crawl. One lookup
    per host at a time (others wait for it). Addresses are still checked against the policy on every connection.
    """

    def __init__(self, ttl: float = 300.0, negative_ttl: float = 60.0):
        self.ttl, self.negative_ttl = float(ttl), float(min(negative_ttl, ttl))
        # Re-entrant: a lookup that finishes at once runs its done-callback (which stores the answer under this
        # lock) in the thread that is still holding it.
        self._lock = threading.RLock()
        self._entries: dict[tuple[str, int], tuple[float, object]] = {}
        self._pending: dict[tuple[str, int], concurrent.futures.Future] = {}
        self.lookups = 0  # resolutions actually made (tests count them)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def resolve(self, host: str, port: int, timeout: float | None) -> list[tuple]:
        key = (host, int(port))
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                return _answer(entry[1])
            future = self._pending.get(key)
            if future is None:
                self.lookups += 1
                future = _resolver_pool().submit(_getaddrinfo, host, port)
                self._pending[key] = future
                future.add_done_callback(lambda f, key=key: self._store(key, f))
        try:
            return _answer(future.result(timeout=timeout))
        except concurrent.futures.TimeoutError:
            raise FetchRefused("timeout_headers", f"resolving {host!r} took longer than {timeout:.3g} s") from None

    def _store(self, key, future) -> None:
        value = future.result()
        ttl = self.negative_ttl if isinstance(value, FetchRefused) else self.ttl
        with self._lock:
            self._pending.pop(key, None)
            if ttl > 0:
                self._entries[key] = (time.monotonic() + ttl, value)


def _getaddrinfo(host: str, port: int):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return FetchRefused("dns_error", f"cannot resolve {host!r} ({exc})")
    if not infos:
        return FetchRefused("dns_error", f"{host!r} resolves to no address")
    return infos


def _answer(value):
    if isinstance(value, FetchRefused):
        raise FetchRefused(value.reason, str(value).split(": ", 1)[-1])
    return value


_NO_CACHE = DnsCache(ttl=0.0)


def resolve_checked(host: str, port: int, policy: AddressPolicy, *, resolver: DnsCache | None = None,
                    timeout: float | None = None) -> list[tuple]:
    """Resolve ``host`` (through ``resolver``'s cache) and return its getaddrinfo entries if every resolved
    address is allowed.

    One blocked address blocks the host: a name with both a public and a private record is a classic rebinding
    set-up, and which record a connection would use is not ours to predict.
    """
    if _is_ip_literal(host):
        infos = _answer(_getaddrinfo(host, port))
    else:
        infos = (resolver or _NO_CACHE).resolve(host, port, timeout)
    for info in infos:
        addr = info[4][0]
        why = policy.check(addr)
        if why is not None:
            shown = host if host == addr else f"{host} resolves to {addr}"
            raise FetchRefused("blocked_private_address",
                               f"{shown} is {why}, not in allow_cidrs {list(policy.allow_cidrs)}")
    return infos


def guarded_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                              policy: AddressPolicy, resolver: DnsCache | None = None):
    """Drop-in for socket.create_connection that connects only to addresses ``policy`` allows, and returns a
    socket that carries this thread's download deadline."""
    host, port = address
    op_timeout = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout
    deadline = current_deadline()
    try:
        infos = resolve_checked(host, port, policy, resolver=resolver,
                                timeout=_bounded_timeout(op_timeout, deadline, "resolving the host"))
    except DeadlineExceeded as exc:
        raise FetchRefused("timeout_headers", str(exc)) from None
    last_error: OSError | None = None
    for family, socktype, proto, _canon, sockaddr in infos:
        sock = DeadlineSocket(family, socktype, proto)
        sock._clipline_deadline, sock._clipline_op_timeout = deadline, op_timeout
        try:
            sock.settimeout(_bounded_timeout(op_timeout, deadline, "connecting"))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)  # the checked address itself, never the name again
            return sock
        except TimeoutError as exc:
            sock.close()
            last_error = FetchRefused("timeout_headers", f"connecting to {host}:{port} timed out ({exc})")
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error if last_error else OSError(f"cannot connect to {host}:{port}")


def _guarded(base: type, policy: AddressPolicy, resolver: DnsCache | None) -> type:
    class Guarded(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # http.client keeps this hook per instance precisely so it can be replaced.
            self._create_connection = lambda addr, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, src=None: \
                guarded_create_connection(addr, timeout, src, policy=policy, resolver=resolver)

        def getresponse(self):
            try:
                return super().getresponse()
            except TimeoutError as exc:  # the status line and headers did not come in time
                self.close()
                raise FetchRefused("timeout_headers", f"no response headers in time ({exc})") from None

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy, resolver: DnsCache | None):
        super().__init__()
        self._conn = _guarded(http.client.HTTPConnection, policy, resolver)

    def http_open(self, req):
        return self.do_open(self._conn, req)


def deadline_ssl_context() -> ssl.SSLContext:
    """The default verifying TLS context, with sockets that honour the download deadline."""
    context = ssl.create_default_context()
    context.sslsocket_class = DeadlineSSLSocket
    return context


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy, resolver: DnsCache | None, context=None):
        super().__init__(context=context or deadline_ssl_context())
        self._conn = _guarded(http.client.HTTPSConnection, policy, resolver)

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
    """Runs on final 2xx responses (after redirects): refuses non-image content types (unless ``images_only`` is
    off) and caps the body's size; body reads that time out end as ``timeout_body``."""

    handler_order = 2000  # after HTTPErrorProcessor (1000), so redirects and errors are already handled

    def __init__(self, max_bytes: int | None, images_only: bool = True):
        self.max_bytes, self.images_only = max_bytes, images_only

    def http_response(self, req, response):
        if getattr(response, "_clipline_bounded", False):
            return response  # a redirect's final response passes through this processor once per hop
        response._clipline_bounded = True
        ctype = (response.headers.get("Content-Type") or "").lower()
        if self.images_only and ctype.startswith(_NOT_IMAGE_TYPES):
            response.close()
            raise FetchRefused("not_image", f"Content-Type {ctype!r} is not an image")
        length = response.headers.get("Content-Length")
        if self.max_bytes is not None and length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise FetchRefused("too_large", f"Content-Length {length} exceeds the {self.max_bytes}-byte cap")
        response.read = _bounded_read(response, self.max_bytes, current_deadline())
        return response

    https_response = http_response


def _bounded_read(response, max_bytes: int | None, deadline: float | None):
    """A replacement for ``response.read`` that enforces the byte cap and the deadline, and names timeouts."""
    raw_read = response.read

    received = 0

    def read_piece(amt: int) -> bytes:
        nonlocal received
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("total download deadline reached")
            piece = raw_read(amt)
        except TimeoutError as exc:
            response.close()  # closes the connection now, at the deadline
            raise FetchRefused("timeout_body", f"body not complete in time ({exc}; {received} bytes read)") \
                from None
        received += len(piece)
        if max_bytes is not None and received > max_bytes:
            response.close()
            raise FetchRefused("too_large", f"body exceeds the {max_bytes}-byte cap")
        return piece

    def read(amt: int | None = None) -> bytes:
        chunks, n = [], 0
        while amt is None or n < amt:
            chunk = read_piece(READ_PIECE if amt is None else min(READ_PIECE, amt - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        data = b"".join(chunks)
        if amt is not None:
            return data
        # read(amt) reports a short body as a plain EOF; a Content-Length not met is a truncated download.
        remaining = getattr(response, "length", None)
        if remaining:
            raise http.client.IncompleteRead(data, remaining)
        return data

    return read


class GuardedOpener(urllib.request.OpenerDirector):
    """An OpenerDirector whose ``open`` starts a download deadline of ``max_seconds`` (redirects included); the
    deadline stays with the response's socket for the body reads that follow."""

    max_seconds: float | None = None

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        deadline = None if self.max_seconds is None else time.monotonic() + self.max_seconds
        with deadline_scope(deadline):
            return super().open(fullurl, data, timeout)


def build_guarded_opener(policy: AddressPolicy, *, max_bytes: int | None = None, max_seconds: float | None = None,
                         resolver: DnsCache | None = None, images_only: bool = True) -> GuardedOpener:
    """An opener with only the guarded http/https handlers (no proxies, no file:/ftp:/data:), a byte cap, a
    total deadline per ``open`` + read, and (with ``resolver``) cached DNS answers."""
    opener = GuardedOpener()
    opener.max_seconds = max_seconds
    for handler in (
        _GuardedHTTPHandler(policy, resolver),
        _GuardedHTTPSHandler(policy, resolver),
        _RedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _BoundedResponse(max_bytes, images_only),
        _OnlyHTTP(),
    ):
        opener.add_handler(handler)
    return opener
