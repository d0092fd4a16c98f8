"""Failure modes of the synthetic web: which URLs misbehave, how, and the bytes the hostile ones serve."""
from __future__ import annotations

import struct
import zlib

import numpy as np

# Every failure mode the server can play, and the crawl reason a correct crawler must end the row with
# (None: the row must end with an image). "flaky" fails its first request(s) with 503 and then serves the image.
EXPECTED_CRAWL_REASON: dict[str, str | None] = {
    "ok": None,
    "redirect": None,  # 301 -> 302 -> image
    "flaky": None,  # 503 first, then the image: ends with an image after a retry or a re-crawl
    "http_404": "http_404",
    "http_500": "http_5xx",
    "timeout": "timeout",  # no response headers within the client's timeout
    "slow_drip": "timeout",  # headers at once, then a trickle of bytes: only a total deadline stops it
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
