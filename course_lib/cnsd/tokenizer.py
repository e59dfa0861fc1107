"""The CLIP BPE tokenizer of Stable Diffusion 1.5: a prompt becomes ``input_ids`` (B, 77) int32.

Chapter 1 introduces it. It behaves like Hugging Face's ``CLIPTokenizer`` for
openai/clip-vit-large-patch14 as ControlNet calls it (truncation on, padding to 77):

1. clean the text: ``ftfy.fix_text`` where ftfy is installed, runs of whitespace become one space,
   lower case;
2. split it into words, numbers and punctuation with CLIP's regular expression;
3. write each piece's UTF-8 bytes as 256 printable characters (:func:`bytes_to_unicode`), mark its
   last character with ``</w>`` and apply the BPE merges, lowest rank first;
4. ``[<|startoftext|>] + ids[:75] + [<|endoftext|>]``, padded with ``<|endoftext|>`` (49407) to 77.

The vocabulary is read from local files only (:func:`load_tokenizer`, :func:`find_vocabulary`). With no
vocabulary, :func:`byte_level_tokenizer` is the same tokenizer with no merges: one id per byte (< 512),
valid for the 49408-row embedding, meant for the random-weight ``tiny`` preset.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import regex
import torch

from course_lib.cnsd.config import CONTEXT_LENGTH

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges: 256 + 256 + 48894 + 2 = 49408 tokens
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "COURSE_CLIP_VOCAB"  # a path find_vocabulary() tries first
SHIPPED_VOCABULARY = Path(__file__).resolve().parent / "data" / BPE_FILE   # CLIP's own, MIT-licensed
PATTERN = regex.compile(  # the special tokens, contractions, letter runs, single digits, other symbol runs
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def bytes_to_unicode() -> dict[int, str]:
    """Chapter 1: byte -> printable character, the alphabet BPE works on.

    Printable Latin-1 bytes keep their own character; the other 68 (space, control bytes...) are
    shifted to chr(256 + n) so that no token contains whitespace. The dict's order is the order of
    the first 256 vocabulary ids.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


class CLIPTokenizer:
    """Chapter 1: prompts -> ``input_ids``. Build one with :func:`get_tokenizer` or :func:`load_tokenizer`.

    Args: ``encoder`` (token string -> id, must hold ``<|startoftext|>`` and ``<|endoftext|>``),
    ``merges`` (BPE merge pairs, rank = position), ``source`` (where they came from, for the repr),
    ``context_length`` (77), ``use_ftfy`` (None: use ftfy if it is installed).
    """

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], source: str,
                 context_length: int = CONTEXT_LENGTH, use_ftfy: bool | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for BOS and EOS), got {context_length}")
        self.encoder = dict(encoder)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.source, self.context_length = source, context_length
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]
        self.pad_id = self.eos_id                       # SD 1.5 pads with <|endoftext|>
        self.vocab_size = max(self.encoder.values()) + 1
        self._fix_text = _ftfy_fix_text() if use_ftfy is not False else None
        if use_ftfy and self._fix_text is None:
            raise ValueError("use_ftfy=True but ftfy is not installed: pip install ftfy")
        self._cache: dict[str, list[str]] = {}

    @property
    def byte_level(self) -> bool:
        """True for the no-merges fallback (:func:`byte_level_tokenizer`)."""
        return not self.ranks

    def __repr__(self) -> str:
        kind = "byte-level fallback, no BPE merges" if self.byte_level else f"BPE, {len(self.ranks)} merges"
        clean = "ftfy" if self._fix_text else "no ftfy"
        return (f"CLIPTokenizer({kind}, vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"{clean}, source={self.source})")

    def clean(self, text: str) -> str:
        """Chapter 1: ftfy (if used), one space for each run of whitespace, strip, lower case."""
        if self._fix_text is not None:
            text = self._fix_text(text)
        return regex.sub(r"\s+", " ", text).strip().lower()

    def bpe(self, piece: str) -> list[str]:
        """Chapter 1: BPE tokens of one pre-token (already in :func:`bytes_to_unicode` characters)."""
        if piece not in self._cache:
            parts = [*piece[:-1], piece[-1] + "</w>"]
            while len(parts) > 1:
                pairs = list(zip(parts, parts[1:]))
                best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
                if best not in self.ranks:
                    break                               # no known merge left
                merged, i = [], 0
                while i < len(parts):                   # merge every occurrence, left to right
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self._cache[piece] = parts
        return self._cache[piece]

    def tokenize(self, text: str) -> list[str]:
        """Chapter 1: the BPE token strings of ``text`` (no BOS/EOS), e.g. ``['a</w>', 'bird</w>']``."""
        tokens: list[str] = []
        for piece in PATTERN.findall(self.clean(text)):
            if piece in (BOS, EOS):
                tokens.append(piece)
            else:
                tokens.extend(self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Chapter 1: the token ids of ``text`` without BOS/EOS, not truncated."""
        return [self.encoder[t] for t in self.tokenize(text)]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Chapter 1: ``input_ids`` int32 (B, context_length) for a prompt or a list of prompts.

        Each row is BOS, at most ``context_length - 2`` text ids, EOS, then ``pad_id`` (= EOS).
        """
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a str or a non-empty list of str, got {texts!r}")
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.int32)
        for row, text in enumerate(texts):
            tokens = [self.bos_id, *self.encode(text)[: self.context_length - 2], self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Chapter 1: text back from one row of ids; BOS, EOS and padding are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[i] for i in ids if i not in (self.bos_id, self.eos_id))
        words = [bytes(byte_decoder[c] for c in word) for word in text.split("</w>")]
        return b" ".join(words).decode("utf-8", errors="replace").strip()


