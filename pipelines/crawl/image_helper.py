"""Image helper processes: each crawl worker process hands its downloaded bodies to ``image_processes`` helper
processes that resize / re-encode them (img2dataset's Resizer) and hash the published image
(:func:`pipelines.crawl.processing.process_body`), and gets back the published bytes and columns.

Why a process and not the download threads: a crawl worker is one Python process whose 32 download threads share
one GIL. Decoding, resizing and hashing an image are many short C calls (0.05-0.2 ms each for a web thumbnail);
each releases the GIL and must win it back from the download threads, so in threads they run barely faster than
in one thread (measured: 2 threads hash 0.54 ms/image, 1 thread 0.47) and slow the downloads down with them. A
helper process has its own GIL: the crawl process keeps to the network, the helper to the pixels, on another core.

Protocol (one ``socketpair`` per helper, :class:`multiprocessing.connection.Connection` framing): the parent sends
the pickled :class:`~pipelines.crawl.processing.ProcessingSettings` once, then ``seq (8 bytes) + body`` per image;
the helper says ``READY`` once its imports are done (until then, ~0.5-1 s, the download threads process images
themselves), then answers ``seq + its CPU seconds so far (8 bytes) + pickle(Processed)`` in order (the CPU goes to
the shard's stats as ``helper_cpu_s``: a helper is not a child the crawl's caller waits for, so its CPU would
not show in the caller's resource usage). A download thread hands its body over and goes on downloading; a
reader thread per helper passes each answer to the image's callback (which queues the row for the shard writer).
Memory stays bounded: a body is sent at once (a download thread waits while the socket is full) and kept only
until its answer. The helper exits when its socket closes (the crawl process ended or was killed). When a helper
dies (a decoder crash on a hostile image, a kill) or gives no answer for ``ANSWER_TIMEOUT_S`` while it has images,
its pending images are sent again to a fresh helper; an image pending at two helper deaths is refused as
``decode_error``. When no helper can be started, the images are processed in the download threads (the same
function, the same output).

    python -m pipelines.crawl.image_helper FD      # the helper side; started by ImageHelperPool only
"""
from __future__ import annotations

import itertools
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from pipelines.crawl.processing import Processed, ProcessingSettings, process_body
from pipelines.crawl.ssrf import REASON_PREFIX

SEQ_BYTES = 8
CPU_BYTES = 8
READY = (1 << 64) - 1  # the seq of the helper's first message: imports done
ANSWER_TIMEOUT_S = 300.0  # an image no helper answers within this is taken as stuck (the helper is killed)
MAX_RESTARTS = 8  # helper starts after the first ones, per pool: beyond this the pool falls back to threads
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the ``pipelines`` package


class HelperUnavailable(RuntimeError):
    """No helper process can take the image: the caller processes it itself."""


class _HelperDied(RuntimeError):
    """The helper that had the image exited before answering."""


class _Failure:
    """An exception raised by process_body in the helper, sent back to be raised in the download thread (as it
    would have been raised there without a helper)."""

    def __init__(self, message: str):
        self.message = message


class _Pending:
    """An image handed to the helpers: its body (kept until answered, to be sent again if its helper dies) and the
    callback that gets the answer."""

    __slots__ = ("seq", "data", "done", "deaths")

    def __init__(self, seq: int, data: bytes, done: Callable[[Processed | Exception], None]):
        self.seq, self.data, self.done, self.deaths = seq, data, done, 0


