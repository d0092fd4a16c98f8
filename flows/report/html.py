"""The HTML report: one self-contained page (plots as embedded PNG), one section per given input directory.

:func:`render_report` writes it atomically. A section whose input is missing or malformed (:class:`SectionError`)
becomes a one-line note naming the file and the reason; any other exception while rendering is a bug and raises.
"""
from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

from flows.report import plots
from flows.report.inputs import (
    EVAL_HEADER,
    MAX_PAIRS_SHOWN,
    MAX_REASONS_SHOWN,
    MAX_SHARDS_SHOWN,
    RETRIEVAL_HEADER,
    SectionError,
    curate_rows,
    dropped,
    eval_rows,
    final_rows,
    fmt_int,
    funnel_rows,
    g,
    load_metrics,
    num,
    obj,
    objs,
    pct,
    per_class,
    read_audit,
    read_eval,
    read_json,
    read_manifest,
    rejected_rows,
    rest_of_rejected,
    retrieval_rows,
    short,
    sorted_counts,
    stat_rows,
)
from pipelines.core import storage

__all__ = ["render_report"]

_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def _h(x) -> str:
    return html.escape(str(x), quote=True)


class _Raw:
    """A table cell holding markup this module built itself (not escaped by :func:`_table`)."""

    def __init__(self, markup: str):
        self.markup = markup


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] | None = None) -> str:
    """Rows are escaped here, except cells wrapped in :class:`_Raw`."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = []
    for row in rows:
        cells = []
        for c, is_num in zip(row, numeric):
            content = c.markup if isinstance(c, _Raw) else _h(c)
            cells.append(f'<td class="num">{content}</td>' if is_num else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _note(message: str) -> str:
    return f'<p class="note">{_h(message)}</p>'


# ------------------------------------------------------------------------------------------------------ build


def build_section(build_dir: str) -> str:
    try:
        uri, m = read_manifest(build_dir)
    except SectionError as exc:
        return _note(f"Build: {exc}")
    parts = [f'<p class="src">from <code>{_h(uri)}</code></p>']
    funnel = m["funnel"]
    shards = objs(m.get("shards"))
    parts.append(f"<p>{fmt_int(funnel.get('input_rows'))} input rows &rarr; <b>{fmt_int(funnel.get('kept'))}</b> "
                 f"samples in {len(shards):,} shard(s); seed {_h(m.get('seed', 'n/a'))}.</p>")

    stages = funnel_rows(m)
    parts.append("<h3>Filter funnel</h3>")
    if stages:
        parts.append(_table(
            ["stage", "rows in", "rows out", "dropped"],
            [(s, fmt_int(a), fmt_int(b), dropped(a, b)) for s, a, b in stages], [False, True, True, True]))
        labels = ["input"] + [s for s, _, _ in stages]
        counts = [int(num(funnel.get("input_rows")) or num(stages[0][1]) or 0)]
        counts += [int(num(b) or 0) for _, _, b in stages]
        parts.append(plots.funnel_plot(labels, counts))
    else:
        parts.append(_note(f"{uri}: funnel has no per-stage counts"))

    rejected = rejected_rows(m)
    parts.append("<h3>Rejected rows by stage and reason</h3>")
    if rejected:
        parts.append(_table(["stage", "reason", "rows"], [(s, short(r), fmt_int(n)) for s, r, n in
                                                          rejected[:MAX_REASONS_SHOWN]], [False, False, True]))
        if len(rejected) > MAX_REASONS_SHOWN:
            parts.append(f"<p>{_h(rest_of_rejected(rejected))}</p>")
    else:
        parts.append("<p>No row was rejected.</p>")

    curate = curate_rows(m)
    if curate:
        parts.append("<h3>Curation funnel</h3>")
        parts.append(_table(["step", "rows in", "rows out", "dropped"],
                            [(s, fmt_int(a), fmt_int(b), dropped(a, b)) for s, a, b in curate],
                            [False, True, True, True]))
        cb = obj(m.get("curate")).get("balance")
        if isinstance(cb, dict) and cb:
            parts.append("<p>Curation balancing: " + ", ".join(f"{_h(k)} {_h(g(v, 6) if num(v) is not None else v)}"
                                                                for k, v in sorted(cb.items())) + ".</p>")

    parts.append(_entry_counts_html(uri, m))

    decontam = m.get("decontam")
    if isinstance(decontam, dict) and decontam:
        per_set = obj(decontam.get("matches_per_eval_set"))
        parts.append("<h3>Decontamination</h3>")
        parts.append(f"<p>{fmt_int(decontam.get('n_dropped'))} of {fmt_int(decontam.get('pool_ok'))} pool images "
                     f"dropped for near-duplicates of evaluation images ({fmt_int(decontam.get('matches'))} matches"
                     + "".join(f"; {_h(k)}: {fmt_int(v)}" for k, v in sorted(per_set.items())) + ").</p>")

    parts.append("<h3>Shards</h3>")
    if shards:
        parts.append(_table(["shard", "samples"], [(s.get("name", "?"), fmt_int(s.get("n")))
                                                   for s in shards[:MAX_SHARDS_SHOWN]], [False, True]))
        if len(shards) > MAX_SHARDS_SHOWN:
            rest = sum(int(num(s.get("n")) or 0) for s in shards[MAX_SHARDS_SHOWN:])
            parts.append(f"<p>… and {len(shards) - MAX_SHARDS_SHOWN:,} more shards with {rest:,} samples.</p>")
    else:
        parts.append(_note(f"{uri}: no shards listed"))
    return "\n".join(parts)


def _entry_counts_html(uri: str, m: dict) -> str:
    counts = m.get("entry_counts")
    out = ["<h3>Entry counts: what balancing did</h3>"]
    if not isinstance(counts, dict) or not isinstance(counts.get("before"), dict) \
            or not isinstance(counts.get("after"), dict):
        return "\n".join(out + [_note(f"{uri}: entry_counts needs 'before' and 'after' objects")])
    matched = counts.get("matched") if isinstance(counts.get("matched"), dict) else {}
    t = num(obj(m.get("balance")).get("t"))
    series = ([("matched (before curation's balancing)", sorted_counts(matched))] if matched else []) + [
        ("pool before the second pass", sorted_counts(counts["before"])), ("published", sorted_counts(counts["after"]))]
    rows = []
    for label, pos in series:
        over = "n/a" if t is None else f"{sum(1 for c in pos if c > t):,}"
        rows.append((label, f"{len(pos):,}", f"{sum(pos):,}", f"{pos[0]:,}" if pos else "0", over))
    out.append(_table(["", "entries with a match", "entry matches", "largest count",
                       "entries over t" if t is not None else "entries over t (no t)"], rows,
                      [False, True, True, True, True]))
    if t is not None:
        out.append(f"<p>Balancing threshold t = {_h(f'{t:g}')}.</p>")
        split = head_tail_kept(matched or counts["before"], counts["after"], t)
        if split:
            out.append(_table(["entries", "entries", "matches before", "published", "share published"],
                              [(name, f"{n:,}", f"{b:,}", f"{a:,}", f"{100 * a / b:.1f}%" if b else "n/a")
                               for name, n, b, a in split], [False, True, True, True, True]))
            out.append("<p>MetaCLIP's draw keeps a pair with probability 1 - &prod;(1 - min(1, t / c<sub>e</sub>)) "
                       "over the entries e it matches: a pair that matches any entry under t is always kept, a pair "
                       "whose entries are all frequent is cut. A head entry keeps more than t pairs when its pairs "
                       "also match rarer entries. The tail's share below 100% is download failures, duplicates and "
                       "decontamination, not balancing.</p>")
    if any(pos for _, pos in series):
        out.append(plots.entry_counts_plot(series, t))
    return "\n".join(out)


def head_tail_kept(before: dict, after: dict, t: float) -> list[tuple[str, int, int, int]]:
    """[(name, entries, matches before, matches published)] for head entries (before count >= t) and the tail."""
    groups = {"head (count >= t)": [0, 0, 0], "tail (count < t)": [0, 0, 0]}
    for e, b in before.items():
        if num(b) is None or b <= 0:
            continue
        g = groups["head (count >= t)" if b >= t else "tail (count < t)"]
        a = num(after.get(e)) or 0
        g[0], g[1], g[2] = g[0] + 1, g[1] + int(b), g[2] + int(a)
    return [(name, *vals) for name, vals in groups.items() if vals[0]]


# ------------------------------------------------------------------------------------------------ contamination


def _thumb(value) -> str | None:
    """An <img> for a base64 PNG/JPEG thumbnail carried by a pair, or None when it is absent or not base64."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("data:image/"):
        head, _, data = value.partition(",")
        if head not in ("data:image/png;base64", "data:image/jpeg;base64") or not _B64.match(data):
            return None
        return f'<img class="thumb" src="{value}">'
    return f'<img class="thumb" src="data:image/png;base64,{value}">' if _B64.match(value) else None


