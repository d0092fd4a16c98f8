"""Decontamination as a build stage: drop pool samples that are near-duplicates of evaluation images.

Reads the pool's ``ok`` rows and their image bytes (from the crawl tars), matches them with the detector of
``pipelines.decontam`` against every named evaluation set, and writes (all atomically, marker last):
``DECONTAM/matches.parquet`` (eval_match rows), ``DECONTAM/drop.parquet`` (the uid set to leave out) and the
rejected rows (stage ``decontam``, reason ``eval_overlap:<eval set>``). The fingerprint covers the pool, the
detector settings and each evaluation set's content, so a changed evaluation set re-decontaminates every sample.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa

from pipelines.core import markers, reasons, storage
from pipelines.core.config import Config, check
from pipelines.core.stage import Stage, StageResult
from schemas import conform
from schemas import rejected as rejected_schema

CHUNK = 1024


@dataclass(frozen=True)
class DecontamConfig(Config):
    """The evaluation sets to decontaminate against (specs such as ``cifar10:PATH``) and detector settings
    (fields of :class:`pipelines.decontam.detector.DetectorConfig`)."""

    eval_sets: tuple[str, ...] = ()
    detector: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "eval_sets", tuple(self.eval_sets or ()))
        check(all(isinstance(s, str) and s for s in self.eval_sets), "decontam.eval_sets",
              f"expected evaluation-set specs (strings), got {list(self.eval_sets)!r}")
        from pipelines.decontam.detector import DetectorConfig

        DetectorConfig.from_dict(dict(self.detector or {}))  # unknown keys / bad values fail here

    def __hash__(self):
        return hash((self.eval_sets, markers.fingerprint(self.detector)))


def eval_set_fingerprint(spec: str) -> dict:
    """What decides an evaluation set's content: its spec and the content hashes of the files it names."""
    from pipelines.evalsets import parse_spec

    kind, path, split = parse_spec(spec)
    files: list[str] = []
    if path and (storage.is_s3(path) or os.path.exists(path)):
        files = [path] if storage.is_s3(path) or os.path.isfile(path) else storage.list_prefix(path)
    return {"spec": spec, "kind": kind, "split": split,
            "files": [[os.path.relpath(f, path) if not storage.is_s3(path) and os.path.isdir(path) else
                       storage.basename(f), storage.sha256_of(f)] for f in sorted(files)]}


class _MatchChunk(beam.DoFn):
    """Match one chunk of pool rows (metadata only) against the evaluation-set index. The index is read once
    per worker from its URI; the images are read by range from the crawl tars; emits the chunk's matches and
    its count of unreadable images (small), never the images."""

    def __init__(self, index_uri: str, detector: dict):
        self.index_uri, self.detector = index_uri, detector
        self.index = None

    def setup(self):
        from pipelines.decontam.detector import EvalIndex

        # each worker reads the index once, straight into memory, from its URI (local or s3://); a learned
        # near-duplicate net saved next to it comes with it. (It used to be copied to a temporary directory
        # per worker that was never removed: 4 MB left in /tmp per worker and run.)
        self.index = EvalIndex.load(self.index_uri)

    def process(self, chunk):
        from pipelines.decontam.detector import DetectorConfig
        from pipelines.decontam.transform import decontaminate_pool
        from pipelines.shard.writer import _read_images

        errors: list[str] = []
        images = _read_images(chunk)
        table = decontaminate_pool(((r["uid"], images[r["uid"]]) for r in chunk), self.index,
                                   DetectorConfig.from_dict(dict(self.detector)), errors)
        yield {"matches": table.to_pylist(), "unreadable": len(errors),
               "unreadable_uids": [e.split(":", 1)[0] for e in errors]}


def _descriptor_fingerprint(detector: dict) -> str | None:
    """The learned copy descriptor's weights fingerprint (new weights must redo decontamination), when present."""
    try:
        from pipelines.decontam.descriptor import weights_fingerprint_of
    except ImportError:
        return None
    uri = (detector or {}).get("descriptor_weights") or (detector or {}).get("descriptor")
    try:
        return weights_fingerprint_of(uri if isinstance(uri, str) else None)
    except Exception:  # noqa: BLE001 - no weights shipped/configured: the detector runs without a descriptor
        return None


