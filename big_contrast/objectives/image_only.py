"""What image-only self-supervised objectives (SimCLR, SwAV) share: multi-crop views of one
image, a tower + projection network run once per crop resolution, and backbone features for
the evaluators. There is no text: the batch holds crops only."""

from __future__ import annotations

import jax.numpy as jnp

from big_contrast.data.spec import BatchSpec, ImageView
from big_contrast.models import image_ssl, precision, two_tower
from big_contrast.objectives.base import Objective


def augmented_view(augment, size: int, crop_scale, **overrides) -> ImageView:
    """An ImageView with data.augment's photometric settings (overrides win)."""
    settings = dict(crop_scale=tuple(crop_scale), flip=augment.flip,
                    colour_jitter=augment.colour_jitter, hue_jitter=augment.hue_jitter,
                    jitter_prob=augment.jitter_prob,
                    grayscale_prob=augment.grayscale_prob, blur_prob=augment.blur_prob,
                    blur_sigma=tuple(augment.blur_sigma))
    settings.update(overrides)
    return ImageView(size, **settings)


def multicrop_spec(config) -> BatchSpec:
    """data.multicrop's views: ``global_crops`` at data.image_size (solarised with
    data.augment.solarize_prob in the second one only, as BYOL-style recipes do), then
    ``local_crops`` at ``local_size``."""
    crops, augment = config.data.multicrop, config.data.augment
    views = [augmented_view(augment, config.data.image_size, crops.global_scale,
                            solarize_prob=augment.solarize_prob if i == 1 else 0.0)
             for i in range(crops.global_crops)]
    views += [augmented_view(augment, crops.local_size, crops.local_scale)] * crops.local_crops
    return BatchSpec(views=tuple(views))


class ImageOnly(Objective):
    """config.model: {image (the tower), head: {hidden_dim, layers}, embed_dim, dtype,
    param_dtype}; config.data.multicrop and config.data.augment: the views.

    ``crop_embeddings`` gives [V, B, D] embeddings (and [V, B, K] prototype scores) with the
    crops in the spec's order: global crops first.
    """

    embeds_text = False

    def __init__(self, config, num_prototypes: int = 0):
        model = config.model
        dtypes = precision.from_config(model)
        self.net = image_ssl.MultiCropNet(
            image_tower=two_tower.build_image_tower(model.image, **dtypes),
            hidden_dim=model.head.hidden_dim, embed_dim=model.embed_dim,
            head_layers=model.head.layers, num_prototypes=num_prototypes, **dtypes)
        self._spec = multicrop_spec(config)
        self.num_crops = len(self._spec.views)

    @property
    def batch_spec(self) -> BatchSpec:
        return self._spec

    def _groups(self, batch) -> list:
        """Each resolution's crops as one [B * n, S, S, 3] array, example-major: the batch axis
        stays the leading (sharded) one."""
        groups = []
        for key, size, _ in self._spec.image_groups():
            crops = batch[key]
            groups.append(crops.reshape((-1, size, size, crops.shape[-1])))
        return groups

    def init_variables(self, rng, batch):
        return self.net.init({"params": rng}, self._groups(batch))

    def crop_outputs(self, params, model_state, batch):
        """({'embeddings': [V, B, D], 'scores': [V, B, K]}, updated model_state)."""
        variables = {"params": params, **model_state}
        out, updated = self.net.apply(variables, self._groups(batch), train=True,
                                      mutable=["batch_stats"])
        by_crop = {}
        for name, rows in out.items():
            parts, start = [], 0
            for key, _, count in self._spec.image_groups():
                batch_size = batch[key].shape[0]
                block = rows[start:start + batch_size * count]
                parts.append(block.reshape(batch_size, count, -1).transpose(1, 0, 2))
                start += batch_size * count
            by_crop[name] = jnp.concatenate(parts)
        return by_crop, {**model_state, **updated}

    def embed_images(self, params, model_state, images):
        """L2-normalised backbone features (before the projection head), the representation
        that kNN and linear probes evaluate."""
        features = self.net.apply({"params": params, **model_state}, images,
                                  method=image_ssl.MultiCropNet.features)
        return two_tower.l2_normalise(features)
