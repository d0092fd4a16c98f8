"""The data card of a dataset version: ``README.md`` in the Hugging Face dataset-card layout and ``card.html`` with
the same sections, the plots and a grid of sample thumbnails -- generated from the manifest and the tables, never
written by hand.

    files = write_card(root, 3, root.version_dir(3), manifest)   # README.md, card.html, card/*.png

Inputs: the version's ``manifest.json`` (lineage, funnel, entry counts, decontamination, shards, ``dataset``
section), its shard Parquet files (uids, entries, image sizes), the query list (entry names), the input files'
Parquet metadata (a ``license`` key or column, when present) and the caption languages of the curation candidates
(``ROOT/work/curate/candidates``, current right after the build that publishes the version).

YAML header: ``license`` (from the inputs; ``unknown`` when none says; ``other`` when they disagree),
``size_categories``, ``task_categories``, ``pretty_name``, tags. Sections: sources with hashes, funnel with every
reason, query-list coverage, head/tail of the entry distribution before/after balancing (plot), language mix,
image sizes (plot), duplicates removed, contamination per evaluation set, opt-outs honoured and takedowns applied,
how to load it (webdataset / open_clip / DuckDB).
"""
from __future__ import annotations

import base64
import html
import io
import json
import random
import tarfile
from collections import Counter

import pyarrow as pa

from pipelines.core import storage

TASKS = ("zero-shot-image-classification", "image-to-text", "text-to-image")
OPT_OUT_REASONS = ("opt_out", "robots_disallowed")
DUP_REASONS = ("duplicate_url", "duplicate_url_caption", "exact_duplicate", "near_duplicate")


def size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for limit, name in bounds:
        if n < limit:
            return name
    return "1B<n<10B"


def input_license(inputs: list[dict]) -> tuple[str, list[str]]:
    """(license id for the YAML header, every license named by the inputs). Parquet inputs are asked for a
    ``license`` key in their metadata or a ``license`` column; other formats say nothing."""
    import pyarrow.parquet as pq

    found: set[str] = set()
    for inp in inputs:
        uri = inp.get("uri", "")
        if not uri.endswith((".parquet", ".pq")):
            continue
        try:
            with storage.open_read(uri) as f:
                pf = pq.ParquetFile(f)
                md = pf.schema_arrow.metadata or {}
                for key in (b"license", b"clipline.license"):
                    if key in md:
                        found.add(md[key].decode().strip())
                if "license" in pf.schema_arrow.names:
                    col = pf.read(columns=["license"]).column("license").to_pylist()
                    found.update(str(x).strip() for x in col if x)
        except Exception:  # noqa: BLE001 - an input we cannot read for metadata says nothing about its license
            continue
    found.discard("")
    if not found:
        return "unknown", []
    return (next(iter(found)).lower() if len(found) == 1 else "other"), sorted(found)


def _shard_table(dest: str, manifest: dict) -> pa.Table:
    tables = [storage.read_table(storage.join(dest, "shards", s["name"][:-4] + ".parquet"))
              for s in manifest["shards"]]
    return pa.concat_tables(tables) if tables else pa.table({"uid": pa.array([], pa.string())})


def _languages(root, uids: set[str]) -> Counter:
    cands = storage.join(root.work, "curate", "candidates")
    out: Counter = Counter()
    try:
        files = [u for u in storage.list_prefix(cands) if u.endswith(".parquet")]
    except storage.StorageError:
        return out
    for uri in files:
        t = storage.read_table(uri, columns=["uid", "lang"])
        for uid, lang in zip(t.column("uid").to_pylist(), t.column("lang").to_pylist()):
            if uid in uids:
                out[lang or "unknown"] += 1
    return out


def _entries(manifest: dict) -> list[str] | None:
    from pipelines.curate import querylist as QL

    try:
        return list(QL.load(manifest["lineage"]["querylist"]["uri"]).entries)
    except Exception:  # noqa: BLE001 - the card still says counts by entry id
        return None


