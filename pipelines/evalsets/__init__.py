"""Evaluation-set registry: one interface (id, RGB image, label, class names, templates) over many sources.

    from pipelines.evalsets import load_eval_set
    es = load_eval_set("cifar10:/data/cifar:test")   # or "digits", "folder:PATH", "wds:GLOB", "synth:PATH"
"""
from pipelines.evalsets.base import VALID_SPECS, EvalExample, EvalSet, EvalSetSpecError
from pipelines.evalsets.registry import load_eval_set, parse_spec

__all__ = ["EvalExample", "EvalSet", "EvalSetSpecError", "VALID_SPECS", "load_eval_set", "parse_spec"]
