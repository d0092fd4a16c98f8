"""What runs in a crawl worker process: img2dataset's Downloader with clipline's fetch loop, hashes and publishing.

img2dataset stays the engine for everything around a download: its Reader cuts the URL list into shards, its
distributor (multiprocessing or pyspark) runs one :class:`CrawlDownloader` call per shard, its Resizer decodes and
resizes, its webdataset writer writes the tar + Parquet and its key / stats formats are kept. What is replaced is
the inside of ``Downloader.download_shard``: img2dataset hands URLs to a thread pool in file order and fetches
each with ``urllib.request.urlopen`` (no per-host limits, a deadline only per socket operation, immediate
retries), then resizes every image in one consumer thread. Here the threads take URLs from a
:class:`~pipelines.crawl.politeness.ShardScheduler` (per-host connections, rate, back-off, pauses, robots.txt
first), fetch them through the guarded opener (SSRF guard, cached DNS, a deadline that bounds wall time), and
hand what they downloaded to this process's image helper processes (:mod:`pipelines.crawl.image_helper`), which
resize it and hash the published image (pHash/dHash/sha256, bit-equal to imagehash) outside this process's GIL;
with ``image_processes: 0`` the download threads do it themselves. One thread writes. The shard's Parquet gets
these columns::

    reason, fetch_seconds, attempts, timeouts, host, img_sha256, img_width, img_height, img_error, phash, dhash,
    jpg_offset, jpg_size

Finished shards are written to a local staging directory and then published to the crawl directory (local or
``s3://``) through :mod:`pipelines.core.storage`: the tar, the Parquet, then ``NNNNN_stats.json`` last (a shard
counts as done only when all three are there).
"""
from __future__ import annotations

import collections
import json
import math
import os
import pickle
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from img2dataset.downloader import Downloader, compute_key, is_disallowed  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402

from pipelines.core import reasons as R  # noqa: E402
from pipelines.core import storage  # noqa: E402
from pipelines.crawl import politeness as P  # noqa: E402
from pipelines.crawl.image_helper import HelperUnavailable, ImageHelperPool  # noqa: E402
from pipelines.crawl.processing import ProcessingSettings, install_limits, process_body  # noqa: E402
from pipelines.crawl.reasons import http_reason, normalise_reason  # noqa: E402
from pipelines.crawl.robots import fetch_robots  # noqa: E402
from pipelines.crawl.robots_store import RobotsStore  # noqa: E402
from pipelines.crawl.ssrf import REASON_PREFIX, AddressPolicy, DnsCache, build_guarded_opener  # noqa: E402

TAR_MTIME = 0  # fixed member mtimes: the same downloaded content gives the same tar bytes
PROGRESS_INTERVAL_S = 0.5
# Columns the worker adds to img2dataset's Parquet (kept out of the tar's per-sample JSON).
EXTRA_FIELDS = [
    pa.field("reason", pa.string()),  # normalised reason of a failure (null on success)
    pa.field("fetch_seconds", pa.float32()),  # wall time of this URL's requests in this round
    pa.field("attempts", pa.int32()),  # requests made for it in this round (0: decided without one)
    pa.field("timeouts", pa.int32()),  # timed-out attempts, earlier rounds included
    pa.field("host", pa.string()),  # scheme://host:port
    pa.field("img_sha256", pa.string()),  # of the published image bytes (the tar member)
    pa.field("img_width", pa.int32()),  # of the published image, decoded
    pa.field("img_height", pa.int32()),
    pa.field("img_error", pa.string()),  # images-stage reason when the published image does not decode
    pa.field("phash", pa.uint64()),  # imagehash's pHash / dHash bits of the published image
    pa.field("dhash", pa.uint64()),
    pa.field("jpg_offset", pa.int64()),  # where the image member's bytes start in the tar
    pa.field("jpg_size", pa.int64()),
]
EXTRA_COLUMNS = tuple(f.name for f in EXTRA_FIELDS)
INTERNAL_INPUT_COLUMNS = ("prior_timeouts",)  # carried from the round's URL list, not part of the tar JSON
# Reasons retried within a round (quick, transient); timeouts are left to a later round.
RETRY_IN_ROUND = frozenset({R.HTTP_429, R.HTTP_5XX, R.CONNECTION_ERROR, R.CONNECTION_REFUSED, R.TRUNCATED})


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs besides img2dataset's own arguments (picklable: it travels with the Downloader)."""

    allow_cidrs: tuple[str, ...]
    max_bytes: int
    max_seconds: float
    op_timeout: float
    max_image_pixels: int
    retries: int
    user_agent: str
    user_agent_token: str
    respect_robots: bool
    robots_timeout: float
    dns_cache_seconds: float
    politeness: P.PolitenessSettings
    publish_dir: str  # the round's directory in the crawl dir (local or s3://)
    progress_dir: str | None  # local directory for NNNNN.json progress files
    log_file: str | None  # worker stdout/stderr go here
    hash_images: bool = True
    image_processes: int = 1  # helper processes per crawl process for resize + hashes (0: the download threads)
    helper_addresses: tuple[str, ...] = ()  # the round's shared helpers (SharedHelpers), used instead when given
    robots_store: str | None = None  # the machine's robots.txt decisions (robots_store.RobotsStore), local path
    robots_scope: str = ""  # the round: decisions that hold for one round only are kept for this scope


