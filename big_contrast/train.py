"""Training entrypoint: config -> mesh -> data -> state -> loop of periodic actions.

  python -m big_contrast.train --config configs/clip.py:demo --workdir /tmp/clip_demo
  python -m big_contrast.train --config configs/clip.py:B/32 --dry_run  # sharding, bytes/device

Rerunning the same command resumes from the newest checkpoint in the workdir with exactly the
data order, random numbers and optimizer state an uninterrupted run would have had; rerunning a
finished run prints its stored summary (running any final evaluation that a kill prevented).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
from absl import flags

from big_contrast import actions, checkpoint, cli, config as config_lib, distributed, dry_run
from big_contrast import evaluators
from big_contrast import metrics
from big_contrast import workdir as workdir_lib
from big_contrast.data import pipeline
from big_contrast.experiment import Experiment


def _rerun_hint(workdir: str) -> str:
    return f"Rerun the same command (--workdir {workdir}) to resume."


def _records_at(workdir: str, step: int) -> dict:
    """Everything metrics.jsonl recorded at ``step`` (training metrics and evaluations)."""
    merged = {}
    for record in metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE)):
        if record["step"] == step:
            merged.update(record)
    return merged


def _print_summary(title: str, summary: dict) -> None:
    if jax.process_index() == 0:
        print(metrics.summary_table(title, summary), flush=True)


def _summary(step: int, final_loss, skipped_counts: dict, began: float,
             eval_results: dict) -> dict:
    skipped = {f"skipped/{reason}": n for reason, n in sorted(skipped_counts.items())}
    return {"step": step, "final_loss": final_loss, "skipped_records": sum(skipped_counts.values()),
            **skipped, "wall_seconds": round(time.perf_counter() - began, 1), **eval_results}


def train(config, workdir: str, devices=None) -> dict:
    """Runs (or resumes) training to config's total length; returns the final summary."""
    began = time.perf_counter()
    exp = Experiment(config, devices, workdir=workdir)
    workdir = workdir_lib.prepare(workdir)
    if jax.process_index() == 0:
        workdir_lib.store_vocabulary(workdir, exp.tokenizer)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    try:
        start = ckpt.latest_step()
        if start is not None:
            accepted = workdir_lib.check_resume(workdir, config)
            if start > exp.total_steps:
                raise config_lib.ConfigError(
                    f"the workdir's newest checkpoint is step {start}, beyond this config's "
                    f"training length of {exp.total_steps} steps")
            if accepted:
                print("Config changes accepted on resume: " + "; ".join(
                    f"{k}: {old!r} -> {new!r}" for k, (old, new) in accepted.items()), flush=True)
        evals = evaluators.build_evaluators(config.evals, exp.objective, exp.mesh, config.data,
                                            exp.tokenizer, config.eval_batch_size,
                                            initial_weights=exp.state_factory.initial_weights,
                                            rules=exp.rules)
        stored = workdir_lib.read_summary(workdir) if start == exp.total_steps else None
        if stored and stored.get("step") == start and not actions.unfinished(
                evals, start, exp.total_steps, stored):
            _print_summary(f"Summary ({workdir}): this run had already finished", stored)
            return stored
        data = pipeline.TrainBatches(config.data, exp.objective.batch_spec, exp.tokenizer,
                                     config.batch_size, config.seed, exp.mesh)
        try:
            return _run(config, workdir, exp, ckpt, data, evals, start, began)
        finally:
            data.close()
    finally:
        ckpt.close()


