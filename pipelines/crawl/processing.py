"""What the crawl makes of one downloaded body: img2dataset's resize / re-encode, then the published image's sha256,
size, pHash and dHash. The same function runs in an image helper process (:mod:`pipelines.crawl.image_helper`, the
default) or in a download thread (``image_processes: 0``), so both give the same bytes and the same columns."""
from __future__ import annotations

import hashlib
import io
import pickle
import threading
import warnings
from dataclasses import dataclass

from PIL import Image

from pipelines.crawl.ssrf import REASON_PREFIX


@dataclass
class Processed:
    """img2dataset's resizer output for a downloaded body and the published image's columns."""

    img: bytes | None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    error: str | None = None
    columns: dict | None = None
    source_hash: str | None = None


@dataclass(frozen=True)
class ProcessingSettings:
    """Everything :func:`process_body` needs besides the body (picklable: it is sent to the helper processes)."""

    resizer: object  # a PixelLimitResizer around img2dataset's Resizer
    max_image_pixels: int
    compute_hash: str | None  # hashlib name of the source-bytes hash img2dataset records (e.g. "sha256"), or None
    hash_images: bool


class PixelLimitResizer:
    """Wraps img2dataset's Resizer: reads only the image header first and refuses images declaring more than
    ``max_pixels`` pixels, or whose header cannot be read, before the decoder allocates anything (img2dataset's
    own max_image_area check runs after a full decode, too late for a decompression bomb)."""

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
        except Exception as exc:  # noqa: BLE001 - a header PIL cannot read: refuse rather than guess its size
            return None, None, None, None, None, f"{REASON_PREFIX}decode_error: unreadable image header ({exc})"
        if width * height > self.max_pixels:
            return (None, None, None, None, None,
                    f"{REASON_PREFIX}too_large: image declares {width}x{height} = {width * height} pixels, "
                    f"more than max_image_pixels={self.max_pixels}")
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


class LazyResizer:
    """The crawl's resizer (a :class:`PixelLimitResizer` around img2dataset's Resizer) travelling as its pickle,
    loaded where it is first called (after :func:`quiet_resizer`). A crawl worker process that hands its images to
    the image helpers never calls it, so it never imports img2dataset's resizer module, whose albumentations import
    costs ~1 s of CPU per process start (and img2dataset's distributor starts a new worker process every 5
    shards). The helpers, and a worker that processes images itself, load it once per process."""

    def __init__(self, resizer):
        self._blob = pickle.dumps(resizer, protocol=pickle.HIGHEST_PROTOCOL)
        self._resizer = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"blob": self._blob}

    def __setstate__(self, state):
        self._blob, self._resizer, self._lock = state["blob"], None, threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._resizer is not None

    def load(self):
        """The resizer itself (unpickled, img2dataset's resizer module imported and quietened, on first use)."""
        if self._resizer is None:
            with self._lock:
                if self._resizer is None:
                    quiet_resizer()
                    self._resizer = pickle.loads(self._blob)
        return self._resizer

    def __call__(self, img_stream, blurring_bbox_list=None):
        return self.load()(img_stream, blurring_bbox_list)


def install_limits(max_image_pixels: int) -> None:
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def quiet_resizer() -> None:
    """Prepares img2dataset's Resizer for the crawl (a crawl worker, an image helper), leaving its output as it is:

    - it silences OpenCV by swapping the process's stdout/stderr file descriptors around each call, which is not
      thread-safe; where it runs those descriptors already go to the crawl's log, so the swap becomes a no-op;
    - it builds a new albumentations transform (``A.LongestMaxSize(...)`` etc.) for every image, ~0.1 ms of
      Python per image, a quarter of its CPU on a thumbnail: the module's ``A`` becomes :class:`ReusedTransforms`,
      which hands out one transform per arguments and thread (the same bytes: tested)."""
    import contextlib

    import img2dataset.resizer as resizer_module

    resizer_module.SuppressStdoutStderr = contextlib.nullcontext
    if not isinstance(resizer_module.A, ReusedTransforms):
        resizer_module.A = ReusedTransforms(resizer_module.A)


class ReusedTransforms:
    """Stands in for the ``albumentations`` module inside ``img2dataset.resizer``: ``A.Name(**kwargs)`` returns
    the transform built the first time this thread asked for that name and those arguments. A transform keeps
    the last call's parameters on itself, so the cache is per thread; the transforms the Resizer uses
    (LongestMaxSize, SmallestMaxSize, CenterCrop, PadIfNeeded, all with p=1.0) depend on nothing else."""

    def __init__(self, module):
        self._module = module
        self._local = threading.local()

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not (isinstance(attr, type) and issubclass(attr, self._module.BasicTransform)):
            return attr

        def reused(**kwargs):
            cache = self._local.__dict__.setdefault("transforms", {})
            key = (name, repr(sorted(kwargs.items())))
            transform = cache.get(key)
            if transform is None:
                if len(cache) >= 64:
                    cache.clear()
                transform = cache[key] = attr(**kwargs)
            return transform

        return reused