# ---------------------------------------------------------------------------------------------- process set-up

_process: dict = {}
_process_lock = threading.Lock()


def _redirect_output(log_file: str | None) -> None:
    """Send this worker process's stdout/stderr (img2dataset's prints, tracebacks, library warnings) to the log."""
    if not log_file or _process.get("log_file") == log_file:
        return
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _process["log_file"] = log_file


def process_tools(settings: WorkerSettings) -> dict:
    """This process's openers, DNS cache and host table for ``settings`` (created once per process)."""
    with _process_lock:
        key = ("tools", settings.allow_cidrs, settings.max_bytes, settings.max_seconds, settings.dns_cache_seconds,
               settings.robots_timeout, settings.robots_store if settings.respect_robots else None)
        tools = _process.get(key)
        if tools is None:
            policy = AddressPolicy(settings.allow_cidrs)
            dns = DnsCache(settings.dns_cache_seconds)
            tools = {
                "dns": dns,
                "opener": build_guarded_opener(policy, max_bytes=settings.max_bytes, max_seconds=settings.max_seconds,
                                               resolver=dns),
                "robots_opener": build_guarded_opener(policy, max_bytes=None, max_seconds=settings.robots_timeout,
                                                      resolver=dns, images_only=False),
                # A claim outlives the robots.txt fetch's own deadline by a margin (a killed claimant blocks no one
                # for longer).
                "robots_store": (RobotsStore(settings.robots_store, claim_seconds=settings.robots_timeout + 5.0)
                                 if settings.robots_store and settings.respect_robots else None),
            }
            _process[key] = tools
        tools["politeness"] = P.process_politeness(settings.politeness)
        return tools


# ------------------------------------------------------------------------------------------------------ fetching