def _run(config, workdir, exp, ckpt, data, evals, start, began) -> dict:
    """The loop: restore or create the state, then step and run the due actions."""
    total_steps = exp.total_steps
    abstract_state = exp.state_factory.abstract()
    if start is not None:
        state = ckpt.restore(start, abstract_state, data)
        print(f"Resumed from checkpoint at step {start} in {ckpt.directory}", flush=True)
    else:
        start, state = 0, exp.state_factory.create()
    if jax.process_index() == 0:
        workdir_lib.write_config(workdir, config)
        if start < total_steps:  # an extended run is not finished any more
            workdir_lib.remove(workdir, workdir_lib.SUMMARY_FILE)

    train_step = exp.train_step(abstract_state)
    writer = metrics.MetricWriter(workdir, config.tensorboard, resume_step=start)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))
    print(f"Training {config.objective} ({n_params:,} parameters) for {total_steps} steps of "
          f"{config.batch_size} on a {dict(exp.mesh.shape)} mesh of {exp.mesh.devices.size} "
          f"{jax.devices()[0].platform} device(s)", flush=True)

    progress = metrics.Progress(total_steps, config.batch_size, start)
    step_metrics = actions.StepMetrics()
    try:
        with actions.StopSignals() as signals, jax.set_mesh(exp.mesh):
            save = actions.SaveCheckpoint(ckpt, data, config.checkpoint_every, total_steps,
                                          signals)
            # Steps where every process synchronises anyway: logging and scheduled checkpoints.
            regular_sync = lambda step: (step % config.log_every == 0  # noqa: E731
                                         or save.scheduled(step))
            sync_due = lambda step: regular_sync(step) or save.due(step)  # noqa: E731
            log = actions.LogMetrics(step_metrics, sync_due, writer, progress, data)
            evaluate = actions.Evaluate(evals, exp.eval_weights, total_steps, writer, progress)
            stop = actions.StopOnSignal(signals, ckpt, _rerun_hint(workdir))
            loop_actions = [actions.AgreeOnStop(signals, regular_sync),
                            actions.ReportFirstStep(start + 1, progress),
                            actions.CheckFinite(step_metrics, sync_due, ckpt),
                            log, save, stop, evaluate]
            missing = set(distributed.from_process_zero(sorted(
                evaluate.missing(start, _records_at(workdir, start)) if start else [])))
            if missing:  # killed after this checkpoint, before its evaluations
                print(f"Running the evaluations of step {start} that did not finish: "
                      f"{', '.join(sorted(missing))}", flush=True)
                evaluate(start, state, only=missing)
            for step in range(start + 1, total_steps + 1):
                state, values = train_step(state, next(data))
                step_metrics.add(step, values)
                for action in loop_actions:
                    if action.due(step):
                        action(step, state)
            if stop.due(total_steps):  # a signal during the final evaluations
                stop(total_steps, state)
    finally:
        writer.close()
    final = _records_at(workdir, total_steps)
    summary = _summary(total_steps, final.get("loss"), data.skipped_everywhere(), began,
                       {k: v for k, v in final.items() if evaluate.is_result(k)})
    if jax.process_index() == 0:
        workdir_lib.write_json(workdir, workdir_lib.SUMMARY_FILE, summary)
    _print_summary(f"Summary ({workdir})", summary)
    return summary


def main():
    """Command line: flags are defined here, not at import, so modules import side-effect free."""
    config_flag = cli.define_flags("Checkpoints, metrics and TensorBoard events go here.")
    dry_run_flag = flags.DEFINE_bool(
        "dry_run", False, "Print each parameter's sharding and the train state's bytes per "
        "device on this mesh, then exit; nothing is allocated or written (--workdir optional).")

    def run():
        if dry_run_flag.value:
            try:
                text = dry_run.report(config_flag.value, cli.FLAGS.workdir)
            except config_lib.ConfigError as e:
                sys.exit(f"error: {e}")
            if jax.process_index() == 0:
                print(text, flush=True)
            return
        try:
            train(config_flag.value, cli.FLAGS.workdir)
        except actions.Interrupted as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            sys.exit(f"error: stopped by Ctrl-C without saving; the newest checkpoint is intact. "
                     f"{_rerun_hint(cli.FLAGS.workdir)}")
        except (config_lib.ConfigError, actions.NonFiniteError, checkpoint.CheckpointError,
                workdir_lib.WorkdirError, pipeline.CorruptDataError) as e:
            sys.exit(f"error: {e}")

    cli.run(run, workdir_required=lambda: not dry_run_flag.value)


if __name__ == "__main__":
    main()
