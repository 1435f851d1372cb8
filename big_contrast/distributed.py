"""Several processes (TPU VM hosts, GPU hosts, SLURM tasks, or local processes on one CPU) as one
run, through jax.distributed, and the few host-side agreements the trainer needs between them.

  python -m big_contrast.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=I

Without flags, jax.distributed.initialize() runs when the environment describes a multi-process
job (JAX_COORDINATOR_ADDRESS, a SLURM job of several tasks, several TPU VM workers) or when
--distributed is given (other clusters that jax detects, e.g. Open MPI); a plain single-machine
run does not initialize it at all.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags


class DistributedError(RuntimeError):
    """The processes of a run could not be connected; the message says what to check."""


def define_flags() -> dict:
    """The launch flags both entrypoints take; returns their holders by name."""
    return {
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0's coordinator, reachable by "
            "every process (with --num_processes and --process_id)"),
        "num_processes": flags.DEFINE_integer("num_processes", None,
                                              "How many processes the run has"),
        "process_id": flags.DEFINE_integer("process_id", None,
                                           "This process's index, 0 .. num_processes - 1"),
        "distributed": flags.DEFINE_bool(
            "distributed", False, "Call jax.distributed.initialize() and let jax detect the "
            "cluster (needed only where the environment is not recognised automatically)"),
    }


def _multi_process_environment() -> str | None:
    """What in the environment says this is one process of several, or None."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "a SLURM job of several tasks"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "several TPU VM workers (TPU_WORKER_HOSTNAMES)"
    return None


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, force: bool = False) -> bool:
    """Connects this process to the others when asked to (flags) or when the environment is a
    multi-process job; returns whether jax.distributed was initialized."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    explicit = [name for name, value in given.items() if value is not None]
    if explicit and len(explicit) < 3:
        missing = [f"--{name}" for name in given if name not in explicit]
        raise DistributedError(f"--{explicit[0]} needs {' and '.join(missing)} as well: give the "
                               "coordinator's host:port, the number of processes and this "
                               "process's index")
    if explicit and not _is_host_port(coordinator_address):
        # Checked here: jax's coordinator crashes the process (a segmentation fault on CPU)
        # when it cannot parse the port it is to listen on.
        raise DistributedError(f"--coordinator_address={coordinator_address} is not host:port "
                               "(a port number from 1 to 65535), e.g. host0:12345")
    if explicit and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} is not in 0 .. "
                               f"{num_processes - 1} (--num_processes={num_processes})")
    reason = "flags" if explicit else "--distributed" if force else _multi_process_environment()
    if reason is None:
        return False
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DistributedError(f"jax.distributed.initialize ({reason}) failed: {e}. Check that "
                               "every process was started with the same coordinator address and "
                               "number of processes and that the coordinator's port is "
                               "reachable") from None
    return True


def process_index() -> int:
    return jax.process_index()


def allgather_json(value) -> list:
    """[value of process 0, value of process 1, ...] for a JSON-serialisable value; every
    process must call it at the same point."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)])) for row, n in zip(gathered, lengths.ravel())]


def from_process_zero(value):
    """Process 0's ``value`` on every process (collective), for decisions that must agree,
    e.g. ones read from files that only process 0 writes."""
    return allgather_json(value)[0]
