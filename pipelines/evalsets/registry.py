"""Parse evaluation-set specs ("cifar10:PATH:train", "digits", "folder:PATH", ...) and dispatch to the loaders."""
from __future__ import annotations

from pipelines.evalsets import loaders
from pipelines.evalsets.base import VALID_SPECS, EvalSet, EvalSetSpecError

SPLITS = ("test", "train")


def _split_suffix(rest: str) -> tuple[str, str]:
    """'PATH:train' -> ('PATH', 'train'); PATH itself may contain colons."""
    head, sep, tail = rest.rpartition(":")
    if sep and tail in SPLITS:
        return head, tail
    return rest, "test"


def parse_spec(spec: str) -> tuple[str, str, str]:
    """Return (kind, path, split) for a spec, or raise EvalSetSpecError listing the valid forms."""
    if not isinstance(spec, str) or not spec.strip():
        raise EvalSetSpecError(f"empty evaluation-set spec; valid forms: {VALID_SPECS}")
    spec = spec.strip()
    if spec == "digits":
        return "digits", "", "test"
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise EvalSetSpecError(f"unknown evaluation-set spec {spec!r}; valid forms: {VALID_SPECS}")
    if kind in ("cifar10", "cifar100"):
        path, split = _split_suffix(rest)
        if not path:
            raise EvalSetSpecError(f"{spec!r}: missing PATH; valid forms: {VALID_SPECS}")
        return kind, path, split
    if kind in ("folder", "wds", "synth"):
        return kind, rest, "test"
    raise EvalSetSpecError(f"unknown evaluation-set spec {spec!r}; valid forms: {VALID_SPECS}")


def load_eval_set(spec: str) -> EvalSet:
    """Load the evaluation set a spec names (see :data:`VALID_SPECS`)."""
    kind, path, split = parse_spec(spec)
    if kind == "digits":
        return loaders.load_digits(spec=spec)
    if kind == "cifar10":
        return loaders.load_cifar10(path, split, spec=spec)
    if kind == "cifar100":
        return loaders.load_cifar100(path, split, spec=spec)
    if kind == "folder":
        return loaders.load_folder(path, spec=spec)
    if kind == "wds":
        return loaders.load_wds(path, spec=spec)
    return loaders.load_synth(path, spec=spec)
