"""How the ConvNet tower's layers are written: forward+backward time of each layer of the
demo's ConvNet (batch 128, 32x32) two ways each on this machine.

  python benchmarks/convnet_layers.py [--batch 128] [--repeats 20]

3x3 convolutions: XLA's convolution op vs an explicit 3x3-neighbourhood matmul (im2col).
2x2 max-pooling: reduce-window (whose gradient is select-and-scatter) vs reshape + max.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.models.convnet import _max_pool_2x2


def _patches_3x3(x):
    """[B, H, W, C] -> [B, H, W, 9C]: each pixel's zero-padded 3x3 neighbourhood (im2col)."""
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, i:i + height, j:j + width] for i in range(3)
                            for j in range(3)], axis=-1)


class _Layer(nn.Module):
    features: int
    how: str

    @nn.compact
    def __call__(self, x):
        if self.how == "conv op":
            y = nn.Conv(self.features, (3, 3), padding="SAME")(x)
        else:
            y = nn.Dense(self.features)(_patches_3x3(x))
        return jnp.sum(nn.relu(y) ** 2)


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - began)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layer (in -> out @ size)':<28}{'conv op ms':>12}{'matmul ms':>12}")
    for cin, features, size in [(5, 16, 32), (16, 16, 32), (16, 32, 16), (32, 32, 16),
                                (32, 64, 8), (64, 64, 8)]:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), jnp.float32)
        row = []
        for how in ("conv op", "matmul"):
            layer = _Layer(features, how)
            params = layer.init(jax.random.key(0), x)
            grad = jax.jit(jax.grad(layer.apply, argnums=(0, 1)))
            row.append(_median_ms(grad, (params, x), args.repeats))
        print(f"{f'{cin} -> {features} @ {size}x{size}':<28}{row[0]:>12.2f}{row[1]:>12.2f}")
    print(f"\n{'2x2 max-pool (channels @ size)':<28}{'reduce_window':>12}{'reshape':>12}")
    for channels, size in [(16, 32), (32, 16)]:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), jnp.float32)
        row = []
        for pool in (lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)), _max_pool_2x2):
            grad = jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(pool(v) ** 2)))
            row.append(_median_ms(grad, (x,), args.repeats))
        print(f"{f'{channels} @ {size}x{size}':<28}{row[0]:>12.2f}{row[1]:>12.2f}")


if __name__ == "__main__":
    main()
