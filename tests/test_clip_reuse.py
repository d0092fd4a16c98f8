"""Reuse of finished evaluation / audit units through pipelines.core.markers (clip_train.reuse), and the flow
modules' import graph (flows/train.py and flows/audit.py no longer import each other)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from clip_train.reuse import done_before, fingerprint, mark_done, model_files

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_counts_files_by_content_not_mtime(tmp_path):
    f = tmp_path / "checkpoint.pt"
    f.write_bytes(b"weights v1")
    fp = fingerprint(f, ["digits"], {"radius": 8})
    os.utime(f, (time.time() + 100, time.time() + 100))
    assert fingerprint(f, ["digits"], {"radius": 8}) == fp  # touched, same bytes: same unit
    f.write_bytes(b"weights v2")
    assert fingerprint(f, ["digits"], {"radius": 8}) != fp
    assert fingerprint(f, ["digits", "cifar10:x"], {"radius": 8}) != fingerprint(f, ["digits"], {"radius": 8})


def test_marker_lists_outputs_and_deleting_one_redoes_the_unit(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    (out / "eval.md").write_text("# x")
    fp = fingerprint("evaluate", ["digits"])
    marker = out / ".done"
    assert not done_before(marker, fp)
    mark_done(marker, fp)  # default: every file of the unit's directory
    assert done_before(marker, fp)
    assert not done_before(marker, fingerprint("evaluate", ["cifar10:x"]))
    (out / "eval.md").unlink()
    assert not done_before(marker, fp)


def test_model_files_of_each_checkpoint_form(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "checkpoint.pt", "tokenizer.json"):
        (run / name).write_text(name)
    assert sorted(p.name for p in model_files(str(run))) == ["checkpoint.pt", "config.json", "tokenizer.json"]
    (tmp_path / "m.pt").write_text("w")
    (tmp_path / "m.json").write_text("{}")
    assert sorted(p.name for p in model_files(str(tmp_path / "m.pt"))) == ["m.json", "m.pt"]
    assert model_files(None) == []


def test_train_and_audit_flows_do_not_import_each_other():
    code = ("import sys, flows.train; print(sorted(m for m in ('flows.audit', 'flows.e2e') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
    # ... not even lazily, inside a function (what made the cycle): flows/e2e.py is the one module using both.
    assert "flows.audit" not in (ROOT / "flows/train.py").read_text()
    assert "flows.e2e" not in (ROOT / "flows/train.py").read_text()
    assert "from flows.train" not in (ROOT / "flows/audit.py").read_text()
