"""Test-wide setup: 8 fake CPU devices (before JAX initialises) and parsed absl flags.

grain 0.2.18 reads an absl flag in its worker code; flags must count as parsed outside
absl.app (google/grain#1355).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
