"""The objective contract: what the trainer, the pipeline and the evaluators may ask of an
objective. The trainer knows nothing about CLIP or SwAV; an objective is one file plus a config.
"""

from __future__ import annotations

import abc

import jax

from big_contrast import optim
from big_contrast.data.spec import BatchSpec


class Objective(abc.ABC):
    """Model outputs -> losses -> metrics, for one training objective.

    Variables are split as in Linen: ``params`` (trained by the optimizer) and ``model_state``,
    a dict of the other collections (batch statistics, queues, EMA) that ``loss_fn`` returns
    updated. All methods are pure and jit-able.
    """

    @property
    @abc.abstractmethod
    def batch_spec(self) -> BatchSpec:
        """What the input pipeline must produce for training."""

    @abc.abstractmethod
    def init_variables(self, rng: jax.Array, batch: dict) -> dict:
        """Linen variables (boxed with logical axis names) for an example batch."""

    @abc.abstractmethod
    def loss_fn(self, params, model_state: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Returns (loss, (metrics dict of scalars, new model_state)). ``step``: int32 scalar,
        the optimizer steps taken before this one (queues, schedules and warm-ups key on it)."""

    def param_groups(self, params):
        """A group name for every parameter leaf (a pytree like ``params``; the leaves may be
        ShapeDtypeStructs). The optimizer config refers to groups: ``optim.exclude_groups``
        are spared weight decay and LARS trust-ratio scaling, and ``frozen_groups`` are held
        still for their first steps. Default: 'vectors' for biases, norm scales and scalars
        (fewer than 2 dimensions), 'weights' for matrices and kernels."""
        return optim.default_groups(params)

    def frozen_groups(self) -> dict[str, int]:
        """{group: N}: the group's parameters do not move during the first N optimizer steps
        (no update, no weight decay, no momentum). Default: none."""
        return {}

    def postprocess_params(self, params):
        """Applied after every optimizer update (clamps, re-normalisations); default: none."""
        return params

    def embed_images(self, params, model_state: dict, images):
        """L2-normalised image embeddings, for evaluators; objectives without one raise."""
        raise NotImplementedError(f"{type(self).__name__} has no image embedding")

    def embed_texts(self, params, model_state: dict, tokens):
        """L2-normalised text embeddings, for evaluators; objectives without one raise."""
        raise NotImplementedError(f"{type(self).__name__} has no text embedding")

    # Image-only objectives (SimCLR, SwAV) have no text embedding: evaluators that compare
    # images with text are refused for them.
    embeds_text = True

    # Captioning objectives (a text decoder) also provide these three; decoding.py and the
    # captioning evaluators use them.
    can_caption = False

    def init_decoding(self, params, model_state: dict, images):
        """The decoding cache for a batch of images (see decoding.py for its contract)."""
        raise NotImplementedError(f"{type(self).__name__} has no caption decoder")

    def decode_step(self, params, model_state: dict, cache, token, position):
        """Feeds one token per sequence at ``position``: (next-token log-probs [N, V], cache)."""
        raise NotImplementedError(f"{type(self).__name__} has no caption decoder")

    def score_captions(self, params, model_state: dict, images, tokens):
        """Log-likelihood [B, K] of each of K tokenised captions given each of B images."""
        raise NotImplementedError(f"{type(self).__name__} has no caption decoder")


class PerExampleObjective(Objective):
    """An objective whose loss is a function of per-example outputs of its towers (two-tower
    embeddings, CoCa's per-caption token losses): ``loss_fn`` is ``loss_from_outputs`` of
    ``per_example_outputs``. The split lets the trainer's GradCache (grad_cache.py) run the
    towers micro-batch by micro-batch while the loss still sees the whole global batch."""

    @abc.abstractmethod
    def per_example_outputs(self, params, model_state: dict, batch: dict, rng, step):
        """The towers' forward pass: ({name: [B, ...] array}, new model_state)."""

    @abc.abstractmethod
    def loss_from_outputs(self, params, outputs: dict, step):
        """(loss, metrics) from the whole global batch's outputs; ``params`` supply what the
        loss itself learns (the logit scale, a bias)."""

    def loss_fn(self, params, model_state, batch, rng, step):
        outputs, new_state = self.per_example_outputs(params, model_state, batch, rng, step)
        loss, metrics = self.loss_from_outputs(params, outputs, step)
        return loss, (metrics, new_state)
