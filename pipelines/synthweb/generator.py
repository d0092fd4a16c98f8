"""Deterministic generator of the synthetic web: images, hostile routes, the raw URL list and a held-out split.

Layout written under ``out_dir``::

    images/...                  files the server serves (one JPEG per original image, near-duplicates, transformed
                                copies of held-out images, hostile bytes)
    site/routes.json            URL path -> failure mode and file (read by SynthWebServer)
    raw/pairs.parquet, .tsv     the raw URL list: url, caption + ground truth (concept, lang, failure_mode, ...,
                                contaminates = the held-out id a row copies, contamination_transform)
    heldout/<class>/<id>.jpg    held-out evaluation images of the same concepts
    heldout/classes.json        {"class_names": [...], "templates": [...]}
    synthweb.json               parameters and counts; written last (marks the web complete)

Contamination: ``contamination_rate`` of the rows (at least ``min_contaminated`` once a web has 200 pairs) serve a
transformed copy of a held-out image (:mod:`contamination`) with a clean English caption of its concept, and no
failure mode, so they reach a crawl and a build's decontamination step has real copies to find. Held-out ids are
the file stems (``h007_0003``), as the ``synth:`` evaluation-set loader names them.

The same parameters and seed give the same bytes in every file. URLs in raw/ are ``base_url + path``; the port of
a server is only known once it is bound, so :func:`materialise_url_list` rewrites raw/ for a given base URL.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from pipelines.core import storage
from pipelines.synthweb import captions as C
from pipelines.synthweb import contamination as K
from pipelines.synthweb import hostile as H
from pipelines.synthweb import vocabulary as V
from pipelines.synthweb.drawing import Scene, encode_jpeg, render, render_heldout

# 2: held-out images drawn in their own style (render_heldout); planted contamination rows and their columns.
FORMAT_VERSION = 2
# Placeholder until a server is bound; ".invalid" never resolves (RFC 2606), so a URL list that was never
# materialised fails loudly instead of reaching some host.
PLACEHOLDER_BASE_URL = "http://synthweb.invalid"
HELDOUT_TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} on a plain background.", "clip art of a {}."]
PRIVATE_REDIRECT_HOST = "127.0.0.2"  # where redirect_private rows point: loopback, but not the allowed 127.0.0.1
CONTAMINATION_MIN_PAIRS = 200  # from this web size on, min_contaminated applies


@dataclass(frozen=True)
class WebParams:
    """Everything that shapes a synthetic web; saved in synthweb.json."""

    n_pairs: int
    seed: int = 0
    n_kinds: int = 8
    n_colours: int = 6
    zipf_exponent: float = 1.1  # concept frequency ~ 1 / rank^s: a long tail of rare concepts
    lang_weights: dict = field(default_factory=lambda: {"en": 0.55, "de": 0.15, "fr": 0.15, "es": 0.15})
    noise_caption_rate: float = 0.06
    exact_dup_rate: float = 0.03
    near_dup_rate: float = 0.03
    failure_rate: float = H.DEFAULT_FAILURE_RATE  # per failure mode
    min_per_failure_mode: int = 1  # so even a small web has every failure mode
    heldout_per_class: int = 10
    contamination_rate: float = 0.02  # rows that serve a transformed copy of a held-out image
    min_contaminated: int = 4  # ...at least this many once n_pairs >= CONTAMINATION_MIN_PAIRS (if the rate is > 0)
    min_side: int = 96
    max_side: int = 192
    bomb_side: int = 30000
    backgrounds: str = "flat"  # web pictures on a flat tint, or "room": a shaded room each (distinct to pHash)

    def __post_init__(self):
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if not 1 <= self.n_kinds <= len(V.KINDS):
            raise ValueError(f"n_kinds must be in 1..{len(V.KINDS)}, got {self.n_kinds}")
        if not 1 <= self.n_colours <= len(V.COLOURS):
            raise ValueError(f"n_colours must be in 1..{len(V.COLOURS)}, got {self.n_colours}")
        unknown = set(self.lang_weights) - set(V.LANGUAGES)
        if unknown:
            raise ValueError(f"lang_weights has unsupported languages {sorted(unknown)}; expected {V.LANGUAGES}")
        if not 0.0 <= self.contamination_rate <= 0.5:
            raise ValueError(f"contamination_rate must be in [0, 0.5], got {self.contamination_rate}")
        if self.min_contaminated < 0:
            raise ValueError(f"min_contaminated must be >= 0, got {self.min_contaminated}")
        if self.backgrounds not in ("flat", "room"):
            raise ValueError(f"backgrounds must be 'flat' or 'room', got {self.backgrounds!r}")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")


@dataclass
class _Row:
    index: int
    kind: V.Kind
    colour: V.Colour
    count: int
    texture: str
    position: str
    width: int
    height: int
    lang: str = "en"
    caption: str = ""
    caption_kind: str = "clean"
    failure_mode: str = "ok"
    dup_kind: str = ""
    dup_of: int = -1
    variant: str = ""
    file: str = ""
    path: str = ""
    pair_id: str = ""
    contaminates: str = ""  # held-out id this row serves a copy of
    contamination_transform: str = ""
    heldout_of: tuple[int, int] = (-1, -1)  # (class index, image index) of that held-out image


def _rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """Independent, order-free random stream per (seed, purpose, item): drawing item 7 never depends on item 6."""
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key, index])


def concepts(params: WebParams) -> list[tuple[V.Kind, V.Colour]]:
    return [(k, c) for k in V.KINDS[: params.n_kinds] for c in V.COLOURS[: params.n_colours]]


def concept_probabilities(params: WebParams) -> np.ndarray:
    """Zipf-like frequencies over :func:`concepts`, with a seeded rank order (which concepts are common varies)."""
    n = len(concepts(params))
    ranks = _rng(params.seed, "concept-ranks").permutation(n)
    weights = 1.0 / (ranks + 1.0) ** params.zipf_exponent
    return weights / weights.sum()


def _scene_row(params: WebParams, rng: np.random.Generator, index: int, cidx: int) -> _Row:
    kind, colour = concepts(params)[cidx]
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    w = int(rng.integers(params.min_side, params.max_side + 1))
    aspect = float(rng.uniform(0.75, 1.33))
    h = int(np.clip(round(w / aspect), params.min_side, params.max_side))
    return _Row(index=index, kind=kind, colour=colour, count=count, texture=str(rng.choice(V.TEXTURES)),
                position=str(rng.choice(V.POSITIONS)), width=w, height=h)


def _scene(row: _Row) -> Scene:
    return Scene(kind=row.kind.name, rgb=row.colour.rgb, count=row.count, texture=row.texture,
                 position=row.position, width=row.width, height=row.height)


def _atomic_write(path: Path, data: bytes) -> None:
    storage.write_bytes_atomic(str(path), data)


def _near_duplicate(jpeg: bytes, variant: str, rng: np.random.Generator) -> bytes:
    """A re-encoded, resized or cropped copy: the same picture to a person and to a perceptual hash."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if variant == "reencode":
        return encode_jpeg(img, quality=int(rng.integers(45, 70)))
    if variant == "resize":
        s = float(rng.uniform(0.6, 0.85))
        return encode_jpeg(img.resize((max(16, round(img.width * s)), max(16, round(img.height * s))), Image.LANCZOS))
    if variant == "crop":
        f = float(rng.uniform(0.03, 0.06))
        dx, dy = round(img.width * f), round(img.height * f)
        return encode_jpeg(img.crop((dx, dy, img.width - dx, img.height - dy)))
    raise ValueError(f"unknown near-duplicate variant {variant!r}")


