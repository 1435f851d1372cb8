"""Tokenizers: built-in ones that need no training file, word vocabularies and SentencePiece.

Every tokenizer maps text to a fixed-length int32 vector laid out as
``[BOS, tokens..., EOS, PAD...]`` with PAD = 0. EOS is "sticky": truncation keeps it as the last
token, so end-of-text pooling always finds it. Tokenizers are picklable (grain workers).
``decode`` (where ``can_decode``) reads ids up to the first EOS and skips PAD and BOS.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import zlib

import numpy as np

from big_contrast.data import synthetic

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIAL = 3
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class Tokenizer:
    """Shared layout logic; subclasses implement ``_ids(text)`` (no specials)."""

    vocab_size: int
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    can_decode = True  # whether decode(ids) gives text back (captioning needs it)

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

    def decode(self, ids) -> str:
        """The text of ``ids`` up to the first EOS (PAD and BOS skipped)."""
        content = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                content.append(i)
        return self._text(content)

    def _text(self, ids: list[int]) -> str:
        raise NotImplementedError


class HashedWordTokenizer(Tokenizer):
    """Lower-cased words and punctuation, each hashed (CRC32) into a fixed vocabulary.

    Needs no vocabulary file and gives short sequences (one token per word); distinct words
    collide with probability about (words in use) / vocab_size. Not invertible: use
    VocabularyTokenizer, ByteTokenizer or SentencePiece where text must be decoded.
    """

    can_decode = False

    def __init__(self, max_len: int = 16, vocab_size: int = 8192):
        super().__init__(max_len)
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        buckets = self.vocab_size - _NUM_SPECIAL
        return [_NUM_SPECIAL + zlib.crc32(w.encode()) % buckets
                for w in _WORD_RE.findall(text.lower())]

    def decode(self, ids) -> str:
        raise ValueError("the 'words' tokenizer hashes words and cannot decode; use "
                         "text.tokenizer='vocab' or 'sentencepiece' for captioning")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 3..258): any text, any language, exactly invertible."""

    vocab_size = 256 + _NUM_SPECIAL

    def _ids(self, text: str) -> list[int]:
        return [b + _NUM_SPECIAL for b in text.encode("utf-8")]

    def _text(self, ids: list[int]) -> str:
        return bytes(i - _NUM_SPECIAL for i in ids).decode("utf-8", errors="replace")


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

    def _text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class VocabularyTokenizer(Tokenizer):
    """Whole words and punctuation (split like HashedWordTokenizer) looked up in a word list.

    Ids: 0 PAD, 1 BOS, 2 EOS, 3 UNK (any word not in the list), then the words in list order.
    Invertible up to case and spacing, which is what captioning needs from a closed-vocabulary
    caption language such as the synthetic world's: decode joins words with spaces and writes
    punctuation conventionally ("two shapes: a five-pointed star"); unknown words read "<unk>".
    """

    unk_id = 3
    UNK = "<unk>"
    _NO_SPACE_BEFORE = frozenset(".,:;!?)]}%")
    _NO_SPACE_AFTER = frozenset("([{")
    _JOINERS = frozenset("-'/")  # no space on either side: "five-pointed", "dog's"

    def __init__(self, words, max_len: int = 16):
        super().__init__(max_len)
        self.words = list(words)
        for word in self.words:
            if not isinstance(word, str) or word != word.lower() or not _WORD_RE.fullmatch(word):
                raise ValueError(f"vocabulary entry {word!r} is not a single lower-case word or "
                                 "punctuation mark, so no text would ever produce it")
        self._id_of = {word: i for i, word in enumerate(self.words, self.unk_id + 1)}
        if len(self._id_of) != len(self.words):
            duplicates = sorted(w for w, n in collections.Counter(self.words).items() if n > 1)
            raise ValueError(f"vocabulary lists words more than once: {duplicates[:10]}")
        self.vocab_size = len(self.words) + self.unk_id + 1

    @classmethod
    def from_texts(cls, texts, max_len: int = 16, max_words: int | None = None,
                   min_count: int = 1) -> "VocabularyTokenizer":
        """The words of ``texts`` seen at least ``min_count`` times, most frequent first (ties in
        alphabetical order, so the same texts always give the same ids), at most ``max_words``."""
        counts = collections.Counter(w for text in texts for w in _WORD_RE.findall(text.lower()))
        ranked = sorted((w for w, n in counts.items() if n >= min_count),
                        key=lambda w: (-counts[w], w))
        return cls(ranked[:max_words], max_len)

    def save(self, path: str) -> None:
        """Writes the word list as JSON (the ids follow from its order)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"reserved": ["<pad>", "<bos>", "<eos>", self.UNK], "words": self.words},
                      f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str, max_len: int = 16) -> "VocabularyTokenizer":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: not a word vocabulary (expected a JSON object with a "
                             "'words' list, as VocabularyTokenizer.save writes)")
        return cls(data["words"], max_len)

    def _ids(self, text: str) -> list[int]:
        return [self._id_of.get(w, self.unk_id) for w in _WORD_RE.findall(text.lower())]

    def _text(self, ids: list[int]) -> str:
        out, glue = [], True  # glue: no space before the next token
        for i in ids:
            word = self.words[i - self.unk_id - 1] if i > self.unk_id else self.UNK
            if not glue and word not in self._NO_SPACE_BEFORE and word not in self._JOINERS:
                out.append(" ")
            out.append(word)
            glue = word in self._NO_SPACE_AFTER or word in self._JOINERS
        return "".join(out)


@functools.lru_cache(maxsize=1)
def _synthetic_words(num_captions: int) -> tuple[str, ...]:
    world = synthetic.SyntheticWorld("train", num_records=num_captions, image_size=16, seed=0)
    return tuple(VocabularyTokenizer.from_texts(world[i]["caption"]
                                                for i in range(num_captions)).words)


def synthetic_vocabulary(max_len: int = 16, num_captions: int = 2000) -> VocabularyTokenizer:
    """The synthetic world's whole caption language (about 100 words), from its first training
    captions. It uses the default world whatever the config's world settings, so every run
    gets the same ids; its rarest words appear about once in 100 captions, all by the 500th."""
    return VocabularyTokenizer(_synthetic_words(num_captions), max_len)


TOKENIZERS = ("words", "vocab", "bytes", "sentencepiece")


def get_tokenizer(name: str, max_len: int, vocab_size: int = 8192,
                  model_path: str | None = None, source: str | None = None) -> Tokenizer:
    """Builds a tokenizer from config values (text.tokenizer, text.max_len, text.vocab_size,
    text.model_path; source is data.source).

    'words': hashed words, vocab_size buckets (the only tokenizer text.vocab_size sizes).
    'vocab': a word list, read from model_path (JSON, see VocabularyTokenizer.save); without
      one the synthetic source gets synthetic_vocabulary().
    'bytes': UTF-8 bytes. 'sentencepiece': the model at model_path.
    The others' vocab_size attribute (what models are sized by) follows from their vocabulary.
    """
    if name == "words":
        return HashedWordTokenizer(max_len, vocab_size)
    if name == "vocab":
        if model_path:
            return VocabularyTokenizer.load(model_path, max_len)
        if source == "synthetic":
            return synthetic_vocabulary(max_len)
        raise ValueError("tokenizer 'vocab' needs text.model_path (a JSON word list written by "
                         "VocabularyTokenizer.save) unless data.source is 'synthetic'")
    if name == "bytes":
        return ByteTokenizer(max_len)
    if name == "sentencepiece":
        if not model_path:
            raise ValueError("tokenizer 'sentencepiece' needs text.model_path "
                             "(train one with tools/train_tokenizer.py)")
        return SentencePieceTokenizer(model_path, max_len)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
