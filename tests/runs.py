"""Command-line runs for tests: start an entrypoint in a subprocess (on 2 fake CPU devices),
wait for a step or a printed line, and read back the losses it logged."""

import os
import subprocess
import sys
import threading
import time

from big_contrast import metrics
from tests.helpers import REPO

ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}


def command(config: str, workdir_path, *flags, entrypoint="train", hook=None) -> list[str]:
    """The entrypoint's command line; with ``hook``, run through tests/fault_runner.py."""
    prefix = ([sys.executable, "-m", "tests.fault_runner", hook, "--"] if hook
              else [sys.executable, "-m", f"big_contrast.{entrypoint}"])
    return [*prefix, "--config", config, "--workdir", str(workdir_path), *flags]


def run(config: str, workdir_path, *flags, **kwargs) -> subprocess.CompletedProcess:
    """Runs an entrypoint to completion; returns the CompletedProcess (text output)."""
    return subprocess.run(command(config, workdir_path, *flags, **kwargs), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def start(config: str, workdir_path, *flags, **kwargs) -> subprocess.Popen:
    """Starts an entrypoint in the background; stdout is a pipe, stderr goes to a file (read
    it with stderr_of) so that neither can fill up and block the run."""
    os.makedirs(workdir_path, exist_ok=True)
    stderr = open(os.path.join(workdir_path, "..", f"{os.path.basename(workdir_path)}.stderr"),
                  "w", encoding="utf-8")
    proc = subprocess.Popen(command(config, workdir_path, *flags, **kwargs), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    proc.stderr_path = stderr.name
    return proc


def stderr_of(proc) -> str:
    with open(proc.stderr_path, encoding="utf-8") as f:
        return f.read()


def wait_for_line(proc, marker: str, timeout: float = 300) -> None:
    """Reads the run's stdout on a thread until a line contains ``marker``."""
    found = threading.Event()

    def read():
        for line in proc.stdout:
            if marker in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError(f"the run never printed {marker!r}")


def losses(workdir_path) -> dict:
    """{step: training loss} from the run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir_path,
                                                                          "metrics.jsonl"))
            if "loss" in r}


def wait_for_step(proc, workdir_path, step, checkpoint_step=None) -> None:
    """Waits until ``step`` is logged (and checkpoint ``checkpoint_step`` committed)."""
    committed = os.path.join(workdir_path, "checkpoints", str(checkpoint_step))
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if max([0] + list(losses(workdir_path))) >= step and (
                checkpoint_step is None or os.path.isdir(committed)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {step}")