class DecontamStage(Stage):
    """inputs: ``{"pool": POOL_DIR}``; output: the decontam directory; ``rejected``: one Parquet file.

    Distributed: the evaluation-set index is built once by the driver and written to ``DECONTAM/index.npz`` (a URI
    every worker reads, like the query list); the pool's ``ok`` rows travel as metadata (uid, tar, offset: ~150
    bytes a row), grouped by crawl tar and cut into chunks of ``CHUNK`` rows, and each worker holds the index plus
    one chunk of decoded images. The driver holds only the matches. Same matches as the single-process detector:
    every pool image is matched on its own.
    """

    name = "decontam"
    cache: str | None = None  # per-image results cache (pipelines.decontam.cache); set for dataset versions

    def input_files(self) -> list[str]:
        from pipelines.images.stage import pool_files

        return pool_files(self.inputs["pool"])

    def extra_fingerprint(self):
        return {"eval_sets": [eval_set_fingerprint(s) for s in self.config.eval_sets],
                "descriptor": _descriptor_fingerprint(self.config.detector)}

    def cache_namespace(self) -> str:
        """What decides one image's result besides its bytes: the evaluation sets' content, the detector settings,
        the descriptor weights and the detector's code (every file of this package)."""
        import pathlib

        here = pathlib.Path(__file__).parent
        code = {p.name: storage.sha256_of(str(p)) for p in sorted(here.iterdir()) if p.suffix in (".py", ".npz")}
        return markers.fingerprint(self.extra_fingerprint(), dict(self.config.detector), markers.CODE_VERSION, code)

    def _match(self, files: list[str], n_ok: int, index_uri: str, summary_uri: str) -> tuple[list[dict], int, dict]:
        """The match rows of every ok pool image, and how many images were unreadable. With a cache
        (``self.cache``, set for dataset versions), images matched by an earlier build under the same namespace
        are taken from it and only the others are matched (and added to it)."""
        import tempfile

        from pipelines.decontam.cache import DecontamCache
        from pipelines.decontam.transform import build_index
        from pipelines.images.pool_chunks import map_pool_chunks, ok_rows

        cfg = self.config
        if not cfg.eval_sets or not n_ok:
            return [], 0, {"from_cache": 0, "matched_now": 0}
        cache = DecontamCache(self.cache, self.cache_namespace()) if self.cache else None
        known = cache.load() if cache is not None else {}
        sha_of = {r["uid"]: r["sha256"] for f in files for r in ok_rows(f, ("uid", "sha256"))}
        hits = frozenset(u for u, sha in sha_of.items() if sha in known)
        rows: list[dict] = [{**m, "pool_key": u} for u in sorted(hits) for m in known[sha_of[u]][1]]
        bad = {u for u in hits if known[sha_of[u]][0]}
        if len(hits) < len(sha_of):
            with tempfile.TemporaryDirectory(prefix="clipline-index-") as tmp:  # built locally, published whole
                local = os.path.join(tmp, "index.npz")
                if cache is not None and storage.exists(cache.index_uri):
                    # same namespace = same evaluation sets, detector and code: the same index
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(cache.index_uri))
                else:
                    build_index(list(cfg.eval_sets), local)
                    if cache is not None:
                        storage.write_file_atomic(cache.index_uri, local)
                storage.write_file_atomic(index_uri, local)
            parts = map_pool_chunks(files, _MatchChunk(index_uri, dict(cfg.detector)), summary_uri=summary_uri,
                                    beam_args=self.beam_args, chunk_rows=CHUNK, exclude=hits)
            new = [m for part in parts for m in part["matches"]]
            new_bad = {u for part in parts for u in part["unreadable_uids"]}
            rows += new
            bad |= new_bad
            if cache is not None:
                fresh: dict[str, tuple[bool, list[dict]]] = {sha_of[u]: (u in new_bad, []) for u in sha_of
                                                              if u not in hits}
                for m in new:
                    fresh[sha_of[m["pool_key"]]][1].append({k: v for k, v in m.items() if k != "pool_key"})
                cache.add(fresh)
        return rows, len(bad), {"from_cache": len(hits), "matched_now": len(sha_of) - len(hits)}

    def compute(self, fingerprint: str) -> StageResult:
        from pipelines.decontam.transform import matches_table
        from pipelines.images.stage import read_rows

        cfg, out_dir = self.config, self.output
        rejected_uri = self.rejected or storage.join(storage.parent(out_dir), "rejected", "decontam.parquet")
        matches_uri = storage.join(out_dir, "matches.parquet")
        drop_uri = storage.join(out_dir, "drop.parquet")
        index_uri = storage.join(out_dir, "index.npz")
        files = self.input_files()
        n_ok = sum(sum(1 for st in storage.read_table(f, columns=["status"]).column("status").to_pylist()
                       if st == "ok") for f in files)
        match_rows, unreadable, activity = self._match(files, n_ok, index_uri, storage.join(out_dir, "_chunks.json"))
        matches = matches_table(match_rows).sort_by([("pool_key", "ascending"), ("eval_set", "ascending"),
                                                     ("eval_id", "ascending")])
        by_uid: dict[str, list[str]] = {}
        for uid, eval_set, eval_id in zip(matches.column("pool_key").to_pylist(),
                                          matches.column("eval_set").to_pylist(),
                                          matches.column("eval_id").to_pylist()):
            by_uid.setdefault(uid, []).append(f"{eval_set}:{eval_id}")
        dropped = [r for r in read_rows(files, columns=["uid", "url", "caption", "status"])
                   if r["status"] == "ok" and r["uid"] in by_uid]
        dropped.sort(key=lambda r: r["uid"])
        storage.write_table(matches_uri, matches)
        storage.write_table(drop_uri, pa.table({"uid": pa.array(sorted(by_uid), pa.string())}))
        reason_of = {r["uid"]: reasons.eval_overlap(by_uid[r["uid"]][0].split(":", 1)[0]) for r in dropped}
        rejected = pa.table({
            "uid": [r["uid"] for r in dropped], "url": [r["url"] for r in dropped],
            "caption": [r["caption"] for r in dropped], "stage": [reasons.DECONTAM] * len(dropped),
            "reason": [reason_of[r["uid"]] for r in dropped],
            "source": [";".join(by_uid[r["uid"]][:5]) for r in dropped],
        })
        storage.write_table(rejected_uri, conform(rejected, rejected_schema.SCHEMA, where="decontam rejected rows"))
        per_set: dict[str, int] = {}
        for name in matches.column("eval_set").to_pylist():
            per_set[name] = per_set.get(name, 0) + 1
        by_reason: dict[str, int] = {}
        for reason in reason_of.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        outputs = {"matches": matches_uri, "drop": drop_uri, "rejected": rejected_uri}
        return StageResult(
            stage="decontam", input_rows=n_ok, kept=n_ok - len(dropped), rejected=by_reason,
            outputs=outputs, params=self.params(), fingerprint=fingerprint,
            details={"eval_sets": list(cfg.eval_sets), "pool_ok": n_ok, "n_dropped": len(dropped),
                     "matches": matches.num_rows, "matches_per_eval_set": dict(sorted(per_set.items())),
                     "unreadable": unreadable, "detector": dict(cfg.detector), "activity": activity})


def decontaminate_build(pool_dir: str, eval_specs, out_dir: str, *, rejected_uri: str,
                        detector: dict | None = None) -> StageResult:
    """Run :class:`DecontamStage` (reusing a finished output with the same pool, eval sets and detector)."""
    return DecontamStage(DecontamConfig(tuple(eval_specs), dict(detector or {})), {"pool": pool_dir}, out_dir,
                         rejected=rejected_uri).run()
