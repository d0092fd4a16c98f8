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

With the multiprocessing distributor the helpers are the round's (:class:`SharedHelpers`, the default): started
once before the first download, shared by all crawl processes of the round over Unix sockets, so they do not start
again each time img2dataset's pool replaces a worker process. A crawl process replaces a shared helper that is gone
with a private one.

    python -m pipelines.crawl.image_helper FD                          # a private helper (ImageHelperPool)
    python -m pipelines.crawl.image_helper --shared CONTROL_FD LISTEN_FD  # a shared one (SharedHelpers)
"""
from __future__ import annotations

import itertools
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
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
# How long a download thread waits for one of the round's shared helpers to finish starting before it processes
# its image itself. They start before the round's first download and are ready ~1-2 s later; a crawl process
# starts in ~0.6 s, and an image it processed itself would load img2dataset's resizer there (~1 s of CPU, again in
# every replacement process). Private helpers start with their crawl process: there the threads do not wait.
SHARED_START_WAIT_S = 30.0
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


def _helper_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI for news on import
    return env


def _helper_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.crawl.image_helper", *args]


class _Helper:
    """One helper process and the thread that reads its answers (and calls the images' callbacks)."""

    def __init__(self, name: str, on_death: Callable[[_Pending, str], None], *, setup: bytes | None = None,
                 address: str | None = None):
        """Start a private helper (``setup``: the pickled settings it is sent) or connect to one of the round's
        shared helpers at ``address`` (:class:`SharedHelpers`; ``OSError`` when it is gone)."""
        self.proc: subprocess.Popen | None = None
        self.shared = address is not None
        if address is not None:
            parent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                parent.connect(address)
            except BaseException:
                parent.close()
                raise
            self.pid: int | None = None  # from its READY message
        else:
            parent, child = socket.socketpair()
            try:
                self.proc = subprocess.Popen(_helper_command(str(child.fileno())), pass_fds=(child.fileno(),),
                                             stdin=subprocess.DEVNULL, env=_helper_env())
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            self.pid = self.proc.pid
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
        self.cpu_s = 0.0  # the CPU seconds the helper reported at its last message (for this connection if shared)
        if setup is not None:
            self.conn.send_bytes(setup)
        self.reader = threading.Thread(target=self._read, daemon=True, name=f"{name}-reader")
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                if not self.conn.poll(ANSWER_TIMEOUT_S):
                    if self.pending:  # images waiting and no answer for that long: the helper is stuck
                        print(f"clipline: image helper process {self.pid} gave no answer in "
                              f"{ANSWER_TIMEOUT_S:g} s; killing it", flush=True)
                        self.kill()
                        break
                    continue
                msg = self.conn.recv_bytes()
                seq = int.from_bytes(msg[:SEQ_BYTES], "big")
                self.cpu_s = struct.unpack("<d", msg[SEQ_BYTES:SEQ_BYTES + CPU_BYTES])[0]
                if seq == READY:
                    self.pid = int.from_bytes(msg[SEQ_BYTES + CPU_BYTES:], "big") or self.pid
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
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)  # reaped here: its CPU then counts for the crawl process's children
            except subprocess.TimeoutExpired:
                pass
            why = f"helper process {self.pid} exited (rc {self.proc.poll()})"
        else:
            why = f"shared helper process {self.pid} closed its connection"
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
                raise _HelperDied(f"helper process {self.pid} is gone")
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
        """Kill the helper process (a shared one too: it is stuck or broken for every crawl process)."""
        try:
            if self.proc is not None:
                self.proc.kill()
            elif self.pid:
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self._shutdown()

    def close(self) -> None:
        """End the helper's input (a private helper exits, a shared one drops this connection), wait for it and
        for the reader thread."""
        self._shutdown()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)


