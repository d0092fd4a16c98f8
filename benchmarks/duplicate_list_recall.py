"""Benchmark: the recall of a contamination audit against a published list of known near-duplicates.

Scores an audit report (``report.json`` of ``clipline audit``) against a list of (evaluation image, training image)
pairs annotated by people, in the format of ciFAIR's ``meta/duplicates_cifar10.csv`` (Barz & Denzler, "Do We Train
on Test Data? Purging CIFAR of Near-Duplicates"; https://github.com/cvjena/cifair): columns ``TestID`` and
``TrainID`` (indices in the original CIFAR arrays, which are the ids ``cifar10:DIR`` / ``cifar10:DIR:train`` give)
and optionally ``Judgment`` (0 exact duplicate, 1 near-duplicate: the same camera shot post-processed, 2 very
similar: a different shot of nearly the same scene). The list is not shipped: download it yourself.

For each judgment: how many listed evaluation images the audit flagged at all, and how many it flagged with the
listed training image; then the misses. A list like ciFAIR's is not complete (its annotators reviewed each test
image's nearest training images in one CNN feature space, up to a distance), so flagged images absent from it are
not counted as errors here; precision comes from looking at a sample (``benchmarks/audit_cifar10.py``).

usage: python benchmarks/duplicate_list_recall.py REPORT_JSON LIST_CSV [--eval-set cifar10] [--json OUT]
(exit code 2 with one line naming the file and row when either input is not what is expected)
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

JUDGMENT = {"0": "exact duplicate", "1": "near-duplicate (same shot)", "2": "very similar (other shot)"}


class InputError(ValueError):
    """A report or list that is not what is expected: the message names the file and row."""


def read_list(path: str) -> list[tuple[str, str, str]]:
    """(evaluation id, training id, judgment or '') per row of a ciFAIR-format CSV."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the duplicate list ({exc})") from exc
    if not rows:
        raise InputError(f"{path}: row 1: expected a header with TestID,TrainID[,Judgment], found an empty file")
    head = [h.strip() for h in rows[0]]
    if "TestID" not in head or "TrainID" not in head:
        raise InputError(f"{path}: row 1: expected a header with TestID,TrainID[,Judgment] (ciFAIR's "
                         f"meta/duplicates_*.csv), found {','.join(head)[:80]}")
    it, ir, ij = head.index("TestID"), head.index("TrainID"), head.index("Judgment") if "Judgment" in head else None
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            te, tr = str(int(row[it])), str(int(row[ir]))
        except (IndexError, ValueError):
            raise InputError(f"{path}: row {n}: expected integer TestID and TrainID, found {','.join(row)[:80]}") from None
        j = row[ij].strip() if ij is not None and ij < len(row) else ""
        out.append((te, tr, j))
    return out


def read_report(path: str, eval_set: str) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the audit report ({exc})") from exc
    sets = rep.get("eval_sets") if isinstance(rep, dict) else None
    if not isinstance(sets, dict) or eval_set not in sets:
        have = ", ".join(sets) if isinstance(sets, dict) else "none"
        raise InputError(f"{path}: expected an audit report (clipline audit's report.json) with evaluation set "
                         f"{eval_set!r}; it has: {have}")
    return sets[eval_set]


def score(report_set: dict, listed: list[tuple[str, str, str]]) -> dict:
    """Recall per judgment: listed evaluation images flagged at all / with the listed training image."""
    flagged: dict[str, set[str]] = {}
    for p in report_set.get("pairs", []):
        flagged.setdefault(str(p["eval_id"]), set()).add(str(p["dataset_key"]))
    near = {str(p["eval_id"]): p for p in report_set.get("nearest_unflagged", [])}
    total, hit, hit_pair, misses = Counter(), Counter(), Counter(), []
    for te, tr, j in listed:
        total[j] += 1
        hit[j] += te in flagged
        hit_pair[j] += tr in flagged.get(te, ())
        if te not in flagged:
            n = near.get(te)
            misses.append({"eval_id": te, "train_id": tr, "judgment": j,
                           "nearest_train": None if n is None else str(n["dataset_key"]),
                           "nearest_cos": None if n is None else n.get("desc_cos")})
    listed_ids = {te for te, _, _ in listed}
    return {"by_judgment": {j: {"listed": total[j], "flagged": hit[j], "flagged_with_listed_train": hit_pair[j],
                                "recall": round(hit[j] / total[j], 4)} for j in sorted(total)},
            "listed": len(listed), "flagged": len(flagged), "flagged_not_listed": len(set(flagged) - listed_ids),
            "misses": misses}


def render(s: dict) -> str:
    lines = ["| judgment | listed test images | flagged | recall | flagged with the listed train image |",
             "|---|---:|---:|---:|---:|"]
    for j, r in s["by_judgment"].items():
        lines.append(f"| {j or '-'} {JUDGMENT.get(j, '')} | {r['listed']} | {r['flagged']} | {r['recall']:.3f} | "
                     f"{r['flagged_with_listed_train']} |")
    lines.append(f"\nflagged test images: {s['flagged']} ({s['flagged_not_listed']} not on the list)")
    for m in s["misses"]:
        where = (f"; nearest unflagged, descriptor cos {m['nearest_cos']} to train {m['nearest_train']}"
                 if m["nearest_train"] else "")
        lines.append(f"missed: test {m['eval_id']} (train {m['train_id']}, judgment {m['judgment'] or '-'}){where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("list_csv")
    ap.add_argument("--eval-set", default="cifar10")
    ap.add_argument("--json", default=None, help="also write the scores here")
    a = ap.parse_args(argv)
    try:
        s = score(read_report(a.report, a.eval_set), read_list(a.list_csv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
