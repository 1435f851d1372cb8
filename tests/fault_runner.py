"""Runs the training entrypoint with a fault injected, for tests/test_faults.py:

  python -m tests.fault_runner HOOK -- <big_contrast.train flags>

Hooks:
  pause_commit:STEP  once checkpoint STEP's files are written, print PAUSED_MARKER and wait
                     before committing it (the test kills the process there)
  fail_commit:STEP   the commit of checkpoint STEP fails with an OSError (a full disk)
  die_in_eval        the process kills itself (SIGKILL) when the first evaluation starts
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
    else:
        raise SystemExit(f"unknown hook {hook!r}")
    from big_contrast import train

    sys.argv = [sys.argv[0], *flags]
    train.main()


if __name__ == "__main__":
    main()
