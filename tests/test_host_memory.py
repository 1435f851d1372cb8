"""host_memory.keep_freed_memory: XLA:CPU's scratch buffer is reused from one execution to the
next instead of being mapped (and page-faulted in) afresh each time."""

import json
import subprocess
import sys

import pytest

from big_contrast import host_memory

# Runs a jitted function with a large scratch buffer 40 times and reports the median of the
# minor page faults of the last 20 executions (the heap's layout settles in the first ones;
# a later execution now and then still maps a fresh region), and the buffer's size in pages.
_PROBE = """
import json, resource, statistics, sys
from big_contrast import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp

def chain(x):  # about 50 MiB of scratch, few FLOPs
    a = jnp.sin(x)
    b = a @ x[:, :256]
    return jnp.sum(jnp.cos(a).T @ b) + jnp.sum(a * a.T)

x = jnp.ones((2048, 2048), jnp.float32) * 1e-3
compiled = jax.jit(chain).lower(x).compile()
temp_pages = compiled.memory_analysis().temp_size_in_bytes // 4096
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "temp_pages": temp_pages,
                  "faults": statistics.median(faults[20:])}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scratch_memory_is_reused_instead_of_faulted_in_every_execution():
    kept = _probe("keep")
    if not kept["kept"]:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    default = _probe("default")
    assert default["temp_pages"] >= 8192  # a scratch buffer of at least 32 MiB
    # By default every execution faults its whole scratch buffer in again; kept, almost none.
    assert default["faults"] > 0.8 * default["temp_pages"]
    assert kept["faults"] < 0.05 * kept["temp_pages"]


def test_is_a_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False
