"""Suite-wide setup: four emulated CPU devices for the multi-device tests.

XLA reads the flag once, when jax is first imported, so it is set here,
before any test module imports jax. Single-device code is unaffected: it
runs on ``jax.devices()[0]``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
# On a loaded 2-core machine an emulated device can reach a collective tens of
# seconds after the others; XLA:CPU's default rendezvous timeout then aborts
# the whole process.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