class ImageHelperPool:
    """``n`` helper processes for one crawl process; the download threads :meth:`submit` their bodies and go on
    downloading, the answers come back through callbacks (from the helpers' reader threads). With ``shared``
    addresses (the round's :class:`SharedHelpers`), the pool connects to those helpers instead of starting its
    own; one that is gone or dies is replaced by a private helper of this process. :meth:`submit` waits up to
    ``start_wait_s`` for a helper that is still starting (default: :data:`SHARED_START_WAIT_S` with shared helpers,
    0 with private ones)."""

    def __init__(self, settings: ProcessingSettings, n: int, name: str = "image-helper",
                 shared: tuple[str, ...] = (), start_wait_s: float | None = None):
        if n < 1 and not shared:
            raise ValueError(f"ImageHelperPool needs at least one process, got {n}")
        self.settings = settings
        self.setup = pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
        self.name = name
        self.shared = tuple(shared)
        self.n = len(self.shared) or n
        self.start_wait_s = (SHARED_START_WAIT_S if self.shared else 0.0) if start_wait_s is None else start_wait_s
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.helpers: list[_Helper] = []
        self.dead_cpu_s = 0.0  # CPU of private helpers that are gone
        self.dead_shared_cpu_s = 0.0  # CPU shared helpers spent on this pool's images, over connections now gone
        self.starts = 0
        self.deaths = 0
        self.failed_start: str | None = None
        for address in self.shared:
            try:
                self.helpers.append(_Helper(f"{self.name}-shared", self._helper_died, address=address))
            except OSError as exc:
                print(f"clipline: the round's image helper at {address} is gone ({exc}); starting one for this "
                      f"process", flush=True)
        while len(self.helpers) < self.n and self.failed_start is None:
            self._start()

    def _start(self) -> None:
        """Start one private helper (under ``self.lock`` or before the pool is shared)."""
        if self.starts >= self.n + MAX_RESTARTS:
            return
        self.starts += 1
        try:
            self.helpers.append(_Helper(f"{self.name}-{self.starts}", self._helper_died, setup=self.setup))
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
                    self._keep_cpu(h)
                    print(f"clipline: image helper process {h.pid} is gone"
                          f"{'' if h.proc is None else f' (rc {h.proc.poll()})'}; starting another", flush=True)
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
        is ready within ``start_wait_s`` (the caller processes the image itself). An image whose helper died is
        sent to another one (waiting for it to start); an image that was with two helpers when they died, or that
        no other helper can take, is refused as ``decode_error`` and never processed in the crawl process (it may
        be an image that crashes the decoder)."""
        item = _Pending(next(self.seq), data, done)
        helper = self._pick(wait=self.start_wait_s > 0, timeout=self.start_wait_s)
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
        """CPU seconds this process's private helpers have used, as last reported by each (imports included)."""
        with self.lock:
            return self.dead_cpu_s + sum(h.cpu_s for h in self.helpers if not h.shared)

    def shared_cpu_s(self) -> float:
        """CPU seconds the round's shared helpers spent on this process's images (their starts not included: the
        round that started them accounts for them)."""
        with self.lock:
            return self.dead_shared_cpu_s + sum(h.cpu_s for h in self.helpers if h.shared)

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
            return [h.pid for h in self.helpers if h.alive]

    def close(self) -> None:
        with self.lock:
            helpers, self.helpers = self.helpers, []
            self.starts = self.n + MAX_RESTARTS  # no more starts
        for h in helpers:
            h.close()
            with self.lock:
                self._keep_cpu(h)

    def _keep_cpu(self, h: _Helper) -> None:
        """A helper leaves the pool (under ``self.lock``): what it used stays counted."""
        if h.shared:
            self.dead_shared_cpu_s += h.cpu_s
        else:
            self.dead_cpu_s += h.cpu_s


class SharedHelpers:
    """The crawl round's image helper processes, shared by all its crawl processes on this machine (the
    multiprocessing distributor's pool workers connect to them: :class:`ImageHelperPool` with ``shared``).

    Why: img2dataset's pool replaces each worker process after 5 shards; helpers owned by a worker were started
    again with it (~0.6 s of CPU each, and images processed in the download threads until they were ready).
    The round's helpers start once, before the first download, and live until the round ends. Each listens on
    its own Unix socket (in a private temporary directory) and serves every crawl process that connects, one image
    at a time in arrival order. A helper exits when the round closes it or the round's process dies (its control
    socket closes). One that dies mid-round is not restarted here: each crawl process replaces it with a private
    helper, and its pending images go there (the same rules as for private helpers)."""

    def __init__(self, settings: ProcessingSettings, n: int, stdout=None):
        if n < 1:
            raise ValueError(f"SharedHelpers needs at least one process, got {n}")
        self.dir = tempfile.mkdtemp(prefix="clipline-helpers-")  # mode 0700: only this user can connect
        self.addresses: tuple[str, ...] = ()
        self.procs: list[subprocess.Popen] = []
        self.controls: list[socket.socket] = []
        self.cpu_s = 0.0  # the helpers' CPU (from the kernel, at close)
        setup = pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
        addresses = []
        try:
            for i in range(n):
                address = os.path.join(self.dir, str(i))
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                control, child = socket.socketpair()
                try:
                    listener.bind(address)
                    listener.listen(64)
                    proc = subprocess.Popen(_helper_command("--shared", str(child.fileno()), str(listener.fileno())),
                                            pass_fds=(child.fileno(), listener.fileno()), stdin=subprocess.DEVNULL,
                                            stdout=stdout, stderr=stdout, env=_helper_env())
                except BaseException:
                    control.close()
                    raise
                finally:
                    # Only the helper holds the listening socket: once it is gone, connecting fails at once.
                    listener.close()
                    child.close()
                self.procs.append(proc)
                self.controls.append(control)
                settings_conn = Connection(os.dup(control.fileno()))
                settings_conn.send_bytes(setup)
                settings_conn.close()
                addresses.append(address)
        except BaseException:
            self.close()
            raise
        self.addresses = tuple(addresses)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self) -> None:
        """Stop the helpers (their control sockets close; connected crawl processes see their connections end)
        and reap them; ``cpu_s`` is then their CPU time."""
        for control in self.controls:
            try:
                control.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            control.close()
        self.controls = []
        deadline = time.monotonic() + 10
        for proc in self.procs:
            while proc.returncode is None:
                try:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (its CPU is then not known here)
                    proc.returncode = -1
                    break
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    self.cpu_s += usage.ru_utime + usage.ru_stime
                elif time.monotonic() > deadline:
                    proc.kill()
                    deadline = time.monotonic() + 5
                else:
                    time.sleep(0.01)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ helper side


