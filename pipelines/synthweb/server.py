"""A real HTTP server for the synthetic web on 127.0.0.1, playing each route's failure mode (404, stalls, bombs...).

    with SynthWebServer("web/") as web:          # binds 127.0.0.1 on a free port
        web.materialise_url_list()               # raw/pairs.* now point at web.base_url
        ...crawl...
        web.hits["/s03/img/p000012.jpg"]         # requests seen per path (tests count re-downloads with it)

A second listener on ``private_host`` (127.0.0.2, still loopback) is the target of ``redirect_private`` routes; it
answers with a valid image, so a crawler that follows such a redirect visibly succeeds, and it counts its hits.
"""
from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pipelines.synthweb.generator import PRIVATE_REDIRECT_HOST, load_routes, materialise_url_list

_QUIET_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stalled handlers must not hold up shutdown
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a crawler with dozens of threads then sees SYNs dropped and
    # connect timeouts that no real web server would cause.
    request_queue_size = 256

    def handle_error(self, request, client_address):  # a client hanging up mid-drip is normal here
        import sys

        if not isinstance(sys.exc_info()[1], _QUIET_ERRORS):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "synthweb/1"
    web: "SynthWebServer"  # set on the per-server subclass

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def do_HEAD(self):
        self.do_GET()

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
              headers: dict | None = None, declared_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if declared_length is None else declared_length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _redirect(self, status: int, location: str) -> None:
        self._send(status, b"", headers={"Location": location})

    def do_GET(self):
        web = self.web
        parts = urlsplit(self.path)
        path, hop = parts.path, int((parse_qs(parts.query).get("hop") or ["0"])[0])
        web._count(path)
        if web.latency:
            time.sleep(web.latency)
        if path == "/robots.txt" and web.robots_txt is not None:
            return self._send(200, web.robots_txt.encode())
        route = web.routes.get(path)
        if route is None:
            return self._send(404, b"not found\n")
        mode = route["mode"]
        if mode == "http_404":
            return self._send(404, b"not found\n")
        if mode == "http_500":
            return self._send(500, b"internal server error\n")
        if mode == "flaky" and web._count_flaky(path) <= web.flaky_failures:
            return self._send(503, b"service unavailable, try again\n", headers={"Retry-After": "1"})
        if mode == "timeout":
            web._stop.wait(web.stall_seconds)  # say nothing until the client gives up (or the server stops)
            return
        if mode == "redirect" and hop < 2:
            return self._redirect(301 if hop == 0 else 302, f"{path}?hop={hop + 1}")
        if mode == "redirect_loop":
            return self._redirect(302, f"{path}?hop={hop + 1}")
        if mode == "redirect_private":
            host = route.get("private_host", PRIVATE_REDIRECT_HOST)
            return self._redirect(302, f"http://{host}:{web.private_port or 9}/latest/meta-data{path}")

        body = web._file(route["file"])
        ctype = route["content_type"]
        if mode == "truncated":
            # Promise the whole file, send half, hang up.
            return self._send(200, body[: len(body) // 2], ctype, declared_length=len(body))
        if mode == "slow_drip":
            return self._drip(body, ctype)
        headers = {}
        if mode == "opt_out_noai":
            headers["X-Robots-Tag"] = "noai"
        elif mode == "opt_out_noimageai":
            headers["X-Robots-Tag"] = "noimageai"
        return self._send(200, body, ctype, headers)

    def _drip(self, body: bytes, ctype: str) -> None:
        """Headers at once, then the body in small pieces spread over drip_seconds: each gap is shorter than any
        sane socket timeout, so only a total download deadline stops it."""
        web = self.web
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        steps = max(1, int(web.drip_seconds / web.drip_interval))
        piece = max(1, -(-len(body) // steps))
        for start in range(0, len(body), piece):
            if web._stop.wait(web.drip_interval):
                return
            self.wfile.write(body[start: start + piece])
            self.wfile.flush()


class _PrivateHandler(BaseHTTPRequestHandler):
    """Stands in for an internal service (a metadata endpoint): it must never be reached by a guarded crawler."""

    web: "SynthWebServer"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):
        self.web._count_private(self.path)
        body = self.web.private_body
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _private_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


class SynthWebServer:
    """Serve a generated synthetic web (``root`` = generate_web's out_dir) on a real socket; a context manager.

    stall_seconds: how long ``timeout`` routes stay silent; drip_seconds / drip_interval: how slowly ``slow_drip``
    routes send; flaky_failures: how many requests a ``flaky`` route fails (503) before it serves its image;
    latency: extra seconds before every answer (slows a crawl down, e.g. to interrupt it mid-way in a test).
    robots_txt: the body of /robots.txt (None: it answers 404, which crawlers read as "allow all").
    ``host`` may be any local address (127.0.0.10, ...): several servers of one web on several addresses make a
    web of several hosts; pass ``private_host=None`` to all but one.
    """

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 private_host: str | None = PRIVATE_REDIRECT_HOST, stall_seconds: float = 30.0,
                 drip_seconds: float = 30.0, drip_interval: float = 0.2, flaky_failures: int = 1,
                 latency: float = 0.0, robots_txt: str | None = None, poll_interval: float = 0.1):
        self.root = Path(root)
        self.routes = load_routes(self.root)
        self.host, self.port = host, port
        self.private_host = private_host
        self.stall_seconds, self.drip_seconds, self.drip_interval = stall_seconds, drip_seconds, drip_interval
        self.flaky_failures, self.latency = flaky_failures, latency
        self.robots_txt = robots_txt
        self.poll_interval = poll_interval  # how often serve_forever checks for shutdown (many servers: raise it)
        self.private_port: int | None = None
        self.private_body = _private_image()
        self._hits: Counter = Counter()
        self._private_hits: Counter = Counter()
        self._flaky: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._files: dict[str, bytes] = {}
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- state shared with handler threads -------------------------------------------------------------------
    def _count(self, key: str) -> int:
        with self._lock:
            self._hits[key] += 1
            return self._hits[key]

    def _count_flaky(self, path: str) -> int:
        with self._lock:  # not cleared by reset_hits: a flaky route stays healed for the server's lifetime
            self._flaky[path] += 1
            return self._flaky[path]

    def _count_private(self, path: str) -> None:
        with self._lock:
            self._private_hits[path] += 1

    def _file(self, rel: str) -> bytes:
        data = self._files.get(rel)
        if data is None:
            data = (self.root / rel).read_bytes()
            with self._lock:
                self._files[rel] = data
        return data

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if not self._servers:
            raise RuntimeError("SynthWebServer is not started (use it as a context manager or call start())")
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def hits(self) -> Counter:
        """Requests seen per URL path (redirect hops and retries included)."""
        with self._lock:
            return Counter(self._hits)

    @property
    def private_hits(self) -> Counter:
        with self._lock:
            return Counter(self._private_hits)

    def reset_flaky(self) -> None:
        """Flaky routes fail again as on a fresh web (each crawl under test meets the same web)."""
        self._flaky.clear()

    def reset_hits(self) -> None:
        with self._lock:
            self._hits.clear()
            self._private_hits.clear()

    def materialise_url_list(self) -> dict[str, Path]:
        """Rewrite root/raw/pairs.{parquet,tsv} with URLs on this server."""
        return materialise_url_list(self.root, self.base_url)

    def start(self) -> "SynthWebServer":
        if self._servers:
            return self
        self._stop.clear()
        handler = type("Handler", (_Handler,), {"web": self})
        main = _Server((self.host, self.port), handler)
        self.port = main.server_address[1]
        self._servers.append(main)
        if self.private_host:
            try:
                private = _Server((self.private_host, 0), type("PrivateHandler", (_PrivateHandler,), {"web": self}))
            except OSError:
                private = None  # no second loopback address here: redirects then point at a closed port
            if private is not None:
                self.private_port = private.server_address[1]
                self._servers.append(private)
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": self.poll_interval}, daemon=True,
                                 name=f"synthweb-{srv.server_address[0]}:{srv.server_address[1]}")
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

    def __enter__(self) -> "SynthWebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a synthetic web until interrupted (Ctrl-C), after pointing its URL list at this server."""
    with SynthWebServer(root, host=host, port=port) as web:
        web.materialise_url_list()
        print(f"serving {root} at {web.base_url} (private redirect target {web.private_host}:{web.private_port}); "
              f"URL list: {Path(root) / 'raw' / 'pairs.parquet'}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
