"""Dataset roots: numbered, immutable versions of one dataset and an atomic LATEST pointer (local or s3://).

Layout of a root::

    ROOT/DATASET.json                 marks a dataset root (format, created, crawl-store back-off policy)
    ROOT/LATEST                       "0003": the newest published version (one whole write: rename / one PUT)
    ROOT/versions/0003/               shards/ (tar + Parquet + sizes.json), rejected/*.parquet, manifest.json,
                                      README.md + card.html + card/*.png (the data card), VERSION.json (last)
    ROOT/work/                        stage directories shared by every version (curate, crawl, pool, decontam,
                                      balance), the build's staging output (work/build) and downloads in flight
    ROOT/crawl_store/                 pipelines.dataset.crawl_store: every URL's download, shared by every version
    ROOT/takedowns/                   pipelines.dataset.takedown: recorded removal requests

Why a staging output: a stage's fingerprint includes the URI of its rejected file, which lives under the build's
``out``; building each version straight into ``versions/NNNN`` would give every stage a new fingerprint and
reuse nothing. The build therefore always writes to ``ROOT/work/build`` and :func:`publish` copies the result
into ``versions/NNNN`` (hard links locally, server-side copies on S3), then writes the card, then ``VERSION.json``,
and moves ``LATEST`` last. A build killed at any point leaves ``LATEST`` on the previous version; numbers above
``LATEST`` are leftovers of an aborted build (never published) and the next build removes and reuses them.

A version is published when ``LATEST`` >= its number and its ``VERSION.json`` exists. ``VERSION.json`` holds what
the version was built from (the effective build config, ``as_of``, the state key, the parent), its sizes, and
what the build reused. The manifest gets a ``dataset`` section: version, parent (number + sha256 of its manifest),
``as_of``, state key and takedowns.

State key (:func:`state_key`): content hashes of every input file and of the query list, the evaluation-set
fingerprints, the build config without paths, and the takedown set's fingerprint. A scheduled build whose state key
equals the latest version's, with no stored crawl failure of that version due for retry at ``as_of``, writes
nothing (see :func:`flows.versions.build_version`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

from pipelines.core import storage
from pipelines.core.errors import ClipError

FORMAT = "clipline-dataset"
FORMAT_VERSION = 1
_NUM = re.compile(r"\d{4,}")


class DatasetError(ClipError):
    """A dataset root or version that cannot be used as asked (names the root / version)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class DatasetRoot:
    uri: str

    # -- opening
    @classmethod
    def open(cls, uri: str, *, create: bool = False, backoff: dict | None = None,
             dry_run: bool = False) -> "DatasetRoot":
        """The root at ``uri``. ``create``: make one when ``uri`` is absent or an empty directory. Anything else
        without ``DATASET.json`` is not a dataset root (DatasetError). ``dry_run``: the same checks, nothing
        written (a build checks its config before it creates a root)."""
        uri = str(uri).rstrip("/") if storage.is_s3(str(uri)) else str(uri)
        root = cls(uri)
        marker = root.path("DATASET.json")
        if storage.exists(marker):
            try:
                doc = storage.read_json(marker)
            except ValueError:
                doc = {}
            if doc.get("format") != FORMAT:
                raise DatasetError(f"{uri}: DATASET.json is not a clipline dataset marker")
            return root
        if not create:
            raise DatasetError(f"{uri}: not a clipline dataset root (no DATASET.json); build one with "
                               f"`clipline build --dataset {uri} ...`")
        if _non_empty(uri):
            raise DatasetError(f"{uri}: not a clipline dataset root (no DATASET.json) and not empty; use a new "
                               f"directory or prefix for a dataset root")
        if not dry_run:
            storage.write_json(marker, {"format": FORMAT, "version": FORMAT_VERSION, "created_at": _now(),
                                        "backoff": backoff or {}})
        return root

    def settings(self) -> dict:
        uri = self.path("DATASET.json")
        return storage.read_json(uri) if storage.exists(uri) else {}

    # -- paths
    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def work(self) -> str:
        return self.path("work")

    @property
    def staging(self) -> str:
        return self.path("work", "build")

    @property
    def crawl_store(self) -> str:
        return self.path("crawl_store")

    @property
    def takedowns(self) -> str:
        return self.path("takedowns")

    def version_dir(self, n: int) -> str:
        return self.path("versions", f"{int(n):04d}")

    # -- versions
    def latest(self) -> int | None:
        uri = self.path("LATEST")
        if not storage.exists(uri):
            return None
        text = storage.read_bytes(uri).decode().strip()
        if not _NUM.fullmatch(text):
            raise DatasetError(f"{uri}: expected a version number, got {text[:40]!r}")
        return int(text)

    def _numbered_dirs(self) -> dict[int, str]:
        try:
            listed = storage.list_prefix(self.path("versions"))
        except storage.StorageError:
            return {}
        base = self.path("versions").rstrip("/") + "/"
        out = {}
        for uri in listed:
            first = uri[len(base):].split("/", 1)[0] if uri.startswith(base) else ""
            if _NUM.fullmatch(first):
                out[int(first)] = storage.join(self.path("versions"), first)
        return out

    def versions(self) -> list[int]:
        """Published versions, oldest first."""
        latest = self.latest()
        if latest is None:
            return []
        return sorted(n for n in self._numbered_dirs()
                      if n <= latest and storage.exists(storage.join(self.version_dir(n), "VERSION.json")))

    def info(self, n: int) -> dict:
        return storage.read_json(storage.join(self.version_dir(n), "VERSION.json"))

    def manifest(self, n: int) -> dict:
        return storage.read_json(storage.join(self.version_dir(n), "manifest.json"))

    def resolve(self, spec: str | int) -> int:
        """A published version from ``3``, ``0003``, ``v3`` or ``latest`` (DatasetError for anything else)."""
        published = self.versions()
        text = str(spec).strip().lower()
        if text == "latest":
            if not published:
                raise DatasetError(f"{self.uri}: has no published version yet")
            return published[-1]
        m = re.fullmatch(r"v?(\d+)", text)
        if not m or int(m.group(1)) not in published:
            have = ", ".join(f"{n:04d}" for n in published) or "none"
            raise DatasetError(f"{self.uri}: no version {spec!r} (published: {have})")
        return int(m.group(1))

    def next_number(self) -> int:
        return (self.latest() or 0) + 1

    def clear_aborted(self) -> list[int]:
        """Remove version directories above LATEST (an aborted build's, never published)."""
        nxt = self.next_number()
        gone = []
        for n, uri in sorted(self._numbered_dirs().items()):
            if n >= nxt:
                storage.delete_prefix(uri)
                gone.append(n)
        return gone

    def set_latest(self, n: int) -> None:
        storage.write_bytes_atomic(self.path("LATEST"), f"{int(n):04d}\n".encode())


