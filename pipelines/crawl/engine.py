"""Runs one crawl round with img2dataset's pieces: its Reader shards the URL list, its distributor runs a
:class:`~pipelines.crawl.worker.CrawlDownloader` per shard, its Resizer and webdataset writer make the shards.

``img2dataset.download()`` itself is not called: it decides which shards are done by globbing its (local) output
folder, prints to stdout from the calling process, starts a logger process and installs a SIGINT handler. Here
shards are staged in a local directory, published by the workers to the crawl directory (local or s3://), and the
round's finished shards are read from there. img2dataset's chatter (the Reader's and distributor's prints, its
tqdm bar, worker tracebacks) goes to ``log_file``; a person sees the ``progress`` callback instead.

img2dataset's workers are started with multiprocessing's *spawn* method, which re-imports the calling program's
main module in each worker: a script that crawls must keep its work under ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Before img2dataset (and so albumentations, wandb) is imported here or in the spawned workers (which inherit the
# environment): albumentations otherwise checks PyPI for a newer version on import, and wandb must stay off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

from pipelines.core import storage  # noqa: E402
from pipelines.crawl.config import CrawlConfig  # noqa: E402
from pipelines.crawl.politeness import PolitenessSettings  # noqa: E402

OOM_SHARD_COUNT = 5  # img2dataset's default: shard names 00000, 00001, ...
ROBOTS_STORE = "robots.sqlite"  # in the crawl's staging root: robots.txt decisions shared by its processes and rounds
_patch_lock = threading.Lock()


@dataclass
class CrawlProgress:
    """What the crawl reports while it runs (about twice a second, and once at the end of each round)."""

    round_no: int
    done: int  # URLs finished in this round (finished shards of an earlier, interrupted run included)
    total: int  # URLs in this round
    successes: int
    failures: dict[str, int] = field(default_factory=dict)  # reason -> URLs so far
    hosts_paused: int = 0
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.successes / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressHook = Callable[[CrawlProgress], None]


def staging_root(config: CrawlConfig, crawl_dir: str) -> str:
    """Local directory for a crawl's unpublished shards and its log: ``staging_dir`` or the system temp dir,
    keyed by the crawl directory's URI."""
    base = config.staging_dir or tempfile.gettempdir()
    return os.path.join(base, "clipline-crawl-" + hashlib.sha256(str(crawl_dir).encode()).hexdigest()[:16])


def politeness_settings(config: CrawlConfig) -> PolitenessSettings:
    return PolitenessSettings(connections=config.per_process_connections(), rps=config.per_process_rps(),
                              failure_limit=config.host_failure_limit, pause_seconds=config.host_pause_seconds,
                              max_retry_after=config.max_retry_after_seconds,
                              backoff_base=config.backoff_base_seconds)


def worker_settings(config: CrawlConfig, publish_dir: str, progress_dir: str | None, log_file: str | None):
    from pipelines.crawl.worker import WorkerSettings

    return WorkerSettings(
        allow_cidrs=tuple(config.allow_cidrs), max_bytes=int(config.max_image_bytes),
        max_seconds=float(config.max_download_seconds), op_timeout=float(config.timeout),
        max_image_pixels=int(config.max_image_pixels), retries=int(config.retries), user_agent=config.user_agent,
        user_agent_token=config.user_agent_token.lower(), respect_robots=bool(config.respect_robots),
        robots_timeout=float(config.robots_timeout), dns_cache_seconds=float(config.dns_cache_seconds),
        politeness=politeness_settings(config), publish_dir=publish_dir, progress_dir=progress_dir,
        log_file=log_file, hash_images=bool(config.hash_images),
        image_processes=config.image_processes_per_process())


def img2dataset_kwargs(config: CrawlConfig, *, url_list: str, output_folder: str, input_format: str = "parquet",
                       additional_columns: list[str] | None = None, incremental_mode: str = "incremental") -> dict:
    """The keyword arguments of ``img2dataset.download`` equivalent to ``config`` (the benchmark's plain
    img2dataset baseline uses them: same image settings, timeouts, retries, threads and shards)."""
    return dict(
        url_list=url_list, output_folder=output_folder, input_format=input_format, url_col="url",
        caption_col="caption", output_format="webdataset", save_additional_columns=additional_columns,
        image_size=config.image_size, resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger, encode_format=config.encode_format,
        encode_quality=config.encode_quality, min_image_size=config.min_image_size,
        max_image_area=config.max_image_pixels, timeout=config.timeout, retries=config.retries,
        processes_count=config.processes, thread_count=config.thread_count,
        number_sample_per_shard=config.number_sample_per_shard, user_agent_token=config.user_agent_token,
        # An empty list means "honour nothing" to img2dataset only when passed as []; None would mean its defaults.
        disallowed_header_directives=list(config.disallowed_header_directives), compute_hash=config.compute_hash,
        extract_exif=False, enable_wandb=False, distributor=config.distributor, incremental_mode=incremental_mode,
        max_shard_retry=config.max_shard_retry,
    )


