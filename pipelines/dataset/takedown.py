"""Takedowns: recorded removal requests of a dataset root, by URL, by sample uid or by domain.

    clipline takedown ROOT --urls FILE      # one http(s) URL a line
    clipline takedown ROOT --uids FILE      # one sample uid a line (32 hex digits, as in the shards)
    clipline takedown ROOT --domains FILE   # one host name a line; its subdomains are included

Lines that are empty or start with ``#`` are skipped. The whole file is checked before anything is written: a bad
line is a :class:`~pipelines.core.errors.ClipError` naming ``FILE:LINE`` and what was expected, and nothing is
recorded. A request is one JSON file ``ROOT/takedowns/NNNNNN-<kind>.json`` (values, the source file's name and
sha256, when it was recorded), written whole; the takedown set of a root is the union of all of them, and its
fingerprint is part of the crawl stage's fingerprint, so a new request makes the next build recompute from the
crawl on (nothing is downloaded again: the crawl store has the rest).

Where it applies: every later version excludes matching candidates at the crawl stage with reason ``takedown``
(:data:`pipelines.core.reasons.TAKEDOWN`; funnel key ``crawl:takedown``) before anything is fetched, so balancing,
decontamination and the shards are computed without them; ``clipline build --dataset ROOT --rebuild-latest``
produces such a version of the current data at once. Recording a request also deletes the stored image bytes of
the URLs it names from the crawl store (URL requests directly; uid and domain requests for every URL of the
latest curation's candidates they match), and every version build deletes them again for anything it finds, so
an interrupted deletion finishes on the next build. Published versions are immutable and keep their shards.

A uid request takes down that (url, caption) pair; the bytes of its URL are deleted from the store, but the same
URL under another caption is not blocked (it would be downloaded again). URL and domain requests block the URL.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import storage
from pipelines.core.errors import ClipError

KINDS = ("url", "uid", "domain")
_UID = re.compile(r"[0-9a-f]{32}")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_REQUEST = re.compile(r"(\d{6})-(url|uid|domain)\.json")


class TakedownError(ClipError, ValueError):
    """A takedown file that cannot be used (names the file and line)."""


def normalise_domain(host: str) -> str:
    return host.strip().lower().rstrip(".")


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


def parse_file(path: str, kind: str) -> list[str]:
    """The values of a takedown file, checked line by line (raises TakedownError naming ``path:line``)."""
    if kind not in KINDS:
        raise TakedownError(f"takedown kind {kind!r}: expected one of {', '.join(KINDS)}")
    try:
        raw = storage.read_bytes(path)
    except storage.StorageError:
        raise TakedownError(f"{path}: no such takedown file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise TakedownError(f"{path}:{line}: not valid UTF-8") from None
    values: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        values.append(_check(path, n, kind, item))
    if not values:
        raise TakedownError(f"{path}: no {kind}s in the file (expected one {kind} a line)")
    return sorted(set(values))


def _check(path: str, n: int, kind: str, item: str) -> str:
    where = f"{path}:{n}"
    if kind == "url":
        parts = urlsplit(item) if " " not in item else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise TakedownError(f"{where}: expected an http(s) URL, got {item[:80]!r}")
        return item
    if kind == "uid":
        if not _UID.fullmatch(item.lower()):
            raise TakedownError(f"{where}: expected a sample uid (32 hex digits), got {item[:80]!r}")
        return item.lower()
    host = normalise_domain(item)
    if "/" in item or ":" in item or not _DOMAIN.fullmatch(host):
        raise TakedownError(f"{where}: expected a domain name such as example.com (no scheme, port or path), "
                            f"got {item[:80]!r}")
    return host


@dataclass(frozen=True)
class TakedownSet:
    """Every recorded request of a root: what a build must leave out."""

    urls: frozenset[str] = frozenset()
    uids: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    requests: tuple[dict, ...] = field(default=(), compare=False)

    def __bool__(self) -> bool:
        return bool(self.urls or self.uids or self.domains)

    def fingerprint(self) -> str:
        doc = {"urls": sorted(self.urls), "uids": sorted(self.uids), "domains": sorted(self.domains)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def domain_match(self, url: str) -> bool:
        if not self.domains:
            return False
        host = host_of(url)
        while host:
            if host in self.domains:
                return True
            if "." not in host:
                return False
            host = host.split(".", 1)[1]
        return False

    def blocks_url(self, url: str) -> bool:
        """True when the URL itself is taken down (URL or domain request): never fetched again."""
        return url in self.urls or self.domain_match(url)

    def matches(self, url: str, uid: str | None = None) -> bool:
        """True when the (url, caption) pair with this uid must be left out."""
        return (uid is not None and uid in self.uids) or self.blocks_url(url)

    def summary(self) -> dict:
        return {"requests": len(self.requests), "urls": len(self.urls), "uids": len(self.uids),
                "domains": len(self.domains), "fingerprint": self.fingerprint()}


def takedown_dir(root: str) -> str:
    return storage.join(root, "takedowns")


def _request_files(directory: str) -> list[str]:
    try:
        listed = storage.list_prefix(directory)
    except storage.StorageError:
        return []
    return sorted(u for u in listed if _REQUEST.fullmatch(storage.basename(u)))


def load(directory: str) -> TakedownSet:
    """The takedown set recorded under ``directory`` (``ROOT/takedowns``); empty when there is none."""
    values: dict[str, set[str]] = {k: set() for k in KINDS}
    requests = []
    for uri in _request_files(directory):
        doc = storage.read_json(uri)
        values[doc["kind"]].update(doc["values"])
        requests.append({k: doc[k] for k in ("kind", "source", "source_sha256", "recorded_at", "n")} |
                        {"file": storage.basename(uri)})
    return TakedownSet(frozenset(values["url"]), frozenset(values["uid"]), frozenset(values["domain"]),
                       tuple(requests))


def record(directory: str, kind: str, source: str) -> dict:
    """Check ``source`` (raises naming the bad line; nothing written) and record it as one request file."""
    values = parse_file(source, kind)
    existing = _request_files(directory)
    number = max((int(_REQUEST.fullmatch(storage.basename(u)).group(1)) for u in existing), default=0) + 1
    doc = {"kind": kind, "values": values, "n": len(values), "source": str(source),
           "source_sha256": storage.sha256_of(source),
           "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    uri = storage.join(directory, f"{number:06d}-{kind}.json")
    storage.write_json(uri, doc)
    return {**doc, "file": uri}


# What urlsplit reads a URL's netloc from: the scheme and the authority, up to the first "/", "?" or "#".
_AUTHORITY = r"^(?P<a>[^/?#]*(?://[^/?#]*)?)"


def blocked_mask(tds: TakedownSet, uids: pa.Array, urls: pa.Array) -> pa.Array:
    """:meth:`TakedownSet.matches` of each (uid, url) row, column-wise: domains are checked once per distinct scheme
    + authority prefix (the host is all they read), per URL only for the rare URLs urlsplit would clean first
    (tabs, newlines, leading spaces or controls)."""
    mask = pc.is_in(uids, value_set=pa.array(sorted(tds.uids), pa.string()))
    if tds.urls:
        mask = pc.or_(mask, pc.is_in(urls, value_set=pa.array(sorted(tds.urls), pa.string())))
    if tds.domains and len(urls):
        urls = urls.cast(pa.string())
        prefix = pc.struct_field(pc.extract_regex(urls, _AUTHORITY), 0).dictionary_encode()
        hits = pa.array([tds.domain_match(p) for p in prefix.dictionary.to_pylist()], pa.bool_())
        by_prefix = hits.take(prefix.indices)
        odd = pc.match_substring_regex(urls, r"[\t\n\r]|^[\x00-\x20]")
        if pc.any(odd).as_py():
            idx = pc.indices_nonzero(odd)
            fixed = pa.array([tds.domain_match(u) for u in urls.take(idx).to_pylist()], pa.bool_())
            by_prefix = pc.replace_with_mask(by_prefix, odd, fixed)
        mask = pc.or_(mask, by_prefix)
    return pc.fill_null(mask, False)


def urls_to_delete(tds: TakedownSet, pairs: Iterable[tuple[str, str]]) -> set[str]:
    """The URLs whose stored bytes must go: every URL request, plus the URL of every (uid, url) pair that a uid or
    domain request matches."""
    out = set(tds.urls)
    for uid, url in pairs:
        if uid in tds.uids or tds.domain_match(url):
            out.add(url)
    return out


def request(root: str, kind: str, source: str) -> dict:
    """``clipline takedown``: check and record a takedown file (``kind``: url, uid or domain) in the dataset root,
    then delete the stored image bytes of the URLs it names (uid / domain requests: the URLs of matching pairs
    among the latest curation's candidates, except a URL another pair still needs). A bad line raises naming
    ``FILE:LINE`` before anything is written."""
    from pipelines.dataset.crawl_store import CrawlStore
    from pipelines.dataset.versions import DatasetRoot

    ds = DatasetRoot.open(root)
    doc = record(ds.takedowns, kind, source)  # checks every line before writing
    tds = load(ds.takedowns)
    deleted: list[str] = []
    if storage.exists(storage.join(ds.crawl_store, "STORE.json")):
        store = CrawlStore.open(ds.crawl_store, create=False)
        pairs: list[tuple[str, str]] = []
        try:
            files = [u for u in storage.list_prefix(storage.join(ds.work, "curate", "candidates"))
                     if u.endswith(".parquet")]
        except storage.StorageError:
            files = []
        for uri in files:
            t = storage.read_table(uri, columns=["uid", "url"])
            pairs.extend(zip(t.column("uid").to_pylist(), t.column("url").to_pylist()))
        live = {url for uid, url in pairs if not tds.matches(url, uid)}
        deleted = store.delete(urls_to_delete(tds, pairs) - live)
    return {**doc, "bytes_deleted": len(deleted), "takedown_set": tds.summary()}
