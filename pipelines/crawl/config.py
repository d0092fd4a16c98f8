"""Typed configuration of the crawl stage (img2dataset settings plus the SSRF guard and download limits)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# img2dataset's own default list: noai / noimageai opt out of AI training, noindex / noimageindex of indexing.
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


@dataclass(frozen=True)
class CrawlConfig:
    """Everything that shapes a crawl; saved next to its output.

    image_size / resize_mode: img2dataset's resizer; "keep_ratio_largest" keeps the aspect ratio with the longest
    side = image_size, and resize_only_if_bigger leaves smaller images at their size (no upscaling).
    timeout: seconds per socket operation; max_download_seconds: total budget for one download's body (a slow
    drip never trips a per-operation timeout); retries: extra attempts per URL within a crawl.
    allow_cidrs: address ranges the SSRF guard lets through in addition to public addresses, e.g.
    ("127.0.0.1/32",) for a local test server; everything else private, loopback, link-local, multicast, reserved
    or cloud-metadata stays blocked.
    max_image_pixels: images declaring more pixels are refused before decoding (decompression bombs);
    max_image_bytes: a download larger than this is cut off.
    """

    image_size: int = 256
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    timeout: float = 10.0
    max_download_seconds: float = 30.0
    retries: int = 1
    processes: int = 1
    thread_count: int = 32
    number_sample_per_shard: int = 10000
    allow_cidrs: tuple[str, ...] = ()
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 32 * 1024 * 1024
    user_agent_token: str | None = "clipline"
    disallowed_header_directives: tuple[str, ...] = field(default=DEFAULT_DISALLOWED_DIRECTIVES)
    compute_hash: str | None = "sha256"
    max_shard_retry: int = 1
    # img2dataset's distributor: "multiprocessing" on one machine, "pyspark" on a Spark cluster (the guarded
    # downloader is pickled to the executors, which need clipline installed; see infra/README.md).
    distributor: str = "multiprocessing"

    def __post_init__(self):
        # Lists from YAML/JSON/CLI become tuples, so the config stays hashable and compares by value.
        for name in ("allow_cidrs", "disallowed_header_directives"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value or ()))
        problems = []
        if self.distributor not in ("multiprocessing", "pyspark", "ray"):
            problems.append(f"distributor {self.distributor!r} is not one of multiprocessing, pyspark, ray")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.encode_format not in ("jpg", "png", "webp"):
            problems.append(f"encode_format {self.encode_format!r} is not one of jpg, png, webp")
        for name in ("image_size", "processes", "thread_count", "number_sample_per_shard", "max_image_pixels",
                     "max_image_bytes"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout", "max_download_seconds"):
            if float(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.retries < 0:
            problems.append(f"retries must be >= 0, got {self.retries}")
        if self.compute_hash not in (None, "md5", "sha256", "sha512"):
            problems.append(f"compute_hash {self.compute_hash!r} is not one of None, md5, sha256, sha512")
        if problems:
            raise ValueError("invalid CrawlConfig: " + "; ".join(problems))
        from pipelines.crawl.ssrf import AddressPolicy

        AddressPolicy(self.allow_cidrs)  # raises a clear error for a malformed CIDR

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "CrawlConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CrawlConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "CrawlConfig":
        """Load from YAML or JSON (a mapping of field names to values)."""
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of CrawlConfig fields, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def replace(self, **changes) -> "CrawlConfig":
        return self.from_dict({**self.to_dict(), **changes})
