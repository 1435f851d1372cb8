"""Training entrypoint: config -> mesh -> data -> state -> loop (log, evaluate, checkpoint).

  python -m big_contrast.train --config configs/clip.py:demo --workdir /tmp/clip_demo

Rerunning the same command resumes from the newest checkpoint in the workdir with exactly the
data order, random numbers and optimizer state an uninterrupted run would have had.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import jax

from big_contrast import checkpoint, cli, config as config_lib, evaluators, metrics
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment
from big_contrast.train_state import make_train_step

log = logging.getLogger("big_contrast")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class _StopSignal:
    """Turns SIGTERM (preemption, scheduler kill) into a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. called from a test runner thread)
            pass

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def _mean_metrics(pending: list[dict]) -> dict:
    """Averages the interval's per-step metrics on device, then fetches them (one host sync)."""
    stacked = jax.tree.map(lambda *xs: sum(xs) / len(xs), *pending)
    return {k: float(v) for k, v in jax.device_get(stacked).items()}


def _truncate_metrics(workdir: str, step: int) -> None:
    """After a resume, drops records the killed run wrote past the restored step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    kept = [r for r in metrics.read_jsonl(path) if r["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def train(config, workdir: str, devices=None) -> dict:
    """Runs (or resumes) training to config's total length; returns the final summary."""
    os.makedirs(workdir, exist_ok=True)
    exp = Experiment(config, devices)
    mesh, objective, total_steps = exp.mesh, exp.objective, exp.total_steps
    abstract_state = exp.state_factory.abstract()
    state_shardings = jax.tree.map(lambda s: s.sharding, abstract_state)
    data = pipeline.DeviceIterator(
        pipeline.train_dataset(config.data, objective.batch_spec, exp.tokenizer,
                               exp.local_batch_size, config.seed),
        mesh, config.data.prefetch)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, abstract_state, data)
        _truncate_metrics(workdir, start)
        print(f"Resumed from checkpoint at step {start} in {ckpt.directory}", flush=True)
    else:
        start = 0
        state = exp.state_factory.create()
        data.start_prefetch()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))

    train_step = make_train_step(exp.state_factory, state_shardings)
    evals = evaluators.build_evaluators(config.evals, objective, mesh, config.data,
                                        exp.tokenizer, config.eval_batch_size)
    writer = metrics.MetricWriter(workdir, config.tensorboard)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    print(f"Training {config.objective} ({n_params:,} parameters) for {total_steps} steps of "
          f"{config.batch_size} on a {dict(mesh.shape)} mesh of {mesh.devices.size} "
          f"{jax.devices()[0].platform} device(s)", flush=True)

    stop = _StopSignal()
    progress = metrics.Progress(total_steps, config.batch_size, start)
    pending, skipped_total, last = [], 0, {}
    eval_results: dict = {}
    step = start
    with jax.set_mesh(mesh):
        while step < total_steps:
            batch, skipped = next(data)
            state, step_metrics = train_step(state, batch)
            step += 1
            if step == start + 1:  # keep compilation out of the throughput and the ETA
                jax.block_until_ready(step_metrics)
                print(f"First step done in {time.perf_counter() - progress.start_time:.1f}s "
                      "(compilation included)", flush=True)
                progress.update(step)
            pending.append(step_metrics)
            skipped_total += skipped
            save_now = step % config.checkpoint_every == 0 or step == total_steps or stop.requested
            if step % config.log_every == 0 or save_now:
                last = _mean_metrics(pending)
                pending = []
                if not math.isfinite(last["loss"]):
                    ckpt.wait()
                    raise NonFiniteLossError(
                        f"loss is {last['loss']} at step {step}; stopped without saving. The last "
                        f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
                progress.update(step)
                last["samples_per_second"] = progress.samples_per_second
                last["skipped_records"] = skipped_total
                writer.write(step, last)
                print(progress.line(step, last), flush=True)
            if save_now:
                ckpt.save(step, state, data)
            due = [e for e in evals if e.due(step, total_steps)]
            if due:
                began = time.perf_counter()
                results = evaluators.run_all(due, state.params, state.model_state)
                eval_results.update(results)
                writer.write(step, results)
                print("  eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
                      flush=True)
                progress.pause(time.perf_counter() - began)
            if stop.requested:
                print(f"SIGTERM: saved step {step}; rerun the same command to resume", flush=True)
                break
    data.close()
    ckpt.close()
    writer.close()
    summary = {"step": step, "final_loss": last.get("loss", float("nan")),
               "skipped_records": skipped_total,
               "wall_seconds": round(time.perf_counter() - progress.start_time, 1),
               **eval_results}
    print(metrics.summary_table(f"Summary ({workdir})", summary), flush=True)
    return summary


def main():
    """Command line: flags are defined here, not at import, so modules import side-effect free."""
    config_flag = cli.define_flags("Checkpoints, metrics and TensorBoard events go here.")

    def run():
        try:
            train(config_flag.value, cli.FLAGS.workdir)
        except (config_lib.ConfigError, NonFiniteLossError) as e:
            sys.exit(f"error: {e}")

    cli.run(run)


if __name__ == "__main__":
    main()
