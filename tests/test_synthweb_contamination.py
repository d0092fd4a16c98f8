"""Planted contamination in the synthetic web: labelled copies of held-out images, found by the detector, with few
look-alikes of other web pictures flagged."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.synthweb import generate_web
from pipelines.synthweb.contamination import TRANSFORMS, transform_copy
from pipelines.synthweb.generator import WebParams, n_contaminated

# Small enough for a few seconds, large enough for every transform family (10 copies >= 7 families).
WEB = dict(n_pairs=200, seed=4, n_kinds=4, n_colours=3, heldout_per_class=4, contamination_rate=0.05)


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contaminated_web")
    opts = {k: v for k, v in WEB.items() if k not in ("n_pairs", "seed")}
    generate_web(root, WEB["n_pairs"], seed=WEB["seed"], **opts)
    return root


def _table(web: Path) -> list[dict]:
    return pq.read_table(web / "raw" / "pairs.parquet").to_pylist()


def _served(web: Path) -> dict[str, bytes]:
    routes = json.loads((web / "site" / "routes.json").read_text())["routes"]
    return {r["pair_id"]: (web / routes[r["path"]]["file"]).read_bytes() for r in _table(web)}


def test_copies_are_labelled_crawlable_and_counted(web):
    from pipelines.evalsets import load_eval_set

    rows = _table(web)
    copies = [r for r in rows if r["contaminates"]]
    assert len(copies) == n_contaminated(WebParams(**WEB)) == 10
    held = load_eval_set(f"synth:{web}")
    held_files = {p.stem: p for p in (web / "heldout").rglob("*.jpg")}
    assert len({r["contaminates"] for r in copies}) == len(copies)  # each copies a different held-out image
    assert {r["contamination_transform"] for r in copies} == set(TRANSFORMS)
    served = _served(web)
    for r in copies:
        # Named as the eval-set registry names it, and of that image's class.
        assert r["contaminates"] in held.ids
        assert r["concept"] == held.class_names[held.labels[held.ids.index(r["contaminates"])]]
        # Nothing stops it before the crawl: no failure, a clean English caption naming the concept.
        assert r["failure_mode"] == "ok" and r["lang"] == "en" and r["caption_kind"] == "clean"
        assert r["colour"] in r["caption"] and r["kind"] in r["caption"]
        assert r["dup_kind"] == ""
        img = Image.open(io.BytesIO(served[r["pair_id"]]))
        assert img.size == (r["width"], r["height"])
        src = Image.open(held_files[r["contaminates"]]).convert("RGB")
        if r["contamination_transform"] in ("reencode", "jpeg_low", "colour_shift"):
            diff = np.abs(np.asarray(img.convert("RGB"), np.int16) - np.asarray(src, np.int16)).mean()
            assert img.size == src.size and diff < 12, (r["pair_id"], diff)
        elif r["contamination_transform"] == "mirror":
            diff = np.abs(np.asarray(img.convert("RGB"), np.int16)
                          - np.asarray(src.transpose(Image.FLIP_LEFT_RIGHT), np.int16)).mean()
            assert diff < 6, (r["pair_id"], diff)
    others = [r for r in rows if not r["contaminates"]]
    assert all(r["contamination_transform"] == "" for r in others)
    summary = json.loads((web / "synthweb.json").read_text())
    assert summary["contamination"]["rows"] == len(copies)
    assert summary["contamination"]["heldout_images"] == len(copies)
    assert sum(summary["contamination"]["transforms"].values()) == len(copies)


def test_contamination_amount_follows_the_parameters():
    assert n_contaminated(WebParams(n_pairs=600)) == 12  # 2% by default
    assert n_contaminated(WebParams(n_pairs=200)) == 4  # min_contaminated once a web has 200 pairs
    assert n_contaminated(WebParams(n_pairs=60)) == 1  # a small test web: just the rate
    assert n_contaminated(WebParams(n_pairs=600, contamination_rate=0.0)) == 0
    # Never more copies than held-out images.
    assert n_contaminated(WebParams(n_pairs=400, n_kinds=1, n_colours=1, heldout_per_class=3,
                                    contamination_rate=0.5)) == 3
    with pytest.raises(ValueError, match="contamination_rate"):
        WebParams(n_pairs=10, contamination_rate=0.9)
    with pytest.raises(ValueError, match="unknown contamination transform"):
        transform_copy(b"", "rotate", np.random.default_rng(0))


def test_no_contamination_when_switched_off(tmp_path):
    generate_web(tmp_path, 200, seed=1, n_kinds=2, n_colours=2, heldout_per_class=2, contamination_rate=0.0)
    assert not any(r["contaminates"] for r in _table(tmp_path))
    assert not (tmp_path / "images" / "copy").exists()


def test_detector_finds_planted_copies_and_few_lookalikes(web):
    """The decontamination detector, as the build runs it, against the web's own held-out split."""
    from pipelines.decontam.transform import decontaminate_pool

    rows = _table(web)
    served = _served(web)
    # Every image the web serves as a JPEG (hostile bodies are not pictures).
    pool = [(r["pair_id"], served[r["pair_id"]]) for r in rows
            if r["failure_mode"] not in ("corrupt", "not_image", "bomb")]
    errors: list[str] = []
    matches = decontaminate_pool(pool, [f"synth:{web}"], errors=errors).to_pylist()
    assert errors == []
    truth = {r["pair_id"]: r["contaminates"] for r in rows}
    found = {m["pool_key"] for m in matches if truth[m["pool_key"]] and m["eval_id"] == truth[m["pool_key"]]}
    planted = {k for k, v in truth.items() if v}
    lookalikes = {m["pool_key"] for m in matches if not truth[m["pool_key"]]}
    n_clean = len(pool) - len(planted)
    recall = len(found) / len(planted)
    missed = {k: next(r["contamination_transform"] for r in rows if r["pair_id"] == k) for k in planted - found}
    print(f"\nplanted copies found: {len(found)}/{len(planted)} (recall {recall:.2f}, missed {missed}); "
          f"unplanted web images flagged: {len(lookalikes)}/{n_clean} ({len(lookalikes) / n_clean:.1%})")
    assert recall >= 0.8, missed
    assert len(lookalikes) <= max(2, 0.02 * n_clean), sorted(lookalikes)
