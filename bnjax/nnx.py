"""``bnjax.nnx.BatchNorm``: the Flax NNX counterpart of :class:`bnjax.BatchNorm`, over :func:`bnjax.batch_norm`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bnjax.batchnorm import Axes, BatchNormState, Convention, _check_options, batch_norm, init_state
from bnjax.statistics import AxisName, Sync, check_sync


class BatchNorm(nnx.Module):
    """NNX batch normalization with the semantics of :class:`bnjax.BatchNorm`.

    Same constructor as ``flax.nnx.BatchNorm`` (``num_features`` is the size of the feature axis; for several
    feature axes pass a tuple of sizes), same variables (``scale``/``bias`` as ``nnx.Param``, ``mean``/``var`` as
    ``nnx.BatchStat``, float32), same ``__call__(x, use_running_average=None, *, mask=None)``. Statistics are
    exact and stable (no ``use_fast_variance``), reduced in at least float32; the output dtype follows
    :func:`bnjax.batch_norm`. Extra arguments: ``convention``, ``virtual_batch_size``, ``sync`` (the
    cross-device merge, see :func:`bnjax.batch_norm`) and ``track_nonfinite`` (adds the ``nnx.BatchStat``
    ``nonfinite_batches``, int32: the number of training steps whose batch statistics were non-finite for some
    feature; those features keep their running statistics either way). With ``axis_name``, the updated
    ``mean``/``var`` are replicated, so ``nnx.vmap`` with the module broadcast (``in_axes=None``) and
    ``nnx.shard_map`` with ``P()`` for its state accept them. Hyper-parameters are validated here, at
    construction, with the messages of :func:`bnjax.batch_norm`.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: Axes = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = nnx.initializers.zeros,
        scale_init: Any = nnx.initializers.ones,
        axis_name: AxisName | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        convention: Convention = "flax",
        virtual_batch_size: int | None = None,
        sync: Sync = "auto",
        track_nonfinite: bool = False,
        rngs: nnx.Rngs,
    ):
        check_sync(sync)
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        fresh = init_state(shape, with_count=convention == "torch", track_nonfinite=track_nonfinite)
        _check_options(momentum, epsilon, convention, fresh)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.num_batches_tracked = None if fresh.count is None else nnx.BatchStat(fresh.count)
        self.nonfinite_batches = None if fresh.nonfinite is None else nnx.BatchStat(fresh.nonfinite)
        key = rngs.params()
        self.scale = nnx.Param(scale_init(key, shape, param_dtype)) if use_scale else None
        self.bias = nnx.Param(bias_init(key, shape, param_dtype)) if use_bias else None
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.convention = convention
        self.virtual_batch_size = virtual_batch_size
        self.sync = sync

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize ``x`` (features on ``self.axis``); in train mode the batch statistics are updated in place."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average is None: pass it to the constructor or to __call__.")
        count = None if self.num_batches_tracked is None else self.num_batches_tracked[...]
        nonfinite = None if self.nonfinite_batches is None else self.nonfinite_batches[...]
        state = BatchNormState(self.mean[...], self.var[...], count, nonfinite)
        y, new = batch_norm(
            x,
            None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            state,
            train=not use_running_average,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            convention=self.convention,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            virtual_batch_size=self.virtual_batch_size,
            dtype=self.dtype,
            sync=self.sync,
        )
        if not use_running_average:
            assert new is not None  # batch_norm returns a state when given one
            self.mean[...] = jax.lax.stop_gradient(new.mean)
            self.var[...] = jax.lax.stop_gradient(new.var)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked[...] = new.count
            if self.nonfinite_batches is not None:
                self.nonfinite_batches[...] = new.nonfinite
        return y
