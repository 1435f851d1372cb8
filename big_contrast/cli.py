"""Command-line plumbing shared by the entrypoints: the --config / --workdir flags, and flag
parsing that names a misspelt --config.<key> with the closest valid key."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from big_contrast import config as config_lib, distributed, host_memory

FLAGS = flags.FLAGS


_launch_flags: dict = {}


def define_flags(workdir_help: str):
    """Defines --config, --workdir and the multi-process launch flags (distributed.py);
    returns the config flag holder."""
    holder = config_flags.DEFINE_config_file(
        "config", None, "Recipe file and variant, e.g. configs/clip.py:demo", lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    _launch_flags.update(distributed.define_flags())
    return holder


def _config_argument(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv):
    """absl parsing; on failure, a one-line error naming the bad key (and a close valid one)."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError, ValueError, flags.Error) as e:
        config_arg = _config_argument(argv)
        if config_arg:
            try:
                config_lib.check_command_line_keys(config_arg, argv)
            except config_lib.ConfigError as named:
                sys.exit(f"error: {named}")
        sys.exit(f"error: {e}")


def _quiet_library_tracebacks(record: logging.LogRecord) -> bool:
    """Drops orbax's own error logs (with tracebacks from its background threads): the
    checkpointer reports the same failure as one clear error naming the step."""
    return not ("/orbax/" in record.pathname.replace("\\", "/") and record.levelno >= logging.ERROR)


def run(main, workdir_required=lambda: True) -> None:
    """app.run with our flag parser; keeps freed host memory for reuse (host_memory.py);
    requires --workdir unless ``workdir_required()`` (called after parsing) says otherwise;
    connects the processes of a multi-process run; quiets INFO logs of orbax/grain."""

    def checked_main(argv):
        host_memory.keep_freed_memory()  # before jax's CPU client exists
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]}")
        if not FLAGS.workdir and workdir_required():
            sys.exit("error: --workdir is required")
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("absl").addFilter(_quiet_library_tracebacks)
        launch = {name: holder.value for name, holder in _launch_flags.items()}
        try:
            distributed.initialize(launch["coordinator_address"], launch["num_processes"],
                                   launch["process_id"], force=launch["distributed"])
        except distributed.DistributedError as e:
            sys.exit(f"error: {e}")
        if distributed.process_index() > 0:  # one copy of the progress lines: process 0's
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
        main()

    app.run(checked_main, flags_parser=parse_flags)


def config_from_arguments(parser, path: str, settings: list[str]):
    """For argparse tools (benchmarks/, tools/): the recipe at ``path`` with ``settings``
    ('KEY=VALUE' strings) applied; a malformed setting, a misspelt key or a bad value ends the
    tool with one usage line naming it (argparse's parser.error), not a traceback."""
    malformed = [kv for kv in settings if "=" not in kv]
    if malformed:
        parser.error(f"--set takes KEY=VALUE, got {malformed}")
    try:
        config = config_lib.load_config_file(path)
        config_lib.apply_overrides(config, dict(kv.split("=", 1) for kv in settings))
    except config_lib.ConfigError as e:
        parser.error(str(e))
    return config
