"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes across multi-crop views.

Follows the official implementation (../shared/reference/ssl_swav.md) with these choices:
- the prototypes are re-normalised after every optimizer update (and start unit-norm), which
  leaves them exactly where SwAV's re-normalisation before each forward pass does;
- the queue is one global array (rows sharded with the batch) rather than one per GPU: Sinkhorn
  sees the same set of rows either way, so the codes are the same;
- the queue holds the assignment crops' embeddings, newest first; it is filled from
  ``swav.queue_start_step`` on and used once full, never containing the current batch;
- freezing is by optimizer steps through optax (Objective.frozen_groups), so frozen prototypes
  get no update, no weight decay and no momentum, as SwAV's ``grad = None`` does;
- ``swav.hard_assignment`` optionally rounds the codes to one-hot (off in the paper recipe; the
  CPU demo collapses without it, README "Image-only self-supervision").
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_contrast import losses
from big_contrast.models import image_ssl
from big_contrast.objectives.image_only import ImageOnly
from big_contrast.sharding import BATCH_AXES

PROTOTYPES = "prototypes"


class SwAV(ImageOnly):
    """config.model.num_prototypes; config.loss.temperature; config.swav: {assign_crops,
    epsilon, sinkhorn_iterations, hard_assignment, queue_length, queue_start_step,
    freeze_prototypes_steps}."""

    def __init__(self, config, tokenizer=None):
        del tokenizer  # image only
        super().__init__(config, num_prototypes=config.model.num_prototypes)
        swav = config.swav
        self.assign_crops = tuple(range(swav.assign_crops))
        self.queue_length = swav.queue_length
        self.queue_start = swav.queue_start_step
        self.freeze_steps = swav.freeze_prototypes_steps
        self._loss = functools.partial(
            losses.swav_loss, assign_crops=self.assign_crops, temperature=config.loss.temperature,
            epsilon=swav.epsilon, iterations=swav.sinkhorn_iterations,
            hard=swav.hard_assignment, axis_name=BATCH_AXES)
        self.embed_dim = config.model.embed_dim

    def init_variables(self, rng, batch):
        variables = super().init_variables(rng, batch)
        if self.queue_length:
            rows = (len(self.assign_crops), self.queue_length, self.embed_dim)
            variables = {**variables, "queue": {
                "embeddings": nn.LogicallyPartitioned(jnp.zeros(rows, jnp.float32),
                                                     (None, "batch", None)),
                "filled": nn.LogicallyPartitioned(jnp.zeros((), jnp.int32), ())}}
        return variables

    def param_groups(self, params):
        groups = super().param_groups(params)
        if PROTOTYPES in params:
            groups = {**groups, PROTOTYPES: PROTOTYPES}
        return groups

    def frozen_groups(self):
        return {PROTOTYPES: self.freeze_steps} if self.freeze_steps else {}

    def postprocess_params(self, params):
        return image_ssl.renormalise_prototypes(params)

    def _sharded_loss(self, scores, queue_scores=None):
        crops = P(None, BATCH_AXES)
        if queue_scores is None:
            return jax.shard_map(self._loss, in_specs=(crops,), out_specs=P())(scores)
        loss = lambda s, q: self._loss(s, queue_scores=q)  # noqa: E731
        return jax.shard_map(loss, in_specs=(crops, crops), out_specs=P())(scores, queue_scores)

    def loss_fn(self, params, model_state, batch, rng, step):
        del rng  # no random numbers in the loss
        out, model_state = self.crop_outputs(params, model_state, batch)
        scores = out["scores"]
        metrics = {}
        if not self.queue_length:
            loss = self._sharded_loss(scores)
        else:
            queue = model_state["queue"]
            in_use = queue["filled"] >= self.queue_length

            def with_queue():  # the queue is scored only once it is full
                prototypes = jax.lax.stop_gradient(params[PROTOTYPES])
                return self._sharded_loss(scores, queue["embeddings"] @ prototypes.T)

            loss = jax.lax.cond(in_use, with_queue, lambda: self._sharded_loss(scores))
            model_state = {**model_state, "queue": self._push(queue, out["embeddings"], step)}
            metrics["queue_in_use"] = in_use.astype(jnp.float32)
        metrics["loss"] = loss
        return loss, (metrics, model_state)

    def _push(self, queue, embeddings, step):
        """The queue after this step: the assignment crops' embeddings in front, the oldest
        rows dropped; unchanged before queue_start_step."""
        newest = jax.lax.stop_gradient(embeddings[jnp.array(self.assign_crops)])
        batch = newest.shape[1]
        pushed = jnp.concatenate([newest, queue["embeddings"][:, :self.queue_length - batch]],
                                 axis=1)
        active = step >= self.queue_start
        return {"embeddings": jnp.where(active, pushed, queue["embeddings"]),
                "filled": jnp.where(active, jnp.minimum(queue["filled"] + batch,
                                                        self.queue_length), queue["filled"])}
