"""Greedy and beam decoding against exhaustive search on a tiny random model.

The model has PAD=0 and BOS=1, which are never generated (log-prob -inf), plus three outcome
tokens: EOS=2 and the real tokens 3 and 4. The next-token distribution is a random table
indexed by the whole prefix. The prefix is read only from the cache, so a wrongly reordered
cache shows up as a score that an independent rescoring does not reproduce.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_contrast.decoding import beam_search, expand_for_beams, greedy_decode

PAD, BOS, EOS = 0, 1, 2
VOCAB = 5
MAX_LEN = 5  # BOS + 4 generated tokens
N_PREFIXES = 2 ** (MAX_LEN - 1) - 1  # prefixes of real tokens, of length 0..3


def prefix_index(generated):
    """Row of the table for a prefix of real tokens: offset by length, then the tokens in binary."""
    return 2 ** len(generated) - 1 + sum((t - 3) << i for i, t in enumerate(generated))


def make_cache(tables):
    """Cache for tables [B, N_PREFIXES, 3]: the prefix tokens fed so far, and each row's table."""
    tables = jnp.asarray(tables, jnp.float32)
    return {"prefix": jnp.zeros((len(tables), MAX_LEN), jnp.int32), "table": tables}


def table_step(cache, token, position):
    """Records ``token`` in the cache and returns the table's log-probs for the cached prefix."""
    prefix = cache["prefix"].at[:, position].set(token)
    bits = jnp.clip(prefix[:, 1:] - 3, 0, 1)  # garbage after EOS maps to some valid row
    weights = jnp.where(jnp.arange(MAX_LEN - 1) < position, 2 ** jnp.arange(MAX_LEN - 1), 0)
    index = 2 ** position - 1 + (bits * weights).sum(axis=1)
    logits = jnp.take_along_axis(cache["table"], index[:, None, None], axis=1)[:, 0]
    log_probs = jnp.full((len(token), VOCAB), -jnp.inf).at[:, EOS:].set(
        jax.nn.log_softmax(logits))
    return log_probs, {"prefix": prefix, "table": cache["table"]}


def numpy_log_probs(table, generated):
    """Float64 log-probs of the outcomes (EOS, 3, 4) after the real-token prefix ``generated``."""
    logits = np.asarray(table[prefix_index(generated)], np.float64)
    return logits - np.log(np.exp(logits).sum())


def score(table, generated, alpha):
    """Summed log-prob of generated tokens (EOS included) over the GNMT length penalty."""
    total = sum(numpy_log_probs(table, generated[:i])[t - EOS] for i, t in enumerate(generated))
    return total / ((5 + len(generated)) / 6) ** alpha


def layout(generated):
    """[BOS, generated..., PAD...] of length MAX_LEN."""
    return [BOS, *generated] + [PAD] * (MAX_LEN - 1 - len(generated))


def exhaustive(table, alpha):
    """Best (layout, score) over all 3^4 outcome strings, each cut after its first EOS."""
    outputs = set()
    for outcome in itertools.product([EOS, 3, 4], repeat=MAX_LEN - 1):
        cut = outcome.index(EOS) + 1 if EOS in outcome else len(outcome)
        outputs.add(outcome[:cut])
    best = max(outputs, key=lambda g: score(table, g, alpha))
    return layout(best), score(table, best, alpha)


def numpy_greedy(table):
    generated = []
    while len(generated) < MAX_LEN - 1 and EOS not in generated:
        generated.append(EOS + int(np.argmax(numpy_log_probs(table, generated))))
    return layout(generated), score(table, generated, 0.0)


def numpy_beam_of_one(table, alpha):
    """Beam size 1: follow the best real token and keep the best complete candidate on the way.

    A candidate is complete if it ends in EOS, or at the last slot. It joins only if it is among
    the top 2 extensions, which holds for all but a last-ranked EOS.
    """
    path, candidates = [], []
    while len(path) < MAX_LEN - 1:
        log_probs = numpy_log_probs(table, path)
        if log_probs[0] > log_probs.min():
            candidates.append(path + [EOS])
        path = path + [3 + int(np.argmax(log_probs[1:]))]
    candidates.append(path)
    best = max(candidates, key=lambda g: score(table, g, alpha))
    return layout(best), score(table, best, alpha)


def random_tables(seed, n, scale=2.0):
    """n random logit tables [n, N_PREFIXES, 3]; a smaller scale gives flatter distributions."""
    return np.random.default_rng(seed).normal(scale=scale, size=(n, N_PREFIXES, 3))


@functools.partial(jax.jit, static_argnames=("beam_size", "alpha"))
def beam(tables, beam_size, alpha):
    return beam_search(table_step, make_cache(tables), len(tables), MAX_LEN, BOS, EOS,
                       beam_size, length_penalty=alpha)


@jax.jit
def greedy(tables):
    return greedy_decode(table_step, make_cache(tables), len(tables), MAX_LEN, BOS, EOS)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_matches_exhaustive_search(alpha):
    # 9 beams hold all 8 real-token prefixes of length 3, so only the last step prunes.
    tables = random_tables(0, 64)
    tokens, scores = beam(tables, 9, alpha)
    for table, got_tokens, got_score in zip(tables, np.asarray(tokens), np.asarray(scores)):
        want_tokens, want_score = exhaustive(table, alpha)
        assert got_tokens.tolist() == want_tokens
        np.testing.assert_allclose(got_score, want_score, atol=1e-5)


def test_greedy_matches_numpy_reference():
    tables = random_tables(1, 64)
    tokens, log_prob = greedy(tables)
    for table, got_tokens, got_log_prob in zip(tables, np.asarray(tokens), np.asarray(log_prob)):
        want_tokens, want_log_prob = numpy_greedy(table)
        assert got_tokens.tolist() == want_tokens
        np.testing.assert_allclose(got_log_prob, want_log_prob, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 2, 3, 4])