def contamination_section(audit_dir: str, out_html: str) -> str:
    try:
        uri, r = read_audit(audit_dir)
    except SectionError as exc:
        return _note(f"Contamination: {exc}")
    parts = [f'<p class="src">from <code>{_h(uri)}</code>'
             + (f" (dataset <code>{_h(r['dataset'])}</code>)" if r.get("dataset") else "") + "</p>"]
    html_uri = storage.join(audit_dir, "report.html")
    if _exists(html_uri):
        parts.append(f'<p><a href="{_h(_link(html_uri, out_html))}">The audit\'s own report</a> shows every matched '
                     "pair with its evaluation and dataset thumbnails.</p>")
    sets = r["eval_sets"]
    parts.append(_table(
        ["evaluation set", "examples", "with a near-duplicate", "overlap"],
        [(name, fmt_int(s.get("n_eval")), fmt_int(s.get("n_overlap")), pct(s.get("overlap_rate")))
         for name, s in sets.items() if isinstance(s, dict)], [False, True, True, True]))
    errors = r.get("errors") if isinstance(r.get("errors"), list) else []
    if errors:
        parts.append(f'<p class="warn">{_h(len(errors))} input problem(s) during the audit (see report.json '
                     f"&#x27;errors&#x27;), first: {_h(short(errors[0]))}</p>")
    stats = obj(r.get("statistics"))
    for name, s in sets.items():
        if not isinstance(s, dict):
            continue
        parts.append(f"<h3>{_h(name)}</h3>")
        st = stats.get(name)
        if isinstance(st, dict):
            parts.append(_table(["subset", "n", "correct", "zero-shot accuracy", "CI"], stat_rows(st),
                                [False, True, True, True, False]))
            parts.append(f"<p>All &minus; Clean: {pct(st.get('all_minus_clean'))}; one-sided binomial p-value "
                         f"(Overlap above Clean): {_h(g(st.get('p_value')))}.</p>")
        pairs = objs(s.get("pairs"))
        if not pairs:
            parts.append("<p>No matched pairs.</p>")
            continue
        with_thumbs = any(_thumb(p.get(k)) for p in pairs[:MAX_PAIRS_SHOWN] for k in ("eval_thumb", "dataset_thumb"))
        header = ["eval id", "dataset key", "distance", "variant", "ncc", "gncc"]
        if with_thumbs:
            header += ["evaluation image", "dataset image"]
        rows = []
        for p in pairs[:MAX_PAIRS_SHOWN]:
            row = [p.get("eval_id"), p.get("dataset_key"), fmt_int(p.get("distance")), p.get("variant", ""),
                   g(p.get("ncc")), g(p.get("gncc"))]
            if with_thumbs:
                row += [_Raw(_thumb(p.get(k)) or "") for k in ("eval_thumb", "dataset_thumb")]
            rows.append(row)
        shown = f"first {MAX_PAIRS_SHOWN} of {len(pairs):,}" if len(pairs) > MAX_PAIRS_SHOWN else f"{len(pairs):,}"
        parts.append(f"<p>Matched pairs ({shown}):</p>")
        parts.append(_table(header, rows, [False, False, True, False, True, True] + [False] * (len(header) - 6)))
    return "\n".join(parts)


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except (OSError, ValueError):  # e.g. S3 access denied: no link, but the table from report.json still shows
        return False


