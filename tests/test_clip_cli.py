"""The CLI contract of the model commands (`clipline train`, `eval`, `export`, `score`), run as subprocesses: --help
works, a user mistake is one line on stderr with exit code 2 and no traceback, and `clipline eval` accepts every
checkpoint format (a run, its open_clip export, an OpenAI state dict, a TorchScript archive) with identical results
for identical weights."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLIPLINE = Path(sys.executable).parent / "clipline"
# Runs the real app; registers flows.cli_model's commands first only if flows/cli.py does not (yet) do it itself,
# so these tests check the commands either way (test_app_lists_model_commands checks the wiring).
_LAUNCH = ("import flows.cli as c, flows.cli_model as m\n"
           "names = {getattr(x, 'name', None) or getattr(x.callback, '__name__', '') for x in c.app.registered_commands}\n"
           "if 'export' not in names: m.register(c.app)\n"
           "c.app(prog_name='clipline')")


def clipline(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (what a user runs)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "CLIPLINE_CLIP_BPE": ""}
    return subprocess.run([sys.executable, "-c", _LAUNCH, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def clipline_inproc(*args: str) -> _Result:
    """The same app in this process (one torch import for all the error checks instead of one per command)."""
    import flows.cli as cli
    import flows.cli_model as model_cli
    from typer.testing import CliRunner

    names = {getattr(x, "name", None) or getattr(x.callback, "__name__", "") for x in cli.app.registered_commands}
    if "export" not in names:
        model_cli.register(cli.app)
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli.app, list(args), prog_name="clipline")
    finally:
        torch.set_num_threads(threads)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return _Result(result.exit_code, result.stdout, result.stderr)


def assert_user_error(proc, *words: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_app_lists_model_commands():
    """flows/cli.py registers export and score (flows.cli_model.register(app))."""
    proc = subprocess.run([str(CLIPLINE), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    assert "export" in proc.stdout and "score" in proc.stdout


@pytest.mark.parametrize("command", ["train", "eval", "export", "score"])
def test_help(command):
    proc = clipline_inproc(command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--checkpoint" in proc.stdout or "--data" in proc.stdout


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run directory with random weights of a small model (64-wide heads, QuickGELU: the OpenAI layout's rules)."""
    from clip_train.checkpoint import atomic_write_json, save_checkpoint
    from clip_train.model import CLIP, CLIPConfig, TextConfig, VisionConfig
    from clip_train.shards import SHAPES, synthetic_shape_samples
    from clip_train.tokenizer import CLIPTokenizer

    root = tmp_path_factory.mktemp("cli")
    caps = [s.caption for s in synthetic_shape_samples(60, seed=1)] + [f"a photo of a {s}." for s in SHAPES]
    tokenizer = CLIPTokenizer.train(caps, vocab_size=600)
    cfg = CLIPConfig(embed_dim=32, vision_cfg=VisionConfig(type="vit", image_size=32, patch_size=8, width=128, layers=1, heads=2),
                     text_cfg=TextConfig(vocab_size=tokenizer.vocab_size, width=128, heads=2, layers=1,
                                         eot_token_id=tokenizer.eot_token_id), quick_gelu=True)
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    run = root / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", {"model": "small", "model_config": cfg.to_dict()})
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "step": 5})
    tokenizer.save(run / "tokenizer.json")
    return root, run, tokenizer


def test_train_user_errors(fake_run, tmp_path):
    root, run, _ = fake_run
    # once as a real process: one line on stderr, exit code 2, no traceback
    assert_user_error(clipline("train", "--data", str(tmp_path), "--model", "tiny", "--out", str(run)), "--resume")
    assert_user_error(clipline_inproc("train", "--data", str(tmp_path / "nope"), "--model", "tiny", "--out",
                                      str(tmp_path / "r")), "nope")
    assert_user_error(clipline_inproc("train", "--data", str(tmp_path), "--model", "ViT-Z-99", "--out",
                                      str(tmp_path / "r")), "ViT-Z-99")
    assert_user_error(clipline_inproc("train", "--model", "tiny"), "--data")
    assert_user_error(clipline_inproc("train", "--data", "x", "--model", "tiny", "--out", "y", "--batch-size", "0"),
                      "--batch-size")
    assert_user_error(clipline_inproc("train", "--data", str(tmp_path), "--model", "tiny", "--out", str(tmp_path / "r"),
                                      "--online-t", "5"), "--online-balance")


