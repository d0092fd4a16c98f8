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
import hashlib
import html
import io
import json
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
# sha256 of the 48894 merges CLIP uses ("left right" lines joined by newlines), computed from the
# bpe_simple_vocab_16e6.txt.gz that open_clip ships (benchmarks/parity_openclip.py checks it again).
CLIP_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"


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
        from pipelines.core import storage

        path = str(path)
        data = storage.read_bytes(path)
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        lines = data.decode("utf-8").split("\n")
        # The first line is a header ("#version: 0.2", in open_clip's copy '"bpe_simple_vocab_16e6.txt#version: 0.2').
        if lines and "#version" in lines[0]:
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
        """Write tokenizer.json (local or s3://, atomically)."""
        from pipelines.core import storage

        data = json.loads(self.tokenizer.to_str())
        data["clipline"] = {"context_length": self.context_length, "sot": SOT, "eot": EOT}
        storage.write_bytes_atomic(str(path), json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> "CLIPTokenizer":
        from pipelines.core import storage

        data = json.loads(storage.read_bytes(str(path)))
        context_length = data.pop("clipline", {}).get("context_length", CONTEXT_LENGTH)
        return cls(Tokenizer.from_str(json.dumps(data)), context_length)

    def merges(self) -> list[tuple[str, str]]:
        """The BPE merges, in rank order."""
        merges = json.loads(self.tokenizer.to_str())["model"]["merges"]
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    def merges_sha256(self) -> str:
        return hashlib.sha256("\n".join(f"{a} {b}" for a, b in self.merges()).encode("utf-8")).hexdigest()

    def is_clip(self) -> bool:
        """True when this is CLIP's own tokenizer (CLIP's merges, its 49408-token layout, its context length)."""
        return (self.merges_sha256() == CLIP_MERGES_SHA256 and self.vocab_size == CLIP_VOCAB_SIZE
                and self.context_length == CONTEXT_LENGTH)

    def clip_merges_file_bytes(self) -> bytes:
        """The merges in the format of CLIP's bpe_simple_vocab_16e6.txt.gz (a header line, one merge per line),
        gzipped: what open_clip's SimpleTokenizer(bpe_path=...) reads. No trailing newline: SimpleTokenizer would
        read it as one more (empty) merge and shift the ids of the special tokens."""
        merges = self.merges()
        results = ["".join(m) for m in merges]
        if len(set(results)) != len(results):
            raise ValueError("this tokenizer has two merges with the same result; open_clip's SimpleTokenizer numbers "
                             "such tokens differently, so its merges cannot be exported as a CLIP merges file")
        if len(merges) > CLIP_VOCAB_SIZE - 512 - 2:
            raise ValueError(f"{len(merges)} merges: open_clip's SimpleTokenizer reads at most {CLIP_VOCAB_SIZE - 514}")
        text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
        return buf.getvalue()

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