def _link(target: str, out_html: str) -> str:
    """A link from the report to another artifact: relative when both are local files, so the folder can move."""
    if storage.is_s3(target) or storage.is_s3(out_html):
        return target
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(out_html)))


# ------------------------------------------------------------------------------------------------------ training


def training_section(run_dir: str) -> str:
    uri = storage.join(run_dir, "metrics.jsonl")
    try:
        records, problems = load_metrics(uri)
    except SectionError as exc:
        parts = [_note(f"Training: {exc}")]
    else:
        parts = [f'<p class="src">from <code>{_h(uri)}</code></p>']
        if problems:
            parts.append(_note(f"{uri}: skipped {len(problems)} malformed line(s): " + "; ".join(problems[:3])))
        parts.append(_table(["", "value"], final_rows(records), [False, True]))
        steps = [float(r["step"]) for r in records]
        charts = [plots.curve_plot(steps, [float(r["loss"]) for r in records], "loss")]
        lr = [(float(r["step"]), num(r.get("lr"))) for r in records]
        lr = [(s, v) for s, v in lr if v is not None]
        if lr:
            charts.append(plots.curve_plot([s for s, _ in lr], [v for _, v in lr], "learning rate"))
        parts.append('<div class="row">' + "".join(charts) + "</div>")
    cfg_uri = storage.join(run_dir, "config.json")
    try:
        cfg = read_json(cfg_uri)
    except SectionError as exc:
        parts.append(_note(f"Training config: {exc}"))
    else:
        text = json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False)
        parts.append(f"<details><summary>config.json</summary><pre>{_h(text)}</pre></details>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluation_section(eval_dir: str) -> str:
    try:
        uri, r = read_eval(eval_dir)
    except SectionError as exc:
        return _note(f"Evaluation: {exc}")
    head = f'<p class="src">from <code>{_h(uri)}</code>'
    if r.get("checkpoint"):
        head += f" (checkpoint <code>{_h(r['checkpoint'])}</code>, step {_h(r.get('step', 'n/a'))})"
    parts = [head + "</p>", _table(EVAL_HEADER, eval_rows(r), [False] + [True] * 5)]
    retrieval = retrieval_rows(r)
    if retrieval:
        parts += ["<h3>Retrieval</h3>", _table(RETRIEVAL_HEADER, retrieval, [False, False, True, True, True])]
    for name, m in r["eval_sets"].items():
        pc = per_class(m) if isinstance(m, dict) else {}
        if pc:
            parts.append(plots.per_class_plot(str(name), pc))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note,.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:.4em .8em}
