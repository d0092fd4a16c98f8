"""CLIP tokenizer: CLIP conventions, training on captions, save/load, and loading a CLIP-format merges file."""

from __future__ import annotations

import gzip

import pytest
import torch

from clip_train.tokenizer import EOT, EOW, SOT, CLIPTokenizer, bytes_to_unicode, clean_text

CAPTIONS = ["a photo of a red circle.", "a blue square on a white table", "two dogs playing in the park"] * 30


@pytest.fixture(scope="module")
def trained() -> CLIPTokenizer:
    return CLIPTokenizer.train(CAPTIONS, vocab_size=700)


def test_clean_text_lowercases_and_collapses_whitespace():
    assert clean_text("  A  Photo\tof\n&amp; a CAT ") == "a photo of & a cat"


def test_sequences_have_start_end_and_padding(trained):
    out = trained(["A photo of a RED circle.", "a  photo of a red   circle."])
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert torch.equal(out[0], out[1])  # lower-casing and whitespace clean-up
    n = int((out[0] == trained.eot_token_id).nonzero()[0, 0]) + 1
    assert out[0, 0] == trained.sot_token_id
    assert (out[0, n:] == 0).all()
    assert trained.decode(out[0]) == "a photo of a red circle ."


def test_truncation_keeps_end_token(trained):
    out = trained(["dogs " * 200], context_length=77)
    assert out[0, 0] == trained.sot_token_id and out[0, -1] == trained.eot_token_id
    assert (out[0, 1:-1] != trained.eot_token_id).all()


def test_vocabulary_layout_is_clip_like(trained):
    vocab = trained.tokenizer.get_vocab()
    byte_symbols = list(bytes_to_unicode().values())
    assert [vocab[s] for s in byte_symbols] == list(range(256))
    assert [vocab[s + EOW] for s in byte_symbols] == list(range(256, 512))
    assert trained.sot_token_id == trained.vocab_size - 2 and trained.eot_token_id == trained.vocab_size - 1
    # Frequent words were merged into single tokens.
    assert len(trained.encode("photo")) == 1
    # Unseen characters still encode (byte level) and round-trip.
    assert trained.decode(trained("zebra ünïcode ☃")[0]) == "zebra ünïcode ☃"


def test_save_and_load_roundtrip(trained, tmp_path):
    trained.save(tmp_path / "tokenizer.json")
    loaded = CLIPTokenizer.load(tmp_path / "tokenizer.json")
    texts = ["a red circle", "something never seen before!"]
    assert torch.equal(loaded(texts), trained(texts))
    assert loaded.context_length == 77


def test_training_is_deterministic():
    a = CLIPTokenizer.train(CAPTIONS, vocab_size=600)
    b = CLIPTokenizer.train(CAPTIONS, vocab_size=600)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()


@pytest.mark.parametrize("compressed", [False, True])
def test_loads_clip_merges_file(tmp_path, compressed):
    merges = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>"]
    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    path = tmp_path / ("merges.txt.gz" if compressed else "merges.txt")
    if compressed:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    tok = CLIPTokenizer.from_clip_merges_file(path, vocab_size=512 + len(merges) + 2)
    assert tok.vocab_size == 512 + len(merges) + 2
    assert tok.sot_token_id == 512 + len(merges) and tok.eot_token_id == 512 + len(merges) + 1
    # "hello" -> merged through the ranks above into the single token of merge #3 (id 512 + 3).
    assert tok.encode("Hello") == [512 + 3]
    assert tok.encode("cat") == [512 + 5]
    # "cats": 'cat' is not word-final there, so 'ca' + 't' + 's</w>'.
    vocab = tok.tokenizer.get_vocab()
    assert tok.encode("cats") == [512 + 4, vocab["t"], vocab["s" + EOW]]
    assert tok(["hello cat"])[0, :4].tolist() == [tok.sot_token_id, 515, 517, tok.eot_token_id]
    # CLIP keeps only vocab_size - 514 merges of the file.
    assert CLIPTokenizer.from_clip_merges_file(path, vocab_size=512 + 2 + 2).encode("hello") != [515]


def test_malformed_merges_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("#version: 0.2\nh e\nthis line is wrong\n")
    with pytest.raises(ValueError, match=r"bad.txt:3"):
        CLIPTokenizer.from_clip_merges_file(path)


def test_special_token_names():
    assert (SOT, EOT) == ("<start_of_text>", "<end_of_text>")
