"""Zero-shot evaluation entrypoint: restore a checkpoint and run the config's evaluators.

  python -m big_contrast.evaluate --config configs/clip.py:demo --workdir /tmp/clip_demo [--step N]

Prints the metrics as a table and writes them to <workdir>/eval_<step>.json.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import flags

from big_contrast import checkpoint, cli, config as config_lib, evaluators, metrics
from big_contrast.experiment import Experiment


def evaluate(config, workdir: str, step: int | None = None, devices=None) -> dict:
    """Restores ``step`` (default: the newest checkpoint) and returns {metric: value}."""
    exp = Experiment(config, devices)
    ckpt = checkpoint.Checkpointer(workdir)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoints in {ckpt.directory}; train first")
    state = ckpt.restore(step, exp.state_factory.abstract())
    ckpt.close()
    evals = evaluators.build_evaluators(config.evals, exp.objective, exp.mesh, config.data,
                                        exp.tokenizer, config.eval_batch_size)
    if not evals:
        raise config_lib.ConfigError("the config declares no evaluators (config.evals is empty)")
    with jax.set_mesh(exp.mesh):
        results = evaluators.run_all(evals, state.params, state.model_state)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, **results}, f, indent=2)
    return {"step": step, **results}


def main():
    """Command line: flags are defined here, not at import, so modules import side-effect free."""
    config_flag = cli.define_flags("The training workdir holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")

    def run():
        try:
            results = evaluate(config_flag.value, cli.FLAGS.workdir, cli.FLAGS.step)
        except (config_lib.ConfigError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        step = results.pop("step")
        print(metrics.summary_table(f"Evaluation of {cli.FLAGS.workdir} at step {step}", results))

    cli.run(run)


if __name__ == "__main__":
    main()