def heldout_id(class_index: int, image_index: int) -> str:
    """The id of a held-out image: its file stem, which is how the ``synth:`` evaluation-set loader names it."""
    return f"h{class_index:03d}_{image_index:04d}"


def _heldout_image(params: WebParams, class_index: int, image_index: int) -> tuple[_Row, bytes]:
    """Scene and JPEG bytes of one held-out image (its own random stream: the same bytes wherever it is drawn)."""
    rng = _rng(params.seed, "heldout", class_index * 100003 + image_index)
    row = _scene_row(params, rng, image_index, class_index)
    return row, encode_jpeg(render_heldout(_scene(row), rng))


def n_contaminated(params: WebParams) -> int:
    """How many rows of a web serve copies of held-out images."""
    n = int(round(params.contamination_rate * params.n_pairs))
    if params.contamination_rate > 0 and params.n_pairs >= CONTAMINATION_MIN_PAIRS:
        n = max(n, params.min_contaminated)
    # Never more than the held-out images (each copied once) or than leaves one original row.
    return min(n, len(concepts(params)) * params.heldout_per_class, params.n_pairs - 1)


def _contamination_rows(params: WebParams, n_contam: int, first_index: int) -> list[_Row]:
    """Rows copying distinct held-out images; transforms go round a seeded order of the families, so every family
    appears once a web has that many copies."""
    if n_contam <= 0:
        return []
    rng = _rng(params.seed, "contamination")
    n_held = len(concepts(params)) * params.heldout_per_class
    picks = rng.choice(n_held, size=n_contam, replace=False)
    families = [K.TRANSFORMS[int(i)] for i in rng.permutation(len(K.TRANSFORMS))]
    rows = []
    for k, flat in enumerate(sorted(int(x) for x in picks)):
        ci, j = divmod(flat, params.heldout_per_class)
        held, _ = _heldout_image(params, ci, j)
        rows.append(_Row(index=first_index + k, kind=held.kind, colour=held.colour, count=held.count,
                         texture=held.texture, position=held.position, width=held.width, height=held.height,
                         lang="en", contaminates=heldout_id(ci, j),
                         contamination_transform=families[k % len(families)], heldout_of=(ci, j)))
    return rows