class _Helper:
    """One helper process and the thread that reads its answers (and calls the images' callbacks)."""

    def __init__(self, setup: bytes, name: str, on_death: Callable[[_Pending, str], None]):
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI for news on import
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.crawl.image_helper", str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        # The socket object is kept for shutdown(): closing a descriptor does not wake the reader thread blocked
        # on it (and the helper would not see its end of input); shutting the socket down does both.
        self.sock = parent
        self.conn = Connection(os.dup(parent.fileno()))
        self.on_death = on_death
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.pending: dict[int, _Pending] = {}
        self.alive = True
        self.ready = False
        self.cpu_s = 0.0  # the helper's CPU seconds at its last message
        self.conn.send_bytes(setup)
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"{name}-reader")
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                if not self.conn.poll(ANSWER_TIMEOUT_S):
                    if self.pending:  # images waiting and no answer for that long: the helper is stuck
                        print(f"clipline: image helper process {self.proc.pid} gave no answer in "
                              f"{ANSWER_TIMEOUT_S:g} s; killing it", flush=True)
                        self.proc.kill()
                        break
                    continue
                msg = self.conn.recv_bytes()
                seq = int.from_bytes(msg[:SEQ_BYTES], "big")
                self.cpu_s = struct.unpack("<d", msg[SEQ_BYTES:SEQ_BYTES + CPU_BYTES])[0]
                if seq == READY:
                    self.ready = True
                    continue
                with self.lock:
                    item = self.pending.pop(seq, None)
                if item is not None:
                    out = pickle.loads(msg[SEQ_BYTES + CPU_BYTES:])
                    item.done(RuntimeError(out.message) if isinstance(out, _Failure) else out)
        except (EOFError, OSError):
            pass
        with self.lock:
            self.alive = False
            pending, self.pending = self.pending, {}
        try:
            self.proc.wait(timeout=5)  # reaped here: its CPU then counts for the crawl process's children
        except subprocess.TimeoutExpired:
            pass
        why = f"helper process {self.proc.pid} exited (rc {self.proc.poll()})"
        for item in sorted(pending.values(), key=lambda i: i.seq):
            self.on_death(item, why)
        self._shutdown()
        try:
            self.conn.close()
        except OSError:
            pass

    def submit(self, item: _Pending) -> None:
        """Send ``item`` to this helper; :class:`_HelperDied` if it is gone (then nothing was registered)."""
        with self.lock:
            if not self.alive:
                raise _HelperDied(f"helper process {self.proc.pid} is gone")
            self.pending[item.seq] = item
        try:
            with self.send_lock:
                self.conn.send_bytes(item.seq.to_bytes(SEQ_BYTES, "big") + item.data)
        except OSError:  # the helper died: the reader thread hands its pending images (this one too) back
            self.kill()

    def load(self) -> int:
        return len(self.pending)

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self._shutdown()

    def close(self) -> None:
        """End the helper's input (it exits), wait for it and for the reader thread."""
        self._shutdown()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)


