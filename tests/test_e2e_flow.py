"""The end_to_end flow (build -> audit -> train -> evaluate -> report) with a tiny config under Prefect's test
server, on the session's synthetic web."""
import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow


def test_end_to_end_tiny(synth_build, synth_web_small, tmp_path):
    import dataclasses

    from flows.e2e import end_to_end
    from tests.conftest import synth_build_config

    build_dir, _ = synth_build  # same parameters: the flow finds every stage finished and reuses it
    b = dataclasses.asdict(synth_build_config(synth_web_small, build_dir))
    b["curate"]["langs"] = []
    config = {"out": str(tmp_path), "build": b,
              "train": {"model": "tiny", "steps": 12, "batch_size": 16, "save_every": 6, "workers": 0},
              "evaluate": {"linear_probe": True}, "audit": {}}
    result = end_to_end(config)

    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (name, numbers), = ev["eval_sets"].items()
    assert numbers["n"] > 0 and 0.0 <= numbers["zeroshot_top1"] <= 1.0
    assert numbers["linear_probe_top1"] is not None
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert report["eval_sets"][name]["n_eval"] == numbers["n"]
    assert "statistics" in report  # the paper's All / Clean / Overlap block, from the trained checkpoint
    html = Path(result["report"]).read_text()
    assert "data:image/png;base64" in html and "funnel" in html.lower()
    # a rerun continues from the finished artifacts: training resumes at its last step instead of starting over
    again = end_to_end(config)
    metrics_again = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_again) == len(metrics)
    assert again["evaluation"] == result["evaluation"]
