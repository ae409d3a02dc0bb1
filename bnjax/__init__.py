"""bnjax: trustworthy batch normalization for JAX/Flax, and loss-landscape / curvature analysis.

Public surface (implementation modules are named for what they do):

Batch normalization
  batch_norm, batch_moments, BatchNormState, init_state  -- the functional core (no Flax inside)
  Moments                                                -- per-feature moments and their exact merge
  BatchNorm                                              -- Flax linen drop-in for flax.linen.BatchNorm
  nnx.BatchNorm                                          -- the Flax NNX counterpart
  equinox.BatchNorm                                      -- the Equinox counterpart (``import bnjax.equinox``;
                                                            needs the ``equinox`` extra, not imported here)
  NoisyBatchNorm, noisy_batch_norm, add_nonstationary_noise  -- BN + STIM18 non-stationary noise
  BatchRenorm, batch_renorm                              -- batch renormalization (Ioffe 2017)
  precise_batch_stats                                    -- exact population statistics ("precise BN")
  fold_batch_norm                                        -- fold eval-mode BN into Dense/Conv
  train_only_batch_norm                                  -- optimizer for fine-tuning BN scale/bias only
  torch_interop.from_torch / to_torch                    -- PyTorch BN state dicts (NumPy, no torch)

Process settings
  retain_freed_memory  -- keep freed memory in the process on Linux CPUs (XLA:CPU buffers stop page-faulting);
                          call it before JAX's first computation (``bnjax.allocator``)

Frameworks
  as_functional, Functional  -- an NNX module or Equinox (model, state) as a linen-style (apply, variables),
                                the form every model-level helper below takes

Analysis
  curvature  -- HVP/GGN products, chunked data-set operators, eigen-solvers, trace/density, EoS tracker
  landscape  -- smoothness measures, internal covariate shift, activation statistics, loss slices
"""

from bnjax import allocator, curvature, landscape, loops, nnx, torch_interop
from bnjax.adapters import Functional, as_functional
from bnjax.allocator import retain_freed_memory
from bnjax.batchnorm import BatchNormState, batch_moments, batch_norm, init_state
from bnjax.folding import fold_batch_norm
from bnjax.frozen import train_only_batch_norm
from bnjax.module import BatchNorm
from bnjax.noisy import NoisyBatchNorm, add_nonstationary_noise, noisy_batch_norm
from bnjax.precise import precise_batch_stats
from bnjax.renorm import BatchRenorm, batch_renorm
from bnjax.statistics import Moments

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormState",
    "BatchRenorm",
    "Functional",
    "Moments",
    "NoisyBatchNorm",
    "add_nonstationary_noise",
    "allocator",
    "as_functional",
    "batch_moments",
    "batch_norm",
    "batch_renorm",
    "curvature",
    "fold_batch_norm",
    "init_state",
    "landscape",
    "loops",
    "noisy_batch_norm",
    "nnx",
    "precise_batch_stats",
    "retain_freed_memory",
    "torch_interop",
    "train_only_batch_norm",
]
