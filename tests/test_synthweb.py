"""The synthetic web: deterministic generation, its content, and every failure mode of its HTTP server."""
from __future__ import annotations

import colorsys
import hashlib
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.synthweb import FAILURE_MODES, SynthWebServer, generate_web, synthweb_main
from pipelines.synthweb import vocabulary as V

SMALL = dict(n_kinds=4, n_colours=3, heldout_per_class=2)


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    generate_web(root, 240, seed=5, heldout_per_class=3)
    return root


@pytest.fixture(scope="module")
def server(web):
    with SynthWebServer(web, stall_seconds=3, drip_seconds=2.5, drip_interval=0.1) as srv:
        srv.materialise_url_list()
        yield srv


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_web(a, 60, seed=11, **SMALL)
    generate_web(b, 60, seed=11, **SMALL)
    generate_web(c, 60, seed=12, **SMALL)
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert len(da) > 60
    assert da == db
    assert da != dc
    # The URL list is rewritten for a server's base URL, deterministically too.
    from pipelines.synthweb import materialise_url_list

    materialise_url_list(a, "http://127.0.0.1:8123")
    materialise_url_list(b, "http://127.0.0.1:8123")
    assert _tree_digest(a) == _tree_digest(b)
    urls = pq.read_table(a / "raw" / "pairs.parquet").column("url").to_pylist()
    assert all(u.startswith("http://127.0.0.1:8123/s") for u in urls)


def test_web_content_long_tail_languages_noise_duplicates(web):
    t = pq.read_table(web / "raw" / "pairs.parquet").to_pandas()
    assert len(t) == 240
    assert {"url", "caption", "concept", "lang", "failure_mode"} <= set(t.columns)
    assert t.url.is_unique
    # Long tail: the most frequent concept is far more common than the median one.
    counts = t.concept.value_counts()
    assert counts.iloc[0] >= 5 * counts.median()
    assert set(t.lang) >= {"en", "de", "fr", "es"}
    assert set(t.caption_kind) >= {"clean", "too_short", "url_only", "gibberish"}
    for mode in FAILURE_MODES:
        assert (t.failure_mode == mode).sum() >= 1, mode
    # Exact duplicates are byte-identical files at other URLs; near duplicates are different bytes, same scene.
    routes = json.loads((web / "site" / "routes.json").read_text())["routes"]
    by_id = t.set_index("pair_id")
    exact = t[t.dup_kind == "exact"]
    near = t[t.dup_kind == "near"]
    assert len(exact) and len(near)
    for _, row in exact.iterrows():
        src = by_id.loc[row.dup_of]
        assert row.url != src.url
        assert (web / routes[row.path]["file"]).read_bytes() == (web / routes[src.path]["file"]).read_bytes()
    for _, row in near.iterrows():
        src = by_id.loc[row.dup_of]
        assert (web / routes[row.path]["file"]).read_bytes() != (web / routes[src.path]["file"]).read_bytes()
        assert row.concept == src.concept
    # Clean captions name their concept's words in their language.
    en = t[(t.caption_kind == "clean") & (t.lang == "en")]
    assert all(row.colour in row.caption and row.kind in row.caption for _, row in en.iterrows())


def test_captions_agree_in_gender_and_number():
    kinds = {k.name: k for k in V.KINDS}
    colours = {c.name: c for c in V.COLOURS}
    assert V.noun_phrase("de", kinds["circle"], colours["red"], 1, "solid") == "ein roter Kreis"
    assert V.noun_phrase("de", kinds["diamond"], colours["red"], 1, "solid") == "eine rote Raute"
    assert V.noun_phrase("de", kinds["square"], colours["blue"], 2, "striped") == "zwei blaue Quadrate mit Streifen"
    assert V.noun_phrase("fr", kinds["star"], colours["green"], 1, "solid") == "une étoile verte"
    assert V.noun_phrase("fr", kinds["star"], colours["green"], 3, "dotted") == "trois étoiles vertes à pois"
    assert V.noun_phrase("es", kinds["cross"], colours["yellow"], 2, "solid") == "dos cruces amarillas"
    assert V.noun_phrase("en", kinds["ring"], colours["orange"], 1, "solid") == "an orange ring"


