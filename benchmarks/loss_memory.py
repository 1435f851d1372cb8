"""Per-device memory of the global-batch contrastive losses' value and gradient, sharded over 8
fake CPU devices: dense softmax InfoNCE ([B_local, B_global] logits), blockwise softmax
(online logsumexp over column blocks), SigLIP with y all-gathered (the baseline, written here)
and SigLIP on a ppermute ring (nothing gathered).

  python benchmarks/loss_memory.py [--batches 1024,4096,16384,65536] [--dim 512]
      [--block_size 1024] [--time_up_to 16384] [--repeats 2]

Memory comes from XLA's buffer assignment of the compiled per-device program
(``compiled.memory_analysis()``), so any batch can be measured without running it: peak =
temp + argument + output − alias bytes. temp_size is the one preallocated block that holds
every intermediate, packed by liveness (so it is the peak of what is live at once), argument
and output sizes are this device's shards of x, y, the scalars and of the gradients (live
for the whole call), and alias bytes (outputs that reuse an argument's buffer, 0 here) would
otherwise count twice. Batches up to --time_up_to are also run (best of --repeats).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from big_contrast.losses import sigmoid_contrastive, softmax_contrastive  # noqa: E402
from machine import cpu_name  # noqa: E402

MiB = 2 ** 20


def gathered_sigmoid(x, y, scale, bias, *, axis_name):
    """The baseline SigLIP under shard_map: all of y gathered, then the local rows against
    every column at once ([B_local, B_global] logits, positives where the column is the row's
    own pair)."""
    x = x.astype(jnp.float32)
    all_y = jax.lax.all_gather(y.astype(jnp.float32), axis_name, tiled=True)
    logits = scale * x @ all_y.T + bias
    rows = jax.lax.axis_index(axis_name) * x.shape[0] + jnp.arange(x.shape[0])
    signs = jnp.where(jnp.arange(all_y.shape[0]) == rows[:, None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    return jax.lax.psum(total, axis_name) / all_y.shape[0]


def losses(block_size):
    """name -> (loss taking axis_name, number of scalar arguments after x and y)."""
    return {
        "dense softmax": (softmax_contrastive, 1),
        f"blockwise softmax ({block_size})": (
            functools.partial(softmax_contrastive, block_size=block_size), 1),
        "gathered sigmoid": (gathered_sigmoid, 2),
        "ring sigmoid": (sigmoid_contrastive, 2),
    }


def value_and_grad_program(loss, num_scalars, mesh):
    """jit of value_and_grad (w.r.t. x, y and the scalars) of ``loss`` under shard_map."""
    sharded = jax.shard_map(functools.partial(loss, axis_name="data"), mesh=mesh,
                            in_specs=(P("data"), P("data")) + (P(),) * num_scalars,
                            out_specs=P())
    return jax.jit(jax.value_and_grad(sharded, argnums=tuple(range(2 + num_scalars))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,4096,16384,65536",
                        help="comma-separated global batch sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding width")
    parser.add_argument("--block_size", type=int, default=1024,
                        help="columns per block of the blockwise softmax")
    parser.add_argument("--time_up_to", type=int, default=16384,
                        help="run (and time) batches up to this size; larger ones only compile")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (the best is shown)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    print(f"{devices} {jax.devices()[0].platform} devices on {os.cpu_count()} cores "
          f"({cpu_name()}), jax {jax.__version__}; embeddings {args.dim} wide, float32\n")
    print("| global batch | loss | peak / device (MiB) | temp | arguments | outputs "
          "| step time (s) | loss value |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        run = batch <= args.time_up_to
        if run:
            data = []
            for _ in range(2):
                z = rng.normal(size=(batch, args.dim)).astype(np.float32)
                data.append(jax.device_put(z / np.linalg.norm(z, axis=1, keepdims=True), rows))
        for name, (loss, num_scalars) in losses(args.block_size).items():
            program = value_and_grad_program(loss, num_scalars, mesh)
            embedding = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32, sharding=rows)
            scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
            compiled = program.lower(embedding, embedding, *[scalar] * num_scalars).compile()
            stats = compiled.memory_analysis()
            peak = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                    + stats.output_size_in_bytes - stats.alias_size_in_bytes)
            seconds = value = "-"
            if run:
                scalars = [jax.device_put(jnp.float32(s), replicated) for s in (10.0, -10.0)]
                inputs = (*data, *scalars[:num_scalars])
                best = float("inf")
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    out = jax.block_until_ready(compiled(*inputs))
                    best = min(best, time.perf_counter() - began)
                seconds, value = f"{best:.2f}", f"{float(out[0]):.5f}"
            print(f"| {batch:,} | {name} | {peak / MiB:,.0f} | {stats.temp_size_in_bytes / MiB:,.0f} "
                  f"| {stats.argument_size_in_bytes / MiB:,.0f} "
                  f"| {stats.output_size_in_bytes / MiB:,.0f} | {seconds} | {value} |", flush=True)


if __name__ == "__main__":
    main()
