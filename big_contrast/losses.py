"""Contrastive, self-supervised and captioning losses as pure functions of arrays (imports
only jax).

Global-batch losses take an optional ``axis_name``. Called inside ``jax.shard_map`` over the
data axes, each device scores only its local rows against the gathered columns, so the
similarity matrix costs O(B_local * B_global) memory, while the value and the gradients equal
those of the single-device loss on the whole global batch.

The image-only self-supervised losses (SwAV with its Sinkhorn-Knopp codes, SimCLR's NT-Xent,
decoupled contrastive learning, MoCHi hard-negative mixing) follow the same convention and
compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gather_columns(x, y, axis_name):
    """Returns (all_x, all_y, offset of this device's rows in the global batch)."""
    if axis_name is None:
        return x, y, 0
    all_x = jax.lax.all_gather(x, axis_name, tiled=True)
    all_y = jax.lax.all_gather(y, axis_name, tiled=True)
    return all_x, all_y, jax.lax.axis_index(axis_name) * x.shape[0]


def _summed_cross_entropy(logits, labels, label_smoothing):
    """Sum over rows of CE(softmax(logits), smoothed one-hot(labels))."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
        uniform = -log_probs.mean(axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return nll.sum()


def softmax_contrastive(x, y, scale, *, axis_name=None, label_smoothing: float = 0.0):
    """Symmetric InfoNCE of CLIP / ALIGN.

    Args:
      x, y: L2-normalised embeddings [B, D] (the local shard under ``shard_map``); row i of x
        and row i of y are a positive pair, every other row of the global batch a negative.
      scale: the already-exponentiated logit multiplier (1 / temperature), a scalar.
      axis_name: mesh axis name(s) of the batch; None for a single device / plain jit.
      label_smoothing: weight of the uniform distribution mixed into the one-hot targets.

    Returns:
      Scalar: mean over the global batch of (CE(x -> y) + CE(y -> x)) / 2, with
      logits = scale * x @ y.T.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    all_x, all_y, offset = _gather_columns(x, y, axis_name)
    labels = offset + jnp.arange(x.shape[0])
    logits_xy = scale * x @ all_y.T  # local x rows against every y in the global batch
    logits_yx = scale * y @ all_x.T
    total = (_summed_cross_entropy(logits_xy, labels, label_smoothing)
             + _summed_cross_entropy(logits_yx, labels, label_smoothing))
    loss = total / (2.0 * all_x.shape[0])
    return loss if axis_name is None else jax.lax.psum(loss, axis_name)


def caption_loss(logits, targets, mask, *, label_smoothing: float = 0.0):
    """Captioning (next-token) cross-entropy, averaged over the non-padding target tokens.

    Args:
      logits: [B, T, V] next-token logits; targets: [B, T] token ids; mask: [B, T], true where
        the target is a real token (EOS included, padding excluded).
      label_smoothing: weight of the uniform distribution over the vocabulary in the targets.

    Returns:
      Scalar: sum of the masked token losses / number of masked tokens. Under jit with a
      batch-sharded input the sums run over the global batch, so every token weighs the same
      whichever device holds it.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _global_logsumexp_over_rows(log_q, axis_name):
    """Per-column logsumexp over the rows of the global batch, [1, K]: each column is shifted
    by its global maximum (a K-vector pmax), then its exponentials are summed (a K-vector
    psum), so no column overflows or underflows to all zeros."""
    top = jnp.max(log_q, axis=0, keepdims=True)
    if axis_name is not None:
        top = jax.lax.pmax(top, axis_name)
    total = jnp.sum(jnp.exp(log_q - top), axis=0, keepdims=True)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return top + jnp.log(total)


def sinkhorn(scores, epsilon: float = 0.05, iterations: int = 3, *, axis_name=None):
    """SwAV's soft codes: a Sinkhorn-Knopp equipartition of the global batch over prototypes.

    SwAV's ``distributed_sinkhorn`` takes Q = exp(S / epsilon), divides it by its global total,
    then ``iterations`` times divides each prototype's entries by their sum over the global
    batch and by K, then each sample's entries by their sum and by B; finally it multiplies by
    B, so each sample's codes sum to 1. Every division by a constant there is undone by the
    next normalisation, so the same codes come from the log domain: L = S / epsilon, then
    ``iterations`` times {L -= per-prototype logsumexp over the global samples; L -= per-sample
    logsumexp over the prototypes}, and Q = exp(L). That form is computed here: exp(S / epsilon)
    overflows float32 once S > ~4.4, and shifting S by one global maximum instead underflows
    whole prototypes or samples to zero (then 0 / 0) when the scores spread widely.

    Args:
      scores: [B, K] similarities of the (local) samples to the K prototypes, normally cosines.
      epsilon: the entropic regularisation; smaller gives harder codes.
      iterations: Sinkhorn iterations, at least 1 (SwAV: 3).
      axis_name: mesh axis name(s) of the batch, or None. Inside ``jax.shard_map`` each device
        passes its own rows; the per-prototype sums run over the global batch (one K-vector
        pmax and one psum per iteration), so each device gets exactly its rows of the
        single-device result on the row-concatenated global scores.

    Returns:
      [B, K] float32 codes, every row summing to 1, under ``stop_gradient`` (they are targets).
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn needs at least one iteration, got {iterations}")
    log_q = jax.lax.stop_gradient(scores.astype(jnp.float32)) / epsilon
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp_over_rows(log_q, axis_name)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
    return jax.lax.stop_gradient(jnp.exp(log_q))


def swav_loss(crop_scores, *, assign_crops=(0, 1), temperature: float = 0.1,
              epsilon: float = 0.05, iterations: int = 3, queue_scores=None, axis_name=None):
    """SwAV's swapped prediction: every crop predicts the Sinkhorn codes of the other crops.

    loss = 1/|A| Σ_{i∈A} 1/(V−1) Σ_{v≠i} mean_b [ −Σ_k q_i[b, k] · log_softmax(s_v[b] / τ)_k ],

    where s_v = crop_scores[v], A = ``assign_crops``, and q_i = the batch's rows of
    sinkhorn(concat([queue_scores[slot of i], s_i])). The codes are targets (no gradient), so
    the gradient reaches the scores only through the log-softmax of the predicting crops.

    Args:
      crop_scores: [V, B, K] scores of every crop of the (local) batch against the K prototypes,
        in a fixed crop order (SwAV: the 2 large crops first, then the small ones).
      assign_crops: indices A of the crops whose codes serve as targets.
      temperature: τ of the predicting softmax.
      epsilon, iterations: the Sinkhorn parameters.
      queue_scores: optional [len(A), Q, K] scores of queued embeddings of each assignment
        crop against the current prototypes (scored by the caller); they enlarge the batch that
        Sinkhorn equipartitions but get no loss.
      axis_name: mesh axis name(s) of the batch, or None. Inside ``jax.shard_map`` Sinkhorn and
        the batch mean run over the global batch; every device must hold the same number of
        rows (and of queue rows).

    Returns:
      The scalar loss, float32.
    """
    crop_scores = crop_scores.astype(jnp.float32)
    num_crops, batch = crop_scores.shape[:2]
    if queue_scores is not None and queue_scores.shape[0] != len(assign_crops):
        raise ValueError(f"queue_scores has {queue_scores.shape[0]} slots for "
                         f"{len(assign_crops)} assignment crops")
    log_probs = jax.nn.log_softmax(crop_scores / temperature, axis=-1)
    total = 0.0
    for slot, i in enumerate(assign_crops):
        to_assign = crop_scores[i]
        if queue_scores is not None:
            to_assign = jnp.concatenate([queue_scores[slot].astype(jnp.float32), to_assign])
        codes = sinkhorn(to_assign, epsilon, iterations, axis_name=axis_name)[-batch:]
        per_crop = jnp.mean(-jnp.sum(codes * log_probs, axis=-1), axis=1)  # [V], crop i too
        total = total + (jnp.sum(per_crop) - per_crop[i]) / (num_crops - 1)
    loss = total / len(assign_crops)
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


def _two_views(z1, z2, axis_name):
    """The 2B-anchor indexing shared by the two-view losses and hard-negative mining.

    Returns (anchors, columns, own, positive): anchors = this device's concat([z1, z2]) [2b, D];
    columns = every view of the global batch, concat([all z1, all z2]) [2B, D] (on one device,
    the same rows as anchors); own / positive = [2b] column indices of each anchor itself and
    of its other view.
    """
    z1 = z1.astype(jnp.float32)
    z2 = z2.astype(jnp.float32)
    all_z1, all_z2, offset = _gather_columns(z1, z2, axis_name)
    rows = offset + jnp.arange(z1.shape[0])
    global_batch = all_z1.shape[0]
    own = jnp.concatenate([rows, rows + global_batch])
    positive = jnp.concatenate([rows + global_batch, rows])
    return (jnp.concatenate([z1, z2]), jnp.concatenate([all_z1, all_z2]), own, positive)


def _two_view_contrastive(z1, z2, temperature, axis_name, extra_negatives,
                          positive_in_denominator):
    """Mean over the 2B global anchors of logsumexp(denominator) − s_pos / τ, where the
    denominator holds every other view of the global batch (minus the positive unless
    ``positive_in_denominator``) and the anchor's ``extra_negatives``."""
    anchors, columns, own, positive = _two_views(z1, z2, axis_name)
    logits = anchors @ columns.T / temperature
    positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
    excluded = jnp.arange(columns.shape[0]) == own[:, None]
    if not positive_in_denominator:
        excluded |= jnp.arange(columns.shape[0]) == positive[:, None]
    logits = jnp.where(excluded, -jnp.inf, logits)
    if extra_negatives is not None:
        extra = jnp.einsum("ad,amd->am", anchors, extra_negatives.astype(jnp.float32))
        logits = jnp.concatenate([logits, extra / temperature], axis=1)
    total = jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive_logit)
    loss = total / columns.shape[0]
    return loss if axis_name is None else jax.lax.psum(loss, axis_name)