@dataclass
class FetchResult:
    data: bytes | None
    reason: str | None = None
    message: str | None = None
    http_status: int | None = None
    retry_after: float | None = None
    seconds: float = 0.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def fetch_image(opener, url: str, *, user_agent: str, user_agent_token: str, directives: set | None,
                timeout: float) -> FetchResult:
    """One guarded request for ``url``: the body, or the normalised reason it failed."""
    t0 = time.monotonic()
    got_headers = False
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with opener.open(request, timeout=timeout) as r:
            got_headers = True
            if directives and is_disallowed(r.headers, user_agent_token, directives):
                return FetchResult(None, R.OPT_OUT, "Use of image disallowed by X-Robots-Tag directive",
                                   seconds=time.monotonic() - t0)
            data = r.read()
        return FetchResult(data, seconds=time.monotonic() - t0)
    except urllib.error.HTTPError as exc:
        retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
        exc.close()
        return FetchResult(None, http_reason(exc.code), f"HTTP Error {exc.code}: {exc.reason}", exc.code,
                           retry_after, time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reason
        message = str(exc) or type(exc).__name__
        reason = normalise_reason(message)
        if reason == R.TIMEOUT:  # a timeout the opener did not label: the phase we were in says which
            reason = R.TIMEOUT_BODY if got_headers else R.TIMEOUT_HEADERS
        return FetchResult(None, reason, message, seconds=time.monotonic() - t0)


# --------------------------------------------------------------------------------------------------- the writer


class CrawlShardWriter(WebDatasetSampleWriter):
    """img2dataset's webdataset writer with fixed member mtimes, the tar JSON limited to img2dataset's own fields,
    and the shard published in key order with each image member's offset and size in its Parquet row (so readers
    can fetch it by range).

    What differs inside (the main thread writes every sample while the download threads hold the GIL, and each
    write syscall hands the GIL back): the staged tar is written through a 1 MiB buffer (img2dataset's goes
    through fsspec's 8 KiB one), the Parquet rows are kept (they are small) and written once, in key order, by
    :meth:`publish` (img2dataset writes a row group every 100 rows, which the key-order step then read back and
    rewrote), and the position of each sample in the staged tar is recorded so that :meth:`publish` copies
    bytes instead of parsing and rewriting the tar."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        import webdataset as wds

        self.shard_id, self.oom_shard_count = shard_id, oom_shard_count
        self.save_caption, self.encode_format, self.schema = save_caption, encode_format, schema
        os.makedirs(output_folder, exist_ok=True)
        self.tar_path = os.path.join(output_folder, f"{shard_id:0{oom_shard_count}d}.tar")
        self.tar_fd = open(self.tar_path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self.tarwriter = wds.TarWriter(self.tar_fd, mtime=TAR_MTIME)
        self.columns: dict[str, list] = {name: [] for name in schema.names}
        # key -> (start, end) of the sample's members in the staged tar, and (offset, size) of its image's data
        self.extents: dict[str, tuple[int, int]] = {}
        self.images: dict[str, tuple[int, int]] = {}
        tarstream = self.tarwriter.tarstream
        add = tarstream.addfile
        self.members: dict[str, tuple[int, int]] = {}

        def addfile(tarinfo, fileobj=None):
            add(tarinfo, fileobj)
            blocks = -(-tarinfo.size // 512)
            self.members[tarinfo.name] = (tarstream.offset - blocks * 512, tarinfo.size)

        tarstream.addfile = addfile

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            sample = {"__key__": key, self.encode_format: img_str}
            if self.save_caption:
                sample["txt"] = str(caption) if caption is not None else ""
            tar_meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()
                        if k not in EXTRA_COLUMNS and k not in INTERNAL_INPUT_COLUMNS}
            sample["json"] = json.dumps(tar_meta, indent=4)
            tarstream = self.tarwriter.tarstream
            start = tarstream.offset
            self.tarwriter.write(sample)
            self.extents[key] = (start, tarstream.offset)
            self.images[key] = self.members.pop(f"{key}.{self.encode_format}")
            self.members.clear()
        for name, values in self.columns.items():
            values.append(meta[name])

    def close(self):
        self.tarwriter.close()
        self.tar_fd.close()

    def publish(self, tar_uri: str, parquet_uri: str) -> None:
        """After :meth:`close`: the tar to ``tar_uri`` and the Parquet to ``parquet_uri``, both in key order."""
        from pipelines.crawl.canonical import publish_in_key_order

        layout = publish_in_key_order(self.tar_path, self.extents, tar_uri)
        keys = self.columns["key"]
        offsets, sizes = [], []
        for key in keys:
            image = self.images.get(key)
            offsets.append(None if image is None else layout[key] + image[0] - self.extents[key][0])
            sizes.append(None if image is None else image[1])
        self.columns["jpg_offset"], self.columns["jpg_size"] = offsets, sizes
        table = pa.Table.from_pydict(self.columns, self.schema)
        table = table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), pa.int64()))
        storage.write_table(parquet_uri, table)


# ----------------------------------------------------------------------------------------------- the downloader


class CrawlDownloader(Downloader):
    """img2dataset's Downloader with clipline's per-host scheduler, guarded fetch, hashes and publishing."""

    def __init__(self, *args, settings: WorkerSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def __call__(self, row):
        _redirect_output(self.settings.log_file)
        install_limits(self.settings.max_image_pixels)  # the resizer is loaded (and quietened) where first used
        try:
            self.download_shard(row)
            return (True, row)
        except Exception as err:  # noqa: BLE001 - as img2dataset: the shard is retried by the distributor
            traceback.print_exc()
            print(f"shard {row[0]} failed with error {err}", flush=True)
            return (False, row)

    # -- one URL, in a download thread
    def _run_task(self, sched: P.ShardScheduler, tools: dict, task: P.Task) -> tuple[bool, FetchResult]:
        s = self.settings
        if task.skip_reason is not None:
            sched.finish(task, reason=task.skip_reason, requested=False)
            return True, FetchResult(None, task.skip_reason, f"{REASON_PREFIX}{task.skip_reason}: host paused "
                                     f"after repeated failures (host_failure_limit)")
        st = tools["politeness"].host(task.host)
        must_wait = False
        if task.fetch_robots:
            must_wait = self._decide_robots(sched, tools, task)
            task.fetch_robots = False
        if s.respect_robots and st.robots is not None:
            allowed, why = st.robots.can_fetch(s.user_agent_token, task.url)
            if not allowed:
                sched.finish(task, reason=why, requested=False)
                detail = "robots.txt disallows it" if why == R.ROBOTS_DISALLOWED else \
                    f"robots.txt could not be read ({st.robots.detail})"
                return True, FetchResult(None, why, f"{REASON_PREFIX}{why}: {detail}")
        if must_wait:  # the image is a second request to the host: back in the queue until its token
            sched.requeue(task)
            return False, FetchResult(None)
        task.attempts += 1
        res = fetch_image(tools["opener"], task.url, user_agent=s.user_agent, user_agent_token=s.user_agent_token,
                          directives=self.disallowed_header_directives, timeout=s.op_timeout)
        timed_out = res.reason in R.TIMEOUT_CRAWL_REASONS
        task.seconds += res.seconds
        task.timeouts += int(timed_out)
        sched.count_request(task.host, res.seconds, timed_out)
        retry = res.reason in RETRY_IN_ROUND and task.attempts <= s.retries
        if res.reason in (R.HTTP_429, R.HTTP_5XX) and res.retry_after is not None \
                and res.retry_after > s.politeness.max_retry_after:
            retry = False  # the host asks for longer than this crawl waits: leave the URL to a later round
        finished = sched.finish(task, reason=res.reason, http_status=res.http_status, retry_after=res.retry_after,
                                retry=retry)
        return finished, res

    def _decide_robots(self, sched: P.ShardScheduler, tools: dict, task: P.Task) -> bool:
        """The host's robots.txt decision: from the machine's store when another process (or the prefetch) has
        it, else fetched here and stored. True when the task must go back to the queue before its image request
        (a request was just made to the host, here or elsewhere, and its token bucket says wait)."""
        s, store = self.settings, tools["robots_store"]
        got = store.wait(task.host, s.robots_scope) if store is not None else True
        if got is not True:  # decided elsewhere: no request from this process
            prefetched = store.take_uncounted(task.host)
            if prefetched is not None:  # the prefetch's request is counted once, in the first shard that uses it
                sched.count_request(task.host, prefetched, timed_out=False)
            return sched.robots_done(task, got.policy, last_request_wall=got.fetched_at)
        policy, fetched_at, t0 = None, time.time(), time.monotonic()
        try:
            policy = fetch_robots(tools["robots_opener"], task.url, user_agent=s.user_agent,
                                  timeout=min(s.op_timeout, s.robots_timeout))
        except BaseException:  # fetch_robots classifies every failure: this is clipline's own; nothing stored
            if store is not None:
                store.release(task.host)
            raise
        finally:
            seconds = time.monotonic() - t0
            sched.count_request(task.host, seconds, timed_out=False)
            sched.robots_done(task, policy)
        if store is not None:
            store.put(task.host, s.robots_scope, policy, fetched_at=fetched_at, seconds=seconds,
                      text=policy.text if policy is not None else None)
        if policy is not None:
            policy.text = None
        return True

    def processing_settings(self) -> ProcessingSettings:
        return ProcessingSettings(resizer=self.resizer, max_image_pixels=self.settings.max_image_pixels,
                                  compute_hash=self.compute_hash, hash_images=self.settings.hash_images)

    def _helpers(self) -> ImageHelperPool | None:
        """This process's image helper processes (started at its first shard, kept for the next ones)."""
        n, shared = self.settings.image_processes, self.settings.helper_addresses
        if n < 1:
            return None
        settings = self.processing_settings()
        setup = pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)  # the downloader is unpickled per shard
        with _process_lock:
            pool = _process.get("helpers")
            if pool is not None and (pool.setup != setup or pool.shared != shared
                                     or (not shared and pool.n != n)):
                pool.close()
                pool = None
            if pool is None:
                pool = _process["helpers"] = ImageHelperPool(settings, n, name=f"image-helper-{os.getpid()}",
                                                             shared=shared)
            return pool

    @staticmethod
    def _failed(exc: BaseException) -> FetchResult:
        """What a URL ends with when clipline's own code failed on it (a bug must not lose a row)."""
        return FetchResult(None, "other:" + " ".join(str(exc).split())[:100], f"worker error: {exc}")

    def _hand_over(self, task, res: FetchResult, helpers: ImageHelperPool | None, results, errors) -> None:
        """The downloaded body of a finished URL to the helpers (the row reaches ``results`` when they answer,
        while this thread downloads on), or processed here when no helper is ready."""
        data, res.data = res.data, None  # only the published image is kept from here on
        if helpers is not None:
            def done(out, task=task, res=res):
                if isinstance(out, Exception):
                    errors.append(f"image processing of {task.url}: {type(out).__name__}: {out}")
                    results.put((task, self._failed(out), None))
                else:
                    results.put((task, res, out))

            try:
                helpers.submit(data, done)
                return
            except HelperUnavailable:
                pass
        self._in_thread += 1  # a lost update under a race only skews a statistic
        try:
            processed = process_body(self.processing_settings(), data)
        except Exception as exc:  # noqa: BLE001
            errors.append(traceback.format_exc())
            results.put((task, self._failed(exc), None))
            return
        results.put((task, res, processed))

    def _thread_loop(self, sched, tools, results, errors, helpers) -> None:
        while True:
            task = sched.take()
            if task is None:
                return
            try:
                finished, res = self._run_task(sched, tools, task)
            except Exception as exc:  # noqa: BLE001 - a bug must not lose a row: it ends with its message
                errors.append(traceback.format_exc())
                try:
                    sched.finish(task, reason="other:worker error", requested=False)
                except Exception:  # noqa: BLE001
                    pass
                results.put((task, self._failed(exc), None))
                continue
            if not finished:
                continue
            if res.data is None:
                results.put((task, res, None))
            else:
                self._hand_over(task, res, helpers, results, errors)

    # -- one shard, in the worker process
    def download_shard(self, row):  # noqa: C901 - mirrors img2dataset's download_shard
        import queue

        s = self.settings
        shard_id, shard_file = row
        start_time, cpu0 = time.time(), time.process_time()
        tools = process_tools(s)
        with storage.open_read(shard_file) as f:  # img2dataset's Arrow shard, in local staging
            df = pa.ipc.open_file(f).read_all()
        schema = df.schema
        for name, tp in (("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                         ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                         ("original_height", pa.int32())):
            schema = schema.append(pa.field(name, tp))
        if self.compute_hash is not None and self.compute_hash not in schema.names:
            schema = schema.append(pa.field(self.compute_hash, pa.string()))
        for f in EXTRA_FIELDS:
            schema = schema.append(f)

        pydict = df.select(self.column_list).to_pydict()
        shard_to_dl = list(enumerate(zip(*(pydict[col] for col in self.column_list))))
        del pydict, df
        count = len(shard_to_dl)
        url_i = self.column_list.index("url")
        caption_i = self.column_list.index("caption") if "caption" in self.column_list else None
        prior_i = self.column_list.index("prior_timeouts") if "prior_timeouts" in self.column_list else None

        sched = P.ShardScheduler(tools["politeness"], [(k, x[url_i]) for k, x in shard_to_dl],
                                 respect_robots=s.respect_robots, robots_scope=s.robots_scope)
        results: queue.Queue = queue.Queue(maxsize=self.thread_count * 2)  # bounds images held in memory
        errors: list[str] = []
        helpers = self._helpers()
        helper_cpu0, shared_cpu0, deaths0, self._in_thread = (
            (helpers.cpu_s(), helpers.shared_cpu_s(), helpers.deaths, 0) if helpers else (0.0, 0.0, 0, 0))
        threads = [threading.Thread(target=self._thread_loop, args=(sched, tools, results, errors, helpers), daemon=True,
                                    name=f"crawl-{shard_id}-{i}") for i in range(self.thread_count)]
        for t in threads:
            t.start()

        writer = self.sample_writer_class(shard_id, self.output_folder, self.save_caption, self.oom_shard_count,
                                          schema, self.encode_format)
        oom_sample_per_shard = math.ceil(math.log10(self.number_sample_per_shard))
        from img2dataset.logger import CappedCounter

        status_dict = CappedCounter()
        reasons: collections.Counter = collections.Counter()
        successes = failed_to_download = failed_to_resize = 0
        last_progress = 0.0
        for done in range(1, count + 1):
            task, res, processed = results.get()
            _, sample = shard_to_dl[task.key]
            str_key = compute_key(task.key, shard_id, oom_sample_per_shard, self.oom_shard_count)
            caption = sample[caption_i] if caption_i is not None else None
            prior = int(sample[prior_i] or 0) if prior_i is not None else 0
            meta = {**{self.column_list[i]: sample[i] for i in range(len(self.column_list))},
                    "key": str_key, "status": None, "error_message": res.message, "width": None, "height": None,
                    "original_width": None, "original_height": None}
            if self.compute_hash is not None:
                meta[self.compute_hash] = None
            meta.update({c: None for c in EXTRA_COLUMNS})
            meta.update(fetch_seconds=round(task.seconds, 4), attempts=task.attempts, timeouts=prior + task.timeouts,
                        host=task.host)
            img = None
            if processed is None:
                failed_to_download += 1
                meta["status"] = "failed_to_download"
                meta["reason"] = res.reason
                status_dict.increment(res.message or res.reason)
            elif processed.error is not None:
                failed_to_resize += 1
                meta.update(status="failed_to_resize", error_message=processed.error,
                            reason=normalise_reason(processed.error))
                status_dict.increment(processed.error)
            else:
                img = processed.img
                successes += 1
                status_dict.increment("success")
                meta.update(status="success", error_message=None, width=processed.width, height=processed.height,
                            original_width=processed.original_width, original_height=processed.original_height)
                if self.compute_hash is not None:
                    meta[self.compute_hash] = processed.source_hash
                if processed.columns:
                    meta.update(processed.columns)
            if meta["reason"] is not None:
                reasons[meta["reason"]] += 1
            writer.write(img, str_key, caption, meta)
            now = time.monotonic()
            if s.progress_dir and (now - last_progress >= PROGRESS_INTERVAL_S or done == count):
                last_progress = now
                self._progress(shard_id, done, count, successes, reasons, tools)
        sched.close()
        for t in threads:
            t.join(timeout=5)
        writer.close()
        end_time = time.time()
        for e in errors:
            print(e, flush=True)

        name = f"{shard_id:0{self.oom_shard_count}d}"
        stats = {
            "count": count, "successes": successes, "failed_to_download": failed_to_download,
            "failed_to_resize": failed_to_resize, "duration": end_time - start_time, "start_time": start_time,
            "end_time": end_time, "status_dict": dict(status_dict.dump()), "reasons": dict(reasons),
            "hosts": {h: st.to_dict() for h, st in sorted(sched.stats.items())},
            "hosts_paused": tools["politeness"].paused_hosts(),
            "worker_cpu_s": round(time.process_time() - cpu0, 3),
            # image helper processes: their CPU in this shard (their start included), images the download threads
            # processed themselves (while the helpers started, or without helpers), helpers that died
            "helper_cpu_s": round(helpers.cpu_s() - helper_cpu0, 3) if helpers else 0.0,
            # the round's shared helpers' CPU on this shard's images (their process is the round's child: this
            # is also in the crawl caller's children CPU once the round ends, unlike helper_cpu_s)
            "shared_helper_cpu_s": round(helpers.shared_cpu_s() - shared_cpu0, 3) if helpers else 0.0,
            "processed_in_thread": self._in_thread,
            "helper_deaths": helpers.deaths - deaths0 if helpers else 0,
        }
        # Publish: tar and Parquet first (in key order: same layout whatever the timing), the stats file last (its
        # presence means the shard is finished).
        writer.publish(storage.join(s.publish_dir, f"{name}.tar"), storage.join(s.publish_dir, f"{name}.parquet"))
        storage.write_json(storage.join(s.publish_dir, f"{name}_stats.json"), stats)
        storage.delete(writer.tar_path)
        storage.delete(shard_file)

    def _progress(self, shard_id, done, total, successes, reasons, tools) -> None:
        body = {"shard": shard_id, "done": done, "total": total, "successes": successes, "reasons": dict(reasons),
                "hosts_paused": tools["politeness"].paused_hosts(), "t": time.time()}
        try:
            storage.write_bytes_atomic(os.path.join(self.settings.progress_dir, f"{shard_id:05d}.json"),
                                       json.dumps(body).encode())
        except OSError:
            pass  # progress is best effort
