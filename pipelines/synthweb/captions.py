"""Captions of the synthetic web: clean ones from per-language templates, and noise (too short, URL only, gibberish)."""
from __future__ import annotations

import numpy as np

from pipelines.synthweb import vocabulary as V

NOISE_KINDS: tuple[str, ...] = ("too_short", "url_only", "gibberish")
_SHORT = ("img", "photo", "IMG_2041", "ok", "pic", "DSC0042", "untitled")
_CONSONANTS = "bcdfghjklmnpqrstvwxz"
_VOWELS = "aeiouy"


def clean_caption(rng: np.random.Generator, lang: str, kind: V.Kind, colour: V.Colour, count: int, texture: str,
                  position: str) -> str:
    template_index = int(rng.integers(0, len(V.TEMPLATES[lang])))
    return V.caption(lang, template_index, kind, colour, count, texture, position)


def noise_caption(rng: np.random.Generator, noise_kind: str) -> str:
    """A caption that says nothing about its image, the way web alt-texts often do."""
    if noise_kind == "too_short":
        return str(rng.choice(_SHORT))
    if noise_kind == "url_only":
        token = "".join(rng.choice(list("0123456789abcdef"), size=12))
        return f"https://cdn.example.com/uploads/{token}.jpg"
    if noise_kind == "gibberish":
        words = []
        for _ in range(int(rng.integers(3, 7))):
            n = int(rng.integers(3, 9))
            # Mostly consonants: reads as no language, so language detectors give low scores.
            letters = [str(rng.choice(list(_CONSONANTS if rng.random() < 0.8 else _VOWELS))) for _ in range(n)]
            words.append("".join(letters))
        return " ".join(words)
    raise ValueError(f"unknown noise caption kind {noise_kind!r}; expected one of {NOISE_KINDS}")
