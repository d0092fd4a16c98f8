"""img2dataset, called as a library, with clipline's SSRF guard and size limits installed in its worker processes.

img2dataset downloads with ``urllib.request.urlopen`` in worker processes that its multiprocessing distributor
starts with the *spawn* method, so nothing set up in the parent (an installed opener, PIL limits) reaches them.
What does reach them is the pickled ``Downloader`` object. So for the duration of a call, ``img2dataset.main``'s
``Downloader`` name is pointed at :class:`GuardedDownloader`, a subclass whose ``__call__`` (run in the worker,
once per shard) installs the guarded opener before downloading; its instances carry the limits with them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import urllib.request
import warnings
from dataclasses import dataclass

# Before img2dataset (and so albumentations, wandb) is imported anywhere in this process or its spawned workers:
# albumentations otherwise checks PyPI for a newer version on import, and wandb must stay off.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import importlib  # noqa: E402

from img2dataset import download as _img2dataset_download  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.crawl.config import CrawlConfig  # noqa: E402
from pipelines.crawl.ssrf import REASON_PREFIX, AddressPolicy, build_guarded_opener  # noqa: E402

# The module, not the package attribute of the same name (img2dataset/__init__ exports a *function* main).
_img2dataset_main = importlib.import_module("img2dataset.main")


@dataclass(frozen=True)
class FetchLimits:
    """What a worker enforces on every download (picklable: it travels inside the Downloader)."""

    allow_cidrs: tuple[str, ...]
    max_bytes: int
    max_seconds: float
    max_image_pixels: int

    @classmethod
    def from_config(cls, config: CrawlConfig) -> "FetchLimits":
        return cls(tuple(config.allow_cidrs), int(config.max_image_bytes), float(config.max_download_seconds),
                   int(config.max_image_pixels))


_installed: FetchLimits | None = None


def install_guard(limits: FetchLimits) -> None:
    """Install the guarded opener as this process's urllib default and set the decoders' pixel limits.

    Only for processes that exist to crawl (img2dataset's workers): it changes process-wide defaults.
    """
    global _installed
    if _installed == limits:
        return
    urllib.request.install_opener(
        build_guarded_opener(AddressPolicy(limits.allow_cidrs), max_bytes=limits.max_bytes,
                             max_seconds=limits.max_seconds))
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    _installed = limits


class PixelLimitResizer:
    """Wraps img2dataset's Resizer: reads only the image header first and refuses images declaring more than
    ``max_pixels`` pixels, before the decoder allocates them (img2dataset's own max_image_area check runs after a
    full decode, too late for a decompression bomb)."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        try:
            with Image.open(img_stream) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as exc:
            return None, None, None, None, None, f"{REASON_PREFIX}too_large: {exc}"
        except Exception:  # noqa: BLE001 - not a format PIL knows: the resizer's decoder judges it
            width = height = 0
        if width * height > self.max_pixels:
            return (None, None, None, None, None,
                    f"{REASON_PREFIX}too_large: image declares {width}x{height} = {width * height} pixels, "
                    f"more than max_image_pixels={self.max_pixels}")
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that installs the guard in whichever process runs it."""

    def __init__(self, *args, fetch_limits: FetchLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetch_limits = fetch_limits
        self.resizer = PixelLimitResizer(self.resizer, fetch_limits.max_image_pixels)

    def __call__(self, row):
        install_guard(self.fetch_limits)
        return super().__call__(row)


_patch_lock = threading.Lock()


class _SignalShim:
    """Stands in for the ``signal`` module inside img2dataset.main, which installs a SIGINT handler (clean up,
    then ``sys.exit(0)``) and never removes it: that would turn a later Ctrl-C in the calling program into a
    successful exit, and it raises ValueError off the main thread (Prefect runs tasks in worker threads). The shim
    installs the handler only on the main thread, and restores the previous one afterwards."""

    def __init__(self, real):
        self._real = real
        self._saved: list = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def signal(self, signum, handler):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = self._real.signal(signum, handler)
        self._saved.append((signum, previous))
        return previous

    def restore(self):
        while self._saved:
            signum, previous = self._saved.pop()
            self._real.signal(signum, previous)


@contextlib.contextmanager
def patched_img2dataset(limits: FetchLimits):
    """While open, ``img2dataset.download`` builds GuardedDownloaders and leaves SIGINT handling as it found it."""
    with _patch_lock:  # one guarded crawl at a time per process: the patched name is module-global
        original = _img2dataset_main.Downloader
        if original is not Downloader:
            raise RuntimeError("img2dataset.main.Downloader is not img2dataset's Downloader; another patch is active")
        _img2dataset_main.Downloader = functools.partial(GuardedDownloader, fetch_limits=limits)
        shim = _SignalShim(_img2dataset_main.signal)
        _img2dataset_main.signal = shim
        # OpenCV reads its own pixel limit once, when the library loads in a worker: set it for the spawned
        # workers' environment as a second line of defence behind PixelLimitResizer.
        saved = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(limits.max_image_pixels)
        try:
            yield
        finally:
            _img2dataset_main.Downloader = original
            _img2dataset_main.signal = shim._real
            shim.restore()
            if saved is None:
                os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
            else:
                os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = saved


def img2dataset_kwargs(config: CrawlConfig, *, url_list: str, output_folder: str, input_format: str = "parquet",
                       additional_columns: list[str] | None = None, incremental_mode: str = "incremental") -> dict:
    """The keyword arguments clipline passes to ``img2dataset.download`` for ``config`` (the benchmark's plain
    img2dataset baseline uses the very same)."""
    return dict(
        url_list=url_list,
        output_folder=output_folder,
        input_format=input_format,
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        save_additional_columns=additional_columns,
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.encode_quality,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_pixels,
        timeout=config.timeout,
        retries=config.retries,
        processes_count=config.processes,
        thread_count=config.thread_count,
        number_sample_per_shard=config.number_sample_per_shard,
        user_agent_token=config.user_agent_token,
        # An empty list means "honour nothing" to img2dataset only when passed as []; None would mean its defaults.
        disallowed_header_directives=list(config.disallowed_header_directives),
        compute_hash=config.compute_hash,
        extract_exif=False,
        enable_wandb=False,
        distributor=config.distributor,
        incremental_mode=incremental_mode,
        max_shard_retry=config.max_shard_retry,
    )


def guarded_download(config: CrawlConfig, **kwargs) -> None:
    """``img2dataset.download`` with the guard in its workers; kwargs as for :func:`img2dataset_kwargs`."""
    with patched_img2dataset(FetchLimits.from_config(config)):
        _img2dataset_download(**img2dataset_kwargs(config, **kwargs))