class _JpegGrey:
    """The published JPEG's grey image as imagehash sees it (``Image.open(...).convert("L")``), decoded by OpenCV
    (only ever given the crawl's own published image, which OpenCV encoded: 1 or 3 components, complete): the same
    libjpeg-turbo decode (integer IDCT, fancy upsampling) without Pillow's Python marker parser, then Pillow's own
    RGB -> L conversion: 0.23 vs 0.39 ms for the decode and conversion of a 128 px thumbnail (the whole columns:
    0.84x the CPU, benchmarks/crawl_hash_bench.py). Checked against Pillow's decode on the first
    ``VERIFY_FIRST`` images of the process and every ``VERIFY_EVERY``-th after; after one difference the process
    uses Pillow only (counted in ``mismatches``), so a platform whose decoders disagree still gets imagehash's bits."""

    VERIFY_FIRST = 64
    VERIFY_EVERY = 256

    def __init__(self):
        self.seen = 0
        self.mismatches = 0
        self.enabled = True
        self._lock = threading.Lock()

    def __call__(self, data: bytes, max_pixels: int):
        """(grey "L" image, width, height), or None where Pillow must decode (not a complete JPEG, OpenCV refused
        it, too many pixels, or the decoders disagreed)."""
        if not self.enabled or not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"):
            return None
        import cv2
        import numpy as np

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.shape[0] * bgr.shape[1] > max_pixels:
            return None
        height, width = bgr.shape[:2]
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        grey = Image.frombuffer("RGB", (width, height), rgb, "raw", "RGB", 0, 1).convert("L")
        with self._lock:
            self.seen += 1
            verify = self.seen <= self.VERIFY_FIRST or self.seen % self.VERIFY_EVERY == 0
        if verify:
            with Image.open(io.BytesIO(data)) as img:
                ref = img if img.mode == "L" else img.convert("L")
                same = ref.size == grey.size and ref.tobytes() == grey.tobytes()
            if not same:
                with self._lock:
                    self.mismatches += 1
                    self.enabled = False
                return None
        return grey, int(width), int(height)


JPEG_GREY = _JpegGrey()


def image_columns(img_str: bytes, max_pixels: int) -> dict:
    """sha256, decoded size, pHash and dHash of a published image, decoded once here so that the images stage does
    not decode it again. The hashes are imagehash's (hash_size 8) bit for bit: the same greyscale pixels (a JPEG
    through :data:`JPEG_GREY`, anything else through Pillow), LANCZOS resizes (Pillow's, as matrix products:
    ``pipelines.decontam.lanczos``) and DCT (``pipelines.decontam.hashing``), one conversion shared by both
    hashes."""
    from pipelines.decontam import hashing, lanczos
    from pipelines.images import checks

    sha = hashlib.sha256(img_str).hexdigest()
    fast = JPEG_GREY(img_str, max_pixels)
    if fast is not None:
        grey, width, height = fast
        error = None
    else:
        info = checks.inspect_image(img_str, max_pixels=max_pixels, decode="exact")
        width, height, error = info.width, info.height, info.error
        grey = None if error else info.image if info.image.mode == "L" else info.image.convert("L")
    out = {"img_sha256": sha, "img_width": width, "img_height": height, "img_error": error, "phash": None,
           "dhash": None}
    if grey is not None:
        small_p, small_d = lanczos.resize_grey(grey, [(hashing.PHASH_SIZE, hashing.PHASH_SIZE), (9, 8)])
        out["phash"] = int(hashing.phash64_from_grey(small_p[None])[0])
        out["dhash"] = int(hashing.dhash64_from_grey(small_d[None])[0])
    return out


def process_body(settings: ProcessingSettings, data: bytes) -> Processed:
    """Resize / re-encode ``data`` with img2dataset's Resizer and compute the published image's columns."""
    img, width, height, original_width, original_height, error = settings.resizer(io.BytesIO(data), None)
    if error is not None:
        return Processed(None, error=error)
    out = Processed(img, width, height, original_width, original_height)
    if settings.compute_hash is not None:
        out.source_hash = getattr(hashlib, settings.compute_hash)(data).hexdigest()
    if settings.hash_images:
        out.columns = image_columns(img, settings.max_image_pixels)
    return out