def _ftfy_fix_text() -> Callable[[str], str] | None:
    if importlib.util.find_spec("ftfy") is None:
        return None
    import ftfy
    return ftfy.fix_text


def _byte_tokens() -> list[str]:
    """The first 512 CLIP tokens: the 256 byte characters, then the same with ``</w>``."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def _read_merges(lines: list[str], path: Path) -> list[tuple[str, str]]:
    """Merge pairs from merges-file lines: a '#version' header line, then 'left right' per line."""
    if not lines or "#version" not in lines[0]:
        raise ValueError(f"{path}: not a CLIP BPE merges file (expected a '#version' first line)")
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    merges = []
    for number, line in enumerate(lines[1: NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}: line {number} should be two tokens 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _load_bpe_gz(path: Path, **kwargs) -> CLIPTokenizer:
    """OpenAI / open_clip ``bpe_simple_vocab_16e6.txt.gz``: the vocabulary is derived from the merges."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable gzip text file ({e})") from None
    merges = _read_merges(lines, path)
    tokens = _byte_tokens() + ["".join(m) for m in merges] + [BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges, source=str(path), **kwargs)


def _load_hf_folder(folder: Path, **kwargs) -> CLIPTokenizer:
    """A Hugging Face tokenizer folder: ``vocab.json`` (token -> id) and ``merges.txt``."""
    try:
        encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}: vocab.json/merges.txt is not valid UTF-8 JSON/text ({e})") from None
    merges = _read_merges(lines, folder / "merges.txt")
    if not isinstance(encoder, dict):
        raise ValueError(f"{folder / 'vocab.json'}: expected a JSON object token -> id")
    needed = [*_byte_tokens(), *("".join(m) for m in merges), BOS, EOS]
    missing = [t for t in needed if t not in encoder]
    if missing:
        raise ValueError(f"{folder / 'vocab.json'}: {len(missing)} byte/merge/special tokens are missing, "
                         f"e.g. {missing[0]!r}")
    return CLIPTokenizer(encoder, merges, source=str(folder), **kwargs)


