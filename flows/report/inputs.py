"""Report inputs: read and validate the artifacts a report is built from, and turn them into table rows.

Everything here is shared by the HTML page (:mod:`flows.report.html`) and the Markdown tables
(:mod:`flows.report.markdown`): reading ``manifest.json`` / ``report.json`` / ``metrics.jsonl`` / ``eval.json``
(local paths or ``s3://``), checking the shape each section relies on, and the rows (already formatted cell
values) both renderers show.

A missing, unreadable or malformed input raises :class:`SectionError` (the message names the file and why); the
renderers turn exactly that exception into a one-line note. Values inside a well-formed file are read defensively
(``obj``/``objs``/``num``), because hand-edited or truncated files put anything anywhere; any other exception is a
bug in this package and propagates.
"""
from __future__ import annotations

import json
import math

from pipelines.core import storage
from pipelines.core.errors import ClipError

MAX_PAIRS_SHOWN = 50  # matched pairs listed per evaluation set (report.json and the audit's HTML keep every one)
MAX_REASONS_SHOWN = 40  # crawl errors can be unique per row (byte counts in the text); the manifest keeps all
MAX_SHARDS_SHOWN = 100
MAX_REASON_CHARS = 160  # rejection reasons can be whole multi-line HTTP errors; the manifest keeps them in full

BUILD_STAGE_ORDER = ("curate", "crawl_and_images", "decontam", "balance", "shard")  # flows.build runs them so
EVAL_HEADER = ["evaluation set", "n", "zero-shot top-1", "zero-shot top-5", "mean per-class recall",
               "linear probe top-1"]
RETRIEVAL_HEADER = ["captioned set", "direction", "R@1", "R@5", "R@10"]


class SectionError(ClipError, ValueError):
    """An input of a report section is missing or malformed; the message names the file and why.

    The only exception a report section turns into a note: anything else raised while rendering is a bug.
    """


# ------------------------------------------------------------------------------------------------------- reading


def read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (OSError, ValueError) as exc:  # StorageError (an OSError) names the URI and why; bad URI: ValueError
        msg = str(exc)
        raise SectionError(msg if msg.startswith(uri) else f"{uri}: {msg}") from None


def read_json(uri: str) -> dict:
    """A JSON object from ``uri``, or :class:`SectionError` saying which file and what is wrong with it."""
    raw = read_bytes(uri)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SectionError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SectionError(f"{uri}: expected a JSON object, found {type(doc).__name__}")
    return doc


def obj(x) -> dict:
    """``x`` when it is a JSON object, else {} (hand-edited or truncated inputs put anything anywhere)."""
    return x if isinstance(x, dict) else {}


def objs(x) -> list[dict]:
    """The JSON objects of a list, or [] when ``x`` is not a list."""
    return [v for v in x if isinstance(v, dict)] if isinstance(x, list) else []


def num(x) -> float | None:
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
    raw = read_bytes(uri)
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
        if num(rec.get("step")) is None or num(rec.get("loss")) is None:
            problems.append(f"line {lineno}: needs numeric 'step' and 'loss'")
            continue
        by_step[int(rec["step"])] = rec
    if not by_step:
        why = "; ".join(problems[:3]) if problems else "no records"
        raise SectionError(f"{uri}: no usable metrics ({why})")
    return [by_step[s] for s in sorted(by_step)], problems


def read_manifest(build_dir: str) -> tuple[str, dict]:
    uri = storage.join(build_dir, "manifest.json")
    m = read_json(uri)
    funnel = m.get("funnel")
    if not isinstance(funnel, dict) or not isinstance(funnel.get("stages", {}), dict):
        raise SectionError(f"{uri}: 'funnel' missing or not an object")
    return uri, m


def read_audit(audit_dir: str) -> tuple[str, dict]:
    uri = storage.join(audit_dir, "report.json")
    r = read_json(uri)
    if not isinstance(r.get("eval_sets"), dict):
        raise SectionError(f"{uri}: 'eval_sets' missing or not an object")
    return uri, r


def read_eval(eval_dir: str) -> tuple[str, dict]:
    uri = storage.join(eval_dir, "eval.json")
    r = read_json(uri)
    if not isinstance(r.get("eval_sets"), dict):
        raise SectionError(f"{uri}: 'eval_sets' missing or not an object")
    return uri, r


# ------------------------------------------------------------------------------------------------------ cell values


def pct(x) -> str:
    v = num(x)
    return "n/a" if v is None else f"{100 * v:.2f}%"


def fmt_int(x) -> str:
    v = num(x)
    return "n/a" if v is None else f"{int(v):,}"


def g(x, digits: int = 4) -> str:
    v = num(x)
    return "n/a" if v is None else f"{v:.{digits}g}"


def short(text, limit: int = MAX_REASON_CHARS) -> str:
    s = " ".join(str(text).split())  # collapse newlines: one reason per table row
    return s if len(s) <= limit else s[: limit - 1] + "…"


