"""Markdown tables of a run for Prefect artifacts (``prefect.artifacts.create_markdown_artifact``).

Same inputs and rows as the HTML report; a table whose input is missing or malformed (:class:`SectionError`)
becomes a one-line note naming the file and why; any other exception is a bug and raises.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from flows.report.inputs import (
    EVAL_HEADER,
    MAX_REASONS_SHOWN,
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
    obj,
    objs,
    pct,
    read_audit,
    read_eval,
    read_manifest,
    rejected_rows,
    rest_of_rejected,
    retrieval_rows,
    short,
    stat_rows,
)
from pipelines.core import storage

__all__ = ["markdown_tables"]


def _cell(x) -> str:
    return short(x).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _note(message: str) -> str:
    return f"Not available: {_cell(message)}"


def build_tables(build_dir: str) -> dict[str, str]:
    try:
        _, m = read_manifest(build_dir)
    except SectionError as exc:
        return {"funnel": _note(str(exc))}
    f = m["funnel"]
    rows = [("input", "", fmt_int(f.get("input_rows")), "")]
    rows += [(s, fmt_int(a), fmt_int(b), dropped(a, b)) for s, a, b in funnel_rows(m)]
    out = {"funnel": _table(["stage", "rows in", "rows out", "dropped"], rows, [False, True, True, True])
           + f"\n\n**{fmt_int(f.get('kept'))}** of {fmt_int(f.get('input_rows'))} input rows reached "
           f"{len(objs(m.get('shards'))):,} shard(s)."}
    rej = rejected_rows(m)
    out["rejected"] = (_table(["stage", "reason", "rows"], [(s, r, fmt_int(n)) for s, r, n in rej[:MAX_REASONS_SHOWN]],
                              [False, False, True]) if rej else "No row was rejected.")
    if len(rej) > MAX_REASONS_SHOWN:
        out["rejected"] += "\n\n" + rest_of_rejected(rej)
    cur = curate_rows(m)
    if cur:
        out["curation"] = _table(["step", "rows in", "rows out", "dropped"],
                                 [(s, fmt_int(a), fmt_int(b), dropped(a, b)) for s, a, b in cur],
                                 [False, True, True, True])
    return out


def contamination_tables(audit_dir: str) -> dict[str, str]:
    try:
        _, r = read_audit(audit_dir)
    except SectionError as exc:
        return {"contamination": _note(str(exc))}
    sets = {n: s for n, s in r["eval_sets"].items() if isinstance(s, dict)}
    text = _table(["evaluation set", "examples", "with a near-duplicate", "overlap"],
                  [(n, fmt_int(s.get("n_eval")), fmt_int(s.get("n_overlap")), pct(s.get("overlap_rate")))
                   for n, s in sets.items()], [False, True, True, True])
    for name, st in obj(r.get("statistics")).items():
        if isinstance(st, dict):
            text += (f"\n\n**{_cell(name)}** zero-shot accuracy\n\n"
                     + _table(["subset", "n", "correct", "accuracy", "CI"], stat_rows(st),
                              [False, True, True, True, False])
                     + f"\n\nAll − Clean {pct(st.get('all_minus_clean'))}, p = {g(st.get('p_value'))}")
    return {"contamination": text}


def training_tables(run_dir: str) -> dict[str, str]:
    try:
        records, problems = load_metrics(storage.join(run_dir, "metrics.jsonl"))
    except SectionError as exc:
        return {"training": _note(str(exc))}
    text = _table(["", "value"], final_rows(records), [False, True])
    if problems:
        text += f"\n\nSkipped {len(problems)} malformed line(s) of metrics.jsonl."
    return {"training": text}


def evaluation_tables(eval_dir: str) -> dict[str, str]:
    try:
        _, r = read_eval(eval_dir)
    except SectionError as exc:
        return {"evaluation": _note(str(exc))}
    text = _table(EVAL_HEADER, eval_rows(r), [False] + [True] * 5)
    retrieval = retrieval_rows(r)
    if retrieval:
        text += "\n\n" + _table(RETRIEVAL_HEADER, retrieval, [False, False, True, True, True])
    return {"evaluation": text}


def markdown_tables(*, build_dir: str | None = None, audit_dir: str | None = None, eval_dir: str | None = None,
                    run_dir: str | None = None) -> dict[str, str]:
    """Markdown tables for Prefect artifacts, keyed by a valid artifact key (lowercase letters and dashes).

    Keys: ``funnel``, ``rejected``, ``curation`` (from build_dir), ``contamination`` (audit_dir), ``training``
    (run_dir), ``evaluation`` (eval_dir). A directory whose file cannot be read yields one key (``funnel``,
    ``contamination``, ``training`` or ``evaluation``) holding a one-line note that names the file and why. Any
    other error raises.
    """
    specs = [("funnel", build_dir, "manifest.json", build_tables),
             ("contamination", audit_dir, "report.json", contamination_tables),
             ("training", run_dir, "metrics.jsonl", training_tables),
             ("evaluation", eval_dir, "eval.json", evaluation_tables)]
    out: dict[str, str] = {}
    for key, directory, filename, build in specs:
        if directory is None:
            continue
        try:
            out.update(build(str(directory)))
        except SectionError as exc:  # an input found malformed deeper in the table: one note, the others stay
            out[key] = _note(str(exc))
        except Exception as exc:
            exc.add_note(f"while building the report's {key!r} table from {storage.join(str(directory), filename)}")
            raise
    return out