def _plot_entries(matched: dict, before: dict, after: dict, t) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for counts, label in ((matched, "matched pairs (before curation balancing)"),
                          (before, "pool before the second pass"), (after, "published")):
        ys = sorted((int(v) for v in counts.values() if int(v) > 0), reverse=True)
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=label, drawstyle="steps-post")
    if t:
        ax.axhline(float(t), color="grey", linestyle="--", linewidth=1, label=f"t = {float(t):g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title("entry distribution: head flattened, tail kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _matched_counts(root) -> dict:
    """Entry counts of every matched pair before curation's balancing (ROOT/work/curate/entry_counts.parquet)."""
    uri = storage.join(root.work, "curate", "entry_counts.parquet")
    if not storage.exists(uri):
        return {}
    t = storage.read_table(uri)
    return {str(e): int(c) for e, c in zip(t.column("entry_id").to_pylist(), t.column("count").to_pylist()) if c}


def _plot_sizes(widths: list[int], heights: list[int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    sides = [max(w, h) for w, h in zip(widths, heights) if w and h]
    if sides:
        ax.hist(sides, bins=30)
    ax.set_xlabel("longest side of the source image (pixels)")
    ax.set_ylabel("samples")
    ax.set_title("image sizes")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _thumbnails(dest: str, table: pa.Table, manifest: dict, entries: list[str] | None, seed: int,
                n_entries: int = 4, per_entry: int = 6, side: int = 96) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(entry name, [(caption, data URI), ...]), ...] for a few random entries with samples."""
    from PIL import Image

    if table.num_rows == 0:
        return []
    by_entry: dict[int, list[int]] = {}
    for i, ids in enumerate(table.column("entry_ids").to_pylist()):
        for e in ids:
            by_entry.setdefault(int(e), []).append(i)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(by_entry), min(n_entries, len(by_entry))))
    want: dict[str, tuple[int, str]] = {}
    keys = table.column("key").to_pylist() if "key" in table.column_names else table.column("uid").to_pylist()
    captions = table.column("caption").to_pylist()
    for e in chosen:
        rows = by_entry[e]
        for i in rng.sample(rows, min(per_entry, len(rows))):
            want.setdefault(keys[i], (e, captions[i] or ""))
    images: dict[str, bytes] = {}
    for s in manifest["shards"]:
        with storage.open_read(storage.join(dest, "shards", s["name"])) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if key in want and ext in ("jpg", "jpeg", "png", "webp"):
                    images[key] = tar.extractfile(member).read()
    out = []
    for e in chosen:
        cells = []
        for key, (entry, caption) in want.items():
            if entry != e or key not in images:
                continue
            im = Image.open(io.BytesIO(images[key])).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            cells.append((caption, "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()))
        name = entries[e] if entries and 0 <= e < len(entries) else f"entry {e}"
        out.append((name, cells))
    return out


def card_facts(root, n: int, dest: str, manifest: dict) -> dict:
    """Everything the card says, as plain data (also what tests check)."""
    table = _shard_table(dest, manifest)
    uids = set(table.column("uid").to_pylist())
    funnel = manifest["funnel"]
    rejected = funnel["rejected"]
    before = manifest["entry_counts"]["before"]
    after = manifest["entry_counts"]["after"]
    n_entries = manifest.get("curate", {}).get("querylist", {}).get("entries") or \
        manifest["lineage"]["querylist"].get("entries")
    license_id, licenses = input_license(manifest["lineage"]["inputs"])
    ds = manifest.get("dataset", {})
    by_suffix = lambda names: {k: v for k, v in rejected.items() if k.split(":", 1)[-1] in names}  # noqa: E731
    contamination = {k.split("eval_overlap:", 1)[1]: v for k, v in rejected.items() if "eval_overlap:" in k}
    return {
        "version": n, "samples": int(funnel["kept"]), "shards": len(manifest["shards"]),
        "license": license_id, "licenses": licenses, "size_category": size_category(int(funnel["kept"])),
        "inputs": manifest["lineage"]["inputs"], "querylist": manifest["lineage"]["querylist"],
        "eval_sets": manifest["lineage"].get("eval_sets", []),
        "funnel": funnel,
        "coverage": {"entries": n_entries, "with_sample": sum(1 for v in after.values() if int(v) >= 1),
                     "before_with_sample": sum(1 for v in before.values() if int(v) >= 1)},
        "entry_counts": {"matched": _matched_counts(root), "before": before, "after": after,
                         "t": manifest.get("balance", {}).get("t")},
        "languages": dict(_languages(root, uids).most_common()),
        "sizes": {"widths": [w or 0 for w in table.column("original_width").to_pylist()]
                  if "original_width" in table.column_names else [],
                  "heights": [h or 0 for h in table.column("original_height").to_pylist()]
                  if "original_height" in table.column_names else []},
        "duplicates": by_suffix(DUP_REASONS),
        "contamination": contamination,
        "opt_outs": by_suffix(OPT_OUT_REASONS),
        "takedowns": {"rows": sum(v for k, v in rejected.items() if k.split(":", 1)[-1] == "takedown"),
                      **(ds.get("takedowns") or {})},
        "as_of": ds.get("as_of"), "parent": ds.get("parent"), "seed": manifest.get("seed"),
        "reason": ds.get("reason"),
        "_table": table,
    }


STAGE_ORDER = ("curate", "crawl", "images", "decontam", "balance", "shard")


def _stage_rank(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _md_table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _head_tail(counts: dict, entries: list[str] | None, k: int = 5) -> tuple[list, list]:
    ranked = sorted(((int(v), int(e)) for e, v in counts.items() if int(v) > 0), reverse=True)
    name = lambda e: entries[e] if entries and 0 <= e < len(entries) else f"#{e}"  # noqa: E731
    return ([(name(e), v) for v, e in ranked[:k]], [(name(e), v) for v, e in ranked[-k:]])


def render_markdown(f: dict, root_uri: str, dest: str, entries: list[str] | None) -> str:
    n, funnel = f["version"], f["funnel"]
    shards = f"{dest}/shards"
    last = max(f["shards"] - 1, 0)
    header = {"license": f["license"], "pretty_name": f"clipline dataset {storage.basename(root_uri)} v{n:04d}",
              "size_categories": [f["size_category"]], "task_categories": list(TASKS),
              "tags": ["clip", "webdataset", "metaclip-balancing", "clipline"]}
    import yaml

    parts = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {header['pretty_name']}", "",
             f"{f['samples']:,} image-text pairs in {f['shards']} webdataset shard(s), built by clipline "
             f"(MetaCLIP-style curation and balancing, decontaminated against {len(f['eval_sets'])} evaluation "
             f"set(s)) as of {f['as_of']}. Seed {f['seed']}."
             + (f" Parent version: {f['parent']['version']:04d} (manifest sha256 {f['parent']['manifest_sha256'][:16]}...)."
                if f.get("parent") else " First version.")
             + (f" Why this version: {f['reason']}." if f.get("reason") else ""), ""]
    if f["licenses"]:
        parts += [f"Licenses named by the inputs: {', '.join(f['licenses'])}.", ""]
    parts += ["## Sources", "",
              _md_table([[i["uri"], i.get("rows", ""), i["sha256"]] for i in f["inputs"]], ["input", "rows", "sha256"]),
              "", f"Query list: `{f['querylist'].get('uri')}` ({f['querylist'].get('entries', '?')} entries, sha256 "
              f"`{f['querylist'].get('sha256')}`).", ""]
    if f["eval_sets"]:
        parts += ["Evaluation sets (decontaminated against): " +
                  ", ".join(f"`{e['spec']}` ({len(e.get('files', []))} files)" for e in f["eval_sets"]), ""]
    rows = [[k, v] for k, v in sorted(funnel["rejected"].items(), key=lambda kv: -kv[1])]
    parts += ["## Funnel", "",
              _md_table([[s, io_["in"], io_["out"]] for s, io_ in sorted(funnel["stages"].items(),
                                                                         key=lambda kv: _stage_rank(kv[0]))],
                        ["stage", "rows in", "rows out"]), "",
              f"{funnel['input_rows']:,} input rows = {funnel['kept']:,} samples + "
              f"{sum(funnel['rejected'].values()):,} rejected, by reason:", "",
              _md_table(rows, ["stage:reason", "rows"]), ""]
    cov = f["coverage"]
    head_m, _tail_m = _head_tail(f["entry_counts"]["matched"], entries)
    head_b, _tail_b = _head_tail(f["entry_counts"]["before"], entries)
    head_a, tail_a = _head_tail(f["entry_counts"]["after"], entries)
    cell = lambda head, i: f"{head[i][0]} ({head[i][1]})" if i < len(head) else ""  # noqa: E731
    parts += ["## Query-list coverage and balancing", "",
              f"{cov['with_sample']:,} of {cov['entries'] or '?'} query-list entries have at least one sample "
              f"({cov['before_with_sample']:,} before the second balancing pass, t = {f['entry_counts']['t']}).", "",
              "![entry distribution](card/entries.png)", "",
              _md_table([[i + 1, cell(head_m, i), cell(head_b, i), cell(head_a, i)]
                         for i in range(max(len(head_m), len(head_b), len(head_a)))],
                        ["rank", "matched, before curation balancing", "pool, before the second pass",
                         "published"]), "",
              "Tail (fewest samples) after balancing: " + ", ".join(f"{e} ({v})" for e, v in tail_a), ""]
    langs = f["languages"]
    parts += ["## Languages of the captions", "",
              (_md_table([[k, v, f"{100 * v / max(1, sum(langs.values())):.1f}%"] for k, v in langs.items()],
                         ["language", "samples", "share"]) if langs else "Not recorded."), ""]
    w, h = f["sizes"]["widths"], f["sizes"]["heights"]
    sides = sorted(max(a, b) for a, b in zip(w, h) if a and b)
    parts += ["## Image sizes", "", "![image sizes](card/sizes.png)", "",
              (f"Longest side of the source images: min {sides[0]}, median {sides[len(sides) // 2]}, "
               f"max {sides[-1]} pixels." if sides else "No images."), ""]
    parts += ["## Duplicates removed", "",
              (_md_table([[k, v] for k, v in f["duplicates"].items()], ["stage:reason", "rows"])
               if f["duplicates"] else "None."), ""]
    parts += ["## Contamination", "",
              (_md_table([[k, v] for k, v in f["contamination"].items()], ["evaluation set", "samples removed"])
               if f["contamination"] else "No sample matched an evaluation image." if f["eval_sets"]
               else "Not decontaminated (no evaluation set given)."), ""]
    td = f["takedowns"]
    parts += ["## Opt-outs and takedowns", "",
              "Opt-outs honoured (X-Robots-Tag noai/noimageai, robots.txt): " +
              (", ".join(f"{k} {v}" for k, v in f["opt_outs"].items()) or "none") + ".", "",
              f"Takedowns applied: {td.get('rows', 0)} pair(s) left out, from {td.get('requests', 0)} recorded "
              f"request(s) ({td.get('urls', 0)} URLs, {td.get('uids', 0)} uids, {td.get('domains', 0)} domains). "
              f"Their stored image bytes are deleted from the crawl store.", ""]
    parts += ["## How to load it", "",
              "webdataset:", "", "```python", "import webdataset as wds",
              f"ds = wds.WebDataset('{shards}/{{00000..{last:05d}}}.tar').decode('pil').to_tuple('jpg', 'txt')",
              "```", "", "open_clip:", "", "```bash",
              f"python -m open_clip_train.main --train-data '{shards}/{{00000..{last:05d}}}.tar' "
              f"--train-num-samples {f['samples']} --dataset-type webdataset ...", "```", "", "DuckDB:", "",
              "```sql", f"SELECT uid, url, caption, entry_ids FROM read_parquet('{shards}/*.parquet');", "```", "",
              "Every sample's `json` member holds uid, url, caption, entry ids, sha256, pHash and dHash. "
              "Rejected rows (with stage and reason) are in `rejected/*.parquet`; `manifest.json` has the full "
              "lineage and parameters.", ""]
    return "\n".join(parts)


def render_html(markdown_text: str, f: dict, plots: dict[str, bytes], thumbs) -> str:
    body = []
    for line in markdown_text.split("\n---\n", 2)[-1].splitlines():
        if line.startswith("!["):
            name = line[line.index("(card/") + 6:-1]
            if name in plots:
                body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
                            f'{base64.b64encode(plots[name]).decode()}">')
            continue
        body.append(html.escape(line))
    grid = []
    for entry, cells in thumbs:
        grid.append(f"<h3>{html.escape(entry)}</h3><div class='grid'>")
        for caption, uri in cells:
            grid.append(f"<figure><img src='{uri}'><figcaption>{html.escape(caption[:80])}</figcaption></figure>")
        grid.append("</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>data card v{v:04d}</title><style>"
            "body{{font-family:sans-serif;max-width:60em;margin:auto}} pre{{white-space:pre-wrap}}"
            ".grid{{display:flex;flex-wrap:wrap;gap:6px}} figure{{width:110px;margin:0;font-size:10px}}"
            "</style></head><body><pre>{body}</pre><h2>Samples of a few random entries</h2>{grid}"
            "<script type='application/json' id='facts'>{facts}</script></body></html>").format(
        v=f["version"], body="\n".join(body), grid="\n".join(grid),
        facts=html.escape(json.dumps({k: v for k, v in f.items() if not k.startswith("_") and k != "sizes"},
                                     default=str)))


def write_card(root, n: int, dest: str, manifest: dict) -> list[str]:
    """Write README.md, card.html and card/*.png into the version directory ``dest``; returns their URIs."""
    facts = card_facts(root, n, dest, manifest)
    entries = _entries(manifest)
    plots = {"entries.png": _plot_entries(facts["entry_counts"]["matched"], facts["entry_counts"]["before"],
                                          facts["entry_counts"]["after"], facts["entry_counts"]["t"]),
             "sizes.png": _plot_sizes(facts["sizes"]["widths"], facts["sizes"]["heights"])}
    thumbs = _thumbnails(dest, facts["_table"], manifest, entries, seed=n)
    md = render_markdown(facts, root.uri, dest, entries)
    out = []
    for name, data in plots.items():
        uri = storage.join(dest, "card", name)
        storage.write_bytes_atomic(uri, data)
        out.append(uri)
    readme = storage.join(dest, "README.md")
    storage.write_bytes_atomic(readme, md.encode())
    page = storage.join(dest, "card.html")
    storage.write_bytes_atomic(page, render_html(md, facts, plots, thumbs).encode())
    return out + [readme, page]
