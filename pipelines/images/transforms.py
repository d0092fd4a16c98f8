"""Beam composite transforms of the images stage: read the crawl, check images, exact and near dedup.

Each transform wraps pure functions (``checks``, ``near_dedup``, the batched hashes of
``pipelines.images.fast_hash``). Records are dicts shaped like ``schemas.sample`` rows (plus ``image`` bytes until
the checks drop them). Transforms that reject return a tagged result with ``ok`` and ``rejected`` outputs, and a
rejected row always carries ``stage`` and ``reason``, so the funnel adds up.
"""
from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam import pvalue

from pipelines.images import checks, fast_hash, near_dedup
from pipelines.images.crawl_reader import crawl_shards_by_round, final_outcomes, read_crawl_shard, read_image

OK, REJECTED = "ok", "rejected"


def reject_row(rec: dict, stage: str, reason: str, *, status: str = "rejected", duplicate_of: str | None = None) -> dict:
    """A record as a rejected row (no image bytes) with its stage and reason: every transform's REJECTED output."""
    out = {k: v for k, v in rec.items() if k != "image"}
    out.update(status=status, stage=stage, reason=reason, duplicate_of=duplicate_of)
    return out


class ReadCrawl(beam.PTransform):
    """img2dataset webdataset output (``CRAWL/NNNNN.tar`` + ``.parquet``) -> one record per crawled row."""

    def __init__(self, crawl_dir: str):
        super().__init__()
        self.crawl_dir = crawl_dir

    def expand(self, pbegin):
        listed = crawl_shards_by_round(self.crawl_dir)  # listed at construction time: a missing crawl fails fast
        pairs = [(pq_uri, tar_uri) for _r, pq_uri, tar_uri in listed]
        rounds = [r for r, _p, _t in listed] if all(r is not None for r, _p, _t in listed) else None
        outcomes = final_outcomes(pairs, rounds) if len(pairs) > 1 else None  # re-crawl rounds: one record per uid
        return (pbegin
                | "CrawlShards" >> beam.Create(pairs)
                | "SpreadShards" >> beam.Reshuffle()
                | "ReadShard" >> beam.FlatMap(read_crawl_shard, outcomes))


def hash_decode(exact_hashes: bool, reduced_decode: bool) -> str:
    """The ``fast_hash`` decode the two config switches select; a contradictory pair is a clear error."""
    if reduced_decode and exact_hashes:
        raise ValueError("images config: reduced_decode=True cannot give exact hashes; set exact_hashes=False "
                         "as well (pHash then differs from imagehash's in a few bits on some images)")
    return "exact" if exact_hashes else "reduced" if reduced_decode else "luma"


