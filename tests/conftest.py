"""Test-wide setup: 8 fake CPU devices (before JAX initialises), a compilation cache shared
with the command-line runs the tests start, and parsed absl flags.

grain 0.2.18 reads an absl flag in its worker code; flags must count as parsed outside
absl.app (google/grain#1355).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Subprocesses inherit these: identical train steps compile once per test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="big_contrast_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