def _prepare(settings_conn: Connection) -> ProcessingSettings:
    """The helper's imports and settings (before it says READY)."""
    from pipelines.crawl.processes import start_crawl_process
    from pipelines.crawl.processing import install_limits, quiet_resizer

    start_crawl_process()  # img2dataset.resizer without img2dataset's __init__, and never torch
    settings: ProcessingSettings = pickle.loads(settings_conn.recv_bytes())
    install_limits(settings.max_image_pixels)
    quiet_resizer()
    from pipelines.decontam import hashing  # noqa: F401 - imported now, not at the first image
    from pipelines.images import checks  # noqa: F401
    return settings


def _ready_message(cpu_s: float) -> bytes:
    return READY.to_bytes(SEQ_BYTES, "big") + struct.pack("<d", cpu_s) + os.getpid().to_bytes(8, "big")


def _answer(settings: ProcessingSettings, msg: bytes) -> tuple[bytes, bytes]:
    """(seq, pickled answer) for one request."""
    view = memoryview(msg)
    try:
        out = process_body(settings, view[SEQ_BYTES:].tobytes())
    except Exception as exc:  # noqa: BLE001 - raised again in the download thread that sent the image
        out = _Failure(f"{type(exc).__name__}: {exc}")
    return msg[:SEQ_BYTES], pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)


def serve(conn: Connection) -> None:
    """A private helper: answer the crawl process's images until its end of the socket closes. Each answer
    carries the helper's CPU seconds so far (its start included)."""
    settings = _prepare(conn)
    try:
        conn.send_bytes(_ready_message(time.process_time()))
    except OSError:
        return
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        seq, out = _answer(settings, msg)
        try:
            conn.send_bytes(seq + struct.pack("<d", time.process_time()) + out)
        except OSError:
            return


def serve_shared(control: Connection, listener: socket.socket) -> None:
    """A shared helper (:class:`SharedHelpers`): accept crawl processes' connections on ``listener`` and answer
    their images, until ``control`` closes. Each answer carries the CPU seconds spent on that connection's images
    (the start is the round's to count)."""
    from multiprocessing.connection import wait

    settings = _prepare(control)
    conns: dict[Connection, float] = {}  # connection -> CPU spent on its images
    while True:
        for ready in wait([control, listener, *conns]):
            if ready is control:
                try:
                    control.recv_bytes()
                except (EOFError, OSError):  # the round ended or its process died (and cannot clean up)
                    _remove_socket_file(listener)
                    return
            elif ready is listener:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    continue
                conn = Connection(sock.detach())
                try:
                    conn.send_bytes(_ready_message(0.0))
                except OSError:
                    conn.close()
                    continue
                conns[conn] = 0.0
            else:
                try:
                    msg = ready.recv_bytes()
                except (EOFError, OSError):  # that crawl process is done (or died)
                    conns.pop(ready, None)
                    ready.close()
                    continue
                t0 = time.process_time()
                seq, out = _answer(settings, msg)
                conns[ready] += time.process_time() - t0
                try:
                    ready.send_bytes(seq + struct.pack("<d", conns[ready]) + out)
                except OSError:
                    conns.pop(ready, None)
                    ready.close()


def _remove_socket_file(listener: socket.socket) -> None:
    """Remove this helper's socket file, and the round's socket directory once it is empty (the last helper out):
    a round process that was killed leaves them to its helpers."""
    try:
        path = listener.getsockname()
    except OSError:
        return
    if not isinstance(path, str) or not path:
        return
    for remove, target in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        try:
            remove(target)
        except OSError:  # already gone (the round removed it), or another helper's socket is still there
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].isdigit():
        serve(Connection(int(argv[0])))
        return 0
    if len(argv) == 3 and argv[0] == "--shared" and argv[1].isdigit() and argv[2].isdigit():
        serve_shared(Connection(int(argv[1])), socket.socket(fileno=int(argv[2])))
        return 0
    print("usage: python -m pipelines.crawl.image_helper FD | --shared CONTROL_FD LISTEN_FD (started by the crawl, "
          "not by hand)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = main()
    # Nothing is left to write but the log's buffers: leave without the interpreter's teardown (finalising numpy,
    # OpenCV, Pillow: ~0.1 s that the round waited for when it reaped its helpers).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