def load_tokenizer(path: str | os.PathLike, **kwargs) -> CLIPTokenizer:
    """Chapter 1: the tokenizer from local vocabulary files.

    ``path`` is one of: a Hugging Face tokenizer folder (``vocab.json`` + ``merges.txt``, e.g. a snapshot
    of openai/clip-vit-large-patch14, or a diffusers model folder with a ``tokenizer/`` inside), a file in
    such a folder, or OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (or a folder holding it).
    ``kwargs`` go to :class:`CLIPTokenizer` (``context_length``, ``use_ftfy``).
    Raises FileNotFoundError (nothing there) or ValueError (a file that isn't a CLIP vocabulary).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"CLIP vocabulary {path} does not exist: expected {BPE_FILE} or a folder "
                                "with vocab.json and merges.txt")
    if path.is_file():
        if path.name.endswith(".gz"):
            return _load_bpe_gz(path, **kwargs)
        if path.name not in ("vocab.json", "merges.txt"):
            raise ValueError(f"{path}: expected {BPE_FILE}, vocab.json or merges.txt")
        path = path.parent
    for folder in (path, path / "tokenizer"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _load_hf_folder(folder, **kwargs)
    if (path / BPE_FILE).is_file():
        return _load_bpe_gz(path / BPE_FILE, **kwargs)
    raise FileNotFoundError(f"{path} holds no CLIP vocabulary: expected vocab.json + merges.txt or {BPE_FILE}")


def byte_level_tokenizer(context_length: int = CONTEXT_LENGTH, use_ftfy: bool | None = None,
                         compact: bool = False) -> CLIPTokenizer:
    """Chapter 1: the offline fallback for the ``tiny`` preset: no merges, one id (< 512) per UTF-8 byte.

    Same cleaning, pre-tokenizer, ``</w>`` marks and BOS 49406 / EOS = pad 49407 as the real tokenizer;
    the ids are real CLIP byte-token ids, but the real model would see text split into single bytes.
    ``compact=True`` numbers BOS 512 and EOS 513 instead: a 514-row token embedding (the trained ``toy``
    preset, whose weights must fit in a few MB) instead of 49408 rows of which 514 are ever used.
    """
    bos = 2 * 256 if compact else 49406
    encoder = {t: i for i, t in enumerate(_byte_tokens())} | {BOS: bos, EOS: bos + 1}
    return CLIPTokenizer(encoder, [], source="built-in byte table", context_length=context_length,
                         use_ftfy=use_ftfy)


def find_vocabulary() -> Path | None:
    """Chapter 1: a CLIP vocabulary already on this machine, or None. Nothing is downloaded.

    Looks, in order, at: ``$COURSE_CLIP_VOCAB`` (an error if set to a missing path); the Hugging Face
    cache's openai/clip-vit-large-patch14 snapshots (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
    ``~/.cache/huggingface/hub``);
    then the copy shipped with course_lib (``course_lib/cnsd/data``, MIT-licensed, 1.3 MB).
    """
    if os.environ.get(VOCAB_ENV):
        path = Path(os.environ[VOCAB_ENV]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"${VOCAB_ENV}={path} does not exist: point it at {BPE_FILE} or a "
                                    "folder with vocab.json and merges.txt, or unset it")
        return path
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    snapshots = Path(hub).expanduser() / "models--openai--clip-vit-large-patch14" / "snapshots"
    for snapshot in sorted(snapshots.glob("*")):
        if (snapshot / "vocab.json").is_file() and (snapshot / "merges.txt").is_file():
            return snapshot
    return SHIPPED_VOCABULARY if SHIPPED_VOCABULARY.is_file() else None


def get_tokenizer(vocab_path: str | os.PathLike | None = None, allow_fallback: bool = False,
                  **kwargs) -> CLIPTokenizer:
    """Chapter 1: the tokenizer to use: ``vocab_path`` if given, else :func:`find_vocabulary`, else the
    byte-level fallback when ``allow_fallback`` (the ``tiny`` preset), else FileNotFoundError.

    Check ``repr(tokenizer)`` or ``tokenizer.byte_level`` to see which one you got.
    """
    path = vocab_path if vocab_path is not None else find_vocabulary()
    if path is not None:
        return load_tokenizer(path, **kwargs)
    if allow_fallback:
        return byte_level_tokenizer(**kwargs)
    raise FileNotFoundError(f"no CLIP vocabulary found: pass vocab_path= ({BPE_FILE}, or a folder with "
                            f"vocab.json and merges.txt such as openai/clip-vit-large-patch14) or set ${VOCAB_ENV}")