def _plan_rows(params: WebParams) -> list[_Row]:
    """Decide every row's concept, caption, failure mode and duplicate status (no drawing yet)."""
    n = params.n_pairs
    n_contam = n_contaminated(params)
    n_exact = int(round(params.exact_dup_rate * n))
    n_near = int(round(params.near_dup_rate * n))
    n_orig = max(1, n - n_contam - n_exact - n_near)
    n_exact = min(n_exact, n - n_contam - n_orig)
    n_near = n - n_contam - n_orig - n_exact
    probs = concept_probabilities(params)
    langs = list(params.lang_weights)
    lang_p = np.array([params.lang_weights[x] for x in langs], dtype=float)
    lang_p /= lang_p.sum()

    plan_rng = _rng(params.seed, "plan")
    rows: list[_Row] = []
    for i in range(n_orig):
        rows.append(_scene_row(params, _rng(params.seed, "scene", i), i, int(plan_rng.choice(len(probs), p=probs))))
        row = rows[-1]
        if plan_rng.random() < params.noise_caption_rate:
            row.caption_kind = str(plan_rng.choice(C.NOISE_KINDS))
            row.lang = "und"
        else:
            row.lang = str(plan_rng.choice(langs, p=lang_p))

    # Failure modes go to clean English originals, so that curation keeps them and they reach the crawler.
    eligible = [r.index for r in rows if r.caption_kind == "clean" and r.lang == "en"]
    eligible = list(plan_rng.permutation(eligible)) if eligible else []
    cursor = 0
    for mode in H.FAILURE_MODES:
        k = max(params.min_per_failure_mode, int(round(params.failure_rate * n)))
        for idx in eligible[cursor: cursor + k]:
            rows[int(idx)].failure_mode = mode
        cursor += k

    ok_sources = [r.index for r in rows if r.failure_mode == "ok"] or [0]
    for j in range(n_exact + n_near):
        src = rows[int(plan_rng.choice(ok_sources))]
        dup = _Row(index=len(rows), kind=src.kind, colour=src.colour, count=src.count, texture=src.texture,
                   position=src.position, width=src.width, height=src.height,
                   lang=str(plan_rng.choice(langs, p=lang_p)),
                   dup_kind="exact" if j < n_exact else "near", dup_of=src.index)
        if dup.dup_kind == "near":
            dup.variant = str(plan_rng.choice(["reencode", "resize", "crop"]))
        rows.append(dup)
    # Copies of held-out images come last: no failure mode (they must reach the crawl) and no duplicates of them
    # (every copy is labelled with the one held-out image it shows).
    rows.extend(_contamination_rows(params, n_contam, len(rows)))

    for r in rows:
        crng = _rng(params.seed, "caption", r.index)
        r.caption = (C.clean_caption(crng, r.lang, r.kind, r.colour, r.count, r.texture, r.position)
                     if r.caption_kind == "clean" else C.noise_caption(crng, r.caption_kind))

    # Web order: shuffled, so failures and duplicates are spread over every shard of a crawl.
    order = plan_rng.permutation(len(rows))
    for pos, ridx in enumerate(order):
        r = rows[int(ridx)]
        r.pair_id = f"p{pos:06d}"
        site = int(_rng(params.seed, "site", r.index).integers(0, 16))
        r.path = f"/s{site:02d}/img/{r.pair_id}.jpg"
    return [rows[int(i)] for i in order]


