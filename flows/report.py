"""Run report: one self-contained HTML page (plots as embedded PNG) and Markdown tables, built from artifacts on disk.

Reads only what earlier stages wrote (``BUILD/manifest.json``, ``AUDIT/report.json``, ``RUN/metrics.jsonl`` +
``RUN/config.json``, ``EVAL/eval.json``; local paths or ``s3://`` URIs) so a report can be rebuilt at any time,
from any machine, without Prefect or torch. A section whose input is missing or malformed becomes a one-line note
naming the file and the reason; it never stops the rest of the report.

Entry points: :func:`render_report` (writes the HTML atomically) and :func:`markdown_tables` (tables for
``prefect.artifacts.create_markdown_artifact``). Same inputs => same bytes (no timestamps; PNGs without metadata).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence

from pipelines.core import storage

__all__ = ["render_report", "markdown_tables", "load_metrics", "SectionError"]

MAX_PAIRS_SHOWN = 50  # matched pairs listed per evaluation set (report.json and the audit's HTML keep every one)
MAX_REASONS_SHOWN = 40  # crawl errors can be unique per row (byte counts in the text); the manifest keeps all
MAX_SHARDS_SHOWN = 100
MAX_REASON_CHARS = 160  # rejection reasons can be whole multi-line HTTP errors; the manifest keeps them in full
MAX_CLASSES_LABELLED = 60  # above this, the per-class chart drops tick labels (a bar per class is still drawn)
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class SectionError(ValueError):
    """An input of a report section is missing or malformed; the message names the file and why."""


# ------------------------------------------------------------------------------------------------------- inputs


def _read_json(uri: str) -> dict:
    """A JSON object from ``uri``, or :class:`SectionError` saying which file and what is wrong with it."""
    raw = _read_bytes(uri)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SectionError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SectionError(f"{uri}: expected a JSON object, found {type(doc).__name__}")
    return doc


def _read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (OSError, ValueError) as exc:  # StorageError (an OSError) names the URI and why; bad URI: ValueError
        msg = str(exc)
        raise SectionError(msg if msg.startswith(uri) else f"{uri}: {msg}") from None


def _obj(x) -> dict:
    """``x`` when it is a JSON object, else {} (hand-edited or truncated inputs put anything anywhere)."""
    return x if isinstance(x, dict) else {}


def _objs(x) -> list[dict]:
    """The JSON objects of a list, or [] when ``x`` is not a list."""
    return [v for v in x if isinstance(v, dict)] if isinstance(x, list) else []


def _num(x) -> float | None:
    """A finite float, or None (JSON numbers may be null, strings or NaN in hand-written inputs)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def load_metrics(uri: str) -> tuple[list[dict], list[str]]:
    """Records of a trainer's ``metrics.jsonl`` (one per logged step) and a list of problems with skipped lines.

    A line is kept when it is a JSON object with numeric ``step`` and ``loss``. When a step appears twice (a run
    resumed from an earlier checkpoint logs its steps again) the later record wins, because it is the one whose
    weights the run went on with. Raises :class:`SectionError` when the file is unreadable or no line is usable.
    """
    raw = _read_bytes(uri)
    by_step: dict[int, dict] = {}
    problems: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SectionError(f"{uri}: not UTF-8 text ({exc})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {lineno}: not JSON ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"line {lineno}: expected a JSON object")
            continue
        if _num(rec.get("step")) is None or _num(rec.get("loss")) is None:
            problems.append(f"line {lineno}: needs numeric 'step' and 'loss'")
            continue
        by_step[int(rec["step"])] = rec
    if not by_step:
        why = "; ".join(problems[:3]) if problems else "no records"
        raise SectionError(f"{uri}: no usable metrics ({why})")
    return [by_step[s] for s in sorted(by_step)], problems


# ------------------------------------------------------------------------------------------------------ formatting


def _pct(x) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _int(x) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{int(v):,}"


def _g(x, digits: int = 4) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def _short(text, limit: int = MAX_REASON_CHARS) -> str:
    s = " ".join(str(text).split())  # collapse newlines: one reason per table row
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _h(x) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] | None = None) -> str:
    """Rows are escaped here, except cells wrapped in :class:`_Raw` (markup this module built itself)."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = []
    for row in rows:
        cells = []
        for c, num in zip(row, numeric):
            content = c.markup if isinstance(c, _Raw) else _h(c)
            cells.append(f'<td class="num">{content}</td>' if num else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw:
    def __init__(self, markup: str):
        self.markup = markup


def _md_cell(x) -> str:
    return _short(x).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _note_html(message: str) -> str:
    return f'<p class="note">{_h(message)}</p>'


# ------------------------------------------------------------------------------------------------------ plots


def _png(draw: Callable, size: tuple[float, float]) -> str:
    """Draw on a fresh Agg figure and return an <img> with the PNG inlined.

    The object API (Figure + FigureCanvasAgg) never touches pyplot's global backend or figure registry, so the
    report can render inside a Prefect worker, a test process or a notebook alike; ``Software: None`` drops the
    only metadata that would change the bytes between matplotlib installs of the same version.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    alt = draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_h(alt)}" src="data:image/png;base64,{data}">'


