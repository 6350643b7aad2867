"""Suite-wide setup: four emulated CPU devices for the multi-device tests.

XLA reads the flag once, when jax is first imported, so it is set here,
before any test module imports jax. Single-device code is unaffected: it
runs on ``jax.devices()[0]``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
