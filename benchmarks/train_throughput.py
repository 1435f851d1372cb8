"""Train-step throughput of a config: samples/s, step time, compiled FLOPs, achieved FLOP/s.

  python benchmarks/train_throughput.py --config configs/clip.py:demo [--steps 20]

Three numbers per config: the jitted train step alone on a fixed device batch (compute),
the input pipeline alone (host), and the two together as the trainer runs them. FLOPs come
from XLA's cost analysis of the compiled step, its memory per device from XLA's buffer
assignment (temp: every intermediate, packed by liveness; plus arguments and outputs, less
donated buffers counted twice).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from big_contrast import cli, config as config_lib, host_memory
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def measure(config, steps: int) -> dict:
    exp = Experiment(config)
    mesh = exp.mesh
    state = exp.state_factory.create()
    step_fn = exp.train_step()
    def batches():
        return pipeline.TrainBatches(config.data, exp.objective.batch_spec, exp.tokenizer,
                                     config.batch_size, config.seed, mesh)

    data = batches()
    batch = next(data)

    with jax.set_mesh(mesh):
        began = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - began
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
        memory = compiled.memory_analysis()  # XLA's buffer assignment, per device
        peak_mib = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                    + memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**20

        state, out = step_fn(state, batch)  # warm-up (also settles any weak types)
        jax.block_until_ready(out)
        holder = {"state": state}

        def compute_only():
            holder["state"], m = step_fn(holder["state"], batch)
            jax.block_until_ready(m)

        step_seconds = _median_time(compute_only, steps)

        host = batches()  # the input pipeline alone, its prefetch thread running ahead
        next(host)
        pipeline_seconds = _median_time(lambda: next(host), steps)
        host.close()

        began = time.perf_counter()
        for _ in range(steps):
            batch = next(data)
            holder["state"], m = step_fn(holder["state"], batch)
        jax.block_until_ready(m)
        end_to_end_seconds = (time.perf_counter() - began) / steps
    data.close()
    bs = config.batch_size
    return {
        "batch_size": bs,
        "devices": mesh.devices.size,
        "compile_s": compile_seconds,
        "step_s": step_seconds,
        "samples_per_s_compute": bs / step_seconds,
        "pipeline_batch_s": pipeline_seconds,
        "samples_per_s_pipeline": bs / pipeline_seconds,
        "samples_per_s_end_to_end": bs / end_to_end_seconds,
        "step_memory_mib": peak_mib,
        "step_temp_mib": memory.temp_size_in_bytes / 2**20,
        "gflops_per_step": flops / 1e9,
        "achieved_gflop_per_s": flops / step_seconds / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="e.g. configs/clip.py:demo")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. batch_size=256 data.num_workers=1")
    args = parser.parse_args()
    host_memory.keep_freed_memory()  # as the trainer's entrypoint does
    config = cli.config_from_arguments(parser, args.config, args.set)
    try:
        results = measure(config, args.steps)
    except config_lib.ConfigError as e:  # found when the Experiment validates the config
        parser.error(str(e))
    print(f"{args.config} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s))")
    for key, value in results.items():
        print(f"  {key:<26} {value:,.3f}" if isinstance(value, float) else f"  {key:<26} {value}")


if __name__ == "__main__":
    main()
