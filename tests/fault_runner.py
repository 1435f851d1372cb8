"""Runs the training entrypoint with a fault injected, for tests/test_faults.py:

  python -m tests.fault_runner HOOK -- <big_contrast.train flags>

Hooks:
  pause_commit:STEP  once checkpoint STEP's files are written, print PAUSED_MARKER and wait
                     before committing it (the test kills the process there)
  fail_commit:STEP   the commit of checkpoint STEP fails with an OSError (a full disk)
  die_in_eval        the process kills itself (SIGKILL) when the first evaluation starts
  dump_state:STEP:F  after saving checkpoint STEP, every process gathers the whole train state
                     and process 0 writes its leaves to the .npz file F (multi-process tests)
"""

import os
import signal
import sys
import time

PAUSED_MARKER = "FAULT_RUNNER: checkpoint written, commit paused"


def _patch_commit(step: int, action) -> None:
    """Wraps orbax's commit of an asynchronous save (the rename that publishes a step)."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    real = async_checkpointer._on_commit_callback

    def commit(tmpdir, checkpoint_start_time):
        name = os.path.basename(str(tmpdir.get()))
        if name.split(".")[0] == str(step):
            action()
        return real(tmpdir, checkpoint_start_time)

    async_checkpointer._on_commit_callback = commit


def _pause():
    print(PAUSED_MARKER, flush=True)
    time.sleep(600)


def _fail():
    raise OSError(28, "No space left on device (injected)")


def _die_in_eval() -> None:
    from big_contrast import actions

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    actions.Evaluate.__call__ = die


def _dump_state(step: int, path: str) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from big_contrast import checkpoint

    real = checkpoint.Checkpointer.save

    def save(self, at, state, data_iterator=None):
        real(self, at, state, data_iterator)
        if at == step:
            whole = multihost_utils.process_allgather(state, tiled=True)
            if jax.process_index() == 0:
                np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(whole)])

    checkpoint.Checkpointer.save = save


def main():
    hook, separator, *flags = sys.argv[1:]
    assert separator == "--", "usage: fault_runner HOOK -- FLAGS"
    name, _, arg = hook.partition(":")
    if name == "pause_commit":
        _patch_commit(int(arg), _pause)
    elif name == "fail_commit":
        _patch_commit(int(arg), _fail)
    elif name == "die_in_eval":
        _die_in_eval()
    elif name == "dump_state":
        at, _, path = arg.partition(":")
        _dump_state(int(at), path)
    else:
        raise SystemExit(f"unknown hook {hook!r}")
    from big_contrast import train

    sys.argv = [sys.argv[0], *flags]
    train.main()


if __name__ == "__main__":
    main()
