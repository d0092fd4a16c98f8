"""What a person sees while a build runs: one live progress line per crawl round (rich), not the libraries'
chatter. img2dataset's and the crawl workers' output goes to the run's log file; ``verbose`` also streams that file
to stderr. When stderr is not a terminal (CI, a Prefect worker), the progress becomes a log line every ~10 s."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def _summary(p) -> str:
    failed = sum(p.failures.values())
    top = ", ".join(f"{k} {v}" for k, v in sorted(p.failures.items(), key=lambda kv: -kv[1])[:3])
    return (f"crawl round {p.round_no}: {p.successes:,} ok, {failed:,} failed{f' ({top})' if top else ''}, "
            f"{p.hosts_paused} host(s) paused, {p.images_per_s:.1f} img/s")


class CrawlProgressDisplay:
    """A :data:`pipelines.crawl.engine.ProgressHook` that renders URLs done of total, images/s, ETA, failures by
    reason and paused hosts."""

    def __init__(self, log=print, interval_s: float = 10.0):
        self.log, self.interval_s = log, interval_s
        self.tty = sys.stderr.isatty()
        self._progress = None
        self._tasks: dict[int, int] = {}
        self._last = 0.0

    def __call__(self, p) -> None:
        if not self.tty:
            now = time.monotonic()
            if now - self._last >= self.interval_s or p.done >= p.total:
                self._last = now
                self.log(f"{_summary(p)}; {p.done:,}/{p.total:,} URLs")
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._progress.start()
        if p.round_no not in self._tasks:
            self._tasks[p.round_no] = self._progress.add_task(_summary(p), total=max(p.total, 1))
        self._progress.update(self._tasks[p.round_no], completed=p.done, total=max(p.total, 1),
                              description=_summary(p))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class LogTail:
    """Stream a log file to stderr while a block runs (``--verbose``)."""

    def __init__(self, path: str):
        self.path, self._stop = Path(path), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pos = 0
        while not self._stop.is_set():
            if self.path.exists():
                with self.path.open("rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                if chunk:
                    sys.stderr.write(chunk.decode("utf-8", "replace"))
                    sys.stderr.flush()
            self._stop.wait(0.5)
