"""The evaluation-set interface: examples (id, RGB image, label) plus class names and zero-shot prompt templates."""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from pipelines.core.errors import ClipError

VALID_SPECS = (
    'digits | cifar10:PATH[:test|:train] | cifar100:PATH[:test|:train] | folder:PATH | wds:GLOB | synth:PATH'
)


class EvalSetSpecError(ClipError, ValueError):
    """An evaluation-set spec that names no known loader, or whose data cannot be read."""


@dataclass(frozen=True)
class EvalExample:
    id: str
    image: Image.Image  # RGB
    label: int


@dataclass
class EvalSet:
    """A labelled evaluation set whose images are decoded lazily, one example at a time.

    ``load_image(i)`` returns the i-th image (any mode; converted to RGB here). ``errors`` lists the inputs that
    were skipped while loading (corrupt images, missing labels), one line each, naming the file and the reason.
    """

    name: str
    class_names: list[str]
    templates: list[str]
    ids: list[str]
    labels: list[int]
    load_image: Callable[[int], Image.Image] = field(repr=False)
    errors: list[str] = field(default_factory=list)
    spec: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.ids)} ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[EvalExample]:
        for i in range(len(self.ids)):
            yield self.example(i)

    def image(self, i: int) -> Image.Image:
        img = self.load_image(i)
        return img if img.mode == "RGB" else img.convert("RGB")

    def example(self, i: int) -> EvalExample:
        return EvalExample(self.ids[i], self.image(i), int(self.labels[i]))


def decode_image(data: bytes, *, where: str) -> Image.Image:
    """Decode image bytes fully (so truncated files fail here, not later); raise EvalSetSpecError (a ValueError)
    naming ``where``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise EvalSetSpecError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from None
    return img


def check_labels(labels: Sequence[int], n_classes: int, *, where: str) -> None:
    bad = [lab for lab in labels if not 0 <= int(lab) < n_classes]
    if bad:
        raise EvalSetSpecError(f"{where}: label {bad[0]} outside 0..{n_classes - 1}")
