"""Batched, jit-friendly autoregressive decoding (greedy and beam search), generic over the model.

The caller supplies ``step_fn(cache, token, position) -> (log_probs, new_cache)``:

- ``token`` [N] int32 holds one token per sequence, fed at ``position`` (an int32 scalar,
  0-based; position 0 receives BOS). ``log_probs`` [N, V] are the log-probabilities (<= 0) of
  the token at ``position + 1``.
- ``cache`` is any pytree (self-attention KV caches, image K/V for cross-attention computed
  once, ...) whose leaves have the N sequences as leading axis. 0-d leaves (e.g. a cache
  index shared by all rows) are left alone by the beam bookkeeping.
- N is ``batch_size`` for greedy decoding and ``batch_size * beam_size`` for beam search, with
  example-major rows ``b * beam_size + k``. Beam search expands the caller's batch_size-row
  cache itself and reorders it by parent beam after every step.

Outputs use the tokenizers' layout ``[BOS, t1, ..., EOS, PAD, ...]`` of length ``max_len``.
A sequence that emits no EOS is cut at ``max_len``. Scores exclude BOS, include the EOS
log-prob, and count nothing after EOS.

Each decoder is one ``lax.while_loop`` that stops once no sequence can change. So
``jax.jit(functools.partial(beam_search, step_fn, batch_size=..., ...))`` compiles the whole
decode once, with ``step_fn`` traced once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]

# Finite stand-in for log(0): placeholder hypotheses stay ordered below every real one, and no
# inf - inf or 0 * inf can produce a NaN.
NEG_INF = -1e9


def _check_max_len(max_len: int) -> None:
    """Rejects layouts that leave no slot to generate into (slot 0 is BOS)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (BOS plus one generated token), got {max_len}")


def greedy_decode(step_fn: StepFn, cache: Any, batch_size: int, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Argmax decoding of ``batch_size`` sequences.

    Returns:
      tokens [B, max_len] int32 (layout in the module docstring) and log_prob [B] float32, the
      summed log-probs of the generated tokens up to and including EOS.
    """
    _check_max_len(max_len)
    tokens = jnp.full((batch_size, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros(batch_size, bool)
    init = (jnp.int32(0), tokens, jnp.zeros(batch_size, jnp.float32), done, cache)

    def keep_going(state):
        pos, _, _, done, _ = state
        return (pos < max_len - 1) & ~jnp.all(done)

    def step(state):
        pos, tokens, log_prob, done, cache = state
        log_probs, cache = step_fn(cache, tokens[:, pos], pos)
        log_probs = log_probs.astype(jnp.float32)
        best = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        best_log_prob = jnp.take_along_axis(log_probs, best[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, best)
        log_prob = log_prob + jnp.where(done, 0.0, best_log_prob)
        return pos + 1, tokens.at[:, pos + 1].set(token), log_prob, done | (token == eos_id), cache

    _, tokens, log_prob, _, _ = jax.lax.while_loop(keep_going, step, init)
    return tokens, log_prob


def expand_for_beams(cache: Any, beam_size: int) -> Any:
    """Repeats every cache row ``beam_size`` times (rows b * beam_size + k): all beams of an
    example start from that example's cache."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, beam_size, axis=0), cache)


def _take_rows(cache: Any, rows: jax.Array) -> Any:
    """Gathers cache rows, so each surviving beam carries its parent beam's state."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, rows, axis=0), cache)


def _brevity_penalty(length, alpha: float):
    """GNMT length normaliser ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha = 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn: StepFn, cache: Any, batch_size: int, max_len: int, bos_id: int,
                eos_id: int, beam_size: int, length_penalty: float = 0.6,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Beam search with alive and finished beams (t5x / flax layout).

    Each step scores all beam_size * V extensions of the alive beams and keeps the top
    2 * beam_size candidates, so beam_size of them survive even when the rest end. Candidates
    ending in EOS, and at the last slot all of them, are complete and join the finished pool.
    The pool keeps the best beam_size by sum_log_prob / ((5 + length) / 6) ** length_penalty,
    where length counts the generated tokens including EOS. The best beam_size incomplete
    candidates stay alive.

    beam_size=1 is not greedy decoding. It follows the best non-EOS token and returns the best
    complete candidate met on the way, which scores at least as well as greedy's sequence.
    The early stop assumes log-probs <= 0.

    Args:
      cache: the cache for ``batch_size`` rows; it is expanded to batch_size * beam_size here.

    Returns:
      tokens [B, max_len] int32, the best finished sequence per example, and its score [B]
      float32 (the raw summed log-prob when length_penalty = 0).
    """
    _check_max_len(max_len)
    b, k, last = batch_size, beam_size, max_len - 1
    seqs = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    # Only beam 0 is live at first, so step 0 does not yield beam_size copies of each token.
    alive_log_prob = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    finished_score = jnp.full((b, k), NEG_INF, jnp.float32)
    init = (jnp.int32(0), seqs, alive_log_prob, seqs, finished_score, expand_for_beams(cache, k))

    def keep_going(state):
        pos, _, alive_log_prob, _, finished_score, _ = state
        # Log-probs are <= 0, so no alive beam's descendant can beat its current sum over the
        # largest penalty still reachable.
        largest = jnp.maximum(_brevity_penalty(pos + 1, length_penalty),
                              _brevity_penalty(last, length_penalty))
        ceiling = alive_log_prob.max(axis=1) / largest
        return (pos < last) & jnp.any(ceiling > finished_score.max(axis=1))

    def step(state):
        pos, alive_seqs, alive_log_prob, finished_seqs, finished_score, cache = state
        log_probs, cache = step_fn(cache, alive_seqs[:, :, pos].reshape(b * k), pos)
        vocab = log_probs.shape[-1]
        scores = alive_log_prob[:, :, None] + log_probs.astype(jnp.float32).reshape(b, k, vocab)
        top_log_prob, top_index = jax.lax.top_k(scores.reshape(b, k * vocab), 2 * k)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(alive_seqs, parent[:, :, None], axis=1)
        top_seqs = top_seqs.at[:, :, pos + 1].set(token)
        complete = (token == eos_id) | (pos + 1 == last)

        penalty = _brevity_penalty(pos + 1, length_penalty)
        new_score = jnp.where(complete, top_log_prob / penalty, NEG_INF)
        finished_score, keep = jax.lax.top_k(
            jnp.concatenate([finished_score, new_score], axis=1), k)
        finished_seqs = jnp.take_along_axis(
            jnp.concatenate([finished_seqs, top_seqs], axis=1), keep[:, :, None], axis=1)

        alive_log_prob, keep = jax.lax.top_k(jnp.where(complete, NEG_INF, top_log_prob), k)
        alive_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
        rows = jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, keep, axis=1)
        cache = _take_rows(cache, rows.reshape(b * k))
        return pos + 1, alive_seqs, alive_log_prob, finished_seqs, finished_score, cache

    _, _, _, finished_seqs, finished_score, _ = jax.lax.while_loop(keep_going, step, init)
    return finished_seqs[:, 0], finished_score[:, 0]  # top_k keeps the pool sorted, best first
