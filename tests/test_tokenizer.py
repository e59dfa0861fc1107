"""Tests for course_lib.cnsd.tokenizer: BPE on small hand-made vocabularies, padding/truncation, the
byte-level fallback, loading errors, and (where a real CLIP vocabulary is on this machine) known ids."""
from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
import torch

from course_lib.cnsd import tokenizer as tk
from course_lib.cnsd.config import get_config
from course_lib.cnsd.tokenizer import (BOS, EOS, byte_level_tokenizer, bytes_to_unicode, find_vocabulary,
                                       get_tokenizer, load_tokenizer)

MERGES = ["l o", "lo w</w>", "e r</w>", "lo w", "b i", "r d</w>", "bi rd</w>", "a a"]
BYTE_TOKENS = list(bytes_to_unicode().values())
BYTE_TOKENS += [t + "</w>" for t in BYTE_TOKENS]


def write_gz(path, merges=MERGES, header='"bpe_simple_vocab_16e6.txt#version: 0.2'):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join([header, *merges]) + "\n")
    return path


def write_hf(folder, merges=MERGES, vocab=None):
    """An HF-style folder whose ids are NOT the derived order: merges from 1000, specials at 49406/7."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        vocab = {t: i for i, t in enumerate(BYTE_TOKENS)}
        vocab |= {m.replace(" ", ""): 1000 + r for r, m in enumerate(merges)} | {BOS: 49406, EOS: 49407}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def gz_tok(tmp_path):
    return load_tokenizer(write_gz(tmp_path / "bpe.txt.gz"))


# --- the byte alphabet -------------------------------------------------------------------------

def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert not any(c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == chr(256)
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]  # the order of the first vocabulary ids


# --- BPE by hand -------------------------------------------------------------------------------

@pytest.mark.parametrize("word, pieces", [
    ("low", ["low</w>"]),                 # l o -> lo, then lo w</w>
    ("lower", ["low", "er</w>"]),         # l o (rank 0), e r</w> (2), lo w (3); nothing joins low + er</w>
    ("bird", ["bird</w>"]),               # b i (4), r d</w> (5), bi rd</w> (6)
    ("rd", ["rd</w>"]),
    ("x", ["x</w>"]),                     # one character: just the end-of-word mark
    ("aaaa", ["aa", "a", "a</w>"]),       # left to right, no overlap; 'a a</w>' is not a merge
    ("newer", ["n", "e", "w", "er</w>"]),
])
def test_bpe_pieces_by_hand(gz_tok, word, pieces):
    assert gz_tok.tokenize(word) == pieces


def test_merge_rank_decides(tmp_path):
    first = load_tokenizer(write_gz(tmp_path / "ab.txt.gz", ["a b", "b c</w>"]))
    second = load_tokenizer(write_gz(tmp_path / "bc.txt.gz", ["b c</w>", "a b"]))
    assert first.tokenize("abc") == ["ab", "c</w>"]
    assert second.tokenize("abc") == ["a", "bc</w>"]


def test_gz_vocabulary_is_derived_from_the_merges(gz_tok):
    # 256 bytes, 256 bytes + </w>, one token per merge, then BOS and EOS
    n = len(MERGES)
    assert gz_tok.vocab_size == 512 + n + 2
    assert (gz_tok.bos_id, gz_tok.eos_id, gz_tok.pad_id) == (512 + n, 513 + n, 513 + n)
    assert gz_tok.encode("low lower") == [512 + 1, 512 + 3, 512 + 2]
    assert gz_tok.encode("a") == [BYTE_TOKENS.index("a</w>")] == [320]  # the same id as in real CLIP


def test_hf_folder_takes_ids_from_vocab_json(tmp_path, gz_tok):
    hf = load_tokenizer(write_hf(tmp_path / "hf"))
    assert hf.encode("low lower bird") == [1001, 1003, 1002, 1006]
    assert hf.tokenize("low lower bird") == gz_tok.tokenize("low lower bird")
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (49406, 49407, 49408)
    # a file of the folder, and a diffusers-style parent with tokenizer/, load the same thing
    assert load_tokenizer(tmp_path / "hf" / "merges.txt").encode("bird") == [1006]
    write_hf(tmp_path / "model" / "tokenizer")
    assert load_tokenizer(tmp_path / "model").encode("bird") == [1006]


# --- input_ids: BOS, EOS, padding, truncation, cleaning ------------------------------------------

def test_batch_shape_dtype_and_padding(tmp_path):
    tok = load_tokenizer(write_hf(tmp_path / "hf"))
    ids = tok(["low", "lower bird", ""])
    assert ids.shape == (3, 77) and ids.dtype == torch.int32
    assert ids[0, :3].tolist() == [49406, 1001, 49407]
    assert ids[1, :5].tolist() == [49406, 1003, 1002, 1006, 49407]
    assert ids[2, :2].tolist() == [49406, 49407]
    assert (ids[0, 3:] == 49407).all() and (ids[1, 5:] == 49407).all()
    assert tok("low").shape == (1, 77)          # one string is a batch of one
    assert torch.equal(tok("low")[0], ids[0])


@pytest.mark.parametrize("words, kept", [(74, 74), (75, 75), (76, 75), (200, 75)])
def test_truncation_keeps_eos_last(gz_tok, words, kept):
    ids = gz_tok(" ".join(["low"] * words))[0].tolist()
    low, eos = 513, gz_tok.eos_id
    assert ids[0] == gz_tok.bos_id and ids[1:1 + kept] == [low] * kept and ids[1 + kept] == eos
    assert ids[2 + kept:] == [eos] * (75 - kept) and len(ids) == 77


def test_context_length_is_a_parameter(tmp_path):
    tok = load_tokenizer(write_gz(tmp_path / "v.txt.gz"), context_length=4)
    assert tok("low low low low")[0].tolist() == [tok.bos_id, 513, 513, tok.eos_id]
    with pytest.raises(ValueError, match="context_length"):
        load_tokenizer(tmp_path / "v.txt.gz", context_length=1)


def test_lower_case_and_whitespace(gz_tok):
    assert torch.equal(gz_tok("  LOW\t\n LoWeR  "), gz_tok("low lower"))
    assert gz_tok.clean("  A\u3000 BIRD\n") == "a bird"  # ideographic space is whitespace too


def test_pretokenizer_splits_punctuation_digits_contractions(gz_tok):
    assert tk.PATTERN.findall("bird's 42 birds!! <|endoftext|>") == ["bird", "'s", "4", "2", "birds", "!!",
                                                                      "<|endoftext|>"]
    assert gz_tok.encode(f"low {EOS}") == [513, gz_tok.eos_id]


@pytest.mark.skipif(importlib.util.find_spec("ftfy") is None, reason="ftfy is not installed")
def test_ftfy_fixes_mojibake_when_used(tmp_path):
    path = write_gz(tmp_path / "v.txt.gz")
    assert load_tokenizer(path).clean("CAFÃ©") == "café"
    assert load_tokenizer(path, use_ftfy=False).clean("CAFÃ©") == "cafã©"


def test_use_ftfy_true_without_ftfy_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "_ftfy_fix_text", lambda: None)
    with pytest.raises(ValueError, match="pip install ftfy"):
        load_tokenizer(write_gz(tmp_path / "v.txt.gz"), use_ftfy=True)


def test_decode_round_trip(gz_tok):
    assert gz_tok.decode(gz_tok("Lower  bird, café")[0]) == "lower bird , café"


def test_bad_input_is_a_value_error(gz_tok):
    for bad in ([], [b"bytes"], None):
        with pytest.raises(ValueError, match="texts must be"):
            gz_tok(bad)


# --- the byte-level fallback (tiny preset) -------------------------------------------------------

def test_byte_level_tokenizer_by_hand():
    tok = byte_level_tokenizer()
    # 'a' is byte 0x61 = index 64 of the printable run starting at '!' (0x21); +256 for 'a</w>'
    assert tok("a bird")[0, :8].tolist() == [49406, 320, 65, 72, 81, 256 + 67, 49407, 49407]
    # é = C3 A9: C3 sits at 94 + 12 + (0xC3 - 0xAE) = 127, A9 at 94 + (0xA9 - 0xA1) = 102, +256 at word end
    assert tok.encode("é") == [127, 358]
    assert tok.byte_level and "byte-level" in repr(tok)
    assert tok.vocab_size == get_config("tiny").clip.vocab_size == 49408
    ids = tok(["Any prompt, with ünïcödé 和 digits 0123!", "x" * 500])
    assert ids.shape == (2, 77) and ids.dtype == torch.int32
    assert ((ids < 512) | (ids >= 49406)).all()


# --- loading errors (one line each) -------------------------------------------------------------

def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_tokenizer(tmp_path / "nope.txt.gz")
    assert one_line(e) and "nope.txt.gz" in str(e.value)
    with pytest.raises(FileNotFoundError, match="holds no CLIP vocabulary") as e:
        load_tokenizer(tmp_path)
    assert one_line(e)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="expected bpe_simple_vocab_16e6.txt.gz") as e:
        load_tokenizer(tmp_path / "notes.txt")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"i n\nt h\n") and p, "not a readable gzip"),
    (lambda p: p.write_bytes(gzip.compress(b"i n\n")[:-12]) and p, "not a readable gzip"),  # truncated
    (lambda p: write_gz(p, header="i n"), "'#version' first line"),
    (lambda p: write_gz(p, merges=["i n", "t h e"]), "line 3 should be two tokens"),
])
def test_corrupt_gz(tmp_path, make, message):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    make(path)
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(path)
    assert one_line(e) and str(path) in str(e.value)


def test_corrupt_hf_folder(tmp_path):
    folder = write_hf(tmp_path / "hf")
    (folder / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid") as e:
        load_tokenizer(folder)
    assert one_line(e)
    vocab = {t: i for i, t in enumerate(BYTE_TOKENS)} | {BOS: 49406, EOS: 49407}  # merges' tokens missing
    write_hf(folder, vocab=vocab)
    with pytest.raises(ValueError, match="8 byte/merge/special tokens are missing, e.g. 'lo'") as e:
        load_tokenizer(folder)
    assert one_line(e)
    write_hf(folder, vocab=["not", "a", "dict"])
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_tokenizer(folder)


# --- finding a vocabulary -----------------------------------------------------------------------

@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    monkeypatch.delenv(tk.VOCAB_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_get_tokenizer_without_vocabulary(monkeypatch):
    monkeypatch.setattr(tk, "find_vocabulary", lambda: None)
    with pytest.raises(FileNotFoundError, match="no CLIP vocabulary found: pass vocab_path=") as e:
        get_tokenizer()
    assert one_line(e) and tk.VOCAB_ENV in str(e.value)
    assert get_tokenizer(allow_fallback=True).byte_level


def test_get_tokenizer_prefers_a_given_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "find_vocabulary", lambda: pytest.fail("must not search when a path is given"))
    tok = get_tokenizer(write_gz(tmp_path / "v.txt.gz"), allow_fallback=True)
    assert not tok.byte_level and tok.encode("bird") == [518]


def test_find_vocabulary_env_var(nothing_installed, monkeypatch):
    path = write_gz(nothing_installed / "v.txt.gz")
    monkeypatch.setenv(tk.VOCAB_ENV, str(path))
    assert find_vocabulary() == path and get_tokenizer().encode("bird") == [518]
    monkeypatch.setenv(tk.VOCAB_ENV, str(nothing_installed / "missing"))
    with pytest.raises(FileNotFoundError, match=tk.VOCAB_ENV):
        find_vocabulary()


def test_find_vocabulary_in_hf_cache(nothing_installed):
    snapshot = nothing_installed / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    write_hf(snapshot)
    assert find_vocabulary() == snapshot


def test_find_vocabulary_falls_back_to_the_shipped_copy(nothing_installed):
    assert find_vocabulary() == tk.SHIPPED_VOCABULARY and tk.SHIPPED_VOCABULARY.is_file()
    assert get_tokenizer().encode("a bird") == [320, 3329]          # sd15 needs no extra package


# --- the real vocabulary (shipped with course_lib) ----------------------------------------------

REAL = tk.SHIPPED_VOCABULARY

# Ids of openai/clip-vit-large-patch14 as published by others, not computed here: "a bird" in the
# expected input_ids of transformers' ImageBind integration test; the rest in the test suites of
# independent CLIP tokenizer ports (Swift, Zig, Elixir Bumblebee, C++) checked against Hugging Face.
KNOWN_IDS = {
    "a bird": [320, 3329],
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A PHOTO of  a Cat!": [320, 1125, 539, 320, 2368, 256],
    "Hello, world!": [3306, 267, 1002, 256],
    "don't stop 42 times": [847, 713, 1691, 275, 273, 1661],
    "hello-world, 3.14 (test)": [3306, 268, 1002, 267, 274, 269, 272, 275, 263, 1628, 264],
    "caf\u00e9 \u00fcber na\u00efve": [15304, 6522, 1516, 1097, 35689, 563],
    "  spaced   out  ": [10336, 538, 620],
}


def test_real_clip_ids():
    tok = load_tokenizer(REAL)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 49407)
    assert len(tok.ranks) == tk.NUM_MERGES
    ids = tok(list(KNOWN_IDS))
    for row, (text, expected) in zip(ids.tolist(), KNOWN_IDS.items()):
        n = len(expected)
        assert row[: n + 2] == [49406, *expected, 49407] and row[n + 2:] == [49407] * (75 - n), text
