"""Failure modes of the synthetic web (which URLs misbehave, how, and the bytes the hostile ones serve), and a
multi-host hostile web for crawler tests (:class:`HostileWeb`)."""
from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

# Every failure mode the server can play, and the crawl reason a correct crawler must end the row with
# (None: the row must end with an image). "flaky" fails its first request(s) with 503 and then serves the image.
EXPECTED_CRAWL_REASON: dict[str, str | None] = {
    "ok": None,
    "redirect": None,  # 301 -> 302 -> image
    "flaky": None,  # 503 first, then the image: ends with an image after a retry or a re-crawl
    "http_404": "http_404",
    "http_500": "http_5xx",
    "timeout": "timeout_headers",  # no response headers within the client's timeout
    "slow_drip": "timeout_body",  # headers at once, then a trickle of bytes: only a total deadline stops it
    "truncated": "truncated",  # Content-Length larger than the body sent
    "corrupt": "decode_error",
    "not_image": "not_image",  # an HTML page served as text/html
    "redirect_loop": "redirect_error",
    "redirect_private": "blocked_private_address",  # 302 to http://127.0.0.2:PORT/...
    "bomb": "too_large",  # a valid PNG that declares 30000 x 30000 pixels
    "opt_out_noai": "opt_out",  # X-Robots-Tag: noai
    "opt_out_noimageai": "opt_out",  # X-Robots-Tag: noimageai
}
FAILURE_MODES: tuple[str, ...] = tuple(m for m in EXPECTED_CRAWL_REASON if m != "ok")

# Default share of URLs per failure mode: ~1.5% each, so about a fifth of a web misbehaves.
DEFAULT_FAILURE_RATE = 0.015

NOT_IMAGE_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Image moved</title></head>\n"
    b"<body><h1>Sorry!</h1><p>This image is only available to logged-in users.</p></body></html>\n"
)


def png_bomb(side: int = 30000) -> bytes:
    """A genuine decompression bomb: a valid 1-bit greyscale PNG of side x side black pixels.

    30000^2 = 9e8 pixels (2.7 GB decoded as RGB) from about 110 KB of zlib data: each row is a filter byte plus
    side/8 zero bytes, and zlib compresses runs of zeros about 1000:1.
    """
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    idat = b"".join(parts)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def corrupt_jpeg(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Keep the JPEG start-of-image marker and replace the rest by random bytes: sniffs as a JPEG, never decodes."""
    garbage = rng.integers(0, 256, size=max(len(jpeg) - 2, 64), dtype=np.uint8).tobytes()
    # No 0xFF bytes, so no stray marker can make a lenient decoder find a frame header.
    return jpeg[:2] + garbage.replace(b"\xff", b"\x00")


# ------------------------------------------------------------------------------------ a multi-host hostile web

DEFAULT_HOSTS = tuple(f"127.0.0.{i}" for i in range(10, 20))


def sample_jpeg(name: str, side: int = 96, noise: bool = False) -> bytes:
    """A small deterministic JPEG for ``name`` (``noise``: random pixels, so it stays tens of KB)."""
    from PIL import Image

    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    if noise:
        arr = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    else:
        base = rng.integers(0, 256, size=3)
        yy, xx = np.mgrid[0:side, 0:side]
        arr = np.stack([(base[i] + (xx * (i + 1) + yy * (3 - i)) * 2) % 256 for i in range(3)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class HostSpec:
    """How one host behaves as a whole (per-URL behaviour is in the path, see :class:`HostileWeb`).

    robots: robots.txt body (None: 404); robots_status: its status; robots_delay: seconds before answering it.
    throttle_first: the first N image requests get ``throttle_status`` (429) with ``Retry-After: retry_after``
    (None: no header). stall_all: every request but robots.txt stays silent until the server stops. latency:
    seconds before every answer.
    """

    robots: str | None = None
    robots_status: int = 200
    robots_delay: float = 0.0
    throttle_first: int = 0
    throttle_status: int = 429
    retry_after: str | None = None
    stall_all: bool = False
    latency: float = 0.0


@dataclass
class RequestRecord:
    host: str
    path: str
    start: float  # time.monotonic() when the request line was read
    end: float = 0.0
    status: int | None = None
    sock: object = field(default=None, repr=False, compare=False)  # the server side of the connection, while open


def _client_hung_up(sock) -> bool:
    """True when the client has closed its side of ``sock`` (FIN or RST waiting in the kernel): read without
    blocking, so it is the connection's state now, not when a handler thread next gets to run."""
    import socket

    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: the client still holds the connection
    except OSError:
        return True  # reset


class _HostServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def process_request(self, request, client_address):
        # When the connection was accepted: less scheduling jitter than when a handler thread gets to run.
        self.accepted[client_address] = time.monotonic()
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError,
                                              TimeoutError)):
            super().handle_error(request, client_address)