def ntxent(z1, z2, temperature, *, axis_name=None, extra_negatives=None):
    """SimCLR's NT-Xent over the 2B views of the global batch.

    loss = mean over the 2B anchors a of −log [exp(s(a, a⁺)/τ) / Σ_{c≠a} exp(s(a, c)/τ)], where
    a⁺ is the other view of a's image and c runs over the other 2B−1 views of the global batch,
    the positive included (plus a's extra negatives, if any). This is lightly's NTXentLoss
    (without its own normalisation); SimCLR's official loss is twice this value.

    Args:
      z1, z2: [B, D] L2-normalised embeddings of the two views (the local shard under
        ``shard_map``); row i of z1 and row i of z2 are a positive pair.
      temperature: τ, a scalar.
      axis_name: mesh axis name(s) of the batch, or None. Inside ``jax.shard_map`` the columns
        are all views of the global batch, gathered, and the result is the global mean.
      extra_negatives: optional [2B_local, M, D] additional negatives for each local anchor,
        anchors ordered as concat([z1, z2]); e.g. ``mix_hard_negatives`` output.

    Returns:
      The scalar loss, float32.
    """
    return _two_view_contrastive(z1, z2, temperature, axis_name, extra_negatives,
                                 positive_in_denominator=True)


def decoupled_contrastive(z1, z2, temperature, *, axis_name=None, extra_negatives=None):
    """Decoupled contrastive learning (DCL, Yeh et al. 2021): NT-Xent without the positive in
    the denominator, which removes the coupling of the positive and negative gradients.

    loss = mean over the 2B anchors a of [−s(a, a⁺)/τ + log Σ_{c∉{a, a⁺}} exp(s(a, c)/τ)], the
    sum running over the 2B−2 negatives of the global batch (plus a's extra negatives). This
    is lightly's unweighted DCLLoss. Arguments and sharding as for ``ntxent``.
    """
    return _two_view_contrastive(z1, z2, temperature, axis_name, extra_negatives,
                                 positive_in_denominator=False)