def _non_empty(uri: str) -> bool:
    if storage.is_s3(uri):
        return bool(storage.list_prefix(uri))
    return os.path.exists(uri) and (not os.path.isdir(uri) or bool(os.listdir(uri)))


# ---------------------------------------------------------------------------------------------------- state key


def state_key(cfg, takedown_fingerprint: str) -> tuple[str, dict]:
    """(sha256, the document it hashes): what decides a version's content apart from the crawl store's clock."""
    from pipelines.curate import querylist as QL
    from pipelines.curate.readers import resolve_inputs
    from pipelines.decontam.build import eval_set_fingerprint

    files = resolve_inputs(list(cfg.inputs), url_col=cfg.url_col, caption_col=cfg.caption_col,
                           columns=list(cfg.columns) if cfg.columns else None)
    params = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "work", "dataset", "inputs")}
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()  # noqa
    doc = {"inputs": [[f.uri, storage.sha256_of(f.uri)] for f in files],
           "querylist": QL.load(cfg.querylist).content_hash,
           "eval_sets": digest([eval_set_fingerprint(s) for s in cfg.decontam.eval_sets]),
           "params": digest(params), "takedowns": takedown_fingerprint}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest(), doc


# ------------------------------------------------------------------------------------------------------ publish


def copy_file(src: str, dst: str) -> None:
    """Copy one file of a version whole (:func:`storage.copy`: a hard link locally, a server-side copy on S3)."""
    storage.copy(src, dst)


def staged_files(staging: str, manifest: dict) -> list[str]:
    """The files of a finished staging build that make a version (relative paths): the manifest's shards, their
    sizes.json and every rejected Parquet."""
    rel = []
    for s in manifest["shards"]:
        stem = s["name"][:-len(".tar")]
        rel += [f"shards/{stem}.tar", f"shards/{stem}.parquet"]
    if storage.exists(storage.join(staging, "shards", "sizes.json")):
        rel.append("shards/sizes.json")
    try:
        rejected = storage.list_prefix(storage.join(staging, "rejected"))
    except storage.StorageError:
        rejected = []
    base = storage.join(staging, "rejected").rstrip("/") + "/"
    rel += sorted("rejected/" + u[len(base):] for u in rejected if u.endswith(".parquet")
                  and not storage.basename(u).startswith("."))
    return rel


