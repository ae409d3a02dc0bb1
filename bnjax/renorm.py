"""Batch renormalization (Ioffe 2017): batch statistics corrected toward the running ones.

In train mode, per feature, with batch moments ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and running
``mu``, ``sigma = sqrt(running_var + eps)``::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = scale * ((x - mu_B) / sigma_B * r + d) + bias

Gradients flow through ``mu_B`` and ``sigma_B`` as in batch norm, while ``r`` and ``d`` are constants. With
``r_max = 1, d_max = 0`` this is batch norm; without clipping, ``y`` is the eval-mode output, so training
and inference agree. The running statistics are updated exactly as by :func:`bnjax.batch_norm` (same
``momentum``/``convention``; this keeps the running *variance*, where the paper averages ``sigma``).
Eval mode is plain eval-mode batch norm. Moments come from :func:`bnjax.batch_moments`: exact, stable,
masked and merged across ``axis_name`` like the rest of bnjax.

The paper warms up with ``r_max = 1, d_max = 0`` for 5k steps, then relaxes linearly to ``r_max = 3`` at 40k
steps and ``d_max = 5`` at 25k: :func:`paper_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax import lax

from bnjax import statistics
from bnjax._validate import check_scalar
from bnjax.batchnorm import (
    Axes,
    BatchNormState,
    Convention,
    _check_inputs,
    _check_options,
    _layout,
    _stats_dtype,
    _update,
    _usable,
    batch_moments,
    batch_norm,
)
from bnjax.module import BatchNorm
from bnjax.statistics import AxisName, Sync

Bound = float | jax.Array
Schedule = Callable[[jax.Array], jax.Array]


def paper_schedule() -> tuple[Schedule, Schedule]:
    """``(r_max(step), d_max(step))`` of Ioffe 2017 (§4.1), as ``optax.linear_schedule`` schedules of the step."""
    r_max = optax.linear_schedule(1.0, 3.0, transition_steps=35_000, transition_begin=5_000)
    d_max = optax.linear_schedule(0.0, 5.0, transition_steps=20_000, transition_begin=5_000)
    return r_max, d_max


def _check_bound(name: str, value: Bound, low: float) -> None:
    check_scalar(value, name, low=low, finite=False, hint=" A float, or a traced scalar from a schedule.")


def batch_renorm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    state: BatchNormState,
    *,
    train: bool,
    r_max: Bound = 3.0,
    d_max: Bound = 5.0,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    convention: Convention = "flax",
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: Any = None,
    sync: Sync = "auto",
) -> tuple[jax.Array, BatchNormState]:
    """Batch renormalization as a pure function; arguments as in :func:`bnjax.batch_norm`, plus:

    Args:
      state: running statistics, required in both modes (``r`` and ``d`` compare against them).
      r_max: bound ``>= 1`` on the variance correction ``r`` (a float, or a traced scalar, e.g. from a
        schedule inside ``jit``).
      d_max: bound ``>= 0`` on the mean correction ``d`` (likewise).

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape (dtype as in :func:`bnjax.batch_norm`); in train mode the
      running statistics updated from the batch moments, in eval mode ``state`` unchanged.
    """
    if state is None:
        raise ValueError("batch_renorm needs `state` (running statistics) in train and eval mode.")
    _check_bound("r_max", r_max, 1.0)
    _check_bound("d_max", d_max, 0.0)
    _check_options(momentum, epsilon, convention, state, dtype)
    if not train:
        y, _ = batch_norm(
            x,
            scale,
            bias,
            state,
            train=False,
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            convention=convention,
            dtype=dtype,
            sync=sync,
        )
        return y, state  # eval mode leaves the state as it is
    x = jnp.asarray(x)
    layout = _layout(x, axis, None, train=True, devices=statistics.merged_devices(axis_name, axis_index_groups))
    _check_inputs(x, scale, bias, state, mask, layout.feature_shape)
    mom = batch_moments(x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, sync=sync)
    acc = _stats_dtype(x.dtype)
    bshape = mom.count.shape
    run_mean = state.mean.reshape(bshape).astype(acc)
    run_var = state.var.reshape(bshape).astype(acc)
    # No valid element anywhere, or non-finite statistics: fall back to the running statistics (r = 1, d = 0,
    # state unchanged), as batch_norm does.
    have = _usable(mom)
    offset = jnp.where(have, mom.offset, run_mean - mom.shift)
    var = jnp.where(have, mom.var, run_var)
    inv_sigma_b = lax.rsqrt(var + epsilon)
    inv_sigma = lax.rsqrt(run_var + epsilon)
    r_max = jnp.asarray(r_max, acc)
    d_max = jnp.asarray(d_max, acc)
    r = lax.stop_gradient(jnp.clip(inv_sigma / inv_sigma_b, 1.0 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip(((mom.shift - run_mean) + offset) * inv_sigma, -d_max, d_max))
    y = ((x.astype(acc) - mom.shift) - offset) * (inv_sigma_b * r) + d
    dtypes = [x.dtype]
    if scale is not None:
        y = y * scale.reshape(bshape)
        dtypes.append(jnp.result_type(scale))
    if bias is not None:
        y = y + bias.reshape(bshape)
        dtypes.append(jnp.result_type(bias))
    new_state = _update(state, mom, layout, momentum, convention)
    return y.astype(jnp.result_type(*dtypes) if dtype is None else dtype), new_state


class BatchRenorm(BatchNorm):
    """Flax module for :func:`batch_renorm`, with the fields and variables of :class:`bnjax.BatchNorm`.

    Extra fields:
      r_max: bound on ``r``: a float, or a schedule ``step -> r_max`` (e.g. from :func:`paper_schedule`).
      d_max: bound on ``d``: a float or a schedule.

    When either bound is a schedule, ``batch_stats`` also holds ``step`` (int32 scalar, the number of train
    calls so far), the schedules' argument. With ``test_local_stats=True``, eval mode computes the train-mode
    output (batch statistics, corrected by ``r``, ``d``) and updates nothing. ``virtual_batch_size`` is not
    supported.
    """

    r_max: float | Schedule = 3.0
    d_max: float | Schedule = 5.0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        r_max: Bound | None = None,
        d_max: Bound | None = None,
    ) -> jax.Array:
        """Renormalize ``x`` (features on ``self.axis``).

        ``r_max``/``d_max`` given here (floats or traced scalars) override the fields and their schedules.
        """
        if self.virtual_batch_size is not None:
            raise ValueError(
                f"BatchRenorm does not support virtual_batch_size (got {self.virtual_batch_size}); use None."
            )
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        step = None
        if callable(self.r_max) or callable(self.d_max):
            step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))

        def bound(given, field):
            if given is not None:
                return given
            return field(step.value) if callable(field) else field

        y = self._normalize(
            batch_renorm,
            x,
            use_running_average,
            mask,
            r_max=bound(r_max, self.r_max),
            d_max=bound(d_max, self.d_max),
        )
        if step is not None and self._updates_state(use_running_average):
            step.value = step.value + 1
        return y