.src{color:#666;font-size:.85em} .row{display:flex;flex-wrap:wrap;gap:1em}
img.plot{max-width:100%} img.thumb{width:64px;height:64px;image-rendering:pixelated}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em} nav a{margin-right:1em}
"""


def _guarded(label: str, uri: str, build: Callable[[], str]) -> str:
    """``build()``; a :class:`SectionError` raised anywhere in it (an input found missing or malformed deeper in
    the section) becomes a note. Any other exception is a bug in the report code: it raises, with a note on the
    exception saying which section and file it was rendering."""
    try:
        return build()
    except SectionError as exc:
        return _note(f"{label}: {exc}")
    except Exception as exc:
        exc.add_note(f"while rendering the report's {label} section from {uri}")
        raise


def render_report(out_html: str, *, build_dir: str | None = None, audit_dir: str | None = None,
                  run_dir: str | None = None, eval_dir: str | None = None, title: str = "clipline run") -> str:
    """Write a self-contained HTML report of a run to ``out_html`` (atomically) and return its path.

    One section per given directory: Build (``build_dir/manifest.json``), Contamination (``audit_dir/report.json``),
    Training (``run_dir/metrics.jsonl`` and ``config.json``), Evaluation (``eval_dir/eval.json``). A section whose
    file is missing or malformed shows a one-line note naming the file and the reason instead; any other error
    raises (nothing is written then).
    """
    out_html = str(out_html)
    specs = [
        ("build", "Build", build_dir, "manifest.json", build_section),
        ("contamination", "Contamination", audit_dir, "report.json", lambda d: contamination_section(d, out_html)),
        ("training", "Training", run_dir, "metrics.jsonl", training_section),
        ("evaluation", "Evaluation", eval_dir, "eval.json", evaluation_section),
    ]
    sections = []
    for sid, name, directory, filename, build in specs:
        if directory is None:
            continue
        directory = str(directory)
        sections.append((sid, name, _guarded(name, storage.join(directory, filename), lambda: build(directory))))
    nav = "".join(f'<a href="#{sid}">{_h(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{_h(name)}</h2>\n{content}\n</section>'
                     for sid, name, content in sections)
    if not sections:
        body = _note("No inputs were given (build_dir, audit_dir, run_dir, eval_dir are all unset).")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{_h(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")
    storage.write_bytes_atomic(out_html, page.encode("utf-8"))
    if not storage.is_s3(out_html):
        os.chmod(out_html, 0o644)  # the atomic temp file is private (0600); a report is meant to be opened and shared
    return out_html