def test_beam_never_scores_below_greedy(beam_size):
    tables = random_tables(2, 256, scale=1.0)
    _, greedy_log_prob = greedy(tables)
    _, scores = beam(tables, beam_size, 0.0)
    assert np.all(np.asarray(scores) >= np.asarray(greedy_log_prob) - 1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_of_one_keeps_best_ending_of_its_path(alpha):
    tables = random_tables(3, 256, scale=1.0)
    tokens, scores = beam(tables, 1, alpha)
    if alpha == 0.0:  # not greedy: a third of these tables end elsewhere
        assert np.any(np.asarray(tokens) != np.asarray(greedy(tables)[0]))
    for table, got_tokens, got_score in zip(tables, np.asarray(tokens), np.asarray(scores)):
        want_tokens, want_score = numpy_beam_of_one(table, alpha)
        assert got_tokens.tolist() == want_tokens
        np.testing.assert_allclose(got_score, want_score, atol=1e-5)


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_nothing_but_pad_after_eos(decode):
    tables = random_tables(4, 64, scale=1.0)
    tokens = np.asarray(greedy(tables)[0] if decode == "greedy" else beam(tables, 3, 0.6)[0])
    assert np.all(tokens[:, 0] == BOS)
    for row in tokens:
        generated = row[1:].tolist()
        if EOS in generated:
            cut = generated.index(EOS) + 1
            assert generated[cut:] == [PAD] * (len(generated) - cut)
            assert set(generated[:cut - 1]) <= {3, 4}
        else:
            assert set(generated) <= {3, 4}  # cut at max_len, no padding


def constant_step(log_probs):
    """A step_fn with the same next-token log-probs everywhere and an empty cache."""
    log_probs = jnp.asarray(log_probs, jnp.float32)
    return lambda cache, token, position: (jnp.tile(log_probs, (len(token), 1)), cache)


def test_eos_preferred_stops_at_once():
    log_probs = jax.nn.log_softmax(jnp.array([-jnp.inf, -jnp.inf, 3.0, 0.0, 0.0]))
    step = constant_step(log_probs)
    for tokens, scores in [greedy_decode(step, {}, 2, MAX_LEN, BOS, EOS),
                           beam_search(step, {}, 2, MAX_LEN, BOS, EOS, beam_size=3)]:
        np.testing.assert_array_equal(tokens, [[BOS, EOS, PAD, PAD, PAD]] * 2)
        np.testing.assert_allclose(scores, [log_probs[EOS]] * 2, rtol=1e-6)


def test_eos_never_emitted_fills_max_len():
    log_probs = jax.nn.log_softmax(jnp.array([-jnp.inf, -jnp.inf, -jnp.inf, 1.0, 0.0]))
    step = constant_step(log_probs)
    for tokens, scores in [greedy_decode(step, {}, 2, MAX_LEN, BOS, EOS),
                           beam_search(step, {}, 2, MAX_LEN, BOS, EOS, beam_size=3,
                                       length_penalty=0.0)]:
        np.testing.assert_array_equal(tokens, [[BOS, 3, 3, 3, 3]] * 2)
        np.testing.assert_allclose(scores, [4 * log_probs[3]] * 2, rtol=1e-6)


def test_batch_equals_examples_decoded_alone():
    tables = random_tables(5, 3)
    for decode in [greedy, functools.partial(beam, beam_size=3, alpha=0.6)]:
        batch_tokens, batch_scores = decode(tables)
        for i in range(3):
            tokens, scores = decode(tables[i:i + 1])
            np.testing.assert_array_equal(tokens[0], batch_tokens[i])
            np.testing.assert_allclose(scores[0], batch_scores[i], atol=1e-6)


@pytest.mark.parametrize("beam_size", [2, 3])
def test_cache_is_reordered_with_parent_beams(beam_size):
    # table_step reads the prefix only from its cache, so the returned score equals a rescoring
    # of the returned tokens only if every step extended a beam with that beam's own cache rows.
    tables = random_tables(6, 64)
    tokens, scores = beam(tables, beam_size, 0.6)
    for table, row, got in zip(tables, np.asarray(tokens), np.asarray(scores)):
        generated = [t for t in row[1:].tolist() if t != PAD]
        np.testing.assert_allclose(got, score(table, generated, 0.6), atol=1e-5)


def test_expand_for_beams_is_example_major_and_keeps_scalars():
    cache = {"kv": jnp.arange(6).reshape(2, 3), "index": jnp.int32(7)}
    expanded = expand_for_beams(cache, 2)
    np.testing.assert_array_equal(expanded["kv"], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    assert int(expanded["index"]) == 7


def test_whole_decode_compiles_once():
    traces = []

    def counting_step(cache, token, position):
        traces.append(1)  # runs only while tracing
        return table_step(cache, token, position)

    kwargs = dict(batch_size=4, max_len=MAX_LEN, bos_id=BOS, eos_id=EOS)
    cases = [(jax.jit(functools.partial(greedy_decode, counting_step, **kwargs)), greedy),
             (jax.jit(functools.partial(beam_search, counting_step, beam_size=3, **kwargs)),
              functools.partial(beam, beam_size=3, alpha=0.6))]
    for jitted, reference in cases:
        traces.clear()
        for seed in (7, 8):
            tables = random_tables(seed, 4)
            got_tokens, got_scores = jitted(make_cache(tables))
            want_tokens, want_scores = reference(tables)
            np.testing.assert_array_equal(got_tokens, want_tokens)
            np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)
        assert len(traces) == 1  # one trace of the loop body serves both calls and every step
