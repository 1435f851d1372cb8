"""Self-supervised losses (Sinkhorn codes, SwAV, NT-Xent, DCL, MoCHi hard-negative mixing)
against independent float64 numpy derivations, on one device and sharded over 8."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from big_contrast.losses import (decoupled_contrastive, hard_negative_candidates,
                                 mix_hard_negatives, ntxent, sinkhorn, swav_loss)

WORLD = 8


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((WORLD,), ("data",), axis_types=(AxisType.Auto,))


def _normalised(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logsumexp(x):
    top = np.max(x)
    return top + np.log(np.exp(x - top).sum())


def numpy_sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV's distributed_sinkhorn on one device, literally, in float64 (no max shift)."""
    q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def numpy_swav(crop_scores, assign=(0, 1), temperature=0.1, queue=None, hard=False):
    """Mean over assignment crops i of the mean over v != i of the batch-mean cross-entropy;
    with ``hard`` against the one-hot of each sample's largest code."""
    crop_scores = np.asarray(crop_scores, np.float64)
    num_crops, batch = crop_scores.shape[:2]
    per_assign = []
    for slot, i in enumerate(assign):
        block = crop_scores[i] if queue is None else np.concatenate([queue[slot], crop_scores[i]])
        codes = numpy_sinkhorn(block)[-batch:]
        if hard:
            codes = np.eye(codes.shape[1])[codes.argmax(axis=1)]
        terms = [-(codes * _log_softmax(crop_scores[v] / temperature)).sum(axis=1).mean()
                 for v in range(num_crops) if v != i]
        per_assign.append(np.mean(terms))
    return np.mean(per_assign)