@contextlib.contextmanager
def _chatter_to(log_file: str, max_image_pixels: int):
    """While open, img2dataset's prints and tqdm bar in this process go to ``log_file``; spawned workers inherit
    OpenCV's pixel limit (a second line of defence behind PixelLimitResizer)."""
    reader = importlib.import_module("img2dataset.reader")
    distributor = importlib.import_module("img2dataset.distributor")
    from tqdm import tqdm

    with _patch_lock, open(log_file, "a", buffering=1) as log:
        def log_print(*args, **kwargs):
            kwargs.pop("file", None)
            print(*args, **kwargs, file=log)

        saved = {(m, n): m.__dict__.get(n) for m in (reader, distributor) for n in ("print", "tqdm")}
        reader.print = log_print
        distributor.print = log_print
        distributor.tqdm = functools.partial(tqdm, file=log, mininterval=5)
        saved_env = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_image_pixels)
        try:
            yield log
        finally:
            for (m, n), v in saved.items():
                if v is None:
                    m.__dict__.pop(n, None)
                else:
                    setattr(m, n, v)
            if saved_env is None:
                os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
            else:
                os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = saved_env


class _ProgressPoller(threading.Thread):
    """Sums the workers' progress files (and the shards finished before this run) for the progress hook."""

    def __init__(self, hook: ProgressHook, round_no: int, total: int, progress_dir: str, before: dict):
        super().__init__(daemon=True, name="crawl-progress")
        self.hook, self.round_no, self.total, self.progress_dir = hook, round_no, total, progress_dir
        self.before = before
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def snapshot(self) -> CrawlProgress:
        done, ok = self.before["done"], self.before["successes"]
        failures: Counter = Counter(self.before["reasons"])
        paused: set = set()
        try:
            names = os.listdir(self.progress_dir)
        except OSError:
            names = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                p = json.loads(storage.read_bytes(os.path.join(self.progress_dir, name)))
            except (OSError, ValueError):
                continue
            done += p["done"]
            ok += p["successes"]
            failures.update(p["reasons"])
            paused.update(p["hosts_paused"])
        return CrawlProgress(self.round_no, done, self.total, ok, dict(failures), len(paused),
                             time.monotonic() - self.t0)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.hook(self.snapshot())