def _write_heldout(out: Path, params: WebParams) -> list[str]:
    class_names = []
    for ci, (kind, colour) in enumerate(concepts(params)):
        name = V.class_name(kind, colour)
        class_names.append(name)
        for j in range(params.heldout_per_class):
            _atomic_write(out / "heldout" / name.replace(" ", "_") / f"{heldout_id(ci, j)}.jpg",
                          _heldout_image(params, ci, j)[1])
    meta = {"class_names": class_names, "templates": HELDOUT_TEMPLATES}
    _atomic_write(out / "heldout" / "classes.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    return class_names


def _write_images(out: Path, params: WebParams, rows: list[_Row]) -> dict[str, dict]:
    """Draw every image and write the served files; returns the server's route table."""
    by_index = {r.index: r for r in rows}
    jpeg_of: dict[int, bytes] = {}

    def original_jpeg(r: _Row) -> bytes:
        if r.index not in jpeg_of:
            jpeg_of[r.index] = encode_jpeg(render(_scene(r), _rng(params.seed, "draw", r.index),
                                                  room=params.backgrounds == "room"))
        return jpeg_of[r.index]

    routes: dict[str, dict] = {}
    bomb_written = html_written = False
    for r in sorted(rows, key=lambda x: x.index):  # originals before their duplicates
        route: dict = {"mode": r.failure_mode}
        if r.contaminates:
            r.file = f"images/copy/{r.pair_id}.jpg"
            data = K.transform_copy(_heldout_image(params, *r.heldout_of)[1], r.contamination_transform,
                                    _rng(params.seed, "contaminate", r.index))
            r.width, r.height = Image.open(io.BytesIO(data)).size  # what is served, after resizing or cropping
            _atomic_write(out / r.file, data)
        elif r.dup_kind == "exact":
            r.file = by_index[r.dup_of].file  # the very same bytes, served at another URL
        elif r.dup_kind == "near":
            r.file = f"images/near/{r.pair_id}.jpg"
            _atomic_write(out / r.file, _near_duplicate(original_jpeg(by_index[r.dup_of]), r.variant,
                                                        _rng(params.seed, "near", r.index)))
        elif r.failure_mode == "bomb":
            r.file = "images/hostile/bomb.png"
            if not bomb_written:
                _atomic_write(out / r.file, H.png_bomb(params.bomb_side))
                bomb_written = True
        elif r.failure_mode == "not_image":
            r.file = "images/hostile/moved.html"
            if not html_written:
                _atomic_write(out / r.file, H.NOT_IMAGE_HTML)
                html_written = True
        elif r.failure_mode == "corrupt":
            r.file = f"images/hostile/{r.pair_id}.jpg"
            _atomic_write(out / r.file, H.corrupt_jpeg(original_jpeg(r), _rng(params.seed, "corrupt", r.index)))
        else:
            r.file = f"images/orig/{r.pair_id}.jpg"
            _atomic_write(out / r.file, original_jpeg(r))
        route["file"] = r.file
        route["content_type"] = ("text/html; charset=utf-8" if r.file.endswith(".html")
                                 else "image/png" if r.file.endswith(".png") else "image/jpeg")
        if r.failure_mode == "redirect_private":
            route["private_host"] = PRIVATE_REDIRECT_HOST
        routes[r.path] = route
    return dict(sorted(routes.items()))


def _pairs_table(rows: list[_Row], base_url: str) -> pa.Table:
    base = base_url.rstrip("/")
    cols = {
        "url": [base + r.path for r in rows],
        "caption": [r.caption for r in rows],
        # Ground truth below: curation ignores it; tests and the demo's accounting read it.
        "concept": [V.class_name(r.kind, r.colour) for r in rows],
        "lang": [r.lang for r in rows],
        "failure_mode": [r.failure_mode for r in rows],
        "caption_kind": [r.caption_kind for r in rows],
        "dup_kind": [r.dup_kind for r in rows],
        "dup_of": _dup_ids(rows),
        "contaminates": [r.contaminates for r in rows],
        "contamination_transform": [r.contamination_transform for r in rows],
        "pair_id": [r.pair_id for r in rows],
        "path": [r.path for r in rows],
        "kind": [r.kind.name for r in rows],
        "colour": [r.colour.name for r in rows],
        "count": pa.array([r.count for r in rows], pa.int8()),
        "texture": [r.texture for r in rows],
        "position": [r.position for r in rows],
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
    }
    return pa.table(cols)


def _dup_ids(rows: list[_Row]) -> list[str]:
    pid = {r.index: r.pair_id for r in rows}
    return [pid[r.dup_of] if r.dup_of >= 0 else "" for r in rows]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _tsv_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Captions never hold tabs, quotes or newlines (templates and noise are built without them), so no quoting;
    # pyarrow quotes header names regardless of quoting_style, so the header line is written here.
    buf.write(("\t".join(table.column_names) + "\n").encode())
    pacsv.write_csv(table, buf, pacsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False))
    return buf.getvalue()


