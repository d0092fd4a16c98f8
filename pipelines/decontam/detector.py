"""Near-duplicate detector: an index of evaluation images (hash variants + thumbnails) and pool-vs-index matching.

Stage 1 (recall): pHash of every robustness variant of every evaluation image in a multi-index hash table; each
pool image is hashed as found and trimmed (see :mod:`variants`) and every index entry within ``radius`` bits is
a candidate. Stage 2 (precision): the best few candidate variant pairs per (pool image, evaluation image) are
re-aligned and checked by :mod:`verify`. Compute then decide: a candidate keeps its scores, so thresholds can be
re-applied to ``candidates`` without hashing again.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from pipelines.decontam.hashing import open_for_hash, phash64_batch
from pipelines.decontam.mih import MultiIndexHash
from pipelines.decontam.variants import COMPATIBLE, EVAL_VARIANTS, QUERY_VARIANTS, apply_variant, query_variants
from pipelines.decontam.verify import VerifyConfig, aligned_scores, passes, patch

INDEX_FORMAT = 1
THUMB = 64  # side of the stored grey evaluation thumbnail used for re-alignment


@dataclass(frozen=True)
class DetectorConfig:
    # pHash Hamming radius of the candidate search. pHash sets exactly 32 of 64 bits (greater than the median), so
    # distances are even: 8 = 9. Measured on planted CIFAR-10 copies (docs/benchmarks_decontam.md), 8 keeps recall
    # >= 0.95 with the hand check; 10 adds ~1.7 points of recall at 4-8x the search cost.
    radius: int = 8
    n_blocks: int | None = None  # multi-index blocks; None = chosen from the index size
    max_checks: int = 6  # candidate variant pairs verified per (pool image, eval image), closest first
    verify: bool = True  # False = stage 1 only (every candidate within radius is a match)
    verify_cfg: VerifyConfig = field(default_factory=VerifyConfig)
    batch_size: int = 1024
    # Learned check (CLIP appendix C, :mod:`learned`): used when True and the index has a trained net attached;
    # a candidate then also needs embedding cosine >= min_cos. Off by default: on planted CIFAR-10 copies it added
    # no precision on top of the hand check and cost recall (docs/benchmarks_decontam.md).
    learned: bool = False
    min_cos: float = 0.8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DetectorConfig":
        d = dict(d or {})
        vc = VerifyConfig(**d.pop("verify_cfg", {}) or {})
        return cls(verify_cfg=vc, **d)

    def with_thresholds(self, **kw) -> "DetectorConfig":
        """Override by flat names: radius, max_checks, verify, min_ncc, min_gncc, min_std, min_grad..."""
        top = {k: v for k, v in kw.items() if k in self.__dataclass_fields__ and v is not None}
        vkw = {k: v for k, v in kw.items() if k in VerifyConfig.__dataclass_fields__ and v is not None}
        unknown = set(kw) - set(top) - set(vkw) - {k for k, v in kw.items() if v is None}
        if unknown:
            raise ValueError(f"unknown detector thresholds {sorted(unknown)}")
        d = self.to_dict()
        d.update(top)
        d["verify_cfg"] = {**d["verify_cfg"], **vkw}
        return DetectorConfig.from_dict(d)


@dataclass(frozen=True)
class Match:
    eval_set: str
    eval_id: str
    pool_key: str
    distance: int  # pHash Hamming distance of the matched variant pair
    variant: str  # "<query variant>~<eval variant>", e.g. "trim~mirror+crop90-tl"
    ncc: float
    gncc: float
    cos: float | None = None  # learned-embedding cosine, when the learned check ran


def to_grey(img: Image.Image) -> Image.Image:
    return img if img.mode == "L" else img.convert("L")


@dataclass
class EvalIndex:
    """Hash variants of evaluation images plus their grey thumbnails (for re-alignment)."""

    set_names: list[str]  # per eval row
    ids: list[str]  # per eval row
    thumbs: np.ndarray  # (n_eval, THUMB, THUMB) uint8
    hashes: np.ndarray  # (n_entries,) uint64
    owner: np.ndarray  # (n_entries,) int32 eval row
    variant: np.ndarray  # (n_entries,) int16 index into EVAL_VARIANTS
    sizes: dict[str, int] = field(default_factory=dict)  # eval set -> number of examples
    embedder: object | None = field(default=None, repr=False)  # learned.NearDupEmbedder, optional
    emb: np.ndarray | None = field(default=None, repr=False)  # (n_eval, dim) embeddings of the thumbnails
    _mih: MultiIndexHash | None = field(default=None, repr=False)

    @classmethod
    def build(cls, named_images: Iterable[tuple[str, str, Image.Image]]) -> "EvalIndex":
        """``named_images``: (eval set name, eval id, image) triples."""
        set_names, ids, thumbs, hashes = [], [], [], []
        sizes: dict[str, int] = {}
        batch: list[Image.Image] = []

        def flush():
            if batch:
                hashes.append(phash64_batch(batch))
                batch.clear()

        for name, ex_id, img in named_images:
            g = to_grey(img)
            set_names.append(name)
            ids.append(str(ex_id))
            sizes[name] = sizes.get(name, 0) + 1
            thumbs.append(np.asarray(g.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8))
            batch.extend(apply_variant(g, v) for v in EVAL_VARIANTS)
            if len(batch) >= 8192:
                flush()
        flush()
        n, nv = len(ids), len(EVAL_VARIANTS)
        return cls(
            set_names=set_names,
            ids=ids,
            thumbs=np.stack(thumbs) if thumbs else np.zeros((0, THUMB, THUMB), np.uint8),
            hashes=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
            owner=np.repeat(np.arange(n, dtype=np.int32), nv),
            variant=np.tile(np.arange(nv, dtype=np.int16), n),
            sizes=sizes,
        )

    @classmethod
    def from_eval_sets(cls, eval_sets) -> "EvalIndex":
        return cls.build((es.name, ex.id, ex.image) for es in eval_sets for ex in es)

    def train_learned(self, cfg=None, log=None) -> None:
        """Train the learned near-duplicate net on this index's thumbnails and attach it (needs torch)."""
        from pipelines.decontam.learned import train_embedder  # noqa: PLC0415 - keeps torch optional

        self.attach_learned(train_embedder(self.thumbs, cfg, log=log))

    def attach_learned(self, embedder) -> None:
        self.embedder = embedder
        self.emb = embedder.embed_thumbs(self.thumbs)

    def mih(self, cfg: DetectorConfig) -> MultiIndexHash:
        if self._mih is None or (cfg.n_blocks and cfg.n_blocks != self._mih.n_blocks):
            self._mih = MultiIndexHash(self.hashes, n_blocks=cfg.n_blocks, radius_hint=cfg.radius)
        return self._mih

    def save(self, path: str) -> None:
        """One .npz, written to a temporary name and renamed so a half-written index is never read."""
        tmp = f"{path}.tmp.npz"
        meta = {"format": INDEX_FORMAT, "variants": [v.name for v in EVAL_VARIANTS], "sizes": self.sizes}
        np.savez(tmp, set_names=np.array(self.set_names, dtype=str), ids=np.array(self.ids, dtype=str),
                 thumbs=self.thumbs, hashes=self.hashes, owner=self.owner, variant=self.variant,
                 meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        net_path = learned_path(path)
        if self.embedder is not None:
            self.embedder.save(net_path)
        elif os.path.exists(net_path):
            os.remove(net_path)  # a stale net of an earlier index must not be paired with this one

    @classmethod
    def load(cls, path: str) -> "EvalIndex":
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not an evaluation-set index written by EvalIndex.save ({exc})") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("variants") != [v.name for v in EVAL_VARIANTS]:
            raise ValueError(f"{path}: index format/variants differ from this version; rebuild the index")
        index = cls(set_names=[str(s) for s in z["set_names"]], ids=[str(s) for s in z["ids"]], thumbs=z["thumbs"],
                    hashes=z["hashes"], owner=z["owner"], variant=z["variant"], sizes=dict(meta["sizes"]))
        if os.path.exists(learned_path(path)):
            from pipelines.decontam.learned import NearDupEmbedder  # noqa: PLC0415 - torch only when used

            index.attach_learned(NearDupEmbedder.load(learned_path(path)))
        return index


def learned_path(index_path: str) -> str:
    """Where the learned near-duplicate net of an index is saved: next to it, ``<name>.neardup.npz``."""
    stem = index_path[:-4] if index_path.endswith(".npz") else index_path
    return f"{stem}.neardup.npz"


def decode_pool_image(data: bytes) -> Image.Image:
    """Grey image for matching: JPEGs decode at a reduced DCT scale (>= 64 px a side) to save most decode time."""
    return to_grey(open_for_hash(data, min_side=THUMB))


def match_batch(index: EvalIndex, keys: Sequence[str], images: Sequence[Image.Image],
                cfg: DetectorConfig) -> tuple[list[Match], list[dict]]:
    """Match a batch of pool images; returns (accepted matches, every verified candidate with its scores)."""
    nq = len(QUERY_VARIANTS)
    greys = [to_grey(im) for im in images]
    qimgs = [q for g in greys for q in query_variants(g)]
    if not qimgs or len(index.hashes) == 0:
        return [], []
    qh = phash64_batch(qimgs)
    qrow, trow, dist = index.mih(cfg).search(qh, cfg.radius)
    pool_i, qvar = qrow // nq, qrow % nq
    erow, evar = index.owner[trow], index.variant[trow]
    compatible = np.array([EVAL_VARIANTS[e].name in COMPATIBLE[QUERY_VARIANTS[q].name]
                           for q, e in zip(qvar, evar)], dtype=bool)
    pool_i, qvar, erow, evar, dist = (a[compatible] for a in (pool_i, qvar, erow, evar, dist))
    # Closest variant pairs first within each (pool image, eval image) group.
    order = np.lexsort((evar, qvar, dist, erow, pool_i))
    matches, cands = [], []
    qpatch_cache: dict[tuple[int, int], np.ndarray] = {}
    thumb_cache: dict[int, Image.Image] = {}
    pool_emb = None
    if cfg.learned and index.embedder is not None and len(order):
        # Embed the as-found and border-trimmed query of every pool image that has a candidate.
        hit = np.unique(pool_i)
        pe = index.embedder.embed([qimgs[p * nq + q] for p in hit for q in (0, 1)]).reshape(len(hit), 2, -1)
        pool_emb = dict(zip(hit.tolist(), pe))
    i = 0
    while i < len(order):
        p, e = int(pool_i[order[i]]), int(erow[order[i]])
        j = i
        while j < len(order) and pool_i[order[j]] == p and erow[order[j]] == e:
            j += 1
        group = order[i:j][: cfg.max_checks]
        i = j
        best = None
        cos = None if pool_emb is None else round(float(np.max(pool_emb[p] @ index.emb[e])), 4)
        for k in group:
            q, v, d = int(qvar[k]), int(evar[k]), int(dist[k])
            name = f"{QUERY_VARIANTS[q].name}~{EVAL_VARIANTS[v].name}"
            if not cfg.verify:
                best = (d, name, 1.0, 1.0, True)
                if cos is not None:
                    cands.append({"pool_key": keys[p], "eval_set": index.set_names[e], "eval_id": index.ids[e],
                                  "distance": d, "variant": name, "ncc": 1.0, "gncc": 1.0, "passed": True,
                                  "cos": cos})
                break
            qp = qpatch_cache.get((p, q))
            if qp is None:
                qp = qpatch_cache[(p, q)] = patch(qimgs[p * nq + q], cfg.verify_cfg.size)
            th = thumb_cache.get(e)
            if th is None:
                th = thumb_cache[e] = Image.fromarray(index.thumbs[e], "L")
            c, g, ep = aligned_scores(th, EVAL_VARIANTS[v], qp, cfg.verify_cfg)
            ok = passes(c, g, ep, qp, cfg.verify_cfg)
            cands.append({"pool_key": keys[p], "eval_set": index.set_names[e], "eval_id": index.ids[e],
                          "distance": d, "variant": name, "ncc": c, "gncc": g, "passed": ok, "cos": cos})
            if ok and (best is None or g > best[3]):
                best = (d, name, c, g, True)
        if best is not None and (cos is None or cos >= cfg.min_cos):
            matches.append(Match(index.set_names[e], index.ids[e], keys[p], best[0], best[1],
                                 round(best[2], 4), round(best[3], 4), cos))
    return matches, cands


def find_matches(index: EvalIndex, items: Iterable[tuple[str, Image.Image | bytes]],
                 cfg: DetectorConfig | None = None, errors: list[str] | None = None) -> Iterator[Match]:
    """Stream matches of (key, image or encoded bytes) pool items; undecodable items go to ``errors``."""
    cfg = cfg or DetectorConfig()
    keys, imgs = [], []
    for key, item in items:
        try:
            img = decode_pool_image(item) if isinstance(item, (bytes, bytearray, memoryview)) else item
        except Exception as exc:  # PIL raises many exception types on bad data
            if errors is not None:
                errors.append(f"{key}: not a readable image ({type(exc).__name__}: {exc})")
            continue
        keys.append(key)
        imgs.append(img)
        if len(keys) >= cfg.batch_size:
            yield from match_batch(index, keys, imgs, cfg)[0]
            keys, imgs = [], []
    if keys:
        yield from match_batch(index, keys, imgs, cfg)[0]


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
