"""Contrastive, self-supervised and captioning losses as pure functions of arrays (imports
only jax).

Global-batch losses take an optional ``axis_name``. Called inside ``jax.shard_map`` over the
data axes, each device scores only its local rows against the gathered columns, so the
similarity matrix costs O(B_local * B_global) memory, while the value and the gradients equal
those of the single-device loss on the whole global batch. Two paths go below that:
``softmax_contrastive(..., block_size=k)`` scores the gathered columns k at a time (online
logsumexp, O(B_local * k)), and ``sigmoid_contrastive`` gathers nothing, passing the other
devices' columns around a ``ppermute`` ring (O(B_local²) per hop).

The image-only self-supervised losses (SwAV with its Sinkhorn-Knopp codes, SimCLR's NT-Xent,
decoupled contrastive learning, MoCHi hard-negative mixing) follow the same convention and
compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

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


def _as_varying(value, axis_name):
    """``value`` cast to device-varying over the batch axes (where it is not already), so that
    a custom_vjp inside shard_map may return a per-device cotangent for it: the cast's transpose
    sums those over the devices. Under ``shard_map(check_vma=False)`` nothing is typed and
    the value is returned as is."""
    vma = getattr(jax.typeof(value), "vma", None)
    if vma is None:
        return value
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    missing = tuple(axis for axis in axes if axis not in vma)
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def _sigmoid_block_sum(queries, keys, bias, positives: bool):
    """Σ over one block of pairs of −log σ(z · (queries @ keys.T + bias)), z = +1 on the
    diagonal when ``positives`` (the block pairs each row with its own column) and −1 elsewhere."""
    logits = queries @ keys.T + bias
    if positives:
        logits = jnp.where(jnp.eye(*logits.shape, dtype=bool), logits, -logits)
    else:
        logits = -logits
    return -jnp.sum(jax.nn.log_sigmoid(logits))


def _ring_permutation(axis_name):
    """The ring over the (linearised) batch axes: device i sends to device i + 1."""
    size = jax.lax.axis_size(axis_name)
    return [(i, (i + 1) % size) for i in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_sigmoid_sum(queries, keys, bias, axis_name):
    """This device's share of the global pairwise sigmoid sum: its rows against every device's
    keys, which travel around the ring one chunk per hop (the own chunk holds the positives)."""
    return _ring_sigmoid_sum_fwd(queries, keys, bias, axis_name)[0]


def _ring_sigmoid_sum_fwd(queries, keys, bias, axis_name):
    permutation = _ring_permutation(axis_name)

    def hop(_, carry):
        chunk, total = carry
        chunk = jax.lax.ppermute(chunk, axis_name, permutation)
        return chunk, total + _sigmoid_block_sum(queries, chunk, bias, positives=False)

    own = _sigmoid_block_sum(queries, keys, bias, positives=True)
    _, total = jax.lax.fori_loop(0, len(permutation) - 1, hop, (keys, own))
    return total, (queries, keys, bias)


def _ring_sigmoid_sum_bwd(axis_name, residuals, cotangent):
    """Runs the ring again, recomputing each block: the keys' cotangent accumulates on the
    chunk as it travels, and one last hop brings every chunk's cotangent back to its owner."""
    queries, keys, bias = residuals
    permutation = _ring_permutation(axis_name)

    def block_grads(chunk, positives):
        block = functools.partial(_sigmoid_block_sum, positives=positives)
        return jax.vjp(block, queries, chunk, bias)[1](cotangent)

    def hop(_, carry):
        chunk, d_chunk, d_queries, d_bias = carry
        chunk, d_chunk = jax.lax.ppermute((chunk, d_chunk), axis_name, permutation)
        dq, dk, db = block_grads(chunk, positives=False)
        return chunk, d_chunk + dk, d_queries + dq, d_bias + db

    d_queries, d_keys, d_bias = block_grads(keys, positives=True)
    _, d_keys, d_queries, d_bias = jax.lax.fori_loop(
        0, len(permutation) - 1, hop, (keys, d_keys, d_queries, d_bias))
    return d_queries, jax.lax.ppermute(d_keys, axis_name, permutation), d_bias


