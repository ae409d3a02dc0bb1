"""Test configuration: 8 forced CPU devices and strict rank promotion.

The device count must be set before JAX initialises its backends, so it happens here, at import time of the
test session, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
