"""Why EfficientNet's depthwise convolutions are shifted products on CPU: forward+backward time
of the depthwise layers of the ALIGN demo's tower (batch 128, 32 px input, stride-1 stem),
written as XLA's grouped convolution and as a sum of shifted, strided products.

  python benchmarks/depthwise_conv.py [--batch 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from big_contrast.models.efficientnet import depthwise_conv_shifted

# (height, channels, kernel, stride) of depthwise layers of EfficientNet 'tiny' at 32 px with a
# stride-1 stem: the expanded widths of its stages.
LAYERS = ((32, 8, 3, 1), (32, 48, 3, 2), (16, 48, 5, 2), (8, 96, 3, 2), (4, 192, 5, 1),
          (4, 288, 5, 1), (4, 480, 3, 1))


def grouped(x, kernel, stride):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def _time(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layer (HxW, C, k, stride)':<28} {'grouped conv':>13} {'shifted':>9}  speed-up")
    totals = [0.0, 0.0]
    for height, channels, k, stride in LAYERS:
        x = jnp.asarray(rng.normal(size=(args.batch, height, height, channels)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, 1, channels)), jnp.float32)
        times = []
        for impl in (grouped, depthwise_conv_shifted):
            loss = lambda x, w, impl=impl: jnp.sum(impl(x, w, stride) ** 2)  # noqa: E731
            times.append(_time(jax.jit(jax.grad(loss, argnums=(0, 1))), (x, kernel), args.repeats))
        totals = [t + s for t, s in zip(totals, times)]
        print(f"{height}x{height}, {channels}, {k}x{k}, /{stride:<14} {times[0] * 1e3:>10.1f} ms "
              f"{times[1] * 1e3:>6.1f} ms  {times[0] / times[1]:>6.1f}x")
    print(f"{'all layers':<28} {totals[0] * 1e3:>10.1f} ms {totals[1] * 1e3:>6.1f} ms  "
          f"{totals[0] / totals[1]:>6.1f}x  ({jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