def test_eval_export_score_user_errors(fake_run, tmp_path):
    root, run, _ = fake_run
    assert_user_error(clipline_inproc("eval", "--checkpoint", str(run), "--out", str(tmp_path / "e")), "nothing to evaluate")
    assert_user_error(clipline_inproc("eval", "--checkpoint", str(tmp_path / "none"), "--eval-set", "digits", "--out",
                                      str(tmp_path / "e")), "none")
    assert_user_error(clipline_inproc("eval", "--checkpoint", str(run), "--eval-set", "imagenet:/x", "--out",
                                      str(tmp_path / "e")), "imagenet")
    assert_user_error(clipline_inproc("export", "--checkpoint", str(run), "--format", "onnx", "--out",
                                      str(tmp_path / "x")), "onnx")
    assert_user_error(clipline_inproc("export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")),
                      "none")
    assert_user_error(clipline_inproc("score", "--checkpoint", str(run), "--dataset", str(tmp_path / "nothing")),
                      "nothing")
    (tmp_path / "w.pt").write_bytes(b"junk")
    (tmp_path / "shards").mkdir()
    assert_user_error(clipline_inproc("score", "--checkpoint", str(tmp_path / "w.pt"), "--dataset", str(tmp_path / "shards"),
                                      "--out", str(tmp_path / "s.parquet")), "shards")
    from clip_train.shards import synthetic_shape_samples, write_shards

    write_shards(synthetic_shape_samples(2, seed=0), tmp_path / "shards", samples_per_shard=2)
    assert_user_error(clipline_inproc("score", "--checkpoint", str(tmp_path / "w.pt"), "--dataset", str(tmp_path / "shards"),
                                      "--out", str(tmp_path / "s.parquet")), "w.pt")


def _eval_folder(root: Path) -> Path:
    from clip_train.shards import jpeg_bytes, shape_image

    folder = root / "evalset"
    rng = np.random.default_rng(3)
    for shape in ("circle", "square", "triangle"):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            (folder / shape / f"{i}.jpg").write_bytes(jpeg_bytes(shape_image("red", shape, rng, 32)))
    return folder


@pytest.mark.slow
def test_eval_accepts_every_checkpoint_format(fake_run):
    from tests.test_clip_interop import RefCLIP

    root, run, tokenizer = fake_run
    folder = _eval_folder(root)
    # 1. the run's open_clip export (directory with NAME.json + NAME.pt + tokenizer files)
    proc = clipline("export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(root / "export"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clipline-small" in proc.stdout
    state = torch.load(root / "export" / "clipline-small.pt", weights_only=True)
    # 2. OpenAI's layout as a plain state dict, CLIP-format merges beside it (no config: inferred, QuickGELU)
    openai = root / "openai"
    openai.mkdir()
    torch.save({**state, "input_resolution": torch.tensor(32)}, openai / "model.pt")
    (openai / "bpe_simple_vocab_16e6.txt.gz").write_bytes(tokenizer.clip_merges_file_bytes())
    # 3. a TorchScript archive of the reference implementation holding the same weights
    ts = root / "torchscript"
    ts.mkdir()
    from clip_train.model import CLIPConfig

    ref = RefCLIP(CLIPConfig.from_dict(json.loads((run / "config.json").read_text())["model_config"])).eval()
    ref.load_state_dict(state)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(ref, (torch.zeros(1, 3, 32, 32), tokenizer(["a"])), check_trace=False).save(str(ts / "ViT.pt"))
    (ts / "bpe_simple_vocab_16e6.txt.gz").write_bytes(gzip.compress(gzip.decompress(tokenizer.clip_merges_file_bytes())))
    results = {}
    for fmt, ckpt in (("clipline-run", run), ("open_clip", root / "export"), ("openai", openai / "model.pt"),
                      ("openai-torchscript", ts / "ViT.pt")):
        out = root / f"eval-{fmt}"
        proc = clipline("eval", "--checkpoint", str(ckpt), "--eval-set", f"folder:{folder}", "--out", str(out),
                        "--threads", "1")
        assert proc.returncode == 0, (fmt, proc.stderr[-3000:])
        report = json.loads((out / "eval.json").read_text())
        assert report["format"] == fmt
        results[fmt] = report["eval_sets"]["evalset"]
    first = results["clipline-run"]
    for fmt, r in results.items():
        assert r["n"] == 12
        assert r["per_class_recall"] == first["per_class_recall"], fmt
        assert r["zeroshot_top1"] == first["zeroshot_top1"] and r["zeroshot_top5"] == first["zeroshot_top5"], fmt
    # score through the CLI with the OpenAI-format file
    from clip_train.shards import synthetic_shape_samples, write_shards

    write_shards(synthetic_shape_samples(10, seed=9), root / "build" / "shards", samples_per_shard=10)
    (root / "build" / "manifest.json").write_text("{}")
    proc = clipline("score", "--checkpoint", str(openai / "model.pt"), "--dataset", str(root / "build"), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 10 samples" in proc.stdout
    assert (root / "build" / "clip_score" / "scores.parquet").exists()
