"""benchmarks/duplicate_list_recall.py: an audit report scored against a list of known near-duplicates."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from duplicate_list_recall import main, read_list, score  # noqa: E402


def _report(tmp_path):
    rep = {"eval_sets": {"cifar10": {
        "pairs": [{"eval_id": "1", "dataset_key": "10"}, {"eval_id": "2", "dataset_key": "99"},
                  {"eval_id": "5", "dataset_key": "50"}],
        "nearest_unflagged": [{"eval_id": "3", "dataset_key": "30", "desc_cos": 0.91}]}}}
    p = tmp_path / "report.json"
    p.write_text(json.dumps(rep))
    return p


def test_recall_per_judgment_and_misses(tmp_path, capsys):
    lst = tmp_path / "dups.csv"
    lst.write_text("TestID,TrainID,Distance,Judgment\n1,10,0.1,1\n2,20,0.1,1\n3,30,0.2,1\n4,40,0.2,2\n")
    s = score(json.loads(_report(tmp_path).read_text())["eval_sets"]["cifar10"], read_list(str(lst)))
    one, two = s["by_judgment"]["1"], s["by_judgment"]["2"]
    assert (one["listed"], one["flagged"], one["flagged_with_listed_train"]) == (3, 2, 1)  # 2 flagged with another
    assert (two["listed"], two["flagged"]) == (1, 0)
    assert s["flagged"] == 3 and s["flagged_not_listed"] == 1
    assert [(m["eval_id"], m["nearest_train"]) for m in s["misses"]] == [("3", "30"), ("4", None)]
    assert main([str(_report(tmp_path)), str(lst)]) == 0
    assert "missed: test 3 (train 30, judgment 1); nearest unflagged" in capsys.readouterr().out


@pytest.mark.parametrize("text,where", [("a,b\n1,2\n", "row 1"), ("TestID,TrainID\n1,x\n", "row 2"), ("", "row 1")])
def test_bad_list_is_one_line_and_exit_2(tmp_path, capsys, text, where):
    lst = tmp_path / "bad.csv"
    lst.write_text(text)
    assert main([str(_report(tmp_path)), str(lst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(lst) in err and where in err


def test_report_without_the_eval_set_is_refused(tmp_path, capsys):
    lst = tmp_path / "dups.csv"
    lst.write_text("TestID,TrainID\n1,10\n")
    assert main([str(_report(tmp_path)), str(lst), "--eval-set", "cifar100"]) == 2
    assert "cifar100" in capsys.readouterr().err