def hard_negative_candidates(z1, z2, *, axis_name=None):
    """The inputs of ``mix_hard_negatives`` in the indexing of ``ntxent`` and
    ``decoupled_contrastive``, so that their output can be passed as ``extra_negatives``.

    Args:
      z1, z2: [B, D] L2-normalised views (the local shard under ``shard_map``).
      axis_name: mesh axis name(s) of the batch, or None.

    Returns:
      anchors: [2B_local, D], this device's concat([z1, z2]) in float32 (the anchor order of
        ``extra_negatives``).
      candidates: [2B_global, D], every view of the global batch, concat([all z1, all z2]),
        in the losses' column order.
      negative_mask: [2B_local, 2B_global] bool, False at each anchor's own column and at its
        positive's.
    """
    anchors, candidates, own, positive = _two_views(z1, z2, axis_name)
    columns = jnp.arange(candidates.shape[0])
    negative_mask = (columns != own[:, None]) & (columns != positive[:, None])
    return anchors, candidates, negative_mask


def _l2_normalise(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def mix_hard_negatives(anchors, candidates, negative_mask, rng, *, top_n: int,
                       num_pair_mixes: int, num_anchor_mixes: int,
                       max_anchor_weight: float = 0.5):
    """MoCHi (Kalantidis et al. 2020): synthetic hard negatives mixed from each anchor's
    hardest real negatives.

    For every anchor, its ``top_n`` most similar valid negatives (cosine similarity, where
    ``negative_mask`` is True) are the hard set. From it, ``num_pair_mixes`` points
    α·n_i + (1−α)·n_j (n_i, n_j drawn uniformly and independently from the hard set,
    α ~ U(0, 1)) and ``num_anchor_mixes`` points β·anchor + (1−β)·n_j (β ~ U(0,
    ``max_anchor_weight``), so the anchor never dominates) are made, each L2-normalised.
    As in the paper no gradient flows through them: they are returned under stop_gradient.

    Args:
      anchors: [A, D] unit-norm anchors; candidates: [N, D] unit-norm candidate negatives.
      negative_mask: [A, N] bool, True where candidate n is a valid negative of anchor a (it
        must exclude the anchor itself and its positive); every anchor needs at least
        ``top_n`` valid negatives.
      rng: a PRNG key. Under ``shard_map`` fold in the device index so devices draw apart.
      top_n, num_pair_mixes, num_anchor_mixes, max_anchor_weight: as above.

    Returns:
      [A, num_pair_mixes + num_anchor_mixes, D] float32 synthetic negatives (pairs first).
    """
    anchors = jax.lax.stop_gradient(anchors.astype(jnp.float32))
    candidates = jax.lax.stop_gradient(candidates.astype(jnp.float32))
    similarity = jnp.where(negative_mask, anchors @ candidates.T, -jnp.inf)
    _, hardest = jax.lax.top_k(similarity, top_n)  # [A, top_n] candidate indices
    pick_i, pick_j, pick_k, alpha_key, beta_key = jax.random.split(rng, 5)

    def draw(key, count):
        """[A, count, D]: hard negatives drawn uniformly from each anchor's hard set."""
        slots = jax.random.randint(key, (anchors.shape[0], count), 0, top_n)
        return candidates[jnp.take_along_axis(hardest, slots, axis=1)]

    alpha = jax.random.uniform(alpha_key, (anchors.shape[0], num_pair_mixes, 1))
    pairs = alpha * draw(pick_i, num_pair_mixes) + (1.0 - alpha) * draw(pick_j, num_pair_mixes)
    beta = jax.random.uniform(beta_key, (anchors.shape[0], num_anchor_mixes, 1),
                              maxval=max_anchor_weight)
    with_anchor = beta * anchors[:, None] + (1.0 - beta) * draw(pick_k, num_anchor_mixes)
    mixed = _l2_normalise(jnp.concatenate([pairs, with_anchor], axis=1))
    return jax.lax.stop_gradient(mixed)