def materialise_url_list(out_dir: str | os.PathLike, base_url: str) -> dict[str, Path]:
    """(Re)write ``raw/pairs.parquet`` and ``raw/pairs.tsv`` with URLs under ``base_url`` (e.g. a bound server's
    ``http://127.0.0.1:PORT``). Everything but the url column is unchanged."""
    out = Path(out_dir)
    src = out / "raw" / "pairs.parquet"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no synthetic web here (run generate_web first)")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    table = pq.read_table(src)
    urls = [base_url.rstrip("/") + p for p in table.column("path").to_pylist()]
    table = table.set_column(table.column_names.index("url"), "url", pa.array(urls, pa.string()))
    _atomic_write(src, _parquet_bytes(table))
    _atomic_write(out / "raw" / "pairs.tsv", _tsv_bytes(table))
    return {"parquet": src, "tsv": out / "raw" / "pairs.tsv"}


def generate_web(out_dir: str | os.PathLike, n_pairs: int, seed: int = 0, *, base_url: str | None = None,
                 **options) -> dict[str, Path]:
    """Generate a synthetic web of ``n_pairs`` image-text pairs under ``out_dir``; see the module docstring.

    ``options`` are :class:`WebParams` fields (n_kinds, n_colours, zipf_exponent, failure_rate, ...). A complete
    web with the same parameters is reused as it is (only its URLs are rewritten when ``base_url`` differs).
    Returns paths: root, pairs_parquet, pairs_tsv, routes, heldout, classes, summary.
    """
    params = WebParams(n_pairs=n_pairs, seed=seed, **options)
    out = Path(out_dir)
    paths = {"root": out, "pairs_parquet": out / "raw" / "pairs.parquet", "pairs_tsv": out / "raw" / "pairs.tsv",
             "routes": out / "site" / "routes.json", "heldout": out / "heldout",
             "classes": out / "heldout" / "classes.json", "summary": out / "synthweb.json"}
    summary_path = paths["summary"]
    if summary_path.exists():
        try:
            done = json.loads(summary_path.read_text())
        except ValueError:
            done = {}
        if done.get("params") == _params_json(params) and done.get("format_version") == FORMAT_VERSION:
            if base_url is not None:
                materialise_url_list(out, base_url)
            return paths
    # Start from a clean slate: files of an older or half-written web must not leak into this one.
    summary_path.unlink(missing_ok=True)
    for sub in ("images", "site", "raw", "heldout"):
        shutil.rmtree(out / sub, ignore_errors=True)

    rows = _plan_rows(params)
    routes = _write_images(out, params, rows)
    _atomic_write(paths["routes"], json.dumps({"format_version": FORMAT_VERSION, "routes": routes}, indent=1,
                                              sort_keys=True).encode())
    table = _pairs_table(rows, base_url or PLACEHOLDER_BASE_URL)
    _atomic_write(paths["pairs_parquet"], _parquet_bytes(table))
    _atomic_write(paths["pairs_tsv"], _tsv_bytes(table))
    class_names = _write_heldout(out, params)

    modes = table.column("failure_mode").to_pylist()
    summary = {
        "format_version": FORMAT_VERSION,
        "params": _params_json(params),
        "n_pairs": len(rows),
        "n_classes": len(class_names),
        "failure_modes": {m: modes.count(m) for m in ("ok",) + H.FAILURE_MODES},
        "expected_crawl_reason": H.EXPECTED_CRAWL_REASON,
        "languages": _counts(table.column("lang").to_pylist()),
        "caption_kinds": _counts(table.column("caption_kind").to_pylist()),
        "duplicates": _counts([d or "none" for d in table.column("dup_kind").to_pylist()]),
        "concepts": _counts(table.column("concept").to_pylist()),
        "contamination": {
            "rows": sum(1 for r in rows if r.contaminates),
            "heldout_images": len({r.contaminates for r in rows if r.contaminates}),
            "transforms": _counts([r.contamination_transform for r in rows if r.contaminates]),
        },
    }
    _atomic_write(summary_path, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
    return paths


def _counts(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _params_json(params: WebParams) -> dict:
    d = asdict(params)
    if d["backgrounds"] == "flat":  # the default is left out: webs written before the option existed stay complete
        del d["backgrounds"]
    return json.loads(json.dumps(d, sort_keys=True))


def load_routes(root: str | os.PathLike) -> dict[str, dict]:
    path = Path(root) / "site" / "routes.json"
    try:
        data = json.loads(path.read_text())
        return data["routes"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no synthetic web here (run generate_web first)") from None
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a synthetic-web route table ({exc})") from None
