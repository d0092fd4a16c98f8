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


class DecontamStage(Stage):
    """inputs: ``{"pool": POOL_DIR}``; output: the decontam directory; ``rejected``: one Parquet file."""

    name = "decontam"

    def input_files(self) -> list[str]:
        from pipelines.images.stage import pool_files

        return pool_files(self.inputs["pool"])

    def extra_fingerprint(self):
        return [eval_set_fingerprint(s) for s in self.config.eval_sets]

    def compute(self, fingerprint: str) -> StageResult:
        from pipelines.images.stage import read_rows

        cfg, out_dir = self.config, self.output
        rejected_uri = self.rejected or storage.join(storage.parent(out_dir), "rejected", "decontam.parquet")
        matches_uri = storage.join(out_dir, "matches.parquet")
        drop_uri = storage.join(out_dir, "drop.parquet")
        cols = ["uid", "url", "caption", "status", "sha256", "crawl_tar", "jpg_offset", "jpg_size"]
        rows = [r for r in read_rows(self.input_files(), columns=cols) if r["status"] == "ok"]
        errors: list[str] = []
        from pipelines.decontam.transform import matches_table

        if cfg.eval_sets and rows:
            from pipelines.decontam.detector import DetectorConfig
            from pipelines.decontam.transform import build_index, decontaminate_pool
            from pipelines.shard.writer import _read_images

            index = build_index(list(cfg.eval_sets))
            det = DetectorConfig.from_dict(dict(cfg.detector))
            tables = []
            for i in range(0, len(rows), CHUNK):
                chunk = rows[i:i + CHUNK]
                images = _read_images(chunk)
                tables.append(decontaminate_pool(((r["uid"], images[r["uid"]]) for r in chunk), index, det, errors))
            matches = pa.concat_tables(tables) if tables else matches_table([])
        else:
            matches = matches_table([])
        matches = matches.sort_by([("pool_key", "ascending"), ("eval_set", "ascending"), ("eval_id", "ascending")])
        by_uid: dict[str, list[str]] = {}
        for uid, eval_set, eval_id in zip(matches.column("pool_key").to_pylist(),
                                          matches.column("eval_set").to_pylist(),
                                          matches.column("eval_id").to_pylist()):
            by_uid.setdefault(uid, []).append(f"{eval_set}:{eval_id}")
        dropped = [r for r in rows if r["uid"] in by_uid]
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
        return StageResult(
            stage="decontam", input_rows=len(rows), kept=len(rows) - len(dropped), rejected=by_reason,
            outputs={"matches": matches_uri, "drop": drop_uri, "rejected": rejected_uri},
            params=self.params(), fingerprint=fingerprint,
            details={"eval_sets": list(cfg.eval_sets), "pool_ok": len(rows), "n_dropped": len(dropped),
                     "matches": matches.num_rows, "matches_per_eval_set": dict(sorted(per_set.items())),
                     "unreadable": len(errors), "detector": dict(cfg.detector)})


def decontaminate_build(pool_dir: str, eval_specs, out_dir: str, *, rejected_uri: str,
                        detector: dict | None = None) -> StageResult:
    """Run :class:`DecontamStage` (reusing a finished output with the same pool, eval sets and detector)."""
    return DecontamStage(DecontamConfig(tuple(eval_specs), dict(detector or {})), {"pool": pool_dir}, out_dir,
                         rejected=rejected_uri).run()
