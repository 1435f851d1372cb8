"""PROTOTYPE small CNN tower."""
import flax.linen as nn
import jax.numpy as jnp
from big_contrast.models.vit import pixels_to_unit_range


def im2col3x3(x, stride):
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, i:i + h:stride, j:j + w:stride, :] for i in range(3) for j in range(3)], axis=-1)


class CNN(nn.Module):
    variant: str = "16,32,64"
    coord: bool = True

    @nn.compact
    def __call__(self, images, train=False):
        x = pixels_to_unit_range(images)
        b, h, w, _ = x.shape
        if self.coord:
            yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
            x = jnp.concatenate([x, jnp.broadcast_to(jnp.stack([yy, xx], -1), (b, h, w, 2))], -1)
        chans = [int(c) for c in self.variant.split(",")]
        for i, f in enumerate(chans):
            x = nn.relu(nn.Dense(f)(im2col3x3(x, 1)))
            x = nn.relu(nn.Dense(f)(im2col3x3(x, 1)))
            if i < len(chans) - 1:
                x = nn.max_pool(x, (2, 2), (2, 2))
        return x.mean((1, 2)), x.reshape(b, -1, x.shape[-1])
