"""Evaluation entrypoint: restore a checkpoint's weights and run the config's evaluators.

  python -m big_contrast.evaluate --workdir /tmp/clip_demo [--step N] [--weights ema]
  python -m big_contrast.evaluate --workdir /tmp/clip_demo --config configs/clip.py:demo
  python -m big_contrast.evaluate --workdir /tmp/clip_demo --zero_shot /data/pets/val \
      [--class_names classes.txt] [--label_key label]

Without --config the run's own config (<workdir>/config.json) is used; a given config must
build the same model. Only the weights are read (parameters, batch statistics, their EMA), never
the optimizer state. --zero_shot replaces the config's evaluators by zero-shot classification of
your own labelled images: an image folder (one sub-folder per class) or a CSV/TSV/JSONL manifest
with an image column and a label column (class indices or names). Prints the metrics as a table
and writes them to <workdir>/eval_<step>.json.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from big_contrast import actions, checkpoint, cli, config as config_lib, evaluators, metrics
from big_contrast import workdir as workdir_lib
from big_contrast.experiment import Experiment
from big_contrast.train_state import TrainState


def run_config(workdir: str, config=None):
    """The config to evaluate with: the given one (checked against the run's), else the run's."""
    recorded = workdir_lib.read_config(workdir)
    if config is None:
        if recorded is None:
            raise config_lib.ConfigError(f"{workdir} has no {workdir_lib.CONFIG_FILE}; pass "
                                         "--config with the run's recipe")
        return config_lib.from_record(recorded)
    workdir_lib.check_weights_config(workdir, config)
    return config


def zero_shot_evals(path: str, label_key: str = "label", class_names_file: str = "",
                    num_examples: int = 10_000) -> dict:
    """config.evals for zero-shot classification of a labelled image folder or manifest."""
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"--zero_shot {path!r} does not exist")
    spec = {"type": "zero_shot", "split": "eval", "path": path, "label_key": label_key,
            "source": "image_folder" if os.path.isdir(path) else "manifest",
            "num_examples": num_examples}
    if class_names_file:
        spec["class_names_file"] = class_names_file
    return {"zero_shot": spec}


def restore_weights(exp: Experiment, workdir: str, step: int | None) -> tuple[int, TrainState]:
    """(step, a TrainState holding only params, model_state and ema) from the checkpoint."""
    ckpt = checkpoint.Checkpointer(workdir, create=False)
    try:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise checkpoint.CheckpointError(
                    f"no checkpoints in {ckpt.directory} (the run has not saved one yet)")
        abstract = exp.state_factory.abstract()
        fields = {"params": abstract.params, "model_state": abstract.model_state}
        if abstract.ema:
            fields["ema"] = abstract.ema
        restored = ckpt.restore_fields(step, fields)
    finally:
        ckpt.close()
    state = TrainState(step=step, params=restored["params"], opt_state=None,
                       model_state=restored["model_state"], rng=None, ema=restored.get("ema", {}))
    return step, state


def evaluate(config, workdir: str, step: int | None = None, devices=None,
             weights: str | None = None, evals: dict | None = None) -> dict:
    """Restores ``step`` (default: the newest checkpoint) and returns {metric: value}; with
    EMA weights their results carry the prefix 'ema/'. ``evals`` replaces config.evals."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise checkpoint.CheckpointError(f"the workdir {workdir} does not exist")
    config = run_config(workdir, config)
    if weights is not None or evals is not None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            if weights is not None:
                config.eval_weights = weights
            if evals is not None:
                config.evals = evals
    if not config.evals:
        raise config_lib.ConfigError("the config declares no evaluators (config.evals is empty)")
    exp = Experiment(config, devices, workdir=workdir)
    step, state = restore_weights(exp, workdir, step)
    evals = evaluators.build_evaluators(config.evals, exp.objective, exp.mesh, config.data,
                                        exp.tokenizer, config.eval_batch_size,
                                        initial_weights=exp.state_factory.initial_weights,
                                        rules=exp.rules)
    with jax.set_mesh(exp.mesh):
        results = actions.run_evaluations(evals, state, exp.eval_weights)
    if jax.process_index() == 0:
        workdir_lib.write_json(workdir, f"eval_{step}.json", {"step": step, **results})
    return {"step": step, **results}


def main():
    """Command line: flags are defined here, not at import, so modules import side-effect free."""
    config_flag = cli.define_flags("The training workdir holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
    flags.DEFINE_enum("weights", None, ["both", "online", "ema"],
                      "Which weights to evaluate (default: the config's eval_weights).")
    flags.DEFINE_string("zero_shot", None, "Zero-shot classification of these labelled images "
                        "instead of the config's evaluators: an image folder or a manifest.")
    flags.DEFINE_string("label_key", "label", "The manifest column holding the label.")
    flags.DEFINE_string("class_names", "", "A text file of class names, one per line, in label "
                        "order (default: folder names, or the sorted names in the manifest).")

    def run():
        f = cli.FLAGS
        try:
            evals = (zero_shot_evals(f.zero_shot, f.label_key, f.class_names)
                     if f.zero_shot else None)
            results = evaluate(config_flag.value, f.workdir, f.step, weights=f.weights,
                               evals=evals)
        except (config_lib.ConfigError, checkpoint.CheckpointError) as e:
            sys.exit(f"error: {e}")
        step = results.pop("step")
        if jax.process_index() == 0:
            print(metrics.summary_table(f"Evaluation of {cli.FLAGS.workdir} at step {step}", results))

    cli.run(run)


if __name__ == "__main__":
    main()