_ring_sigmoid_sum.defvjp(_ring_sigmoid_sum_fwd, _ring_sigmoid_sum_bwd)


def sigmoid_contrastive(x, y, scale, bias, *, axis_name=None):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

    loss = (1 / B) Σ_{i,j} −log σ(z_ij · (scale · x_i · y_j + bias)) over all B² pairs of the
    global batch, z_ij = +1 for the positive pairs (i = j) and −1 for every other pair.

    Args:
      x, y: L2-normalised embeddings [B, D] (the local shard under ``shard_map``); row i of x
        and row i of y are a positive pair.
      scale: the already-exponentiated logit multiplier, a scalar; bias: the logit bias, a scalar.
      axis_name: mesh axis name(s) of the batch (a name or a tuple), or None. Inside
        ``jax.shard_map`` nothing is gathered: each device scores its rows against its own y
        chunk, then against the other devices' chunks as they pass around a ``ppermute`` ring
        (n_devices − 1 hops; the backward pass runs the ring again), so the memory per device is
        O(B_local²) per hop, while value and gradients equal the single-device loss.

    Returns:
      The scalar loss, float32 whatever the input dtype.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"sigmoid_contrastive needs x and y of one [B, D] shape, got "
                         f"{x.shape} and {y.shape}")
    queries = jnp.asarray(scale, jnp.float32) * x.astype(jnp.float32)
    keys = y.astype(jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    if axis_name is None:
        return _sigmoid_block_sum(queries, keys, bias, positives=True) / x.shape[0]
    total = _ring_sigmoid_sum(queries, keys, _as_varying(bias, axis_name), axis_name)
    return jax.lax.psum(total, axis_name) / (x.shape[0] * jax.lax.axis_size(axis_name))


def _column_blocks(columns, block_size: int):
    """(block(i) -> the i-th [block_size, D] slice of ``columns``, the number of such full
    blocks, the [r, D] remaining r < block_size columns or None), block_size capped at the
    number of columns. Blocks are slices read in place, never a reshaped copy."""
    block_size = min(block_size, columns.shape[0])
    num_full = columns.shape[0] // block_size
    rest = columns[num_full * block_size:] if columns.shape[0] % block_size else None
    return (lambda i: jax.lax.dynamic_slice_in_dim(columns, i * block_size, block_size),
            num_full, rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blockwise_logsumexp(queries, columns, block_size: int):
    """[b]: logsumexp_j(queries_i · columns_j), computed block_size columns at a time with a
    running maximum and sum of exponentials, so no [b, N] logits exist in either pass."""
    return _blockwise_logsumexp_fwd(queries, columns, block_size)[0]


def _blockwise_logsumexp_fwd(queries, columns, block_size):
    def update(state, block):
        top, total = state
        logits = queries @ block.T
        new_top = jnp.maximum(top, jnp.max(logits, axis=1))
        total = (total * jnp.exp(top - new_top)
                 + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=1))
        return new_top, total

    block, num_full, rest = _column_blocks(columns, block_size)
    first = queries @ block(0).T
    top = jnp.max(first, axis=1)
    state = (top, jnp.sum(jnp.exp(first - top[:, None]), axis=1))
    state = jax.lax.fori_loop(1, num_full, lambda i, state: update(state, block(i)), state)
    if rest is not None:
        state = update(state, rest)
    top, total = state
    lse = top + jnp.log(total)
    return lse, (queries, columns, lse)


def _blockwise_logsumexp_bwd(block_size, residuals, cotangent):
    """d lse_i / d logits_ij = softmax_ij = exp(logits_ij − lse_i): each block's logits are
    recomputed from the saved lse and contracted at once into the query cotangent and the
    block's rows of the column cotangent."""
    queries, columns, lse = residuals

    def block_grads(block):
        weights = jnp.exp(queries @ block.T - lse[:, None]) * cotangent[:, None]
        return weights @ block, weights.T @ queries

    def step(i, grads):
        d_queries, d_columns = grads
        dq, d_block = block_grads(block(i))
        start = i * d_block.shape[0]
        return (d_queries + dq,
                jax.lax.dynamic_update_slice_in_dim(d_columns, d_block, start, axis=0))

    block, num_full, rest = _column_blocks(columns, block_size)
    d_queries, d_columns = jax.lax.fori_loop(
        0, num_full, step, (jnp.zeros_like(queries), jnp.zeros_like(columns)))
    if rest is not None:
        dq, d_rest = block_grads(rest)
        d_queries = d_queries + dq
        d_columns = d_columns.at[columns.shape[0] - rest.shape[0]:].set(d_rest)
    return d_queries, d_columns


_blockwise_logsumexp.defvjp(_blockwise_logsumexp_fwd, _blockwise_logsumexp_bwd)


def _blockwise_summed_cross_entropy(queries, columns, positives, block_size, label_smoothing):
    """``_summed_cross_entropy`` of logits = queries @ columns.T without forming them: row i's
    target column is ``positives[i]``, and the uniform part of a smoothed target needs only
    the mean column, since mean_j(q · c_j) = q · mean_j(c_j)."""
    lse = _blockwise_logsumexp(queries, columns, block_size)
    target_logit = jnp.sum(queries * positives, axis=1)
    if label_smoothing:
        target_logit = ((1.0 - label_smoothing) * target_logit
                        + label_smoothing * (queries @ jnp.mean(columns, axis=0)))
    return jnp.sum(lse - target_logit)


def softmax_contrastive(x, y, scale, *, axis_name=None, label_smoothing: float = 0.0,
                        block_size: int = 0):
    """Symmetric InfoNCE of CLIP / ALIGN.

    Args:
      x, y: L2-normalised embeddings [B, D] (the local shard under ``shard_map``); row i of x
        and row i of y are a positive pair, every other row of the global batch a negative.
      scale: the already-exponentiated logit multiplier (1 / temperature), a scalar.
      axis_name: mesh axis name(s) of the batch; None for a single device / plain jit.
      label_smoothing: weight of the uniform distribution mixed into the one-hot targets.
      block_size: 0 scores each local row against all B_global columns at once
        ([B_local, B_global] logits per direction); k > 0 scores the gathered columns k at a
        time (the last block may be smaller) with an online logsumexp in both passes, so the
        logits cost O(B_local * k) memory, for the same value and gradients.

    Returns:
      Scalar: mean over the global batch of (CE(x -> y) + CE(y -> x)) / 2, with
      logits = scale * x @ y.T.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 0:
        raise ValueError(f"block_size must be a non-negative int (0: dense logits), "
                         f"got {block_size!r}")
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    all_x, all_y, offset = _gather_columns(x, y, axis_name)
    if block_size:
        total = (_blockwise_summed_cross_entropy(scale * x, all_y, y, block_size, label_smoothing)
                 + _blockwise_summed_cross_entropy(scale * y, all_x, x, block_size,
                                                   label_smoothing))
    else:
        labels = offset + jnp.arange(x.shape[0])
        logits_xy = scale * x @ all_y.T  # local x rows against every y in the global batch
        logits_yx = scale * y @ all_x.T
        total = (_summed_cross_entropy(logits_xy, labels, label_smoothing)
                 + _summed_cross_entropy(logits_yx, labels, label_smoothing))
    loss = total / (2.0 * all_x.shape[0])
    return loss if axis_name is None else jax.lax.psum(loss, axis_name)


def caption_token_losses(logits, targets, mask, *, label_smoothing: float = 0.0):
    """Per-caption sums of the next-token cross-entropies and the counts of target tokens.

    Args: as ``caption_loss``. Returns (nll [B]: each caption's summed masked token losses,
    tokens [B]: its number of masked tokens), both float32: per-example outputs that GradCache
    can gather before ``caption_loss`` divides their totals.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def mean_token_loss(nll, tokens):
    """The token-weighted mean of per-caption summed losses: sum(nll) / sum(tokens)."""
    return jnp.sum(nll) / jnp.maximum(jnp.sum(tokens), 1.0)


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
    return mean_token_loss(*caption_token_losses(logits, targets, mask,
                                                 label_smoothing=label_smoothing))


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
              epsilon: float = 0.05, iterations: int = 3, hard: bool = False, queue_scores=None,
              axis_name=None):
    """SwAV's swapped prediction: every crop predicts the Sinkhorn codes of the other crops.

    loss = 1/|A| Σ_{i∈A} 1/(V−1) Σ_{v≠i} mean_b [ −Σ_k q_i[b, k] · log_softmax(s_v[b] / τ)_k ],

    where s_v = crop_scores[v], A = ``assign_crops``, and q_i = the batch's rows of
    sinkhorn(concat([queue_scores[slot of i], s_i])), or with ``hard`` the one-hot of each row's
    largest code. The codes are targets (no gradient), so the gradient reaches the scores only
    through the log-softmax of the predicting crops.

    Args:
      crop_scores: [V, B, K] scores of every crop of the (local) batch against the K prototypes,
        in a fixed crop order (SwAV: the 2 large crops first, then the small ones).
      assign_crops: indices A of the crops whose codes serve as targets.
      temperature: τ of the predicting softmax.
      epsilon, iterations: the Sinkhorn parameters.
      hard: round each sample's codes to a one-hot of its largest code. The paper trains on the
        soft codes; SwAV's README suggests hard assignment when the loss sticks at ln K (the
        uniform codes of a collapsing representation), and it is what lets the CPU demo learn.
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
        if hard:
            codes = jax.nn.one_hot(jnp.argmax(codes, axis=-1), codes.shape[-1], dtype=codes.dtype)
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
                       max_anchor_weight: float = 0.5, anchor_ids=None):
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
      rng: a PRNG key; anchor a draws from fold_in(rng, anchor_ids[a]).
      top_n, num_pair_mixes, num_anchor_mixes, max_anchor_weight: as above.
      anchor_ids: [A] ints naming each anchor in the global batch (default: 0..A-1). Under
        ``shard_map`` pass global ids, so an anchor's mixes do not depend on which device
        holds it: the loss is then the same on any mesh.

    Returns:
      [A, num_pair_mixes + num_anchor_mixes, D] float32 synthetic negatives (pairs first).
    """
    anchors = jax.lax.stop_gradient(anchors.astype(jnp.float32))
    candidates = jax.lax.stop_gradient(candidates.astype(jnp.float32))
    similarity = jnp.where(negative_mask, anchors @ candidates.T, -jnp.inf)
    _, hardest = jax.lax.top_k(similarity, top_n)  # [A, top_n] candidate indices
    if anchor_ids is None:
        anchor_ids = jnp.arange(anchors.shape[0])
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, anchor_ids)

    def mixes(key, anchor, hard_set):
        """[num_pair_mixes + num_anchor_mixes, D] for one anchor and its hard set [top_n]."""
        pick_i, pick_j, pick_k, alpha_key, beta_key = jax.random.split(key, 5)

        def draw(k, count):  # [count, D]: uniformly from the hard set
            return candidates[hard_set[jax.random.randint(k, (count,), 0, top_n)]]

        alpha = jax.random.uniform(alpha_key, (num_pair_mixes, 1))
        pairs = alpha * draw(pick_i, num_pair_mixes) + (1.0 - alpha) * draw(pick_j, num_pair_mixes)
        beta = jax.random.uniform(beta_key, (num_anchor_mixes, 1), maxval=max_anchor_weight)
        with_anchor = beta * anchor + (1.0 - beta) * draw(pick_k, num_anchor_mixes)
        return jnp.concatenate([pairs, with_anchor], axis=0)

    mixed = _l2_normalise(jax.vmap(mixes)(keys, anchors, hardest))
    return jax.lax.stop_gradient(mixed)
