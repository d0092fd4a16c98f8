"""Zero-shot prompt templates and class names for the registered evaluation sets (from the CLIP paper's prompts)."""
from __future__ import annotations

# CLIP (Radford et al. 2021), data/prompts.md: the 18 templates used for CIFAR-10; CIFAR-100 uses the same list.
CIFAR_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]
CIFAR10_TEMPLATES = list(CIFAR_TEMPLATES)
CIFAR100_TEMPLATES = list(CIFAR_TEMPLATES)

# CLIP prompts.md, MNIST: one template for digits.
DIGITS_TEMPLATES: list[str] = ['a photo of the number: "{}".']

# The 7-template ImageNet ensemble the CLIP notebook selected as the best general subset; used for sets
# (folders, webdataset shards) whose domain is not known.
GENERIC_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

CIFAR10_CLASSES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
