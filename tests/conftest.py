"""Session-wide test setup.

Forces 8 host (CPU) devices so that sharding tests can build a fake mesh, e.g.
``jax.make_mesh((2, 4), ("data", "model"))``. XLA reads ``XLA_FLAGS`` once,
when jax first initialises its backends, so this must run before any test
module imports jax; pytest imports this file first (also in each xdist worker,
which inherits the environment). Every other test keeps running on device 0.
An existing ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), _DEVICE_COUNT_FLAG) if f
  )