class ImageHelperPool:
    """``n`` helper processes for one crawl process; the download threads :meth:`submit` their bodies and go on
    downloading, the answers come back through callbacks (from the helpers' reader threads)."""

    def __init__(self, settings: ProcessingSettings, n: int, name: str = "image-helper"):
        if n < 1:
            raise ValueError(f"ImageHelperPool needs at least one process, got {n}")
        self.settings = settings
        self.setup = pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
        self.name = name
        self.n = n
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.helpers: list[_Helper] = []
        self.dead_cpu_s = 0.0  # CPU of helpers that are gone
        self.starts = 0
        self.deaths = 0
        self.failed_start: str | None = None
        for _ in range(n):
            self._start()

    def _start(self) -> None:
        """Start one helper (under ``self.lock`` or before the pool is shared)."""
        if self.starts >= self.n + MAX_RESTARTS:
            return
        self.starts += 1
        try:
            self.helpers.append(_Helper(self.setup, f"{self.name}-{self.starts}", self._helper_died))
        except OSError as exc:
            self.failed_start = f"{type(exc).__name__}: {exc}"
            print(f"clipline: could not start an image helper process ({self.failed_start}); images are "
                  f"processed in the download threads", flush=True)

    def _pick(self, wait: bool = False, timeout: float = 120.0) -> _Helper:
        """The ready helper with the fewest pending images; dead helpers are replaced here. Without ``wait``,
        :class:`HelperUnavailable` when none is ready yet; with it, only when none can start within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for h in [h for h in self.helpers if not h.alive]:
                    self.helpers.remove(h)
                    self.deaths += 1
                    self.dead_cpu_s += h.cpu_s
                    print(f"clipline: image helper process {h.proc.pid} exited (rc {h.proc.poll()}); starting "
                          f"another", flush=True)
                while len(self.helpers) < self.n and self.starts < self.n + MAX_RESTARTS \
                        and self.failed_start is None:
                    self._start()
                ready = [h for h in self.helpers if h.ready and h.alive]
                if ready:
                    return min(ready, key=_Helper.load)
                if not self.helpers:
                    raise HelperUnavailable(self.failed_start or "image helper processes keep exiting")
            if not wait or time.monotonic() > deadline:
                raise HelperUnavailable("image helper processes are starting")
            time.sleep(0.01)

    def submit(self, data: bytes, done: Callable[[Processed | Exception], None]) -> None:
        """Hand ``data`` to a helper; ``done`` gets its :class:`~pipelines.crawl.processing.Processed` (or the
        exception ``process_body`` raised) later, from another thread. :class:`HelperUnavailable` when no helper
        is ready (the caller processes the image itself). An image whose helper died is sent to another one
        (waiting for it to start); an image that was with two helpers when they died, or that no other helper can
        take, is refused as ``decode_error`` and never processed in the crawl process (it may be an image that
        crashes the decoder)."""
        item = _Pending(next(self.seq), data, done)
        helper = self._pick()
        try:
            helper.submit(item)
        except _HelperDied as exc:
            self._helper_died(item, str(exc))

    def _helper_died(self, item: _Pending, why: str) -> None:
        item.deaths += 1
        if item.deaths < 2:
            try:
                self._pick(wait=True).submit(item)
                return
            except (HelperUnavailable, _HelperDied) as exc:
                why = f"{why}; no other could take it ({exc})"
        item.done(Processed(None, error=f"{REASON_PREFIX}decode_error: the image processing process exited "
                                        f"while it had this image ({why})"))

    def process(self, data: bytes) -> Processed:
        """:meth:`submit` and wait for the answer (raises what ``process_body`` raised)."""
        box: list = []
        event = threading.Event()

        def done(out):
            box.append(out)
            event.set()

        self.submit(data, done)
        event.wait()
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def cpu_s(self) -> float:
        """CPU seconds the helpers have used, as last reported by each (imports included)."""
        with self.lock:
            return self.dead_cpu_s + sum(h.cpu_s for h in self.helpers)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until ``n`` helpers are alive and ready, dead ones replaced (tests; a crawl does not wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._pick()
            except HelperUnavailable:
                pass
            with self.lock:
                if len(self.helpers) == self.n and all(h.ready and h.alive for h in self.helpers):
                    return True
            time.sleep(0.02)
        return False

    def pids(self) -> list[int]:
        with self.lock:
            return [h.proc.pid for h in self.helpers if h.alive]

    def close(self) -> None:
        with self.lock:
            helpers, self.helpers = self.helpers, []
            self.starts = self.n + MAX_RESTARTS  # no more starts
        for h in helpers:
            h.close()


# ------------------------------------------------------------------------------------------------ helper side


def _bare_img2dataset_package() -> None:
    """Let ``img2dataset.resizer`` be imported without img2dataset's ``__init__`` (which imports its downloader,
    writers, webdataset and torch: 2 s of a helper's start for modules it never uses). Only in a helper process."""
    import importlib.util
    import types

    if "img2dataset" in sys.modules:
        return
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("img2dataset")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["img2dataset"] = package


def serve(conn: Connection) -> None:
    """Answer the crawl process's images until its end of the socket closes."""
    from pipelines.crawl.processing import install_limits, quiet_resizer

    _bare_img2dataset_package()
    settings: ProcessingSettings = pickle.loads(conn.recv_bytes())
    install_limits(settings.max_image_pixels)
    quiet_resizer()
    from pipelines.decontam import hashing  # noqa: F401 - imported now, not at the first image
    from pipelines.images import checks  # noqa: F401

    try:
        conn.send_bytes(READY.to_bytes(SEQ_BYTES, "big") + struct.pack("<d", time.process_time()))
    except OSError:
        return
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        view = memoryview(msg)
        try:
            out = process_body(settings, view[SEQ_BYTES:].tobytes())
        except Exception as exc:  # noqa: BLE001 - raised again in the download thread that sent the image
            out = _Failure(f"{type(exc).__name__}: {exc}")
        try:
            conn.send_bytes(msg[:SEQ_BYTES] + struct.pack("<d", time.process_time())
                            + pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m pipelines.crawl.image_helper FD (started by the crawl, not by hand)",
              file=sys.stderr)
        return 2
    serve(Connection(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