def test_heldout_split_is_read_by_the_eval_registry(web):
    from pipelines.evalsets import load_eval_set

    meta = json.loads((web / "heldout" / "classes.json").read_text())
    assert len(meta["class_names"]) == 8 * 6 and "{}" in meta["templates"][0]
    es = load_eval_set(f"synth:{web}")
    assert es.class_names == meta["class_names"]
    assert len(es.labels) == 3 * len(meta["class_names"])
    assert Counter(es.labels) == Counter({i: 3 for i in range(len(meta["class_names"]))})


def test_images_show_their_colour(web):
    """The concept's colour dominates the non-background pixels at 64 px (a tiny CLIP can learn it)."""
    t = pq.read_table(web / "raw" / "pairs.parquet").to_pandas()
    routes = json.loads((web / "site" / "routes.json").read_text())["routes"]
    rgb = {c.name: c.rgb for c in V.COLOURS[:6]}  # the web's colours (default n_colours=6)
    checked = 0
    for _, row in t[(t.failure_mode == "ok") & (t.dup_kind == "") & (t.contaminates == "")].head(40).iterrows():
        img = Image.open(web / routes[row.path]["file"]).convert("RGB").resize((64, 64))
        px = [p for p in img.getdata() if min(p) < 190]  # background is light (>= 205 per channel, minus noise)
        assert px, row.pair_id
        mean = [sum(ch) / len(px) / 255 for ch in zip(*px)]  # textures mix in a lighter tint; the hue stays
        nearest = min(rgb, key=lambda n: _hue_distance(mean, [v / 255 for v in rgb[n]]))
        assert nearest == row.colour, (row.pair_id, mean)
        checked += 1
    assert checked >= 20


def test_heldout_images_show_their_colour(web):
    """Held-out pictures (own style: shaded rooms, free placement) keep the class colour as their saturated part."""
    rgb = {c.name: c.rgb for c in V.COLOURS[:6]}
    checked = 0
    for path in sorted((web / "heldout").rglob("*.jpg"))[::4]:
        img = Image.open(path).convert("RGB").resize((64, 64))
        # Backgrounds are unsaturated greys; the object is the saturated part.
        px = [p for p in img.getdata() if max(p) - min(p) > 60]
        assert len(px) >= 20, path
        mean = [sum(ch) / len(px) / 255 for ch in zip(*px)]
        nearest = min(rgb, key=lambda n: _hue_distance(mean, [v / 255 for v in rgb[n]]))
        assert nearest == path.parent.name.split("_")[0], (path, mean)
        checked += 1
    assert checked >= 30


def _hue_distance(a, b) -> float:
    ha, hb = colorsys.rgb_to_hsv(*a)[0], colorsys.rgb_to_hsv(*b)[0]
    return min(abs(ha - hb), 1 - abs(ha - hb))


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read(), r.url


def _rows(web: Path) -> dict[str, dict]:
    t = pq.read_table(web / "raw" / "pairs.parquet").to_pylist()
    out: dict[str, dict] = {}
    for row in t:
        out.setdefault(row["failure_mode"], row)
    return out


def test_server_plays_each_failure_mode(web, server):
    rows = _rows(web)
    status, headers, body, _ = _get(rows["ok"]["url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (rows["ok"]["width"], rows["ok"]["height"])

    for mode, code in (("http_404", 404), ("http_500", 500)):
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(rows[mode]["url"])
        assert err.value.code == code

    with pytest.raises(urllib.error.HTTPError) as err:  # flaky: 503 once, then the image
        _get(rows["flaky"]["url"])
    assert err.value.code == 503
    assert _get(rows["flaky"]["url"])[0] == 200

    status, _, body, final = _get(rows["redirect"]["url"])
    assert status == 200 and final.endswith("?hop=2") and body[:2] == b"\xff\xd8"

    with pytest.raises(urllib.error.HTTPError) as err:
        _get(rows["redirect_loop"]["url"])
    assert "redirect" in str(err.value).lower()

    # Unguarded urllib follows the redirect to the private listener: this is what the crawl guard must stop.
    before = sum(server.private_hits.values())
    _, _, body, final = _get(rows["redirect_private"]["url"])
    assert final.startswith("http://127.0.0.2:") and sum(server.private_hits.values()) == before + 1

    with pytest.raises(http.client.IncompleteRead):
        _get(rows["truncated"]["url"])

    _, headers, body, _ = _get(rows["not_image"]["url"])
    assert headers["Content-Type"].startswith("text/html") and b"<html>" in body

    _, headers, body, _ = _get(rows["corrupt"]["url"])
    assert headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()

    _, headers, body, _ = _get(rows["bomb"]["url"])
    assert len(body) < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))

    for mode, directive in (("opt_out_noai", "noai"), ("opt_out_noimageai", "noimageai")):
        assert _get(rows[mode]["url"])[1]["X-Robots-Tag"] == directive

    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(rows["timeout"]["url"], timeout=0.5)


