"""``bnjax.nnx.BatchNorm``: the Flax NNX counterpart of :class:`bnjax.BatchNorm`, over :func:`bnjax.batch_norm`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnjax.batchnorm import Axes, BatchNormState, Convention, _check_options, batch_norm, init_state
from bnjax.statistics import AxisName, Sync, check_sync


class BatchNorm(nnx.Module):
    """NNX batch normalization with the semantics of :class:`bnjax.BatchNorm`.

    Same constructor as ``flax.nnx.BatchNorm`` (0.12; ``num_features`` is the size of the feature axis; for
    several feature axes pass a tuple of sizes), same attributes, same variables (``scale``/``bias`` as
    ``nnx.Param``, each from its own ``rngs.params()`` key as in Flax, ``mean``/``var`` as ``nnx.BatchStat``,
    float32), same ``__call__(x, use_running_average=None, *, mask=None)``, same ``set_view`` for
    ``nnx.view(model, use_running_average=...)``. Statistics are exact and stable, reduced in at least float32;
    the output dtype follows :func:`bnjax.batch_norm`. Complex inputs are normalized as in Flax (complex mean,
    real variance ``E|x - mean|^2``; ``mean`` turns complex64 at the first training update, ``var`` stays real,
    as Flax's linen module keeps them; Flax's NNX module writes the complex mean into its float32 variable,
    dropping the imaginary part with a JAX ``FutureWarning``, which bnjax does not copy).

    Flax arguments with a bnjax meaning of their own:

    * ``use_fast_variance``: accepted and ignored; the variance is always exact (Flax's
      ``use_fast_variance=False`` result).
    * ``promote_dtype``: None (default) casts nothing up front, exactly as :class:`bnjax.BatchNorm` (linen) and
      Flax's linen module do; Flax's NNX default, ``flax.nnx.nn.dtypes.promote_dtype``, first casts ``x``, the
      running statistics, ``scale`` and ``bias`` to one dtype (``dtype`` when given). Pass it (or any function
      of ``((x, mean, var, scale, bias), dtype=...)`` returning such a tuple) to get that casting; the
      batch statistics are still reduced in float32 or wider, the running variance stays real, and the
      running statistics are updated from their stored values (not the promoted copies, as in Flax: a
      bfloat16 copy would round small increments away), in at least the variable's dtype.
    * ``bias_metadata`` / ``scale_metadata``: metadata of the ``nnx.Param`` variables, as in Flax.

    Extra arguments: ``convention``, ``virtual_batch_size``, ``sync`` (the
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
        use_fast_variance: bool = True,
        promote_dtype: Callable[..., Any] | None = None,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        convention: Convention = "flax",
        virtual_batch_size: int | None = None,
        sync: Sync = "auto",
        track_nonfinite: bool = False,
    ):
        check_sync(sync)
        is_int = lambda n: isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))  # noqa: E731
        if is_int(num_features):
            shape: tuple[int, ...] = (int(num_features),)  # type: ignore[arg-type]  # narrowed by is_int
        elif isinstance(num_features, (tuple, list)) and num_features and all(is_int(n) for n in num_features):
            shape = tuple(int(n) for n in num_features)
        else:
            raise TypeError(
                f"num_features must be an int (or a tuple of ints for several feature axes); got {num_features!r}."
            )
        fresh = init_state(shape, with_count=convention == "torch", track_nonfinite=track_nonfinite)
        _check_options(momentum, epsilon, convention, fresh, dtype)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.num_batches_tracked = None if fresh.count is None else nnx.BatchStat(fresh.count)
        self.nonfinite_batches = None if fresh.nonfinite is None else nnx.BatchStat(fresh.nonfinite)
        # One key each, drawn in Flax's order, so a swapped model draws the same keys for every later layer.
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata) if use_scale else None
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata) if use_bias else None
        self.num_features = num_features
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.use_fast_variance = use_fast_variance  # no-op: the variance is always exact
        self.promote_dtype = promote_dtype
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
        mean, var = self.mean[...], self.var[...]
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if self.promote_dtype is not None:
            x, p_mean, p_var, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
            if use_running_average:  # eval normalizes with the promoted statistics, as Flax does
                mean, var = p_mean, jnp.real(p_var)  # the variance is real even where promotion made all complex
            # Train mode updates the running statistics from the stored values, as Flax's NNX BatchNorm does: from
            # a bfloat16 copy, small increments would round away and the averages stall.
        y, new = batch_norm(
            x,
            scale,
            bias,
            BatchNormState(mean, var, count, nonfinite),
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
            _store(self.mean, new.mean)
            _store(self.var, new.var)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked[...] = new.count
            if self.nonfinite_batches is not None:
                self.nonfinite_batches[...] = new.nonfinite
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``, as in Flax: sets the attribute when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _store(variable: nnx.Variable, value: jax.Array) -> None:
    """Write an updated running statistic, in at least the variable's dtype (``promote_dtype`` may have cast
    the statistics down); a complex batch mean replaces a real variable's value instead of being cast to it."""
    value = jax.lax.stop_gradient(value.astype(jnp.promote_types(variable.dtype, value.dtype)))
    if value.dtype == variable.dtype:
        variable[...] = value
    else:
        variable.set_value(value)