class _CheckBatch(beam.DoFn):
    def __init__(self, min_side: int, max_aspect: float, max_pixels: int, decode: str):
        self.min_side, self.max_aspect, self.max_pixels = min_side, max_aspect, max_pixels
        self.decode = decode

    def _from_crawl(self, rec: dict, h: dict):
        """Decide with the measurements the crawl made on the published image (no decode here): the same
        outcome and row as decoding it again, since the crawl ran the same inspection and hashes."""
        rec = {k: v for k, v in rec.items() if k not in ("image", "crawl_hashes")}
        if h["img_error"]:
            return pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", h["img_error"]))
        width, height = int(h["img_width"]), int(h["img_height"])
        if width * height > self.max_pixels:
            return pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", checks.TOO_LARGE))
        w = rec.get("original_width") or width
        h_ = rec.get("original_height") or height
        for reason in (checks.check_size(w, h_, self.min_side), checks.check_aspect(w, h_, self.max_aspect)):
            if reason:
                return pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", reason))
        rec.update(sha256=h["img_sha256"], width=width, height=height, original_width=w, original_height=h_,
                   status="ok", stage=None, reason=None, duplicate_of=None, phash=int(h["phash"]),
                   dhash=int(h["dhash"]))
        return rec

    def process(self, batch: Sequence[dict]):
        good, images = [], []
        for rec in batch:
            if rec.get("status") != "success":
                # One vocabulary of crawl reasons (pipelines.crawl.reasons), not img2dataset's free text.
                from pipelines.crawl.reasons import normalise_reason

                reason = normalise_reason(rec.get("error_message") or rec.get("status"))
                yield pvalue.TaggedOutput(REJECTED, reject_row(rec, "crawl", reason[:300], status="failed"))
                continue
            hashes = rec.get("crawl_hashes")
            if hashes is not None:
                if self.decode == "exact":  # what the crawl computed is exactly what we would compute
                    yield self._from_crawl(rec, hashes)
                    continue
                rec = {k: v for k, v in rec.items() if k != "crawl_hashes"}
                rec["image"] = read_image(rec)  # another decode was asked for: read the published bytes
            if rec.get("image") is None:
                yield pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", checks.MISSING_IMAGE))
                continue
            info = checks.inspect_image(rec["image"], max_pixels=self.max_pixels, decode=self.decode,
                                        hash_side=fast_hash.REDUCED_MIN_SIDE)
            if info.error:
                yield pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", info.error))
                continue
            # Size and shape are judged on the image as published (img2dataset may have resized or padded it).
            w = rec.get("original_width") or info.width
            h = rec.get("original_height") or info.height
            for reason in (checks.check_size(w, h, self.min_side), checks.check_aspect(w, h, self.max_aspect)):
                if reason:
                    yield pvalue.TaggedOutput(REJECTED, reject_row(rec, "images", reason))
                    break
            else:
                row = {k: v for k, v in rec.items() if k != "image"}
                row.update(sha256=checks.sha256_hex(rec["image"]), width=info.width, height=info.height,
                           original_width=w, original_height=h, status="ok", stage=None, reason=None,
                           duplicate_of=None)
                good.append(row)
                images.append(info.image)
        if good:
            # One decode per image serves the size checks and both hashes; the resize and DCT run per batch.
            phashes, dhashes = fast_hash.hashes_from_images(images)
            for row, ph, dh in zip(good, phashes, dhashes):
                row["phash"], row["dhash"] = int(ph), int(dh)
                yield row


class CheckImages(beam.PTransform):
    """Crawl failures, decode errors, too small, bad aspect -> ``rejected``; the rest get sha256/pHash/dHash.

    Records of a clipline crawl carry the published image's sha256/pHash/dHash/size computed in the crawl worker
    (``crawl_hashes``): with ``exact_hashes`` they are used as they are and no image is read or decoded here.

    Hashes are computed per batch (``fast_hash``: resize as matrix products, one DCT for the batch). With
    ``exact_hashes`` (default) they equal imagehash's bit for bit; ``exact_hashes=False`` decodes a JPEG's luma only
    (faster; a few bits differ on some images), and with ``reduced_decode`` at a reduced JPEG scale (fastest,
    least faithful). Measured in docs/benchmarks_images.md.
    """

    def __init__(self, min_side: int = 32, max_aspect: float = 3.0, max_pixels: int = 64_000_000,
                 batch_size: int = 256, reduced_decode: bool = False, exact_hashes: bool = True):
        super().__init__()
        self.min_side, self.max_aspect, self.max_pixels, self.batch_size = min_side, max_aspect, max_pixels, batch_size
        self.decode = hash_decode(exact_hashes, reduced_decode)

    def expand(self, records):
        return (records
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
                | "Check" >> beam.ParDo(_CheckBatch(self.min_side, self.max_aspect, self.max_pixels, self.decode))
                .with_outputs(REJECTED, main=OK))


DUPLICATES = "duplicates"


def _exact_decisions(item):
    sha, members = item
    members = sorted(members, key=lambda m: m[0])  # (uid, phash): the smallest uid is kept
    keeper = members[0][0]
    yield {"uid": keeper, "phash": members[0][1]}
    for uid, _phash in members[1:]:
        yield pvalue.TaggedOutput(DUPLICATES, ((uid, sha), keeper))


class ExactDuplicateKeys(beam.PTransform):
    """Exact duplicates (the same image sha256): the smallest uid is kept, the others are ``exact_duplicate`` of it.
    Decided from keys alone: only ``(sha256, (uid, phash))`` is shuffled, never a row.

    Main output: ``{"uid", "phash"}`` of each image's kept row (what near dedup looks at next);
    ``DUPLICATES``: ``((uid, sha256), kept uid)`` for every other row with that image. The images stage joins these
    to the rows in the shuffle that groups its output files, so a row crosses one shuffle. (Where one uid appears
    twice with the same image, the kept uid is its own: one of its rows is kept.)"""

    def expand(self, rows):
        return (rows
                | "ShaKeys" >> beam.Map(lambda r: (r["sha256"], (r["uid"], r["phash"])))
                | "GroupSha" >> beam.GroupByKey()
                | "KeepSmallest" >> beam.FlatMap(_exact_decisions).with_outputs(DUPLICATES, main=OK))