def _activate_spark_session() -> None:
    """img2dataset's pyspark distributor uses ``SparkSession.getActiveSession()``, which is per thread: a crawl
    run from another thread than the one that built the session (a Prefect task, a thread pool) would not see it,
    and img2dataset would build a ``local[N]`` session on the same context and *stop* it at the end. When a
    SparkContext exists, make its session active in this thread; when none does, img2dataset builds its own."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is None or SparkSession.getActiveSession() is not None:
        return
    session = SparkSession.builder.getOrCreate()  # the existing (default) session; does not make it active
    # What pyspark itself does to make a session active (SparkSession.__init__ / createDataFrame).
    SparkSession._activeSession = session
    jcls = (SparkSession._get_j_spark_session_class(session._jvm)
            if hasattr(SparkSession, "_get_j_spark_session_class") else session._jvm.SparkSession)
    jcls.setActiveSession(session._jsparkSession)


def make_downloader(config: CrawlConfig, *, column_list: list[str], out_dir: str, settings):
    """The :class:`~pipelines.crawl.worker.CrawlDownloader` a round hands to img2dataset's distributor (pickled to
    the crawl processes with every shard). Its resizer is img2dataset's Resizer behind the pixel limit, carried
    as a :class:`~pipelines.crawl.processing.LazyResizer`: loaded only where it is called."""
    from img2dataset.resizer import Resizer

    from pipelines.crawl.processing import LazyResizer, PixelLimitResizer
    from pipelines.crawl.worker import CrawlDownloader, CrawlShardWriter

    resizer = Resizer(image_size=config.image_size, resize_mode=config.resize_mode,
                      resize_only_if_bigger=config.resize_only_if_bigger, encode_quality=config.encode_quality,
                      encode_format=config.encode_format, min_image_size=config.min_image_size,
                      max_image_area=config.max_image_pixels)
    return CrawlDownloader(
        sample_writer_class=CrawlShardWriter,
        resizer=LazyResizer(PixelLimitResizer(resizer, config.max_image_pixels)),
        thread_count=config.thread_count, save_caption=True, extract_exif=False, output_folder=out_dir,
        column_list=column_list, timeout=config.timeout, number_sample_per_shard=config.number_sample_per_shard,
        oom_shard_count=OOM_SHARD_COUNT, compute_hash=config.compute_hash, verify_hash_type=None,
        encode_format=config.encode_format, retries=config.retries, user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives) or None, settings=settings)


def run_round(config: CrawlConfig, *, round_no: int, url_list: str, publish_dir: str, done_shards: set[int],
              additional_columns: list[str], staging: str, log_file: str,
              progress: ProgressHook | None = None, total: int = 0, before: dict | None = None) -> None:
    """Crawl the shards of ``url_list`` not in ``done_shards``; each finished shard is published to
    ``publish_dir``. ``staging`` is a local directory this round may use (emptied first)."""
    from img2dataset.distributor import pyspark_distributor
    from img2dataset.reader import Reader

    from pipelines.crawl import url_lists
    from pipelines.crawl.image_helper import SharedHelpers
    from pipelines.crawl.processes import multiprocessing_distributor  # img2dataset's, its processes without torch
    from pipelines.crawl.robots_prefetch import RobotsPrefetch
    from pipelines.crawl.robots_store import RobotsStore

    storage.delete_prefix(staging)
    out_dir, tmp_dir, progress_dir = (os.path.join(staging, d) for d in ("out", "_tmp", "_progress"))
    for d in (out_dir, tmp_dir, progress_dir):
        os.makedirs(d, exist_ok=True)
    local_list = os.path.join(staging, "url_list.parquet")
    with storage.open_read(url_list) as src, open(local_list, "wb") as dst:  # img2dataset reads local files
        while chunk := src.read(1 << 20):
            dst.write(chunk)

    poller = None
    with _chatter_to(log_file, config.max_image_pixels) as log:
        # img2dataset's Reader reads each input file whole: a long list goes to it in files of whole shards.
        rows_per_file = max(1, config.url_list_part_rows // config.number_sample_per_shard) \
            * config.number_sample_per_shard
        reader_input = url_lists.split_for_reader(local_list, os.path.join(staging, "url_list"), rows_per_file)
        reader = Reader(reader_input, "parquet", "url", "caption", None, None, list(additional_columns),
                        config.number_sample_per_shard, set(done_shards), tmp_dir)
        downloader = make_downloader(config, column_list=reader.column_list, out_dir=out_dir,
                                     settings=worker_settings(config, publish_dir, progress_dir, log_file))
        prefetch = None
        if config.respect_robots:
            # One robots.txt decision per host for the machine's crawl processes and the crawl's rounds, in the
            # crawl's staging root (kept across rounds; a round's own staging directory is emptied).
            store_path = os.path.join(os.path.dirname(os.path.abspath(staging)), ROBOTS_STORE)
            downloader.settings = dataclasses.replace(downloader.settings, robots_store=store_path,
                                                      robots_scope=publish_dir)
            if config.distributor == "multiprocessing" and config.robots_prefetch_threads > 0:
                prefetch = RobotsPrefetch(RobotsStore(store_path, claim_seconds=config.robots_timeout + 5.0),
                                          publish_dir, local_list, settings=downloader.settings,
                                          threads=config.robots_prefetch_threads,
                                          shard_size=config.number_sample_per_shard, done_shards=set(done_shards))
                prefetch.start()
        distribute = {"multiprocessing": multiprocessing_distributor,
                      "pyspark": pyspark_distributor}[config.distributor]
        if config.distributor == "pyspark":
            _activate_spark_session()
        if progress is not None:
            poller = _ProgressPoller(progress, round_no, total, progress_dir,
                                     before or {"done": 0, "successes": 0, "reasons": {}})
            poller.start()
        shared = None
        try:
            per_process = config.image_processes_per_process()
            if config.distributor == "multiprocessing" and config.shared_image_helpers and per_process > 0:
                # Started now, so they are ready by the first download; they outlive img2dataset's worker processes.
                try:
                    shared = SharedHelpers(downloader.processing_settings(), config.processes * per_process, stdout=log)
                except OSError as exc:  # each crawl process then starts its own
                    print(f"round {round_no}: could not start the shared image helpers ({type(exc).__name__}: {exc}); "
                          f"each crawl process starts its own", file=log)
                else:
                    downloader.settings = dataclasses.replace(downloader.settings, helper_addresses=shared.addresses)
            distribute(config.processes, downloader, reader, 1000, config.max_shard_retry)
        finally:
            if prefetch is not None:
                prefetch.stop()
                print(f"round {round_no}: robots.txt prefetched for {prefetch.fetched} hosts "
                      f"({prefetch.seconds:.2f} s of requests), {prefetch.skipped} already decided or claimed"
                      + (f"; prefetch stopped early: {prefetch.error}" if prefetch.error else ""), file=log)
            if shared is not None:
                shared.close()
                print(f"round {round_no}: {len(shared.addresses)} shared image helper processes used "
                      f"{shared.cpu_s:.2f} s of CPU", file=log)
            if poller is not None:
                poller.stop.set()
                poller.join()
                progress(poller.snapshot())
    storage.delete_prefix(staging)
