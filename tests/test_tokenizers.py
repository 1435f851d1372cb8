"""Tokenizer layout ([BOS, ..., EOS, PAD...], sticky EOS), determinism, round trips, pickling,
and SentencePiece training through tools/train_tokenizer.py."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from big_contrast.data import tokenizers
from big_contrast.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from tests.helpers import REPO


@pytest.mark.parametrize("tok", [tokenizers.HashedWordTokenizer(8, 1000), tokenizers.ByteTokenizer(8)])
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
    for tok in (tokenizers.HashedWordTokenizer(8, 100), tokenizers.ByteTokenizer(8)):
        clone = pickle.loads(pickle.dumps(tok))
        np.testing.assert_array_equal(clone.encode("x y"), tok.encode("x y"))


def test_unknown_tokenizer_and_missing_model_path():
    with pytest.raises(ValueError, match="words"):
        tokenizers.get_tokenizer("bpe", 8)
    with pytest.raises(ValueError, match="model_path"):
        tokenizers.get_tokenizer("sentencepiece", 8)


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