def exact_duplicate_row(row: dict, keeper: str) -> dict:
    return reject_row(row, "dedup", checks.EXACT_DUP, duplicate_of=keeper)


def _apply_roots(item):
    _uid, grouped = item
    rows, roots = list(grouped["row"]), list(grouped["root"])
    for row in rows:
        if roots:
            yield pvalue.TaggedOutput(REJECTED, near_duplicate_row(row, roots[0]))
        else:
            yield row


class NearComponents(beam.CombineFn):
    """Connected components of the near-duplicate edges as a combiner: each worker folds the edges of its bundles
    into a union-find forest of the uids it saw (smallest uid as root), the forests are flattened and merged, and
    the output maps every uid that is not its component's smallest to that smallest uid. So the edges are never
    gathered in one place (a ``ToList`` of every edge did, ~150 bytes an edge on one worker): the merge holds the
    uids that have a near duplicate, once each."""

    def create_accumulator(self) -> dict[str, str]:
        return {}

    def add_input(self, parent, edge):
        near_dedup.union(parent, edge[0], edge[1])
        return parent

    def merge_accumulators(self, accumulators):
        forests = iter(accumulators)
        merged = next(forests, None)
        if merged is None:
            return {}
        for other in forests:  # only the first accumulator may be modified (Beam's contract)
            for x, p in other.items():
                near_dedup.union(merged, x, p)
        return merged

    def compact(self, parent):
        return near_dedup.flatten(parent)

    def extract_output(self, parent):
        return near_dedup.flatten(parent)


class NearDuplicateRoots(beam.PTransform):
    """pHash within ``radius`` bits -> ``(uid, root)`` for every uid that is not the smallest of its connected
    component (root: that smallest uid). Only ``(block, (uid, phash))`` pairs and uids are shuffled, never rows.

    Candidate pairs come from multi-index hashing buckets (``radius + 1`` blocks, pigeonhole) and are verified by
    their real distance; never all-pairs. ``radius`` < 0 switches near dedup off (no roots).
    """

    def __init__(self, radius: int = 4):
        super().__init__()
        self.radius = radius

    def expand(self, rows):
        r = self.radius
        if r < 0:
            return rows | "NoRoots" >> beam.FlatMap(lambda x: [])
        edges = (rows
                 | "Blocks" >> beam.FlatMap(lambda x: [(b, (x["uid"], x["phash"])) for b in near_dedup.blocks(x["phash"], r)])
                 | "GroupBlocks" >> beam.GroupByKey()
                 | "VerifyPairs" >> beam.FlatMap(lambda kv: near_dedup.bucket_pairs(kv[0][0], list(kv[1]), r)))
        return (edges
                | "Components" >> beam.CombineGlobally(NearComponents())
                | "Roots" >> beam.FlatMap(lambda parent: sorted(parent.items())))


def near_duplicate_row(row: dict, root: str) -> dict:
    return reject_row(row, "dedup", checks.NEAR_DUP, duplicate_of=root)


class NearDedup(beam.PTransform):
    """Rows -> OK (each near-duplicate component's smallest uid, and rows without near duplicates) and REJECTED
    (``near_duplicate`` of that smallest uid): :class:`NearDuplicateRoots` joined back to the rows by uid. (The
    images stage joins the roots in the shuffle that groups its output files instead, saving this one.)"""

    def __init__(self, radius: int = 4):
        super().__init__()
        self.radius = radius

    def expand(self, rows):
        if self.radius < 0:
            return rows | "NoNearDedup" >> beam.FlatMap(lambda x: [x]).with_outputs(REJECTED, main=OK)
        roots = rows | "NearRoots" >> NearDuplicateRoots(self.radius)
        keyed = rows | "ByUid" >> beam.Map(lambda x: (x["uid"], x))
        return ({"row": keyed, "root": roots}
                | "JoinRoots" >> beam.CoGroupByKey()
                | "Decide" >> beam.FlatMap(_apply_roots).with_outputs(REJECTED, main=OK))
