"""CLIP's byte-level BPE tokenizer on the `tokenizers` library: train on captions, save with a run, load CLIP's merges.

Conventions follow CLIP's `simple_tokenizer`: ftfy + HTML-unescape + whitespace clean-up + lower-casing, CLIP's
pre-tokenisation regex, byte-level symbols with an end-of-word suffix `</w>`, a vocabulary laid out as 256 byte
symbols, the same 256 with `</w>`, one token per merge, then `<start_of_text>` and `<end_of_text>` (open_clip's names).
Token sequences are `[sot] + tokens + [eot]` padded with 0 to the context length (77); longer texts are truncated
keeping the end-of-text token, so the text tower can always pool at it.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

SOT = "<start_of_text>"
EOT = "<end_of_text>"
EOW = "</w>"
CONTEXT_LENGTH = 77
# CLIP's split: contractions, letter runs, single digits, runs of other non-space symbols.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP keeps 49152 - 256 - 2 merges of its 16e6 file, for a vocabulary of 49408.
CLIP_VOCAB_SIZE = 49408


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters (no whitespace/control characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """CLIP's basic_clean + whitespace_clean + lower()."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


def _pipeline_parts() -> tuple:
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return normalizer, pre_tokenizer


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for a merge list (duplicate merge results keep their first id)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab


class CLIPTokenizer:
    """Callable: list of captions -> LongTensor (N, context_length)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = CONTEXT_LENGTH):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot_token_id = tokenizer.token_to_id(SOT)
        self.eot_token_id = tokenizer.token_to_id(EOT)
        if self.sot_token_id is None or self.eot_token_id is None:
            raise ValueError(f"tokenizer vocabulary lacks {SOT!r} / {EOT!r}")
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH) -> "CLIPTokenizer":
        vocab = clip_vocab(merges)
        bpe = models.BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=EOW, continuing_subword_prefix="")
        tok = Tokenizer(bpe)
        tok.normalizer, tok.pre_tokenizer = _pipeline_parts()
        return cls(tok, context_length)

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, context_length: int = CONTEXT_LENGTH
    ) -> "CLIPTokenizer":
        """Learn merges on captions (BPE stops early when no pair reaches min_frequency)."""
        if vocab_size < 512 + 2:
            raise ValueError(f"vocab_size must be at least 514 (256 bytes x2 + 2 specials), got {vocab_size}")
        scratch = Tokenizer(models.BPE(end_of_word_suffix=EOW, continuing_subword_prefix=""))
        scratch.normalizer, scratch.pre_tokenizer = _pipeline_parts()
        trainer = trainers.BpeTrainer(
            # The trainer's vocabulary holds the 256 + 256 base symbols too; ask for enough merges to fill CLIP's layout.
            vocab_size=vocab_size - 2,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            # tokenizers <= 0.23 creates the word-final symbols ("e</w>") in hash-map order, and their ids break ties
            # between equally frequent merges, so two trainings could differ (huggingface/tokenizers#1794). Declaring
            # them up front, in a fixed order, fixes their ids and makes training deterministic.
            special_tokens=[symbol + EOW for symbol in bytes_to_unicode().values()],
            end_of_word_suffix=EOW,
            continuing_subword_prefix="",
            show_progress=False,
        )
        scratch.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
        merges = json.loads(scratch.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        return cls.from_merges(merges[: vocab_size - 514], context_length)

    @classmethod
    def from_clip_merges_file(
        cls, path: str | Path, vocab_size: int = CLIP_VOCAB_SIZE, context_length: int = CONTEXT_LENGTH
    ) -> "CLIPTokenizer":
        """Load CLIP's `bpe_simple_vocab_16e6.txt(.gz)`: a '#version' header line, then one 'a b' merge per line."""
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for lineno, line in enumerate(lines, start=2):
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected a merge 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        # CLIP uses only the first vocab_size - 512 - 2 merges of the file.
        return cls.from_merges(merges[: vocab_size - 512 - 2], context_length)

    # -- persistence -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        data = json.loads(self.tokenizer.to_str())
        data["clipline"] = {"context_length": self.context_length, "sot": SOT, "eot": EOT}
        tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "CLIPTokenizer":
        path = Path(path)
        data = json.loads(path.read_text())
        context_length = data.pop("clipline", {}).get("context_length", CONTEXT_LENGTH)
        return cls(Tokenizer.from_str(json.dumps(data)), context_length)

    # -- use -------------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned text, without start/end tokens."""
        return self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        tokens = []
        for i in (int(i) for i in ids):
            if i == self.eot_token_id:
                break  # what follows is padding
            if i != self.sot_token_id:
                tokens.append(self.tokenizer.id_to_token(i))
        text = "".join(tokens)
        # As CLIP: map symbols back to bytes, decode, then turn end-of-word markers into spaces.
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(EOW, " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        encodings = self.tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, enc in enumerate(encodings):
            ids = [self.sot_token_id] + enc.ids[: ctx - 2] + [self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
