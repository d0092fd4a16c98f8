"""Typed configuration of the crawl stage: img2dataset's settings, the SSRF guard, download limits, politeness."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pipelines.core import storage
from pipelines.core.config import Config, check
from pipelines.core.errors import ConfigError

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# img2dataset's own default list (noai / noimageai opt out of AI training, noindex / noimageindex of indexing),
# plus noml (opt-out of machine learning, used by several publishers).
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noml", "noindex", "noimageindex")
DEFAULT_CONTACT_URL = "https://github.com/clipline/clipline#crawler"
DISTRIBUTORS = ("multiprocessing", "pyspark")


@dataclass(frozen=True)
class CrawlConfig(Config):
    """Everything that shapes a crawl; saved next to its output (``_clipline/round-NNN.config.json``).

    Images: ``image_size`` / ``resize_mode``: img2dataset's resizer ("keep_ratio_largest" keeps the aspect ratio
    with the longest side = image_size; ``resize_only_if_bigger`` never upscales).

    Time: ``timeout`` bounds each socket operation (connect, one read); ``max_download_seconds`` bounds one
    download's wall time, redirects, headers and body together: every socket read waits at most the time left and
    the connection is closed at the deadline. ``retries``: extra attempts per URL within a round for quick
    transient failures (connection errors, 5xx, 429 after its back-off); a timeout is not retried within a round.
    ``recrawl_rounds``: rounds after round 0 that fetch again the retryable failures (never a URL that timed out
    twice).

    Politeness (per host = scheme + host name + port): at most ``per_host_connections`` requests at once and
    ``per_host_rps`` requests per second (token bucket, burst 1; None = no rate limit) in each crawl process;
    these are the limits of the whole crawl: with ``processes`` > 1 each process gets ``per_host_connections //
    processes`` (at least 1, so with more processes than connections a host may see one per process) and
    ``per_host_rps / processes`` (why: :mod:`pipelines.crawl.politeness`). A 429 or 503 pauses the host for
    its ``Retry-After`` (capped at ``max_retry_after_seconds``), else for ``backoff_base_seconds`` doubled per
    consecutive 429/5xx; ``host_failure_limit`` connect errors / timeouts in a row pause the host for
    ``host_pause_seconds`` and its pending URLs end as ``host_unavailable`` (retried in a later round).

    robots.txt: fetched once per host with ``robots_timeout`` and shared by the crawl processes of a machine and
    the crawl's rounds (:mod:`pipelines.crawl.robots_store`; 24 h at most); 4xx = allow all, 5xx / timeout /
    connection error = disallow all (``robots_unavailable``, for the round only); checked for ``user_agent_token``
    before any request to a URL. ``robots_prefetch_threads`` (multiprocessing distributor; 0 = off): threads of
    the calling process that fetch robots.txt ahead of the crawl processes, in the URL list's order
    (:mod:`pipelines.crawl.robots_prefetch`). ``respect_robots: false`` switches it off. Requests send
    ``User-Agent: clipline/<token> (+contact)``.

    Guard: ``allow_cidrs`` are address ranges allowed in addition to public addresses (e.g. ("127.0.0.1/32",) for
    a local test server); everything else private, loopback, link-local, multicast, reserved or cloud-metadata stays
    blocked, checked on every connection (redirect hops included). DNS answers are cached per host for at most
    ``dns_cache_seconds``. ``max_image_pixels``: images declaring more are refused before decoding;
    ``max_image_bytes``: a body larger than this is cut off.

    ``hash_images``: compute each published image's sha256/pHash/dHash/size in the crawl (~0.3 ms of CPU per 128 px
    image there, none in the images stage).

    ``image_processes``: helper processes per crawl process that resize / re-encode the downloaded images and hash
    them (:mod:`pipelines.crawl.image_helper`): the crawl process keeps to the network and its GIL, the helpers use
    the cores. None (default) = the machine's cores divided by ``processes``, at least 1 and at most 4 (1 with the
    pyspark distributor, whose executors share machines in ways the driver does not see); 0 = the download threads
    do it in the crawl process. Each busy helper uses one core. ``shared_image_helpers`` (default true; the
    multiprocessing distributor only): the round starts ``processes`` x ``image_processes`` helpers once, before
    the first download, and every crawl process connects to all of them; false: each crawl process starts its own
    (again whenever img2dataset's pool replaces a worker process, every 5 shards).

    ``staging_dir``: local directory where a round's shards are written before being published to the crawl
    directory (default: the system temp directory); needed because the crawl directory may be ``s3://``.

    ``url_list_part_rows``: a round-0 URL list of more candidates than this is built and read in parts of about
    this many rows (uid ranges), so that neither the driver nor img2dataset's reader holds the whole list
    (:mod:`pipelines.crawl.url_lists`; the parts go through ``staging_dir``). Up to it, the list is built whole.
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
    recrawl_rounds: int = 1
    processes: int = 1
    thread_count: int = 32
    number_sample_per_shard: int = 10000
    url_list_part_rows: int = 2_000_000
    allow_cidrs: tuple[str, ...] = ()
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 32 * 1024 * 1024
    user_agent_token: str = "clipline"
    contact_url: str = DEFAULT_CONTACT_URL
    disallowed_header_directives: tuple[str, ...] = field(default=DEFAULT_DISALLOWED_DIRECTIVES)
    respect_robots: bool = True
    robots_timeout: float = 5.0
    robots_prefetch_threads: int = 8
    per_host_connections: int = 2
    per_host_rps: float | None = 5.0
    host_failure_limit: int = 5
    host_pause_seconds: float = 600.0
    max_retry_after_seconds: float = 60.0
    backoff_base_seconds: float = 1.0
    dns_cache_seconds: float = 300.0
    compute_hash: str | None = "sha256"
    # pHash/dHash/sha256/size of each published image computed in the crawl worker (the images stage then reads
    # them instead of decoding every image again); off: the images stage decodes and hashes as before.
    hash_images: bool = True
    image_processes: int | None = None
    shared_image_helpers: bool = True
    max_shard_retry: int = 1
    # img2dataset's distributor: "multiprocessing" on one machine, "pyspark" on a Spark cluster (the downloader is
    # pickled to the executors, which need clipline installed and publish their shards themselves).
    distributor: str = "multiprocessing"
    staging_dir: str | None = None

    def __post_init__(self):
        # Lists from YAML/JSON/CLI become tuples, so the config stays hashable and compares by value.
        for name in ("allow_cidrs", "disallowed_header_directives"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value or ()))
        self._check()

    def _check(self) -> None:
        def number(name: str, *, integer: bool, minimum: float, strict: bool = False, optional: bool = False):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            where = f"crawl.{name}"
            check(ok_type and not isinstance(value, bool), where,
                  f"expected {'an integer' if integer else 'a number'}, got {value!r}")
            check(math.isfinite(value), where, f"expected a finite number, got {value!r}")
            if strict:
                check(value > minimum, where, f"must be > {minimum:g}, got {value!r}")
            else:
                check(value >= minimum, where, f"must be >= {minimum:g}, got {value!r}")

        for name in ("image_size", "processes", "thread_count", "number_sample_per_shard", "url_list_part_rows",
                     "max_image_pixels", "max_image_bytes", "per_host_connections", "host_failure_limit",
                     "max_shard_retry"):
            number(name, integer=True, minimum=1)
        for name in ("min_image_size", "retries", "recrawl_rounds"):
            number(name, integer=True, minimum=0)
        number("image_processes", integer=True, minimum=0, optional=True)
        number("robots_prefetch_threads", integer=True, minimum=0)
        number("encode_quality", integer=True, minimum=0)
        check(self.encode_quality <= (9 if self.encode_format == "png" else 100), "crawl.encode_quality",
              f"must be <= {9 if self.encode_format == 'png' else 100} for {self.encode_format}, "
              f"got {self.encode_quality}")
        for name in ("timeout", "max_download_seconds", "robots_timeout", "dns_cache_seconds"):
            number(name, integer=False, minimum=0, strict=True)
        for name in ("host_pause_seconds", "max_retry_after_seconds", "backoff_base_seconds"):
            number(name, integer=False, minimum=0)
        number("per_host_rps", integer=False, minimum=0, strict=True, optional=True)
        for name in ("resize_only_if_bigger", "respect_robots", "hash_images", "shared_image_helpers"):
            check(isinstance(getattr(self, name), bool), f"crawl.{name}",
                  f"expected true or false, got {getattr(self, name)!r}")
        check(self.distributor in DISTRIBUTORS, "crawl.distributor",
              f"{self.distributor!r} is not one of {', '.join(DISTRIBUTORS)}")
        check(self.resize_mode in RESIZE_MODES, "crawl.resize_mode",
              f"{self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        check(self.encode_format in ("jpg", "png", "webp"), "crawl.encode_format",
              f"{self.encode_format!r} is not one of jpg, png, webp")
        check(self.compute_hash in (None, "md5", "sha256", "sha512"), "crawl.compute_hash",
              f"{self.compute_hash!r} is not one of null, md5, sha256, sha512")
        check(isinstance(self.user_agent_token, str) and self.user_agent_token.strip() != ""
              and all(c.isalnum() or c in "-_" for c in self.user_agent_token), "crawl.user_agent_token",
              f"expected a product token (letters, digits, - and _), got {self.user_agent_token!r}")
        check(isinstance(self.contact_url, str) and self.contact_url.startswith(("http://", "https://", "mailto:")),
              "crawl.contact_url", f"expected an http(s):// or mailto: URL, got {self.contact_url!r}")
        from pipelines.crawl.ssrf import AddressPolicy

        try:
            AddressPolicy(self.allow_cidrs)
        except ValueError as exc:
            raise ConfigError(f"crawl.{exc}") from None

    # ---- derived settings
    @property
    def user_agent(self) -> str:
        """The User-Agent header: names the project, the token robots.txt rules match, and a contact URL."""
        return f"Mozilla/5.0 (compatible; {self.user_agent_token}/1.0; +{self.contact_url})"

    def per_process_connections(self) -> int:
        return max(1, self.per_host_connections // self.processes)

    def per_process_rps(self) -> float | None:
        return None if self.per_host_rps is None else self.per_host_rps / self.processes

    def image_processes_per_process(self) -> int:
        """``image_processes``, or its default: this machine's cores / ``processes`` (1..4; 1 on pyspark)."""
        if self.image_processes is not None:
            return self.image_processes
        if self.distributor == "pyspark":
            return 1
        return max(1, min(4, (os.cpu_count() or 1) // self.processes))

    # ---- compatibility and files
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CrawlConfig":
        return cls.from_mapping(data)

    @classmethod
    def from_file(cls, uri: str) -> "CrawlConfig":
        """Load from YAML or JSON (a mapping of field names to values), local or s3://."""
        text = storage.read_bytes(str(uri)).decode()
        try:
            if str(uri).endswith(".json"):
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except ValueError as exc:
            raise ConfigError(f"{uri}: not valid JSON/YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{uri}: expected a mapping of CrawlConfig fields, found {type(data).__name__}")
        try:
            return cls.from_mapping(data)
        except ConfigError as exc:
            raise ConfigError(f"{uri}: {exc}") from None

    def replace(self, **changes) -> "CrawlConfig":
        return self.from_mapping({**self.to_dict(), **changes})
