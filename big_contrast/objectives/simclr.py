"""SimCLR (Chen et al. 2020) and its relatives: two augmented views per image, each view's
positive is the other, every other view in the global batch is a negative. ``simclr.loss``
picks NT-Xent or DCL (Yeh et al. 2021: the positive left out of the denominator), and
``simclr.hard_negatives`` adds MoCHi's synthetic hard negatives (Kalantidis et al. 2020)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_contrast import losses
from big_contrast.objectives.image_only import ImageOnly
from big_contrast.sharding import BATCH_AXES

LOSSES = {"ntxent": losses.ntxent, "dcl": losses.decoupled_contrastive}


def _global_anchor_ids(local_rows: int):
    """Global ids of this device's anchors (its rows of view 1, then of view 2; inside
    shard_map), numbered as on one device: view v's row g of the global batch B is v * B + g."""
    device = jax.lax.axis_index(BATCH_AXES)
    global_rows = local_rows * jax.lax.axis_size(BATCH_AXES)
    rows = device * local_rows + jnp.arange(local_rows)
    return jnp.concatenate([rows, global_rows + rows])


class SimCLR(ImageOnly):
    """config.loss.temperature; config.simclr: {loss, hard_negatives: {top_n, pair_mixes,
    anchor_mixes, max_anchor_weight}}; config.data.multicrop.global_crops must be 2."""

    def __init__(self, config, tokenizer=None):
        del tokenizer  # image only
        super().__init__(config)
        simclr = config.simclr
        self.loss = functools.partial(LOSSES[simclr.loss], temperature=config.loss.temperature,
                                      axis_name=BATCH_AXES)
        mixing = simclr.hard_negatives
        self.mixing = None
        if mixing.top_n:
            self.mixing = functools.partial(
                losses.mix_hard_negatives, top_n=mixing.top_n, num_pair_mixes=mixing.pair_mixes,
                num_anchor_mixes=mixing.anchor_mixes, max_anchor_weight=mixing.max_anchor_weight)

    def _local_loss(self, z1, z2, rng):
        """The loss on this device's rows against the global batch (inside shard_map)."""
        extra = None
        if self.mixing is not None:
            anchors, candidates, negatives = losses.hard_negative_candidates(
                z1, z2, axis_name=BATCH_AXES)
            extra = self.mixing(anchors, candidates, negatives, rng,
                                anchor_ids=_global_anchor_ids(z1.shape[0]))
        return self.loss(z1, z2, extra_negatives=extra)

    def loss_fn(self, params, model_state, batch, rng, step):
        del step  # nothing scheduled
        out, model_state = self.crop_outputs(params, model_state, batch)
        z = out["embeddings"]
        rows = P(BATCH_AXES)
        loss = jax.shard_map(self._local_loss, in_specs=(rows, rows, P()), out_specs=P())(
            z[0], z[1], rng)
        positive = (z[0] * z[1]).sum(-1).mean()
        return loss, ({"loss": loss, "positive_similarity": positive}, model_state)