def _funnel_plot(labels: list[str], counts: list[int]) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        y = list(range(len(labels)))
        ax.barh(y, counts, color="#4c72b0")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()  # first stage on top, as a funnel reads
        ax.set_xlabel("rows")
        ax.set_title("rows after each stage")
        top = max(counts) if counts else 1
        for yi, c in zip(y, counts):
            ax.text(c + top * 0.01, yi, f"{c:,}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.15 or 1)
        return "filter funnel: rows after each stage"
    return _png(draw, (7, 0.45 * len(labels) + 1.2))


def _entry_counts_plot(before: list[int], after: list[int], t: float | None) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        for counts, label, style in ((before, "before balancing", "-"), (after, "after balancing", "--")):
            if counts:
                ax.plot(range(1, len(counts) + 1), counts, style, label=f"{label} ({len(counts):,} entries)",
                        drawstyle="steps-post")
        if t is not None:
            ax.axhline(t, color="#c44e52", linewidth=1, label=f"t = {t:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entry rank (by count, descending)")
        ax.set_ylabel("pairs matching the entry")
        ax.set_title("entry-count distribution")
        ax.legend(fontsize=8)
        return "entry counts sorted descending against rank, log-log, before and after balancing"
    return _png(draw, (7, 4))


def _curve_plot(steps: list[float], values: list[float], ylabel: str) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        ax.plot(steps, values, color="#4c72b0")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step")
        return f"{ylabel} against training step"
    return _png(draw, (4.6, 3.2))


def _per_class_plot(name: str, per_class: dict[str, float]) -> str:
    items = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    n = len(items)
    labelled = n <= MAX_CLASSES_LABELLED

    def draw(fig):
        ax = fig.add_subplot()
        y = list(range(n))
        ax.barh(y, [100 * v for _, v in items], color="#55a868")
        if labelled:
            ax.set_yticks(y, [c for c, _ in items], fontsize=8)
            for yi, (_, v) in zip(y, items):  # a 0% class has no visible bar; the number says it was measured
                ax.text(100 * v + 1, yi, f"{100 * v:.1f}", va="center", fontsize=7)
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{n} classes, sorted by accuracy")
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("zero-shot accuracy (%)")
        ax.set_title(f"{name}: zero-shot accuracy per class")
        return f"{name}: zero-shot accuracy per class"
    height = (0.22 * n + 1.2) if labelled else 4.0
    return _png(draw, (7, min(height, 16)))


# ------------------------------------------------------------------------------------------------------ build


def _manifest(build_dir: str) -> tuple[str, dict]:
    uri = storage.join(build_dir, "manifest.json")
    m = _read_json(uri)
    funnel = m.get("funnel")
    if not isinstance(funnel, dict) or not isinstance(funnel.get("stages", {}), dict):
        raise SectionError(f"{uri}: 'funnel' missing or not an object")
    return uri, m


BUILD_STAGE_ORDER = ("curate", "crawl_and_images", "decontam", "balance", "shard")  # flows.build runs them so


def _funnel_rows(m: dict) -> list[tuple[str, int, int]]:
    """(stage, rows in, rows out) in the order the build ran them.

    manifest.json is written with sorted keys, so the file's order is alphabetical: known stages take the build's
    order, any other stage follows by rows in, descending (a funnel only narrows).
    """
    stages = {str(k): v for k, v in _obj(m["funnel"].get("stages")).items() if isinstance(v, dict)}
    rank = {name: i for i, name in enumerate(BUILD_STAGE_ORDER)}
    order = sorted(stages, key=lambda s: (rank.get(s, len(rank)), -(_num(stages[s].get("in")) or 0), s))
    return [(s, stages[s].get("in"), stages[s].get("out")) for s in order]


def _rejected_rows(m: dict) -> list[tuple[str, str, int]]:
    out = []
    for key, n in _obj(m["funnel"].get("rejected")).items():
        stage, _, reason = str(key).partition(":")
        out.append((stage, reason, n))
    return sorted(out, key=lambda r: (-(_num(r[2]) or 0), r[0], r[1]))


def _rest_of_rejected(rejected: list[tuple[str, str, int]]) -> str:
    rest = rejected[MAX_REASONS_SHOWN:]
    return (f"… and {len(rest):,} more reasons with {sum(int(_num(n) or 0) for _, _, n in rest):,} rows "
            "(manifest.json lists every one).")


def _curate_rows(m: dict) -> list[tuple[str, int, int]]:
    steps = _objs(_obj(m.get("curate")).get("steps"))
    return [(str(s.get("step")), s.get("rows_in"), s.get("rows_out")) for s in steps]


def _sorted_counts(counts) -> list[int]:
    """Positive counts, descending; zero counts have no place on a log axis (they are counted separately)."""
    if not isinstance(counts, dict):
        return []
    return sorted((int(v) for v in counts.values() if _num(v) is not None and v > 0), reverse=True)


def _dropped(a, b) -> str:
    va, vb = _num(a), _num(b)
    return "n/a" if va is None or vb is None else f"{int(va - vb):,}"


def _build_section(build_dir: str) -> str:
    try:
        uri, m = _manifest(build_dir)
    except SectionError as exc:
        return _note_html(f"Build: {exc}")
    parts = [f'<p class="src">from <code>{_h(uri)}</code></p>']
    funnel = m["funnel"]
    shards = _objs(m.get("shards"))
    parts.append(f"<p>{_int(funnel.get('input_rows'))} input rows &rarr; <b>{_int(funnel.get('kept'))}</b> samples in "
                 f"{len(shards):,} shard(s); seed {_h(m.get('seed', 'n/a'))}.</p>")

    stages = _funnel_rows(m)
    parts.append("<h3>Filter funnel</h3>")
    if stages:
        parts.append(_html_table(
            ["stage", "rows in", "rows out", "dropped"],
            [(s, _int(a), _int(b), _dropped(a, b)) for s, a, b in stages], [False, True, True, True]))
        labels = ["input"] + [s for s, _, _ in stages]
        counts = [int(_num(funnel.get("input_rows")) or _num(stages[0][1]) or 0)]
        counts += [int(_num(b) or 0) for _, _, b in stages]
        parts.append(_funnel_plot(labels, counts))
    else:
        parts.append(_note_html(f"{uri}: funnel has no per-stage counts"))

    rejected = _rejected_rows(m)
    parts.append("<h3>Rejected rows by stage and reason</h3>")
    if rejected:
        parts.append(_html_table(["stage", "reason", "rows"], [(s, _short(r), _int(n)) for s, r, n in
                                                               rejected[:MAX_REASONS_SHOWN]], [False, False, True]))
        if len(rejected) > MAX_REASONS_SHOWN:
            parts.append(f"<p>{_h(_rest_of_rejected(rejected))}</p>")
    else:
        parts.append("<p>No row was rejected.</p>")

    curate = _curate_rows(m)
    if curate:
        parts.append("<h3>Curation funnel</h3>")
        parts.append(_html_table(["step", "rows in", "rows out", "dropped"],
                                 [(s, _int(a), _int(b), _dropped(a, b)) for s, a, b in curate],
                                 [False, True, True, True]))
        cb = _obj(m.get("curate")).get("balance")
        if isinstance(cb, dict) and cb:
            parts.append("<p>Curation balancing: " + ", ".join(f"{_h(k)} {_h(_g(v, 6) if _num(v) is not None else v)}"
                                                                for k, v in sorted(cb.items())) + ".</p>")

    parts.append(_entry_counts_html(uri, m))

    decontam = m.get("decontam")
    if isinstance(decontam, dict) and decontam:
        per_set = _obj(decontam.get("matches_per_eval_set"))
        parts.append("<h3>Decontamination</h3>")
        parts.append(f"<p>{_int(decontam.get('n_dropped'))} of {_int(decontam.get('pool_ok'))} pool images dropped "
                     f"for near-duplicates of evaluation images ({_int(decontam.get('matches'))} matches"
                     + "".join(f"; {_h(k)}: {_int(v)}" for k, v in sorted(per_set.items())) + ").</p>")

    parts.append("<h3>Shards</h3>")
    if shards:
        parts.append(_html_table(["shard", "samples"], [(s.get("name", "?"), _int(s.get("n")))
                                                        for s in shards[:MAX_SHARDS_SHOWN]], [False, True]))
        if len(shards) > MAX_SHARDS_SHOWN:
            rest = sum(int(_num(s.get("n")) or 0) for s in shards[MAX_SHARDS_SHOWN:])
            parts.append(f"<p>… and {len(shards) - MAX_SHARDS_SHOWN:,} more shards with {rest:,} samples.</p>")
    else:
        parts.append(_note_html(f"{uri}: no shards listed"))
    return "\n".join(parts)


def _entry_counts_html(uri: str, m: dict) -> str:
    counts = m.get("entry_counts")
    out = ["<h3>Entry counts before and after the second balancing pass</h3>"]
    if not isinstance(counts, dict) or not isinstance(counts.get("before"), dict) \
            or not isinstance(counts.get("after"), dict):
        return "\n".join(out + [_note_html(f"{uri}: entry_counts needs 'before' and 'after' objects")])
    before, after = _sorted_counts(counts["before"]), _sorted_counts(counts["after"])
    t = _num(_obj(m.get("balance")).get("t"))
    rows = []
    for label, pos in (("before", before), ("after", after)):
        over = "n/a" if t is None else f"{sum(1 for c in pos if c > t):,}"
        rows.append((label, f"{len(pos):,}", f"{sum(pos):,}", f"{pos[0]:,}" if pos else "0", over))
    out.append(_html_table(["", "entries with a match", "entry matches", "largest count",
                            "entries over t" if t is not None else "entries over t (no t)"], rows,
                           [False, True, True, True, True]))
    if t is not None:
        out.append(f"<p>Balancing threshold t = {_h(f'{t:g}')}.</p>")
    if before or after:
        out.append(_entry_counts_plot(before, after, t))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ contamination


def _audit(audit_dir: str) -> tuple[str, dict]:
    uri = storage.join(audit_dir, "report.json")
    r = _read_json(uri)
    if not isinstance(r.get("eval_sets"), dict):
        raise SectionError(f"{uri}: 'eval_sets' missing or not an object")
    return uri, r


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


def _stat_rows(s: dict) -> list[tuple]:
    rows = []
    for subset in ("all", "clean", "overlap"):
        d = _obj(s.get(subset))
        ci = d.get("ci")
        ci_s = f"{_pct(ci[0])} – {_pct(ci[1])}" if isinstance(ci, list) and len(ci) == 2 else "n/a"
        rows.append((subset.capitalize(), _int(d.get("n")), _int(d.get("correct")), _pct(d.get("accuracy")), ci_s))
    return rows


def _contamination_section(audit_dir: str, out_html: str) -> str:
    try:
        uri, r = _audit(audit_dir)
    except SectionError as exc:
        return _note_html(f"Contamination: {exc}")
    parts = [f'<p class="src">from <code>{_h(uri)}</code>'
             + (f" (dataset <code>{_h(r['dataset'])}</code>)" if r.get("dataset") else "") + "</p>"]
    html_uri = storage.join(audit_dir, "report.html")
    if _exists(html_uri):
        parts.append(f'<p><a href="{_h(_link(html_uri, out_html))}">The audit\'s own report</a> shows every matched '
                     "pair with its evaluation and dataset thumbnails.</p>")
    sets = r["eval_sets"]
    parts.append(_html_table(
        ["evaluation set", "examples", "with a near-duplicate", "overlap"],
        [(name, _int(s.get("n_eval")), _int(s.get("n_overlap")), _pct(s.get("overlap_rate")))
         for name, s in sets.items() if isinstance(s, dict)], [False, True, True, True]))
    errors = r.get("errors") if isinstance(r.get("errors"), list) else []
    if errors:
        parts.append(f'<p class="warn">{_h(len(errors))} input problem(s) during the audit (see report.json '
                     f"&#x27;errors&#x27;), first: {_h(_short(errors[0]))}</p>")
    stats = _obj(r.get("statistics"))
    for name, s in sets.items():
        if not isinstance(s, dict):
            continue
        parts.append(f"<h3>{_h(name)}</h3>")
        st = stats.get(name)
        if isinstance(st, dict):
            parts.append(_html_table(["subset", "n", "correct", "zero-shot accuracy", "CI"], _stat_rows(st),
                                     [False, True, True, True, False]))
            parts.append(f"<p>All &minus; Clean: {_pct(st.get('all_minus_clean'))}; one-sided binomial p-value "
                         f"(Overlap above Clean): {_h(_g(st.get('p_value')))}.</p>")
        pairs = _objs(s.get("pairs"))
        if not pairs:
            parts.append("<p>No matched pairs.</p>")
            continue
        with_thumbs = any(_thumb(p.get(k)) for p in pairs[:MAX_PAIRS_SHOWN] for k in ("eval_thumb", "dataset_thumb"))
        header = ["eval id", "dataset key", "distance", "variant", "ncc", "gncc"]
        if with_thumbs:
            header += ["evaluation image", "dataset image"]
        rows = []
        for p in pairs[:MAX_PAIRS_SHOWN]:
            row = [p.get("eval_id"), p.get("dataset_key"), _int(p.get("distance")), p.get("variant", ""),
                   _g(p.get("ncc")), _g(p.get("gncc"))]
            if with_thumbs:
                row += [_Raw(_thumb(p.get(k)) or "") for k in ("eval_thumb", "dataset_thumb")]
            rows.append(row)
        shown = f"first {MAX_PAIRS_SHOWN} of {len(pairs):,}" if len(pairs) > MAX_PAIRS_SHOWN else f"{len(pairs):,}"
        parts.append(f"<p>Matched pairs ({shown}):</p>")
        parts.append(_html_table(header, rows, [False, False, True, False, True, True] + [False] * (len(header) - 6)))
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


def _final_rows(records: list[dict]) -> list[tuple[str, str]]:
    last = records[-1]
    rows = [("steps logged", f"{len(records):,}"), ("last step", _int(last.get("step"))),
            ("final loss", _g(last.get("loss"))),
            ("lowest loss", _g(min(_num(r.get("loss")) for r in records)))]
    for key in ("lr", "logit_scale", "in_batch_acc"):
        if _num(last.get(key)) is not None:
            rows.append((f"final {key}", _g(last.get(key))))
    for key in ("samples_per_s", "data_wait_s", "data_wait", "step_time_s"):
        vals = [v for v in (_num(r.get(key)) for r in records) if v is not None]
        if vals:
            rows.append((f"mean {key}", _g(sum(vals) / len(vals))))
    return rows


def _training_section(run_dir: str) -> str:
    uri = storage.join(run_dir, "metrics.jsonl")
    try:
        records, problems = load_metrics(uri)
    except SectionError as exc:
        parts = [_note_html(f"Training: {exc}")]
    else:
        parts = [f'<p class="src">from <code>{_h(uri)}</code></p>']
        if problems:
            parts.append(_note_html(f"{uri}: skipped {len(problems)} malformed line(s): " + "; ".join(problems[:3])))
        parts.append(_html_table(["", "value"], _final_rows(records), [False, True]))
        steps = [float(r["step"]) for r in records]
        plots = [_curve_plot(steps, [float(r["loss"]) for r in records], "loss")]
        lr = [(float(r["step"]), _num(r.get("lr"))) for r in records]
        lr = [(s, v) for s, v in lr if v is not None]
        if lr:
            plots.append(_curve_plot([s for s, _ in lr], [v for _, v in lr], "learning rate"))
        parts.append('<div class="row">' + "".join(plots) + "</div>")
    cfg_uri = storage.join(run_dir, "config.json")
    try:
        cfg = _read_json(cfg_uri)
    except SectionError as exc:
        parts.append(_note_html(f"Training config: {exc}"))
    else:
        text = json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False)
        parts.append(f"<details><summary>config.json</summary><pre>{_h(text)}</pre></details>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ evaluation


def _eval(eval_dir: str) -> tuple[str, dict]:
    uri = storage.join(eval_dir, "eval.json")
    r = _read_json(uri)
    if not isinstance(r.get("eval_sets"), dict):
        raise SectionError(f"{uri}: 'eval_sets' missing or not an object")
    return uri, r


def _per_class(m: dict) -> dict[str, float]:
    """Per-class zero-shot recall (the evaluator writes ``per_class_recall``; ``per_class`` is accepted too)."""
    pc = m.get("per_class_recall", m.get("per_class"))
    if not isinstance(pc, dict):
        return {}
    # a value outside [0, 1] is not a recall; drawing it would only distort the chart's axis
    return {str(c): float(v) for c, v in pc.items() if _num(v) is not None and 0.0 <= v <= 1.0}


def _eval_rows(r: dict) -> list[tuple]:
    rows = []
    for name, m in r["eval_sets"].items():
        if not isinstance(m, dict):
            continue
        probe = _pct(m["linear_probe_top1"]) if "linear_probe_top1" in m else "-"
        rows.append((name, _int(m.get("n")), _pct(m.get("zeroshot_top1")), _pct(m.get("zeroshot_top5")),
                     _pct(m.get("mean_per_class_recall")), probe))
    return rows


EVAL_HEADER = ["evaluation set", "n", "zero-shot top-1", "zero-shot top-5", "mean per-class recall",
               "linear probe top-1"]
RETRIEVAL_HEADER = ["captioned set", "direction", "R@1", "R@5", "R@10"]


def _retrieval_rows(r: dict) -> list[tuple]:
    rows = []
    for spec, m in _obj(r.get("retrieval")).items():
        if not isinstance(m, dict):
            continue
        for d, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
            rows.append((spec, label) + tuple(_pct(m.get(f"{d}_R@{k}")) for k in (1, 5, 10)))
    return rows


def _evaluation_section(eval_dir: str) -> str:
    try:
        uri, r = _eval(eval_dir)
    except SectionError as exc:
        return _note_html(f"Evaluation: {exc}")
    head = f'<p class="src">from <code>{_h(uri)}</code>'
    if r.get("checkpoint"):
        head += f" (checkpoint <code>{_h(r['checkpoint'])}</code>, step {_h(r.get('step', 'n/a'))})"
    parts = [head + "</p>", _html_table(EVAL_HEADER, _eval_rows(r), [False] + [True] * 5)]
    retrieval = _retrieval_rows(r)
    if retrieval:
        parts += ["<h3>Retrieval</h3>", _html_table(RETRIEVAL_HEADER, retrieval, [False, False, True, True, True])]
    for name, m in r["eval_sets"].items():
        pc = _per_class(m) if isinstance(m, dict) else {}
        if pc:
            parts.append(_per_class_plot(str(name), pc))
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
    """``build()``, or a note naming the file when its content breaks an assumption the checks above missed.

    Why a catch-all: the report is the last step of a long run, and one odd field (a list where an object was
    expected) must cost one section, not the report; the note still says which file and what went wrong.
    """
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - see docstring
        return _note_html(f"{label}: {uri}: unexpected content ({type(exc).__name__}: {exc})")


def render_report(out_html: str, *, build_dir: str | None = None, audit_dir: str | None = None,
                  run_dir: str | None = None, eval_dir: str | None = None, title: str = "clipline run") -> str:
    """Write a self-contained HTML report of a run to ``out_html`` (atomically) and return its path.

    One section per given directory: Build (``build_dir/manifest.json``), Contamination (``audit_dir/report.json``),
    Training (``run_dir/metrics.jsonl`` and ``config.json``), Evaluation (``eval_dir/eval.json``). A section whose
    file is missing or malformed shows a one-line note naming the file and the reason instead.
    """
    out_html = str(out_html)
    specs = [
        ("build", "Build", build_dir, "manifest.json", _build_section),
        ("contamination", "Contamination", audit_dir, "report.json", lambda d: _contamination_section(d, out_html)),
        ("training", "Training", run_dir, "metrics.jsonl", _training_section),
        ("evaluation", "Evaluation", eval_dir, "eval.json", _evaluation_section),
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
        body = _note_html("No inputs were given (build_dir, audit_dir, run_dir, eval_dir are all unset).")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{_h(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")
    storage.write_bytes_atomic(out_html, page.encode("utf-8"))
    if not storage.is_s3(out_html):
        os.chmod(out_html, 0o644)  # the atomic temp file is private (0600); a report is meant to be opened and shared
    return out_html


# ------------------------------------------------------------------------------------------------------ markdown


def _md_note(message: str) -> str:
    return f"Not available: {_md_cell(message)}"


def _md_build(build_dir: str) -> dict[str, str]:
    try:
        _, m = _manifest(build_dir)
    except SectionError as exc:
        return {"funnel": _md_note(str(exc))}
    f = m["funnel"]
    rows = [("input", "", _int(f.get("input_rows")), "")]
    rows += [(s, _int(a), _int(b), _dropped(a, b)) for s, a, b in _funnel_rows(m)]
    out = {"funnel": _md_table(["stage", "rows in", "rows out", "dropped"], rows, [False, True, True, True])
           + f"\n\n**{_int(f.get('kept'))}** of {_int(f.get('input_rows'))} input rows reached "
           f"{len(_objs(m.get('shards'))):,} shard(s)."}
    rej = _rejected_rows(m)
    out["rejected"] = (_md_table(["stage", "reason", "rows"], [(s, r, _int(n)) for s, r, n in rej[:MAX_REASONS_SHOWN]],
                                 [False, False, True]) if rej else "No row was rejected.")
    if len(rej) > MAX_REASONS_SHOWN:
        out["rejected"] += "\n\n" + _rest_of_rejected(rej)
    cur = _curate_rows(m)
    if cur:
        out["curation"] = _md_table(["step", "rows in", "rows out", "dropped"],
                                    [(s, _int(a), _int(b), _dropped(a, b)) for s, a, b in cur],
                                    [False, True, True, True])
    return out


def _md_contamination(audit_dir: str) -> dict[str, str]:
    try:
        _, r = _audit(audit_dir)
    except SectionError as exc:
        return {"contamination": _md_note(str(exc))}
    sets = {n: s for n, s in r["eval_sets"].items() if isinstance(s, dict)}
    text = _md_table(["evaluation set", "examples", "with a near-duplicate", "overlap"],
                     [(n, _int(s.get("n_eval")), _int(s.get("n_overlap")), _pct(s.get("overlap_rate")))
                      for n, s in sets.items()], [False, True, True, True])
    for name, st in _obj(r.get("statistics")).items():
        if isinstance(st, dict):
            text += (f"\n\n**{_md_cell(name)}** zero-shot accuracy\n\n"
                     + _md_table(["subset", "n", "correct", "accuracy", "CI"], _stat_rows(st),
                                 [False, True, True, True, False])
                     + f"\n\nAll − Clean {_pct(st.get('all_minus_clean'))}, p = {_g(st.get('p_value'))}")
    return {"contamination": text}


def _md_training(run_dir: str) -> dict[str, str]:
    try:
        records, problems = load_metrics(storage.join(run_dir, "metrics.jsonl"))
    except SectionError as exc:
        return {"training": _md_note(str(exc))}
    text = _md_table(["", "value"], _final_rows(records), [False, True])
    if problems:
        text += f"\n\nSkipped {len(problems)} malformed line(s) of metrics.jsonl."
    return {"training": text}


def _md_evaluation(eval_dir: str) -> dict[str, str]:
    try:
        _, r = _eval(eval_dir)
    except SectionError as exc:
        return {"evaluation": _md_note(str(exc))}
    text = _md_table(EVAL_HEADER, _eval_rows(r), [False] + [True] * 5)
    retrieval = _retrieval_rows(r)
    if retrieval:
        text += "\n\n" + _md_table(RETRIEVAL_HEADER, retrieval, [False, False, True, True, True])
    return {"evaluation": text}


def markdown_tables(*, build_dir: str | None = None, audit_dir: str | None = None, eval_dir: str | None = None,
                    run_dir: str | None = None) -> dict[str, str]:
    """Markdown tables for Prefect artifacts, keyed by a valid artifact key (lowercase letters and dashes).

    Keys: ``funnel``, ``rejected``, ``curation`` (from build_dir), ``contamination`` (audit_dir), ``training``
    (run_dir), ``evaluation`` (eval_dir). A directory whose file cannot be read yields one key (``funnel``,
    ``contamination``, ``training`` or ``evaluation``) holding a one-line note that names the file and why.
    """
    specs = [("funnel", build_dir, "manifest.json", _md_build),
             ("contamination", audit_dir, "report.json", _md_contamination),
             ("training", run_dir, "metrics.jsonl", _md_training),
             ("evaluation", eval_dir, "eval.json", _md_evaluation)]
    out: dict[str, str] = {}
    for key, directory, filename, build in specs:
        if directory is None:
            continue
        try:
            out.update(build(str(directory)))
        except Exception as exc:  # noqa: BLE001 - as in _guarded: one odd field costs one table, not the artifacts
            uri = storage.join(str(directory), filename)
            out[key] = _md_note(f"{uri}: unexpected content ({type(exc).__name__}: {exc})")
    return out