def dropped(a, b) -> str:
    va, vb = num(a), num(b)
    return "n/a" if va is None or vb is None else f"{int(va - vb):,}"


# ------------------------------------------------------------------------------------------------------ build rows


def funnel_rows(m: dict) -> list[tuple[str, int, int]]:
    """(stage, rows in, rows out) in the order the build ran them.

    manifest.json is written with sorted keys, so the file's order is alphabetical: known stages take the build's
    order, any other stage follows by rows in, descending (a funnel only narrows).
    """
    stages = {str(k): v for k, v in obj(m["funnel"].get("stages")).items() if isinstance(v, dict)}
    rank = {name: i for i, name in enumerate(BUILD_STAGE_ORDER)}
    order = sorted(stages, key=lambda s: (rank.get(s, len(rank)), -(num(stages[s].get("in")) or 0), s))
    return [(s, stages[s].get("in"), stages[s].get("out")) for s in order]


def rejected_rows(m: dict) -> list[tuple[str, str, int]]:
    out = []
    for key, n in obj(m["funnel"].get("rejected")).items():
        stage, _, reason = str(key).partition(":")
        out.append((stage, reason, n))
    return sorted(out, key=lambda r: (-(num(r[2]) or 0), r[0], r[1]))


def rest_of_rejected(rejected: list[tuple[str, str, int]]) -> str:
    rest = rejected[MAX_REASONS_SHOWN:]
    return (f"… and {len(rest):,} more reasons with {sum(int(num(n) or 0) for _, _, n in rest):,} rows "
            "(manifest.json lists every one).")


def curate_rows(m: dict) -> list[tuple[str, int, int]]:
    steps = objs(obj(m.get("curate")).get("steps"))
    return [(str(s.get("step")), s.get("rows_in"), s.get("rows_out")) for s in steps]


def sorted_counts(counts) -> list[int]:
    """Positive counts, descending; zero counts have no place on a log axis (they are counted separately)."""
    if not isinstance(counts, dict):
        return []
    return sorted((int(v) for v in counts.values() if num(v) is not None and v > 0), reverse=True)


# ------------------------------------------------------------------------------------------------ contamination rows


def stat_rows(s: dict) -> list[tuple]:
    rows = []
    for subset in ("all", "clean", "overlap"):
        d = obj(s.get(subset))
        ci = d.get("ci")
        ci_s = f"{pct(ci[0])} – {pct(ci[1])}" if isinstance(ci, list) and len(ci) == 2 else "n/a"
        rows.append((subset.capitalize(), fmt_int(d.get("n")), fmt_int(d.get("correct")), pct(d.get("accuracy")),
                     ci_s))
    return rows


# ------------------------------------------------------------------------------------------------ training rows


def final_rows(records: list[dict]) -> list[tuple[str, str]]:
    last = records[-1]
    rows = [("steps logged", f"{len(records):,}"), ("last step", fmt_int(last.get("step"))),
            ("final loss", g(last.get("loss"))),
            ("lowest loss", g(min(num(r.get("loss")) for r in records)))]
    for key in ("lr", "logit_scale", "in_batch_acc"):
        if num(last.get(key)) is not None:
            rows.append((f"final {key}", g(last.get(key))))
    for key in ("samples_per_s", "data_wait_s", "data_wait", "step_time_s"):
        vals = [v for v in (num(r.get(key)) for r in records) if v is not None]
        if vals:
            rows.append((f"mean {key}", g(sum(vals) / len(vals))))
    return rows


# ------------------------------------------------------------------------------------------------ evaluation rows


def per_class(m: dict) -> dict[str, float]:
    """Per-class zero-shot recall (the evaluator writes ``per_class_recall``; ``per_class`` is accepted too)."""
    pc = m.get("per_class_recall", m.get("per_class"))
    if not isinstance(pc, dict):
        return {}
    # a value outside [0, 1] is not a recall; drawing it would only distort the chart's axis
    return {str(c): float(v) for c, v in pc.items() if num(v) is not None and 0.0 <= v <= 1.0}


def eval_rows(r: dict) -> list[tuple]:
    rows = []
    for name, m in r["eval_sets"].items():
        if not isinstance(m, dict):
            continue
        probe = pct(m["linear_probe_top1"]) if "linear_probe_top1" in m else "-"
        rows.append((name, fmt_int(m.get("n")), pct(m.get("zeroshot_top1")), pct(m.get("zeroshot_top5")),
                     pct(m.get("mean_per_class_recall")), probe))
    return rows


def retrieval_rows(r: dict) -> list[tuple]:
    rows = []
    for spec, m in obj(r.get("retrieval")).items():
        if not isinstance(m, dict):
            continue
        for d, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
            rows.append((spec, label) + tuple(pct(m.get(f"{d}_R@{k}")) for k in (1, 5, 10)))
    return rows