def numpy_two_view(z1, z2, temperature, extra=None, decoupled=False):
    """Anchor by anchor over the 2B views: −s_pos/τ + log Σ exp(s/τ) over the other views
    (minus the positive when decoupled) and the anchor's extra negatives."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n = len(z)
    losses = []
    for a in range(n):
        positive = (a + n // 2) % n
        others = [c for c in range(n) if c != a and not (decoupled and c == positive)]
        terms = list(z[others] @ z[a] / temperature)
        if extra is not None:
            terms += list(np.asarray(extra[a], np.float64) @ z[a] / temperature)
        losses.append(_logsumexp(np.array(terms)) - z[positive] @ z[a] / temperature)
    return np.mean(losses)


def _device_major(single_order):
    """Rows ordered concat([all z1, all z2]) -> the order of WORLD shards of concat([z1, z2])."""
    rest = single_order.shape[1:]
    return single_order.reshape((2, WORLD, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)


# ---------------------------------------------------------------- Sinkhorn

def test_sinkhorn_matches_numpy_rows_sum_to_one_and_balances_prototypes():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(48, 12))
    codes = sinkhorn(jnp.float32(scores))
    assert codes.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(codes), numpy_sinkhorn(scores), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(codes).sum(axis=1), 1.0, atol=1e-6)
    target = 48 / 12
    mass = np.asarray(codes).sum(axis=0)
    assert np.all(mass > target / 3) and np.all(mass < target * 3), mass
    converged = np.asarray(sinkhorn(jnp.float32(scores), iterations=50)).sum(axis=0)
    np.testing.assert_allclose(converged, target, rtol=0.03)
    np.testing.assert_allclose(converged, numpy_sinkhorn(scores, iterations=50).sum(axis=0),
                               rtol=1e-5)


def test_sinkhorn_is_shift_invariant_and_finite_for_large_scores_and_bfloat16():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, size=(24, 10))
    base = np.asarray(sinkhorn(jnp.float32(scores)))
    # Only the float32 rounding of S + c and of (S + c) / ε differs.
    np.testing.assert_allclose(np.asarray(sinkhorn(jnp.float32(scores + 3.7))), base,
                               rtol=1e-5, atol=1e-7)
    # exp(10 / 0.05) overflows float32 and float64 copes: the codes must still match.
    large = np.asarray(sinkhorn(jnp.float32(10 * scores)))
    assert np.all(np.isfinite(large))
    np.testing.assert_allclose(large.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(large, numpy_sinkhorn(10 * scores), atol=2e-5)
    half = sinkhorn(jnp.asarray(scores, jnp.bfloat16))
    assert half.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(half)))
    np.testing.assert_allclose(np.asarray(half).sum(axis=1), 1.0, atol=1e-6)


def test_sinkhorn_sharded_equals_single_device(mesh):
    rng = np.random.default_rng(2)
    scores = jnp.float32(rng.uniform(-1, 1, size=(WORLD * 4, 12)))
    sharded = jax.jit(jax.shard_map(functools.partial(sinkhorn, axis_name="data"), mesh=mesh,
                                    in_specs=P("data"), out_specs=P("data")))(scores)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(sinkhorn(scores)), atol=1e-6)


# ---------------------------------------------------------------- SwAV

@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_numpy(with_queue, hard):
    rng = np.random.default_rng(3)
    crop_scores = rng.uniform(-1, 1, size=(4, 8, 10))
    queue = rng.uniform(-1, 1, size=(2, 16, 10)) if with_queue else None
    got = swav_loss(jnp.float32(crop_scores), hard=hard,
                    queue_scores=None if queue is None else jnp.float32(queue))
    want = numpy_swav(crop_scores, queue=queue, hard=hard)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if hard:  # one-hot targets: a different loss from the soft codes'
        assert abs(want - numpy_swav(crop_scores, queue=queue)) > 0.05


def test_swav_loss_at_uniform_scores_is_log_k():
    for dtype in (jnp.float32, jnp.bfloat16):
        got = swav_loss(jnp.full((3, 4, 7), 0.3, dtype), assign_crops=(0, 2))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), np.log(7), rtol=1e-6)


@pytest.mark.parametrize("hard", [False, True])
def test_swav_loss_sharded_value_and_gradients_equal_single_device(mesh, hard):
    """Queue rows and batch rows interleave by device in the sharded Sinkhorn; codes are
    equivariant to row order, so the value equals the single-device loss on the global arrays."""
    rng = np.random.default_rng(4)
    crop_scores = jnp.float32(rng.uniform(-1, 1, size=(3, WORLD * 2, 6)))
    queue = jnp.float32(rng.uniform(-1, 1, size=(2, WORLD * 3, 6)))
    sharded = jax.shard_map(lambda s, q: swav_loss(s, hard=hard, queue_scores=q, axis_name="data"),
                            mesh=mesh, in_specs=(P(None, "data"), P(None, "data")),
                            out_specs=P())

    value, grad = jax.jit(jax.value_and_grad(sharded))(crop_scores, queue)
    ref_value, ref_grad = jax.jit(jax.value_and_grad(
        lambda s: swav_loss(s, hard=hard, queue_scores=queue)))(crop_scores)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(float(value), numpy_swav(crop_scores, queue=queue, hard=hard),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-6)


# ---------------------------------------------------------------- NT-Xent and DCL

LOSSES = [(ntxent, False), (decoupled_contrastive, True)]


@pytest.mark.parametrize("loss_fn,decoupled", LOSSES)
def test_two_view_losses_match_numpy(loss_fn, decoupled):
    rng = np.random.default_rng(5)
    z1, z2 = _normalised(rng, 6, 8), _normalised(rng, 6, 8)
    extra = _normalised(rng, 12 * 3, 8).reshape(12, 3, 8)
    plain = loss_fn(jnp.float32(z1), jnp.float32(z2), 0.2)
    np.testing.assert_allclose(float(plain), numpy_two_view(z1, z2, 0.2, decoupled=decoupled),
                               rtol=1e-5)
    mixed = loss_fn(jnp.float32(z1), jnp.float32(z2), 0.2, extra_negatives=jnp.float32(extra))
    np.testing.assert_allclose(float(mixed),
                               numpy_two_view(z1, z2, 0.2, extra, decoupled=decoupled), rtol=1e-5)
    half = loss_fn(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16), 0.1,
                   extra_negatives=jnp.asarray(extra, jnp.bfloat16))
    assert half.dtype == jnp.float32 and np.isfinite(float(half))


@pytest.mark.parametrize("loss_fn,decoupled", LOSSES)
def test_two_view_losses_sharded_value_and_gradients_equal_single_device(mesh, loss_fn,
                                                                         decoupled):
    rng = np.random.default_rng(6)
    z1, z2 = (jnp.float32(_normalised(rng, WORLD * 2, 8)) for _ in range(2))
    extra = _normalised(rng, WORLD * 4 * 3, 8).reshape(WORLD * 4, 3, 8)  # single-device order
    sharded = jax.shard_map(
        lambda a, b, e: loss_fn(a, b, 0.3, axis_name="data", extra_negatives=e), mesh=mesh,
        in_specs=(P("data"), P("data"), P("data")), out_specs=P())

    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(
        z1, z2, jnp.float32(_device_major(extra)))
    ref_value, ref_grads = jax.jit(jax.value_and_grad(
        lambda a, b: loss_fn(a, b, 0.3, extra_negatives=jnp.float32(extra)),
        argnums=(0, 1)))(z1, z2)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(float(value), numpy_two_view(z1, z2, 0.3, extra, decoupled),
                               rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


# ---------------------------------------------------------------- hard-negative mixing

def test_hard_negative_candidates_follow_the_loss_indexing(mesh):
    rng = np.random.default_rng(7)
    z1, z2 = (jnp.float32(_normalised(rng, WORLD * 2, 4)) for _ in range(2))
    anchors, candidates, mask = hard_negative_candidates(z1, z2)
    views = np.concatenate([z1, z2])
    np.testing.assert_array_equal(np.asarray(anchors), views)
    np.testing.assert_array_equal(np.asarray(candidates), views)
    n = len(views)
    expected_mask = ~(np.eye(n, dtype=bool) | np.roll(np.eye(n, dtype=bool), n // 2, axis=1))
    np.testing.assert_array_equal(np.asarray(mask), expected_mask)

    # Every device's candidates (stacked here) are the single-device columns.
    sharded = jax.shard_map(functools.partial(hard_negative_candidates, axis_name="data"),
                            mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=(P("data"), P("data"), P("data")))(z1, z2)
    np.testing.assert_array_equal(np.asarray(sharded[0]), _device_major(views))
    np.testing.assert_array_equal(np.asarray(sharded[1]), np.tile(views, (WORLD, 1)))
    np.testing.assert_array_equal(np.asarray(sharded[2]), _device_major(expected_mask))


def _span_residual(point, basis):
    """Distance from ``point`` to the linear span of the rows of ``basis`` (float64)."""
    basis = np.asarray(basis, np.float64)
    coefficients = np.linalg.lstsq(basis.T, point, rcond=None)[0]
    return np.linalg.norm(basis.T @ coefficients - point)


def test_mix_hard_negatives_are_unit_hard_mask_respecting_and_feed_ntxent():
    rng = np.random.default_rng(8)
    z1 = _normalised(rng, 6, 16)
    z2 = z1 + 0.1 * rng.normal(size=z1.shape)  # each positive is its anchor's nearest view
    z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
    anchors, candidates, mask = hard_negative_candidates(jnp.float32(z1), jnp.float32(z2))
    top_n, pairs, with_anchor = 3, 4, 2
    mix = jax.jit(functools.partial(mix_hard_negatives, top_n=top_n, num_pair_mixes=pairs,
                                    num_anchor_mixes=with_anchor))
    mixed = np.asarray(mix(anchors, candidates, mask, jax.random.key(0)))
    assert mixed.shape == (12, pairs + with_anchor, 16) and mixed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=-1), 1.0, atol=1e-5)

    views = np.concatenate([z1, z2])
    similarity = views @ views.T
    valid = np.asarray(mask)
    synthetic_sim = np.einsum("amd,ad->am", mixed, views)
    for a in range(len(views)):
        negatives = np.flatnonzero(valid[a])
        hard = negatives[np.argsort(-similarity[a, negatives])[:top_n]]
        positive = (a + 6) % 12
        assert similarity[a, positive] > similarity[a, hard].max()  # the mask matters here
        assert synthetic_sim[a].mean() > similarity[a, negatives].mean()
        # Pair mixes lie in the span of the valid hard negatives, anchor mixes in the span of
        # those and the anchor; neither span holds the positive.
        for point in mixed[a, :pairs]:
            assert _span_residual(point, views[hard]) < 1e-5
        span = np.concatenate([views[[a]], views[hard]])
        for point in mixed[a, pairs:]:
            assert _span_residual(point, span) < 1e-5
        assert _span_residual(views[positive], span) > 0.05

    loss = ntxent(jnp.float32(z1), jnp.float32(z2), 0.2, extra_negatives=jnp.asarray(mixed))
    np.testing.assert_allclose(float(loss), numpy_two_view(z1, z2, 0.2, mixed), rtol=1e-5)


def test_mix_hard_negatives_respects_a_custom_mask_and_stops_gradients():
    rng = np.random.default_rng(9)
    anchors, candidates = _normalised(rng, 3, 8), _normalised(rng, 7, 8)
    mask = np.zeros((3, 7), bool)
    mask[:, 4:] = True  # only the last three candidates may be used

    def synthesise(a):
        return mix_hard_negatives(a, jnp.float32(candidates), jnp.asarray(mask),
                                  jax.random.key(1), top_n=2, num_pair_mixes=3,
                                  num_anchor_mixes=0)

    mixed, grad = jax.jit(lambda a: (synthesise(a), jax.grad(
        lambda b: jnp.sum(synthesise(b)))(a)))(jnp.float32(anchors))
    mixed = np.asarray(mixed)
    for a in range(3):
        hard = 4 + np.argsort(-(candidates[4:] @ anchors[a]))[:2]
        for point in mixed[a]:
            assert _span_residual(point, candidates[hard]) < 1e-5
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_mixes_follow_the_anchor_not_the_device_holding_it():
    """With global anchor ids, the synthetic negatives on 2 devices are the single-device ones
    (so a SimCLR loss with MoCHi does not depend on the mesh)."""
    devices = 2
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:devices])
    rng = np.random.default_rng(10)
    z1, z2 = (jnp.float32(_normalised(rng, devices * 4, 8)) for _ in range(2))
    mix = functools.partial(mix_hard_negatives, top_n=3, num_pair_mixes=2, num_anchor_mixes=2)
    key = jax.random.key(4)
    single = mix(*hard_negative_candidates(z1, z2), key)

    def local(a, b):
        rows = jax.lax.axis_index("data") * a.shape[0] + jnp.arange(a.shape[0])
        ids = jnp.concatenate([rows, devices * a.shape[0] + rows])
        return mix(*hard_negative_candidates(a, b, axis_name="data"), key, anchor_ids=ids)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=P("data"))(z1, z2)
    # Device d holds its rows of view 1, then of view 2.
    expected = np.asarray(single).reshape(2, devices, -1, 4, 8).swapaxes(0, 1).reshape(-1, 4, 8)
    np.testing.assert_allclose(np.asarray(sharded), expected, atol=1e-6)
