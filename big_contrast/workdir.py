"""What a workdir records about its run, and which config changes a resume may make.

  <workdir>/config.json   the config the run was trained with (rewritten after accepted changes)
  <workdir>/summary.json  the summary of a finished run: final loss and evaluation results

A rerun compares its config with config.json: keys that change what is trained (model,
objective, batch, optimizer, data) must match; keys that only change how the run is carried
out (its length, logging, checkpoints, evaluation, the mesh, data loading speed) may change.
"""

from __future__ import annotations

import json
import os

from big_contrast.config import ConfigError, base_config

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
# A word vocabulary built by the code rather than read from text.model_path: stored with the
# run, so that resume and evaluate map words to the ids the weights were trained with.
VOCABULARY_FILE = "vocabulary.json"

# Dotted keys (or prefixes ending in '.') that a resumed run may change.
RESUME_SAFE = (
    "total_steps", "total_examples", "total_epochs", "log_every", "checkpoint_every",
    "keep_checkpoints", "eval_batch_size", "eval_weights", "tensorboard", "evals.", "mesh.",
    "sharding_rules",
    "data.num_workers", "data.prefetch", "data.read_threads", "data.worker_buffer_size",
    "data.max_corrupt_fraction", "debug.",
    # How the loss is computed, not what: the same value and gradients (GradCache draws dropout
    # per micro-batch, so a run with dropout continues with other masks).
    "loss.block_size", "grad_cache.",
)

# What fixes the weights a checkpoint holds: evaluation must agree on these and nothing else.
DEFINES_WEIGHTS = ("objective", "model.", "text.", "data.image_size", "ema_decay",
                   "swav.queue_length")


class WorkdirError(RuntimeError):
    """A workdir that cannot be used for this run; the message says why and what to do."""


def prepare(workdir: str) -> str:
    """Creates the workdir if needed and checks it can be written; returns its absolute path."""
    path = os.path.abspath(workdir)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"cannot write to the workdir {path}: {e.strerror or e}") from e
    return path


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {'optim.lr': 0.001, ...}; lists and tuples compare as lists."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".")
               for p in patterns)


def differences(recorded: dict, config) -> dict:
    """{dotted key: (recorded value, new value)} for every key that differs. A key that the
    recorded run predates counts as recorded with its default (which was the behaviour before
    the key existed), so adding a key never strands an older workdir."""
    defaults = flatten(json.loads(base_config().to_json()))
    old, new = {**defaults, **flatten(recorded)}, flatten(json.loads(config.to_json()))
    same = lambda k: json.dumps(old.get(k, "<absent>")) == json.dumps(new.get(k, "<absent>"))  # noqa: E731 (NaN == NaN)
    return {k: (old.get(k, "<absent>"), new.get(k, "<absent>"))
            for k in sorted(set(old) | set(new)) if not same(k)}


def _describe(changed: dict) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def read_json(workdir: str, name: str) -> dict | None:
    """workdir/name parsed, or None when the run has not written it."""
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_config(workdir: str) -> dict | None:
    return read_json(workdir, CONFIG_FILE)


def check_resume(workdir: str, config) -> dict:
    """Compares config with the workdir's recorded one; raises ConfigError for unsafe changes,
    returns the safe ones (empty for a new workdir)."""
    recorded = read_config(workdir)
    if recorded is None:
        return {}
    changed = differences(recorded, config)
    unsafe = {k: v for k, v in changed.items() if not _matches(k, RESUME_SAFE)}
    if unsafe:
        raise ConfigError(
            f"{workdir} holds a run of a different configuration ({_describe(unsafe)}); use a "
            f"new --workdir, or the recorded config ({os.path.join(workdir, CONFIG_FILE)})")
    return changed


def check_weights_config(workdir: str, config) -> None:
    """For evaluation: the config must build the weights the checkpoint holds."""
    recorded = read_config(workdir)
    if recorded is None:
        return
    changed = {k: v for k, v in differences(recorded, config).items()
               if _matches(k, DEFINES_WEIGHTS)}
    if changed:
        raise ConfigError(
            f"the config does not build the model trained in {workdir} ({_describe(changed)}); "
            f"evaluate with that run's config ({os.path.join(workdir, CONFIG_FILE)}, the default "
            "when --config is left out)")


def write_json(workdir: str, name: str, payload: dict) -> None:
    """Writes workdir/name atomically (a kill never leaves half a file)."""
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)


def remove(workdir: str, name: str) -> None:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
        os.remove(path)


def write_config(workdir: str, config) -> None:
    write_json(workdir, CONFIG_FILE, json.loads(config.to_json()))


def read_summary(workdir: str) -> dict | None:
    return read_json(workdir, SUMMARY_FILE)


def stored_vocabulary(workdir: str | None) -> str | None:
    """The path of the run's stored vocabulary, if it has one."""
    path = workdir and os.path.join(workdir, VOCABULARY_FILE)
    return path if path and os.path.isfile(path) else None


def store_vocabulary(workdir: str, tokenizer) -> None:
    """Writes a built-in word vocabulary into the workdir the first time the run starts."""
    if hasattr(tokenizer, "save") and stored_vocabulary(workdir) is None:
        tokenizer.save(os.path.join(workdir, VOCABULARY_FILE))
