"""Tokenizer layout ([BOS, ..., EOS, PAD...], sticky EOS), determinism, round trips, pickling,
word vocabularies, and SentencePiece training through tools/train_tokenizer.py."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from big_contrast import config as config_lib, experiment, validation
from big_contrast.data import synthetic, tokenizers
from big_contrast.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from tests.helpers import REPO

WORDS = ["a", "red", "star", "two", "shapes", ":", "and", "blue", "circle"]
UNK_ID = tokenizers.VocabularyTokenizer.unk_id


@pytest.mark.parametrize("tok", [tokenizers.HashedWordTokenizer(8, 1000),
                                 tokenizers.ByteTokenizer(8),
                                 tokenizers.VocabularyTokenizer(["a", "b", "one", "two"], 8)])
def test_layout_and_sticky_eos(tok):
    short = tok.encode("a b")
    assert short[0] == BOS_ID and EOS_ID in short and short[-1] == PAD_ID
    long = tok.encode("one two three four five six seven eight nine ten")
    assert long.shape == (8,) and long.dtype == np.int32
    assert long[0] == BOS_ID and long[-1] == EOS_ID and PAD_ID not in long
    assert (tok.encode_batch(["a b", "a b"]) == short).all()


def test_hashed_words_are_case_insensitive_and_stable():
    tok = tokenizers.HashedWordTokenizer(16, 4096)
    a, b = tok.encode("A Red Circle"), tok.encode("a red circle")
    np.testing.assert_array_equal(a, b)
    assert len(set(tok.encode("red green blue").tolist()) - {0, 1, 2}) == 3
    assert tok.encode("circle")[1] == tokenizers.HashedWordTokenizer(16, 4096).encode("circle")[1]
    assert tok.encode("a, b")[2] != tok.encode("a b")[2]  # punctuation is its own token


def test_bytes_round_trip_any_language():
    tok = tokenizers.ByteTokenizer(64)
    for text in ("a red circle", "ein grüner Kreis", "赤い円"):
        assert tok.decode(tok.encode(text)) == text


def test_tokenizers_pickle_for_grain_workers():
    for tok in (tokenizers.HashedWordTokenizer(8, 100), tokenizers.ByteTokenizer(8),
                tokenizers.VocabularyTokenizer(["x", "y"], 8)):
        clone = pickle.loads(pickle.dumps(tok))
        np.testing.assert_array_equal(clone.encode("x y"), tok.encode("x y"))
    vocab = tokenizers.VocabularyTokenizer(WORDS, 8)
    assert pickle.loads(pickle.dumps(vocab)).decode(vocab.encode("a red star")) == "a red star"


def test_decoding_stops_at_eos_and_hashed_words_cannot_decode():
    assert tokenizers.ByteTokenizer(8).can_decode
    assert tokenizers.VocabularyTokenizer(WORDS, 8).can_decode
    tok = tokenizers.ByteTokenizer(8)
    assert tok.decode([BOS_ID, 3 + ord("h"), 3 + ord("i"), EOS_ID, 3 + ord("x"), PAD_ID]) == "hi"
    hashed = tokenizers.HashedWordTokenizer(8, 100)
    assert not hashed.can_decode
    with pytest.raises(ValueError, match="cannot decode.*'vocab'"):
        hashed.decode(hashed.encode("a red star"))


def test_vocabulary_ids_unknown_words_and_punctuation():
    tok = tokenizers.VocabularyTokenizer(WORDS, 12)
    assert tok.vocab_size == len(WORDS) + 4
    ids = tok.encode("Two shapes: a RED star and a green circle")
    assert ids.tolist() == [BOS_ID, 7, 8, 9, 4, 5, 6, 10, 4, UNK_ID, 12, EOS_ID]
    assert tok.decode(ids) == "two shapes: a red star and a <unk> circle"
    assert tok.decode(tok.encode("")) == ""
    text = "two shapes: a five-pointed star, (big) isn't it?"
    full = tokenizers.VocabularyTokenizer.from_texts([text], 32)
    assert full.decode(full.encode(text)) == text  # conventional punctuation spacing
    for bad in (["a", "a"], ["Red"], ["two words"], [""]):
        with pytest.raises(ValueError, match="vocabulary"):
            tokenizers.VocabularyTokenizer(bad, 8)


def test_vocabulary_truncation_keeps_eos():
    tok = tokenizers.VocabularyTokenizer(WORDS, 6)
    ids = tok.encode("two shapes: a red star and a blue circle")
    assert ids.tolist() == [BOS_ID, 7, 8, 9, 4, EOS_ID]
    assert tok.decode(ids) == "two shapes: a"


def test_vocabulary_from_texts_is_deterministic():
    texts = ["b a c", "a b", "a", "d ."]
    tok = tokenizers.VocabularyTokenizer.from_texts(texts)
    assert tok.words == ["a", "b", ".", "c", "d"]  # by count, ties alphabetical
    assert tokenizers.VocabularyTokenizer.from_texts(texts[::-1]).words == tok.words
    assert tokenizers.VocabularyTokenizer.from_texts(texts, min_count=2).words == ["a", "b"]
    assert tokenizers.VocabularyTokenizer.from_texts(texts, max_words=3).words == ["a", "b", "."]


def test_vocabulary_save_and_load(tmp_path):
    tok = tokenizers.VocabularyTokenizer.from_texts(["a red star", "two shapes: a blue circle"], 10)
    path = str(tmp_path / "vocab.json")
    tok.save(path)
    loaded = tokenizers.VocabularyTokenizer.load(path, 10)
    assert loaded.words == tok.words and loaded.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(loaded.encode("a blue star"), tok.encode("a blue star"))
    via_config = tokenizers.get_tokenizer("vocab", 7, model_path=path)
    assert via_config.words == tok.words and via_config.max_len == 7
    (tmp_path / "bad.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="not a word vocabulary"):
        tokenizers.VocabularyTokenizer.load(str(tmp_path / "bad.json"))


def test_synthetic_vocabulary_round_trips_the_worlds_captions():
    tok = tokenizers.synthetic_vocabulary(32)
    assert tok.words == tokenizers.synthetic_vocabulary(32).words  # deterministic
    assert 90 <= tok.vocab_size <= 130
    tables = (synthetic.SHAPE_WORDS, synthetic.COLOUR_WORDS, synthetic._SIZE_WORDS,
              synthetic._POSITION_WORDS, synthetic._BACKGROUND_WORDS)
    phrases = [p for table in tables for ps in table.values() for p in ps] + list(
        synthetic._GREY_WORDS)
    assert not [p for p in phrases if UNK_ID in tok.encode(p)]  # every synonym is known
    for split, seed in (("val", 3), ("heldout_combos", 7)):
        world = synthetic.SyntheticWorld(split, image_size=16, seed=seed)
        captions = [world[i]["caption"] for i in range(300)]
        ids = tok.encode_batch(captions)
        assert UNK_ID not in ids and (ids == EOS_ID).sum(axis=1).tolist() == [1] * len(ids)
        for caption, row in zip(captions, ids):
            assert tok.decode(row) == " ".join(caption.lower().split())


def test_vocab_from_config_builds_the_synthetic_language_or_needs_a_file():
    config = config_lib.base_config()
    config.text.tokenizer = "vocab"
    validation.validate(config)
    tok = experiment.build_tokenizer(config)
    assert tok.words == tokenizers.synthetic_vocabulary().words
    assert tok.max_len == config.text.max_len
    config.data.source = "manifest"
    with pytest.raises(ValueError, match="model_path"):
        experiment.build_tokenizer(config)


def test_unknown_tokenizer_and_missing_model_path():
    with pytest.raises(ValueError, match="words, vocab, bytes"):
        tokenizers.get_tokenizer("bpe", 8)
    for name in ("sentencepiece", "vocab"):
        with pytest.raises(ValueError, match="model_path"):
            tokenizers.get_tokenizer(name, 8)


def test_train_sentencepiece_with_the_tool(tmp_path):
    model = tmp_path / "captions.model"
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--config", "configs/clip.py:demo",
                    "--output", str(model), "--vocab_size", "300", "--max_captions", "3000"],
                   check=True, capture_output=True, text=True, cwd=REPO)
    tok = tokenizers.get_tokenizer("sentencepiece", 24, model_path=str(model))
    # The world's captions use ~140 distinct pieces, fewer than the 300 asked for.
    assert 100 <= tok.vocab_size <= 300
    ids = tok.encode("a small red circle in the top left")
    assert ids[0] == BOS_ID and EOS_ID in ids and ids.max() < tok.vocab_size
    assert tok.decode(ids) == "a small red circle in the top left"
    clone = pickle.loads(pickle.dumps(tok))  # reloads the model file in a worker
    np.testing.assert_array_equal(clone.encode("a ring"), tok.encode("a ring"))
