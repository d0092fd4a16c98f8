"""The CLI contract of every command: --help works; a user mistake is one line on stderr and exit code 2, with
nothing written; flags given on the command line win over --config, which wins over the defaults."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
COMMANDS = ["querylist", "curate", "build", "audit", "train", "eval", "e2e", "serve", "demo", "synthweb"]


def invoke(*args):
    return runner.invoke(app, list(args))


def one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr if hasattr(res, "stderr") else "")
    err = res.stderr.strip()
    assert "Traceback" not in res.output + err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pq.write_table(pa.table({"url": ["http://a.com/1.jpg", "http://b.com/2.jpg"],
                             "caption": ["a red cat on a mat", "a blue dog in the park"]}), d / "pairs.parquet")
    (d / "ql.txt").write_text("cat\ndog\nred\n")
    return d


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output or "usage" in res.output


@pytest.mark.parametrize("flags,needle", [
    (["--t", "-5"], "curate.t"),
    (["--target-size", "0"], "curate.target_size"),
    (["--dedup", "urll"], "curate.dedup"),
    (["--lang-backend", "fasttext"], "curate.lang_backend"),
    (["--batch-rows", "0"], "curate.batch_rows"),
    (["--runner", "NoSuchRunner"], "dask"),
])
def test_curate_rejects_bad_numbers_and_names_before_any_work(tiny, tmp_path, flags, needle):
    out = tmp_path / "out"
    res = invoke("curate", "-i", str(tiny / "pairs.parquet"), "-q", str(tiny / "ql.txt"), "-o", str(out), *flags)
    one_line_error(res, needle)
    assert not out.exists()  # nothing written (no stats.json, no candidates)


def test_binary_file_in_an_input_directory_is_named(tiny, tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "good.parquet").write_bytes((tiny / "pairs.parquet").read_bytes())
    (d / "photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    res = invoke("curate", "-i", f"{d}/", "-q", str(tiny / "ql.txt"), "-o", str(tmp_path / "out"))
    err = one_line_error(res, "photo.csv", "not a readable table")
    assert "IHDR" not in err and "found" not in err  # the header bytes are not shown as column names


def test_build_config_errors_name_the_key(tiny, tmp_path):
    base = ["build", "-i", str(tiny / "pairs.parquet"), "-q", str(tiny / "ql.txt"), "-o", str(tmp_path / "o")]
    for doc, needle in [({"curate": {"dedup": "urll"}}, "curate.dedup"),
                        ({"crawl": {"timout": 3}}, "crawl.timout: unknown key"),
                        ({"images": {"min_side": -1}}, "images.min_side"),
                        ({"shard": {"samples_per_shard": 0}}, "shard.samples_per_shard"),
                        ({"nonsense": 1}, "nonsense: unknown key"),
                        ({"runner": "DaskRunnr"}, "runner 'DaskRunnr' is not known")]:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(doc))
        one_line_error(invoke(*base, "--config", str(path)), needle)
    (tmp_path / "broken.yaml").write_text("crawl: [unclosed\n")
    one_line_error(invoke(*base, "--config", str(tmp_path / "broken.yaml")), "broken.yaml", "not valid YAML")
    one_line_error(invoke("build", "-q", str(tiny / "ql.txt"), "-o", str(tmp_path / "o")), "inputs: missing")
    assert not (tmp_path / "o").exists()


def test_flags_win_over_the_config_file_which_wins_over_defaults(tiny, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "inputs": [str(tiny / "pairs.parquet")], "querylist": str(tiny / "ql.txt"), "out": str(tmp_path / "o"),
        "work": str(tmp_path / "w"), "shard": {"samples_per_shard": 7, "seed": 3},
        "crawl": {"timeout": 4.5, "thread_count": 8}, "curate": {"langs": ["de"], "t": 99}}))
    res = invoke("build", "--config", str(path), "--samples-per-shard", "9", "--timeout", "2", "--print-config")
    assert res.exit_code == 0, res.output
    eff = yaml.safe_load(res.output)
    assert eff["shard"]["samples_per_shard"] == 9  # flag beats file
    assert eff["shard"]["seed"] == 3 and eff["crawl"]["thread_count"] == 8  # file beats defaults
    assert eff["crawl"]["timeout"] == 2.0 and eff["work"] == str(tmp_path / "w")  # keys the old CLI dropped
    assert eff["curate"]["langs"] == ["de"] and eff["curate"]["t"] == 99  # an unset flag never overrides the file
    assert eff["balance"]["t"] is None  # the second pass takes the curation t unless given


def test_other_commands_user_errors_are_one_line(tmp_path):
    one_line_error(invoke("serve", "--config", str(tmp_path / "missing.yaml")), "missing.yaml")
    (tmp_path / "e2e.yaml").write_text("out: o\nbuild: {inputs: [x], querylist: q, out: o, crawl: {timout: 1}}\n")
    one_line_error(invoke("e2e", "--config", str(tmp_path / "e2e.yaml")), "timout")
    one_line_error(invoke("audit", "--dataset", str(tmp_path / "nothing" / "*.tar"), "--eval-set", "nosuch:x",
                          "--out", str(tmp_path / "a")), "nosuch")


def test_no_traceback_from_a_real_process(tiny, tmp_path):
    """The installed entry point (not only the in-process runner) prints one line and exits 2."""
    res = subprocess.run([sys.executable, "-m", "flows.cli", "curate", "-i", str(tiny / "pairs.parquet"),
                          "-q", str(tiny / "ql.txt"), "-o", str(tmp_path / "o"), "--t", "-5"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "curate.t" in res.stderr


def test_demo_starts_its_derived_outputs_over_when_the_web_moved(tmp_path):
    """A second `make demo` serves the web on another free port (every URL and uid changes): the earlier build's
    crawl would refuse the new URL list, so the demo removes what it derived and keeps the web and query list."""
    from flows.demo import DERIVED, start_over_if_moved

    for name in DERIVED + ("web",):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / "report.html").write_text("r")
    assert not start_over_if_moved(tmp_path, "http://127.0.0.1:4000/a/1.jpg", "http://127.0.0.1:4000/b/2.jpg")
    assert (tmp_path / "build" / "f").exists()
    assert start_over_if_moved(tmp_path, "http://127.0.0.1:4000/a/1.jpg", "http://127.0.0.1:4001/a/1.jpg")
    assert not any((tmp_path / name).exists() for name in DERIVED) and not (tmp_path / "report.html").exists()
    assert (tmp_path / "web" / "f").exists()
    assert not start_over_if_moved(tmp_path, "http://127.0.0.1:4001/a", "http://127.0.0.1:4002/a")  # nothing built


def test_synthweb_names_a_bad_background_and_writes_nothing(tmp_path):
    one_line_error(invoke("synthweb", "--out", str(tmp_path / "web"), "--n-pairs", "10", "--backgrounds", "wallpaper"),
                   "backgrounds must be 'flat' or 'room'", "wallpaper")
    assert not (tmp_path / "web").exists()
