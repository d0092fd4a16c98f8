"""S3 test fixtures: moto's real S3 HTTP server on 127.0.0.1 and a fault-injecting proxy in front of it.

Import from conftest (``from tests.s3_fixtures import *``). ``s3_endpoint`` is session-scoped (moto starts once);
``s3_bucket`` gives each test a fresh, empty bucket URI ``s3://NAME``. ``faulty_s3_endpoint`` is a proxy that answers
every 10th request with a fault — 500 InternalError, 503 SlowDown, a dropped connection, or (for a GET) a body cut
off mid-stream — deterministically, so a test can show that retries give identical bytes.
"""
from __future__ import annotations

import http.client
import itertools
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

__all__ = ["s3_endpoint", "s3_bucket", "faulty_s3_endpoint", "FaultProxy", "start_moto", "make_bucket"]

_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_FAULT_KINDS = ("500", "slowdown", "drop", "truncate")


def start_moto():
    """Start moto's threaded S3 server on 127.0.0.1 (a free port); returns (server, endpoint_url)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def make_bucket(endpoint_url: str | None = None, name: str | None = None) -> str:
    """Create a fresh bucket through the storage layer's client; returns ``s3://NAME``."""
    from pipelines.core import storage

    name = name or f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client(endpoint_url).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto S3 server on 127.0.0.1; AWS_* env points boto3 at it (dummy credentials) for the whole session."""
    server, url = start_moto()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _DUMMY_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        yield url
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh empty bucket on the session's moto server, as ``s3://NAME``."""
    return make_bucket()


class FaultProxy:
    """HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and fails every ``every``-th request.

    Fault kinds rotate through 500 InternalError, 503 SlowDown, a connection dropped before any response, and a
    GET whose body stops half-way (the connection closes after half of the announced Content-Length). Non-GET
    requests that draw ``truncate`` are dropped instead, before reaching upstream, so no write is half-applied.
    """

    def __init__(self, upstream: str, every: int = 10, kinds: tuple[str, ...] = _FAULT_KINDS):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.every = every
        self.kinds = kinds
        self.requests = 0
        self.faults: dict[str, int] = {k: 0 for k in kinds}  # faults drawn, by kind
        self.effects: dict[str, int] = {}  # what was actually done: error status, dropped, truncated GET body
        self._lock = threading.Lock()
        self._kind_cycle = itertools.cycle(kinds)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.every:
                return None
            kind = next(self._kind_cycle)
            self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and answers "Expect: 100-continue" as botocore wants

            def log_message(self, *args):  # keep test output clean
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the blank line
                                t = self.rfile.readline()
                                raw += t
                                if t in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _effect(self, what: str) -> None:
                with proxy._lock:
                    proxy.effects[what] = proxy.effects.get(what, 0) + 1

            def _drop(self) -> None:
                self._effect("dropped")
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _send_error_xml(self, status: int, code: str) -> None:
                self._effect(code)
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected fault</Message><RequestId>fault</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                body = self._read_body()
                fault = proxy._next_fault()
                if fault == "500":
                    return self._send_error_xml(500, "InternalError")
                if fault == "slowdown":
                    return self._send_error_xml(503, "SlowDown")
                if fault == "drop" or (fault == "truncate" and self.command != "GET"):
                    return self._drop()
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                    conn.request(self.command, self.path, body=body if body else None, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() in ("transfer-encoding", "connection", "content-length", "date", "server"):
                            continue
                        self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                        self.end_headers()
                        return
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if fault == "truncate" and len(payload) > 1:
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                        self._effect("truncated")
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(payload)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler


@pytest.fixture
def faulty_s3_endpoint(s3_endpoint):
    """A FaultProxy in front of the session's moto server (every 10th request fails); yields the proxy."""
    proxy = FaultProxy(s3_endpoint, every=10).start()
    try:
        yield proxy
    finally:
        proxy.stop()

