"""``bnjax.BatchNorm``: a Flax linen drop-in for ``flax.linen.BatchNorm`` over :func:`bnjax.batch_norm`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bnjax.batchnorm import Axes, BatchNormState, Convention, batch_norm, init_state
from bnjax.statistics import AxisName, Sync

Initializer = Any


class BatchNorm(nn.Module):
    """Batch normalization with exact, numerically stable (cross-device) statistics.

    A drop-in for ``flax.linen.BatchNorm``: every field of Flax's (0.12), same ``__call__(x,
    use_running_average=None, *, mask=None)``, same variables (``params``: ``scale``, ``bias`` of shape
    ``[*feature_shape]`` and ``param_dtype``; ``batch_stats``: ``mean`` (zeros) and ``var`` (ones), float32, or
    ``param_dtype`` with ``force_float32_reductions=False``), and running statistics are not touched by ``init``.
    Variable trees are interchangeable with Flax's in both directions (e.g. through an Orbax checkpoint).

    Complex inputs are normalized as Flax does: complex mean, real variance ``E|x - mean|^2``, a complex output
    (``dtype=jnp.complex64`` or None); the running ``mean`` turns complex64 at the first training update and
    ``var`` stays float32, as Flax keeps them. This holds with ``mask`` and ``axis_name`` too.

    Differences from Flax, all deliberate: statistics are always computed stably (Flax's default
    ``use_fast_variance=True`` can be wrong by O(1) when ``|mean| >> std``); masked and cross-device
    statistics are exact count-weighted merges (Flax averages per-device means); a batch with no valid
    element, or with non-finite (NaN/Inf) statistics for a feature, leaves that feature's running statistics
    unchanged instead of making them NaN; ``momentum`` outside ``[0, 1]`` and ``epsilon <= 0`` are errors.

    Extra fields:
      convention: ``"flax"`` (default) or ``"torch"``. With ``"torch"``, ``momentum`` is the weight on the
        latest batch (PyTorch's ``momentum=0.1`` is Flax's ``0.9``), ``momentum=None`` is a cumulative
        average, the running variance is stored unbiased, and ``batch_stats`` also holds
        ``num_batches_tracked`` (int32 scalar), as in a PyTorch state dict.
      virtual_batch_size: ghost batch norm; see :func:`bnjax.batch_norm`.
      track_nonfinite: if True, ``batch_stats`` also holds ``nonfinite_batches`` (int32 scalar), the number
        of training steps whose batch statistics were non-finite (NaN/Inf) for some feature. Such features
        keep their running statistics either way (see :func:`bnjax.batch_norm`); the counter only makes
        it visible. Off by default, so the variables stay those of ``flax.linen.BatchNorm``.
      test_local_stats: if True, eval mode (``use_running_average=True``) normalizes with the statistics of
        the current batch, as train mode does, but never touches the running statistics and needs no
        mutable collection (Haiku's ``test_local_stats``): a check of how much the running statistics
        matter, without switching the rest of the model (dropout, ...) to train mode.

    Fields as in Flax:
      use_running_average: if True, normalize with the running statistics (eval mode).
      axis: feature axis or axes.
      momentum: decay of the running average (see ``convention``).
      epsilon: added to the variance.
      dtype: output dtype (None: promote input and parameter dtypes).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: whether to learn ``bias`` / ``scale``.
      bias_init, scale_init: their initializers.
      axis_name: device axis name(s) to merge statistics across (pmap / shard_map / vmap).
      axis_index_groups: groups of device indices within ``axis_name``.
      use_fast_variance: accepted for compatibility and ignored: bnjax always computes the exact variance
        (shifted sums, equivalent to the two-pass ``E|x - E[x]|^2``), which is Flax's
        ``use_fast_variance=False`` result at no extra cost; ``True`` and ``False`` give the same output.
      force_float32_reductions: statistics are always reduced in float32 or wider whatever this says (a
        no-op for the arithmetic). As in Flax it sets the dtype of ``batch_stats``: float32 when True
        (default), ``param_dtype`` when False, so variables still match Flax's.
      sync: how statistics are merged across ``axis_name``: ``"auto"`` (default), ``"gather"`` or
        ``"allreduce"``; see :func:`bnjax.batch_norm`. Updated ``batch_stats`` come out replicated, so
        ``nn.vmap(..., variable_axes={"batch_stats": None}, axis_name=...)`` and ``shard_map`` with
        ``out_specs=P()`` take them as they are.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: AxisName | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None
    use_fast_variance: bool = True  # no-op: the variance is always exact
    force_float32_reductions: bool = True  # no-op for the arithmetic; False stores batch_stats in param_dtype
    convention: Convention = "flax"
    virtual_batch_size: int | None = None
    track_nonfinite: bool = False
    test_local_stats: bool = False
    sync: Sync = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalize ``x`` (any shape; features on ``self.axis``, every other axis reduced).

        Args:
          x: the input.
          use_running_average: overrides the field of the same name.
          mask: optional boolean array broadcastable to ``x``: statistics over the ``True`` elements only.

        Returns:
          The normalized input, of ``x``'s shape.
        """
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        return self._normalize(batch_norm, x, use_running_average, mask, virtual_batch_size=self.virtual_batch_size)

    def _normalize(
        self,
        norm_fn: Callable[..., tuple[jax.Array, BatchNormState | None]],
        x: jax.Array,
        use_running_average: bool,
        mask: jax.Array | None,
        **kwargs: Any,
    ) -> jax.Array:
        """Create/read this layer's variables, call the functional ``norm_fn`` and store its new state.

        Shared by every module with BatchNorm's fields (``BatchRenorm`` passes ``batch_renorm``); ``kwargs``
        are the options specific to ``norm_fn``. Called from a ``@nn.compact`` method.
        """
        x = jnp.asarray(x)
        if isinstance(self.axis, (int, np.integer)):
            axes: tuple = (self.axis,)
        elif isinstance(self.axis, (tuple, list)):
            axes = tuple(self.axis)
        else:
            raise ValueError(f"axis must be an int or a tuple of ints (the feature axes); got {self.axis!r}.")
        # Shapes only, in ascending axis order as Flax orders them (axis=(2, 1) gives scale (x.shape[1],
        # x.shape[2])); norm_fn validates the axes themselves with a clear message.
        in_range = {int(a) % x.ndim for a in axes if isinstance(a, (int, np.integer)) and -x.ndim <= a < x.ndim}
        feature_shape = tuple(x.shape[a] for a in sorted(in_range))
        fresh = init_state(feature_shape, dtype=jnp.float32 if self.force_float32_reductions else self.param_dtype)
        if (
            self.convention == "torch"
            and self.has_variable("batch_stats", "mean")
            and not self.has_variable("batch_stats", "num_batches_tracked")
        ):
            raise ValueError(
                f"{self.name or type(self).__name__}: batch_stats has 'mean' and 'var' but no 'num_batches_tracked', "
                'which convention="torch" keeps (the cumulative average of momentum=None weighs by it; a counter '
                "created at 0 would replace the loaded statistics). These look like the variables of a "
                'convention="flax" layer, whose variance is the biased one: load PyTorch state with '
                "bnjax.torch_interop.from_torch, or add num_batches_tracked explicitly."
            )
        ra_mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        ra_var = self.variable("batch_stats", "var", lambda: fresh.var)
        count = nonfinite = None
        if self.convention == "torch":
            count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if self.track_nonfinite:
            nonfinite = self.variable("batch_stats", "nonfinite_batches", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

        state = BatchNormState(
            ra_mean.value,
            ra_var.value,
            None if count is None else count.value,
            None if nonfinite is None else nonfinite.value,
        )
        y, new_state = norm_fn(
            x,
            scale,
            bias,
            state,
            train=not use_running_average or self.test_local_stats,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            convention=self.convention,
            mask=mask,
            axis_name=None if self.is_initializing() else self.axis_name,
            axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
            sync=self.sync,
            **kwargs,
        )
        if self._updates_state(use_running_average):
            assert new_state is not None  # norm_fn returns a state when given one
            ra_mean.value = new_state.mean
            ra_var.value = new_state.var
            # The state carries a count (a nonfinite counter) exactly when the variable exists.
            if count is not None and new_state.count is not None:
                count.value = new_state.count
            if nonfinite is not None and new_state.nonfinite is not None:
                nonfinite.value = new_state.nonfinite
        return y

    def _updates_state(self, use_running_average: bool) -> bool:
        """Running statistics change in train mode, except during ``init`` (as in Flax)."""
        return not use_running_average and not self.is_initializing()
