"""train --dry_run: the sharding report of a config's train state on this machine's devices,
built from the abstract state: no data read, no state allocated, nothing written.

What a dry run cannot know here it reports instead of stopping: a tokenizer that cannot be
built (a paper recipe's SentencePiece model elsewhere) is stood in for by the 'words'
tokenizer, which sizes the text embedding by text.vocab_size; an epoch-based training length
whose source cannot be opened is reported as unknown (the length only sets the learning-rate
schedule, never a shape).
"""

from __future__ import annotations

import copy

from big_contrast import config as config_lib, sharding_report
from big_contrast.data import sources
from big_contrast.experiment import Experiment, build_tokenizer, example_batch


def _stand_in_tokenizer(config, workdir: str | None):
    """(config, note): the config unchanged if its tokenizer builds, else a copy that uses
    'words' and a line saying why."""
    try:
        build_tokenizer(config, workdir)
        return config, None
    except (OSError, ValueError) as e:
        note = (f"text.tokenizer {config.text.tokenizer!r} cannot be built here, and a "
                f"training run would stop: {e}. The text embedding is sized by "
                f"text.vocab_size = {config.text.vocab_size:,} instead.")
        config = copy.deepcopy(config)
        config_lib.apply_overrides(config, {"text.tokenizer": "words"})
        return config, note


def _examples_per_epoch(config):
    """(examples per epoch, note) for an epoch-based training length: the training source's
    size, or when it cannot be opened a stand-in of one batch per epoch and a line saying why.
    Any failure counts: the length is only reported."""
    if config.total_epochs is None:
        return None, None
    try:
        return sources.num_examples(sources.build_source(config.data,
                                                         config.data.train_split)), None
    except Exception as e:  # missing files, a dataset library not installed: see above
        first_line = str(e).partition("\n")[0]
        reason = f"{type(e).__name__}: {first_line}"
        return config.batch_size, (f"Training length: unknown, the training source cannot be "
                                   f"opened ({reason})")


def report(config, workdir: str | None = None, devices=None) -> str:
    """The printed dry run: the objective and mesh, one line per parameter, per-device totals,
    the training length and what was stood in. Raises ConfigError as training would."""
    config, tokenizer_note = _stand_in_tokenizer(config, workdir)
    examples_per_epoch, length_note = _examples_per_epoch(config)
    exp = Experiment(config, devices, examples_per_epoch=examples_per_epoch, workdir=workdir)
    logical = sharding_report.logical_axes(
        exp.objective, example_batch(exp.objective.batch_spec, config.text.max_len), exp.mesh,
        exp.rules)
    result = sharding_report.build_report(exp.state_factory.abstract(), exp.mesh, logical)
    length = length_note or (f"Training length: {exp.total_steps:,} steps of "
                             f"{config.batch_size:,} ({exp.warmup_steps:,} warmup)")
    platform = exp.mesh.devices.flat[0].platform
    return "\n".join([f"Dry run of {config.objective} on {platform}: nothing is allocated or "
                      "written", "", sharding_report.format_report(result), length,
                      *([f"Note: {tokenizer_note}"] if tokenizer_note else [])])
