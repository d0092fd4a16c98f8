"""Parity of clip_train with open_clip, both directions, in a side environment (`make parity`).

open_clip needs torchvision, which does not import beside the CPU torch 2.13 of requirements.lock, so this script
creates `.venv-openclip` (torch==2.14.1 and torchvision==0.29.1 from the machine's local wheels, open_clip_torch==3.3.0,
webdataset==0.2.86, clip-benchmark, tokenizers, ftfy) on first use and re-runs itself there. clip_train is imported
from this checkout. Nothing is downloaded at run time: random weights; CLIP's merges file is the one open_clip ships.

Checks (fp32, CPU), each for ViT-B-32 and RN50:
  1. open_clip -> clip_train: a random-weight open_clip model saved as NAME.pt + NAME.json, loaded with
     clip_train.interop.load_any; image and text features equal open_clip's to --tol (default 1e-5).
  2. clip_train -> open_clip: a random-weight clip_train run exported with `export_open_clip`, loaded with
     open_clip.add_model_config + create_model_and_transforms(NAME, pretrained=...); features equal to --tol.
     Done twice: with CLIP's tokenizer (no tokenizer files exported) and with a tokenizer trained on captions
     (exported merges file; open_clip.get_tokenizer(NAME) must tokenise the caption set exactly like clip_train).
  3. OpenAI layout: the -quickgelu variant scripted with TorchScript and saved (OpenAI's released format), loaded by
     clip_train without a config (architecture from the shapes, QuickGELU because it is a TorchScript archive).
  4. CLIP's tokenizer: clip_train's (from open_clip's bpe_simple_vocab_16e6.txt.gz) equals open_clip's on a caption
     set (CC3M / COCO / Multi30k captions from ../shared/data when present, plus hand-picked edge cases), and the
     merges hash clip_train records as CLIP's matches the file.
  5. Preprocessing: clip_train's eval transform equals open_clip's (bit for bit) on random RGB images.

Optional CLIP_benchmark parity (`--clip-benchmark RUN_DIR`): export the run, write CIFAR-10 test (from
../shared/data/cifar10/cifar10-jpeg.parquet, in a temporary directory that is removed afterwards) in
CLIP_benchmark's webdataset layout, run `clip_benchmark eval --dataset wds/cifar10` on the export (fp32, no AMP)
and `clipline eval --eval-set wds:ROOT` on the run (project venv), and compare zero-shot top-1 (must agree within
0.1 point).

Exits non-zero when any comparison fails; the last line is the maximum absolute feature difference.

    python benchmarks/parity_openclip.py [--tol 1e-5] [--clip-benchmark RUN_DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDE_VENV = ROOT / ".venv-openclip"
SIDE_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "open_clip_torch==3.3.0", "webdataset==0.2.86",
                 "clip-benchmark", "requests", "numpy<2.4", "tokenizers==0.23.3", "ftfy", "pyarrow"]
# clip-benchmark 1.6.2 imports requests without declaring it, and its accuracy() calls float() on a 1-element array,
# which numpy 2.4 refuses.
SHARED = Path(os.environ.get("CLIPLINE_SHARED_DATA", ROOT / ".." / "shared" / "data"))


# ----------------------------------------------------------------------------------------------- side environment
def _in_side_env() -> bool:
    return Path(sys.prefix).resolve() == SIDE_VENV.resolve()


def ensure_side_env() -> Path:
    python = SIDE_VENV / "bin" / "python"
    stamp = SIDE_VENV / ".parity-installed"
    if stamp.exists() and stamp.read_text().strip() == " ".join(SIDE_PACKAGES):
        return python
    if not python.exists():
        print(f"creating {SIDE_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(SIDE_VENV)], check=True)
    print(f"installing {' '.join(SIDE_PACKAGES)} into {SIDE_VENV} (torch/torchvision from local wheels)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PACKAGES], check=True)
    stamp.write_text(" ".join(SIDE_PACKAGES))
    return python


# ------------------------------------------------------------------------------------------------------- helpers
def captions(limit: int = 400) -> list[str]:
    out = [
        "a photo of a cat.", "A DOG on the beach!!", "two red circles, one blue square", "naïve café — résumé",
        "it's what they'd've done", "numbers 12345 and 3.14", "emoji 😀 and symbols #$%&", "   spaces   everywhere  ",
        "HTML &amp; entities &lt;b&gt;", "ein Hund im Schnee", "un chat sur le toit", "日本語のキャプション",
        "hyphen-ated words and under_scores", "a" * 300, " ".join(["word"] * 120),
    ]
    cc3m = SHARED / "captions" / "cc3m-validation.tsv"
    if cc3m.exists():
        out += [line.split("\t")[0] for line in cc3m.read_text(encoding="utf-8").splitlines()[:limit]]
    m30k = SHARED / "captions" / "multi30k-en-de-fr-cs.tsv"
    if m30k.exists():
        rows = [line.split("\t") for line in m30k.read_text(encoding="utf-8").splitlines()[1:limit // 4]]
        out += [c for r in rows for c in r[2:6] if c]
    return out


def perturb_(module, seed: int) -> None:
    """Random weights everywhere (the default init zeros biases and the ResNet's last BN gains), kept at O(1) scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif ".bn" in name or "downsample.1" in name:
                t.copy_((torch.rand(t.shape, generator=g) * 0.5 + 0.5) if name.endswith("weight")
                        else 0.05 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias") or name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                                                         "ln_final.weight")):
                t.add_(0.02 * torch.randn(t.shape, generator=g))
            elif name == "logit_scale":
                continue


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


class Report:
    def __init__(self, tol: float):
        self.tol, self.rows, self.failures, self.max_feature_diff = tol, [], [], 0.0

    def feature(self, what: str, a, b) -> None:
        d = max_diff(a, b)
        scale = float(b.float().abs().max())
        self.max_feature_diff = max(self.max_feature_diff, d)
        ok = d <= self.tol
        self.rows.append({"check": what, "max_abs_diff": d, "max_abs_feature": scale, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {what}: max |diff| {d:.3g} (features up to {scale:.3g})", flush=True)
        if not ok:
            self.failures.append(what)

    def equal(self, what: str, ok: bool, detail: str = "") -> None:
        self.rows.append({"check": what, "ok": ok, "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failures.append(what)

    def info(self, what: str, detail: str) -> None:
        self.rows.append({"check": what, "info": detail})
        print(f"info {what}: {detail}", flush=True)


def inputs(image_size: int, tokenizer, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, image_size, image_size, generator=g)
    texts = tokenizer(["a photo of a cat.", "two red circles on a grey background", "naïve café résumé " * 3])
    return images, texts


# ------------------------------------------------------------------------------------------------------- checks
def check_openclip_to_cliptrain(name: str, work: Path, rep: Report, bpe: str) -> None:
    import open_clip
    import torch

    from clip_train.interop import load_any

    torch.manual_seed(0)
    oc = open_clip.create_model(name, pretrained=None).eval()
    perturb_(oc, 1)
    d = work / f"oc-{name}"
    d.mkdir()
    torch.save(oc.state_dict(), d / f"{name}.pt")
    (d / f"{name}.json").write_text(json.dumps(open_clip.get_model_config(name)))
    loaded = load_any(str(d / f"{name}.pt"), bpe=bpe)
    rep.equal(f"{name} open_clip -> clip_train: format detected", loaded.format == "open_clip", loaded.format)
    images, texts = inputs(loaded.model.image_size, open_clip.get_tokenizer(name), 2)
    with torch.no_grad():
        rep.feature(f"{name} open_clip -> clip_train: image features", loaded.model.encode_image(images), oc.encode_image(images))
        rep.feature(f"{name} open_clip -> clip_train: text features", loaded.model.encode_text(texts), oc.encode_text(texts))


def _fake_run(model, tokenizer, model_name: str, run: Path) -> None:

    from clip_train.checkpoint import atomic_write_json, save_checkpoint

    run.mkdir(parents=True)
    atomic_write_json(run / "config.json", {"model": model_name, "model_config": model.config.to_dict()})
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "step": 0})
    tokenizer.save(run / "tokenizer.json")


def check_cliptrain_to_openclip(name: str, work: Path, rep: Report, bpe: str, trained_tokenizer) -> None:
    import open_clip
    import torch

    from clip_train.interop import export_open_clip
    from clip_train.model import CLIP, load_config
    from clip_train.tokenizer import CLIPTokenizer

    for variant, tokenizer in (("CLIP tokenizer", CLIPTokenizer.from_clip_merges_file(bpe)),
                               ("trained tokenizer", trained_tokenizer)):
        cfg = load_config(name)
        cfg.text_cfg.vocab_size = tokenizer.vocab_size
        cfg.text_cfg.eot_token_id = tokenizer.eot_token_id
        torch.manual_seed(3)
        model = CLIP(cfg).eval()
        perturb_(model, 4)
        tag = f"{name}-{'clip' if variant == 'CLIP tokenizer' else 'trained'}"
        run = work / f"run-{tag}"
        _fake_run(model, tokenizer, name, run)
        out = work / f"export-{tag}"
        result = export_open_clip(str(run), str(out), name=f"clipline-{tag}")
        rep.equal(f"{name} clip_train -> open_clip ({variant}): tokenizer files only when not CLIP's",
                  ("bpe" in result["files"]) == (variant != "CLIP tokenizer"), ", ".join(sorted(result["files"])))
        open_clip.add_model_config(str(out))
        oc, _, preprocess = open_clip.create_model_and_transforms(result["name"], pretrained=result["files"]["weights"])
        oc.eval()
        oc_tok = open_clip.get_tokenizer(result["name"])
        caps = captions()
        same = torch.equal(oc_tok(caps), tokenizer(caps))
        rep.equal(f"{name} clip_train -> open_clip ({variant}): open_clip.get_tokenizer equals clip_train's on "
                  f"{len(caps)} captions", same)
        images, texts = inputs(model.image_size, tokenizer, 5)
        with torch.no_grad():
            rep.feature(f"{name} clip_train -> open_clip ({variant}): image features", oc.encode_image(images),
                        model.encode_image(images))
            rep.feature(f"{name} clip_train -> open_clip ({variant}): text features", oc.encode_text(texts),
                        model.encode_text(texts))


def check_openai_torchscript(name: str, work: Path, rep: Report, bpe: str) -> None:
    import open_clip
    import torch

    from clip_train.interop import load_any

    qname = f"{name}-quickgelu"
    torch.manual_seed(6)
    oc = open_clip.create_model(qname, pretrained=None).eval()
    perturb_(oc, 7)
    try:
        scripted = torch.jit.script(oc)
    except Exception as exc:  # noqa: BLE001 - report why TorchScript is unavailable
        rep.equal(f"{qname} TorchScript archive: torch.jit.script", False, f"{type(exc).__name__}: {str(exc)[:200]}")
        return
    path = work / f"{qname}-openai.pt"
    torch.jit.save(scripted, str(path))
    loaded = load_any(str(path), bpe=bpe)
    rep.equal(f"{qname} TorchScript archive: read as OpenAI's format, QuickGELU",
              loaded.format == "openai-torchscript" and loaded.model.config.quick_gelu, loaded.format)
    images, texts = inputs(loaded.model.image_size, open_clip.get_tokenizer(qname), 8)
    with torch.no_grad():
        rep.feature(f"{qname} TorchScript archive -> clip_train: image features", loaded.model.encode_image(images),
                    oc.encode_image(images))
        rep.feature(f"{qname} TorchScript archive -> clip_train: text features", loaded.model.encode_text(texts),
                    oc.encode_text(texts))


def check_clip_tokenizer(rep: Report, bpe: str) -> None:
    import open_clip
    import torch

    from clip_train.tokenizer import CLIP_MERGES_SHA256, CLIPTokenizer

    ours = CLIPTokenizer.from_clip_merges_file(bpe)
    theirs = open_clip.get_tokenizer("ViT-B-32")
    caps = captions(2000)
    coco = SHARED / "captions" / "coco2017-val-captions.json"
    if coco.exists():
        caps += [a["caption"] for a in json.loads(coco.read_text())["annotations"][:2000]]
    a, b = ours(caps), theirs(caps)
    rows_differ = int((a != b).any(dim=1).sum())
    rep.equal(f"CLIP tokenizer: clip_train == open_clip on {len(caps)} captions", rows_differ == 0,
              f"{rows_differ} captions differ")
    rep.equal("CLIP tokenizer: vocabulary size 49408 and merges hash recorded in clip_train",
              ours.vocab_size == 49408 and ours.merges_sha256() == CLIP_MERGES_SHA256 and ours.is_clip(),
              ours.merges_sha256()[:16])
    del torch


def check_preprocess(rep: Report) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from clip_train.transforms import EvalTransform

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    rng = np.random.default_rng(0)
    worst = 0.0
    for w, h in ((320, 240), (224, 224), (500, 333), (32, 32)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        worst = max(worst, float((EvalTransform(224)(img) - preprocess(img)).abs().max()))
    rep.equal("eval preprocessing: clip_train's EvalTransform equals open_clip's on random RGB images of 4 sizes",
              worst == 0.0, f"max |diff| {worst:.3g}")
    del torch


# ----------------------------------------------------------------------------------------- CLIP_benchmark parity
def clip_benchmark_parity(run_dir: str, work: Path, rep: Report) -> None:
    import pyarrow.parquet as pq

    from clip_train.benchmark_wds import write_benchmark_wds
    from clip_train.interop import export_open_clip

    parquet = SHARED / "cifar10" / "cifar10-jpeg.parquet"
    if not parquet.exists():
        rep.info("CLIP_benchmark parity", f"skipped: {parquet} not found")
        return
    table = pq.read_table(parquet, columns=["split", "index", "label", "label_name", "jpeg"])
    rows = [r for r in table.to_pylist() if r["split"] == "test"]
    rows.sort(key=lambda r: r["index"])
    classes = [None] * 10
    for r in rows:
        classes[r["label"]] = r["label_name"]
    from pipelines.evalsets.templates import CIFAR10_TEMPLATES

    root = work / "cifar10_wds"
    write_benchmark_wds(str(root), classes, CIFAR10_TEMPLATES,
                        ((f"test_{r['index']:05d}", r["jpeg"], "jpg", r["label"]) for r in rows), samples_per_shard=2500)
    result = export_open_clip(run_dir, str(work / "export-cifar"), name="clipline-cifar10-parity")
    out_json = work / "clip_benchmark.json"
    code = (f"import sys, open_clip; open_clip.add_model_config({str(work / 'export-cifar')!r}); "
            f"from clip_benchmark.cli import main; sys.argv = ['clip_benchmark', 'eval', '--dataset', 'wds/cifar10', "
            f"'--dataset_root', {str(root)!r}, '--model', {result['name']!r}, '--pretrained', "
            f"{result['files']['weights']!r}, '--task', 'zeroshot_classification', '--no_amp', '--num_workers', '0', "
            f"'--batch_size', '250', '--output', {str(out_json)!r}, '--quiet']; main()")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    cb = json.loads(out_json.read_text())["metrics"]
    cb_s = time.perf_counter() - t0
    project_python = ROOT / ".venv" / "bin" / "python"
    t0 = time.perf_counter()
    subprocess.run([str(project_python), "-m", "clip_train.evaluate", "--checkpoint", run_dir, "--eval-set",
                    f"wds:{root}", "--out", str(work / "clipline_eval"), "--batch-size", "250"], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    ours = json.loads((work / "clipline_eval" / "eval.json").read_text())["eval_sets"]["cifar10_wds"]
    cl_s = time.perf_counter() - t0
    diff_points = 100 * abs(ours["zeroshot_top1"] - cb["acc1"])
    rep.info("CLIP_benchmark zero-shot on CIFAR-10 test", f"top-1 {100 * cb['acc1']:.2f}%, top-5 "
             f"{100 * cb['acc5']:.2f}%, mean per-class recall {100 * cb['mean_per_class_recall']:.2f}% ({cb_s:.0f} s)")
    rep.info("clipline eval zero-shot on the same files", f"top-1 {100 * ours['zeroshot_top1']:.2f}%, top-5 "
             f"{100 * ours['zeroshot_top5']:.2f}%, mean per-class recall {100 * ours['mean_per_class_recall']:.2f}% "
             f"({cl_s:.0f} s)")
    rep.equal("CLIP_benchmark parity: zero-shot top-1 within 0.1 point", diff_points <= 0.1,
              f"|difference| {diff_points:.3f} points on {ours['n']} images")


# ------------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"])
    p.add_argument("--clip-benchmark", default=None, metavar="RUN_DIR", help="also run the CLIP_benchmark parity")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--no-feature-checks", action="store_true", help="only the CLIP_benchmark parity")
    args = p.parse_args()
    if not _in_side_env():
        python = ensure_side_env()
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(ROOT))
    import open_clip
    import torch
    from open_clip.tokenizer import default_bpe

    from clip_train.tokenizer import CLIPTokenizer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, clip_train from {ROOT}", flush=True)
    rep = Report(args.tol)
    bpe = default_bpe()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipline-parity-") as tmp:
        work = Path(tmp)
        try:
            if not args.no_feature_checks:
                check_clip_tokenizer(rep, bpe)
                trained = CLIPTokenizer.train(captions(4000), vocab_size=1500)
                for name in args.models:
                    check_openclip_to_cliptrain(name, work, rep, bpe)
                    check_cliptrain_to_openclip(name, work, rep, bpe, trained)
                    check_openai_torchscript(name, work, rep, bpe)
                check_preprocess(rep)
            if args.clip_benchmark:
                clip_benchmark_parity(args.clip_benchmark, work, rep)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed comparison, reported with its cause
            import traceback

            traceback.print_exc()
            rep.failures.append(f"crashed: {type(exc).__name__}: {exc}")
    report = {"torch": torch.__version__, "open_clip": open_clip.__version__, "tol": args.tol,
              "seconds": round(time.perf_counter() - t0, 1), "checks": rep.rows, "failures": rep.failures,
              "max_abs_feature_diff": rep.max_feature_diff}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"{len(rep.rows)} checks, {len(rep.failures)} failed" + (f": {rep.failures}" if rep.failures else ""))
    compared = any("max_abs_diff" in r for r in rep.rows)
    print(f"max abs feature difference: {rep.max_feature_diff:.3g}" if compared
          else "max abs feature difference: n/a (no feature comparison ran)")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