def test_slow_drip_trickles_below_any_socket_timeout(web, server):
    rows = _rows(web)
    t0 = time.monotonic()
    status, _, body, _ = _get(rows["slow_drip"]["url"], timeout=1.0)  # no single read waits 1 s...
    assert status == 200 and body[:2] == b"\xff\xd8"
    assert time.monotonic() - t0 >= 2.0  # ...yet the whole body took drip_seconds


def test_server_counts_hits_and_unknown_paths_404(web, server):
    rows = _rows(web)
    server.reset_hits()
    _get(rows["ok"]["url"])
    _get(rows["ok"]["url"])
    with pytest.raises(urllib.error.HTTPError):
        _get(server.url("/nope.jpg"))
    path = rows["ok"]["path"]
    assert server.hits[path] == 2 and server.hits["/nope.jpg"] == 1


def test_synthweb_main_returns_paths_and_reuses_a_complete_web(tmp_path):
    paths = synthweb_main(tmp_path / "w", n_pairs=30, seed=1)
    assert paths["pairs_tsv"].read_text().splitlines()[0].startswith("url\tcaption\tconcept\tlang\tfailure_mode")
    stamp = paths["summary"].stat().st_mtime_ns
    again = synthweb_main(tmp_path / "w", n_pairs=30, seed=1)
    assert again == paths and paths["summary"].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_pairs"):
        synthweb_main(tmp_path / "x", n_pairs=0)


def _phash_neighbours(root: Path, radius: int = 4) -> tuple[int, int]:
    """(originals within ``radius`` of another original's pHash, originals) among the served pictures."""
    import imagehash

    t = pq.read_table(root / "raw" / "pairs.parquet").to_pandas()
    routes = json.loads((root / "site" / "routes.json").read_text())["routes"]
    rows = t[(t.failure_mode == "ok") & (t.dup_kind == "") & (t.contaminates == "")]
    hashes = [imagehash.phash(Image.open(root / routes[p]["file"])) for p in rows.path]
    close = sum(any(h - o <= radius for j, o in enumerate(hashes) if j != i) for i, h in enumerate(hashes))
    return close, len(hashes)


def test_room_backgrounds_keep_distinct_pictures_distinct_to_phash(tmp_path):
    """On flat tints, pictures of one concept and position are pHash look-alikes; on rooms of their own they are not
    (the images stage keeps them apart), and a room web is as deterministic as a flat one."""
    flat, room, again = tmp_path / "flat", tmp_path / "room", tmp_path / "again"
    generate_web(flat, 400, seed=2, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1)
    generate_web(room, 400, seed=2, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1,
                 backgrounds="room")
    generate_web(again, 400, seed=2, failure_rate=0.0, min_per_failure_mode=0, heldout_per_class=1,
                 backgrounds="room")
    assert _tree_digest(room) == _tree_digest(again)
    assert json.loads((room / "synthweb.json").read_text())["params"]["backgrounds"] == "room"
    assert "backgrounds" not in json.loads((flat / "synthweb.json").read_text())["params"]  # older webs stay valid
    (flat_close, n), (room_close, n_room) = _phash_neighbours(flat), _phash_neighbours(room)
    assert n == n_room > 300
    assert room_close <= 0.02 * n < flat_close, (flat_close, room_close, n)
    with pytest.raises(ValueError, match="backgrounds"):
        generate_web(tmp_path / "bad", 10, backgrounds="wallpaper")