def publish(root: DatasetRoot, n: int, *, staging: str, dataset_section: dict, version_doc: dict,
            write_card=None) -> dict:
    """Make version ``n`` from a finished staging build: files, manifest (+ ``dataset`` section), card,
    VERSION.json, then LATEST. Returns VERSION.json's content."""
    dest = root.version_dir(n)
    manifest = storage.read_json(storage.join(staging, "manifest.json"))
    files = staged_files(staging, manifest)
    total = 0
    for rel in files:
        copy_file(storage.join(staging, rel), storage.join(dest, rel))
        total += storage.size_of(storage.join(dest, rel))
    manifest = {**manifest, "dataset": dataset_section}
    write_manifest(storage.join(dest, "manifest.json"), manifest)
    card_files = write_card(root, n, dest, manifest) if write_card else []
    total += sum(storage.size_of(u) for u in [storage.join(dest, "manifest.json"), *card_files])
    doc = {**version_doc, "version": n, "published_at": _now(),
           "samples": int(manifest["funnel"]["kept"]), "shards": len(manifest["shards"]),
           "shard_bytes": sum(storage.size_of(storage.join(dest, r)) for r in files if r.startswith("shards/")),
           "bytes": total, "files": len(files) + 1 + len(card_files)}
    storage.write_json(storage.join(dest, "VERSION.json"), doc)
    root.set_latest(n)
    return doc


def write_manifest(uri: str, manifest: dict) -> None:
    """Validate (schemas.manifest) and write a manifest as pipelines.shard.writer.write_manifest does (same JSON
    layout), without importing the shard writer (and Beam) into the publish step."""
    from schemas import manifest as manifest_schema

    manifest_schema.validate(manifest)
    storage.write_bytes_atomic(uri, json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False).encode())


def manifest_sha256(root: DatasetRoot, n: int) -> str:
    return storage.sha256_of(storage.join(root.version_dir(n), "manifest.json"))


# -------------------------------------------------------------------------------------------------- listing


def list_versions(root: DatasetRoot) -> list[dict]:
    """One row per published version: number, as_of, published_at, samples, shards, sizes, parent, latest."""
    latest = root.latest()
    rows = []
    for n in root.versions():
        info = root.info(n)
        rows.append({"version": n, "latest": n == latest, "as_of": info.get("as_of"),
                     "published_at": info.get("published_at"), "samples": info.get("samples"),
                     "shards": info.get("shards"), "shard_bytes": info.get("shard_bytes"), "bytes": info.get("bytes"),
                     "parent": info.get("parent"), "reason": info.get("reason"),
                     "reused": info.get("reused", [])})
    return rows


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------- manifest comparison

TIMING_KEYS = frozenset({"elapsed_s", "seconds", "start_time", "end_time", "download_seconds", "worker_cpu_s",
                         "fetch_seconds", "published_at", "created_at", "recorded_at", "log_file"})
CRAWL_ACTIVITY = ("crawl_store", "fetch", "rounds", "hosts", "n_hosts", "host_totals")


def comparable_manifest(doc: dict) -> dict:
    """A manifest without what legitimately differs between an incremental and a from-scratch build of the same
    inputs, seed and ``as_of``: timing fields (keys in :data:`TIMING_KEYS`, outside ``params`` and ``stages``,
    whose ``*_seconds`` keys are settings), the crawl's and decontamination's activity this time (what was downloaded
    or matched vs reused: :data:`CRAWL_ACTIVITY`, ``decontam.activity``), and the ``dataset`` section (version number, parent). Everything else -- lineage,
    params, seeds, funnel, per-step curation figures, decontamination, balancing, entry counts, every shard's tar
    and Parquet sha256, stage fingerprints, tool versions -- must be equal. Paths are kept: compare two builds made
    at the same ROOT path."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    out = {k: (v if k in ("params", "stages") else strip(v)) for k, v in doc.items() if k != "dataset"}
    if isinstance(out.get("crawl"), dict):
        out["crawl"] = {k: v for k, v in out["crawl"].items() if k not in CRAWL_ACTIVITY}
    if isinstance(out.get("decontam"), dict):  # images matched now vs taken from the per-image cache
        out["decontam"] = {k: v for k, v in out["decontam"].items() if k != "activity"}
    return out
