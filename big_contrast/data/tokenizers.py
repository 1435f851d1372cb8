"""Tokenizers: built-in ones that need no training file, and SentencePiece models.

Every tokenizer maps text to a fixed-length int32 vector laid out as
``[BOS, tokens..., EOS, PAD...]`` with PAD = 0. EOS is "sticky": truncation keeps it as the last
token, so end-of-text pooling always finds it. Tokenizers are picklable (grain workers).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIAL = 3
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class Tokenizer:
    """Shared layout logic; subclasses implement ``_ids(text)`` (no specials)."""

    vocab_size: int
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must leave room for BOS, a token and EOS; got {max_len}")
        self.max_len = max_len

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = [self.bos_id] + self._ids(text)[: self.max_len - 2] + [self.eos_id]
        out = np.full(self.max_len, self.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts])


class HashedWordTokenizer(Tokenizer):
    """Lower-cased words and punctuation, each hashed (CRC32) into a fixed vocabulary.

    Needs no vocabulary file and gives short sequences (one token per word); distinct words
    collide with probability about (words in use) / vocab_size. Not invertible: use
    ByteTokenizer or SentencePiece where text must be decoded.
    """

    def __init__(self, max_len: int = 16, vocab_size: int = 8192):
        super().__init__(max_len)
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        buckets = self.vocab_size - _NUM_SPECIAL
        return [_NUM_SPECIAL + zlib.crc32(w.encode()) % buckets
                for w in _WORD_RE.findall(text.lower())]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 3..258): any text, any language, exactly invertible."""

    vocab_size = 256 + _NUM_SPECIAL

    def _ids(self, text: str) -> list[int]:
        return [b + _NUM_SPECIAL for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - _NUM_SPECIAL for i in ids if int(i) >= _NUM_SPECIAL)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (see tools/train_tokenizer.py).

    The model must reserve ids 0, 1, 2 for PAD, BOS, EOS (train_tokenizer.py does), so the
    layout matches the built-in tokenizers.
    """

    def __init__(self, model_path: str, max_len: int = 16):
        super().__init__(max_len)
        self.model_path = model_path
        self._load()

    def _load(self):
        import sentencepiece as spm  # imported lazily: only this tokenizer needs it

        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        specials = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{self.model_path}: (pad, bos, eos) ids are {specials}, expected "
                             f"{(PAD_ID, BOS_ID, EOS_ID)}; train it with tools/train_tokenizer.py")
        self.vocab_size = self._sp.get_piece_size()

    def __getstate__(self):  # the C++ processor does not pickle; reload it in the worker
        return {"model_path": self.model_path, "max_len": self.max_len}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def _ids(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) >= _NUM_SPECIAL])


TOKENIZERS = ("words", "bytes", "sentencepiece")


def get_tokenizer(name: str, max_len: int, vocab_size: int = 8192,
                  model_path: str | None = None) -> Tokenizer:
    """Builds a tokenizer from config values: 'words', 'bytes' or 'sentencepiece'."""
    if name == "words":
        return HashedWordTokenizer(max_len, vocab_size)
    if name == "bytes":
        return ByteTokenizer(max_len)
    if name == "sentencepiece":
        if not model_path:
            raise ValueError("tokenizer 'sentencepiece' needs text.model_path "
                             "(train one with tools/train_tokenizer.py)")
        return SentencePieceTokenizer(model_path, max_len)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'words', 'bytes' or 'sentencepiece'")
