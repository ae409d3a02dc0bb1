"""bnjax: trustworthy batch normalization for JAX/Flax, and loss-landscape / curvature analysis.

Public surface:
  batch_norm, batch_moments, BatchNormState, init_state  -- the functional core (no Flax inside)
  Moments                                                -- per-feature moments and their exact merge
  BatchNorm                                              -- Flax linen drop-in for flax.linen.BatchNorm
  nnx.BatchNorm                                          -- the Flax NNX counterpart
"""

from bnjax import nnx
from bnjax.batchnorm import BatchNormState, batch_moments, batch_norm, init_state
from bnjax.module import BatchNorm
from bnjax.statistics import Moments

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormState",
    "Moments",
    "batch_moments",
    "batch_norm",
    "init_state",
    "nnx",
]