class _HostileHandler(BaseHTTPRequestHandler):
    web: "HostileWeb"
    host_addr: str
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds`` (or until the server stops); False as soon as the client hangs up, so that the
        host's concurrency is measured as the client holds its connections, not as abandoned handlers linger."""
        import select
        import socket

        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or self.web._stop.is_set():
                return not self.web._stop.is_set()
            readable, _, _ = select.select([self.connection], [], [], min(0.25, left))  # wakes at the FIN
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False

    def do_GET(self):  # noqa: C901 - one branch per behaviour
        web, host = self.web, self.host_addr
        spec = web.specs[host]
        rec = web._begin(host, self.path, self.server.accepted.pop(self.client_address, None), self.connection)
        try:
            if spec.latency and not self._wait(spec.latency):
                return
            if self.path == "/robots.txt":
                if spec.robots_delay and not self._wait(spec.robots_delay):
                    return
                if spec.robots is None:
                    return self._send(rec, 404, b"no robots here\n", "text/plain")
                return self._send(rec, spec.robots_status, spec.robots.encode(), "text/plain")
            if spec.stall_all:
                self._wait(web.stall_seconds)
                return
            if spec.throttle_first and web._count_image_request(host) <= spec.throttle_first:
                headers = {"Retry-After": spec.retry_after} if spec.retry_after is not None else {}
                return self._send(rec, spec.throttle_status, b"slow down\n", "text/plain", headers)
            parts = self.path.split("?")[0].strip("/").split("/")
            kind, args, name = parts[0], parts[1:-1], parts[-1]
            if kind == "ok":
                return self._send(rec, 200, web.image(name), "image/jpeg")
            if kind == "big":  # a noisy image of tens of KB
                return self._send(rec, 200, web.image(name, noise=True), "image/jpeg")
            if kind == "status":
                return self._send(rec, int(args[0]), b"status\n", "text/plain")
            if kind == "xrobots":  # /xrobots/<directive>/NAME.jpg: the image with X-Robots-Tag: <directive>
                return self._send(rec, 200, web.image(name), "image/jpeg", {"X-Robots-Tag": args[0]})
            if kind == "slow_headers":
                if not self._wait(float(args[0])):
                    return
                return self._send(rec, 200, web.image(name), "image/jpeg")
            if kind == "stall":
                self._wait(web.stall_seconds)
                return
            if kind == "drip":  # headers now, then the body spread over args[0] seconds
                body = web.image(name, noise=len(args) > 1 and args[1] == "big")
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                rec.status = 200
                steps = max(1, int(float(args[0]) / 0.1))
                piece = max(1, -(-len(body) // steps))
                for start in range(0, len(body), piece):
                    if not self._wait(0.1):
                        return
                    if start + piece >= len(body):
                        web._end(rec)
                    self.wfile.write(body[start:start + piece])
                    self.wfile.flush()
                return
            if kind == "redirect":  # /redirect/<hops>/<delay>/<name>: each hop waits <delay> s
                hops, delay = int(args[0]), float(args[1])
                if delay and not self._wait(delay):
                    return
                target = f"/ok/{name}" if hops <= 1 else f"/redirect/{hops - 1}/{args[1]}/{name}"
                return self._send(rec, 302, b"", "text/plain", {"Location": target})
            return self._send(rec, 404, b"not found\n", "text/plain")
        finally:
            web._end(rec)

    def _send(self, rec, status, body, ctype, headers=None):
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # The request ends (for the concurrency count) before its last bytes go out: the client cannot have read
        # the whole answer, and started its next request, before this point.
        self.web._end(rec)
        self.end_headers()
        self.wfile.write(body)


class HostileWeb:
    """Real HTTP servers on several loopback addresses (default 127.0.0.10-.19), each its own host, that measure
    what a crawler does to them. URLs say how they behave::

        /ok/NAME.jpg                    a small image          /big/NAME.jpg       a noisy ~20-30 KB image
        /slow_headers/S/NAME.jpg        S seconds of silence, then the image
        /stall/NAME.jpg                 silence until the server stops
        /drip/S/NAME.jpg                headers at once, then the (< 64 KB) body spread over S seconds
        /redirect/N/D/NAME.jpg          N redirects, each after D seconds, then the image
        /status/CODE/NAME.jpg           that status
        /xrobots/DIRECTIVE/NAME.jpg     the image, with X-Robots-Tag: DIRECTIVE

    Per host (:class:`HostSpec`): robots.txt, throttling with Retry-After, stalling everything, latency. Measured
    per host: every request (path, start, end, status) and the most requests it served at once.
    """

    def __init__(self, hosts=DEFAULT_HOSTS, specs: dict[str, HostSpec] | None = None, stall_seconds: float = 60.0):
        self.hosts = tuple(hosts)
        self.specs = {h: (specs or {}).get(h, HostSpec()) for h in self.hosts}
        self.stall_seconds = stall_seconds
        self.ports: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._records: list[RequestRecord] = []
        self._active: dict[str, int] = defaultdict(int)
        self._open: dict[str, list[RequestRecord]] = defaultdict(list)
        self._max_active: dict[str, int] = defaultdict(int)
        self._image_requests: dict[str, int] = defaultdict(int)
        self._images: dict[tuple[str, bool], bytes] = {}
        self._servers: list[_HostServer] = []
        self._threads: list[threading.Thread] = []

    # -- bookkeeping shared with handler threads
    def _begin(self, host: str, path: str, accepted: float | None = None, sock=None) -> RequestRecord:
        rec = RequestRecord(host, path, accepted or time.monotonic(), sock=sock)
        with self._lock:
            # A request whose client has hung up has ended even if its handler thread has not run since (a busy
            # machine can delay it past the client's next connection): end those first, so the concurrency count
            # is the connections the client holds.
            for other in [r for r in self._open[host] if r.sock is not None and _client_hung_up(r.sock)]:
                self._end_locked(other)
            self._records.append(rec)
            self._open[host].append(rec)
            self._active[host] += 1
            self._max_active[host] = max(self._max_active[host], self._active[host])
        return rec

    def _end_locked(self, rec: RequestRecord) -> None:
        if rec.end:
            return
        rec.end = time.monotonic()
        rec.sock = None
        self._active[rec.host] -= 1
        self._open[rec.host].remove(rec)

    def _end(self, rec: RequestRecord) -> None:
        with self._lock:
            self._end_locked(rec)

    def _count_image_request(self, host: str) -> int:
        with self._lock:
            self._image_requests[host] += 1
            return self._image_requests[host]

    def image(self, name: str, noise: bool = False) -> bytes:
        key = (name, noise)
        with self._lock:
            data = self._images.get(key)
        if data is None:
            data = sample_jpeg(name, side=180 if noise else 96, noise=noise)
            with self._lock:
                self._images[key] = data
        return data

    # -- what tests read
    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.ports[host]}{path}"

    def records(self, host: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self._records if host is None or r.host == host]

    def max_concurrent(self, host: str) -> int:
        with self._lock:
            return self._max_active[host]

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._max_active.clear()
            self._image_requests.clear()

    # -- life cycle
    def start(self) -> "HostileWeb":
        self._stop.clear()
        for host in self.hosts:
            handler = type("Handler", (_HostileHandler,), {"web": self, "host_addr": host})
            srv = _HostServer((host, 0), handler)
            srv.accepted = {}
            self.ports[host] = srv.server_address[1]
            self._servers.append(srv)
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                 name=f"hostile-{host}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HostileWeb":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
