"""The functional batch normalization: a pure function of the input, parameters and explicit running state.

No hidden state and no Flax in here; :class:`bnjax.BatchNorm` only maps Flax variables onto
:func:`batch_norm`. See ``statistics.py`` for how moments are accumulated and merged across devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax import statistics
from bnjax._validate import check_bool, check_scalar
from bnjax.statistics import AxisName, Moments, Sync

Axes = int | Sequence[int]
Convention = Literal["flax", "torch"]


class BatchNormState(NamedTuple):
    """Running statistics of one batchnorm layer.

    Attributes:
      mean: ``float32[*feature_shape]``, running mean (complex64 once a complex batch has updated it, as in
        Flax).
      var: ``float32[*feature_shape]``, running variance (biased in the Flax convention, unbiased in PyTorch's);
        always real, ``E|x - mean|^2`` for complex inputs.
      count: ``int32[]`` number of training batches seen (PyTorch's ``num_batches_tracked``), or None. Only
        needed for ``convention="torch"`` with ``momentum=None`` (cumulative average).
      nonfinite: ``int32[]`` number of training updates whose batch statistics were non-finite (NaN or Inf) for
        at least one feature, whose running statistics were therefore kept as they were; or None (not
        tracked). A cheap health check: it stays 0 while every batch is finite.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array | None = None  # type: ignore[assignment]  # shadows tuple.count; public field name
    nonfinite: jax.Array | None = None


def init_state(
    feature_shape: Sequence[int],
    *,
    with_count: bool = False,
    track_nonfinite: bool = False,
    dtype: Any = jnp.float32,
) -> BatchNormState:
    """Running statistics at initialization: mean 0, variance 1 (and count 0 when ``with_count``).

    ``track_nonfinite`` adds the ``nonfinite`` counter (int32 0) of :class:`BatchNormState`. ``dtype`` is the
    mean's dtype (float32 by default, as in Flax; a complex dtype for a complex scan carry); the variance
    takes its real counterpart.
    """
    shape = (feature_shape,) if isinstance(feature_shape, (int, np.integer)) else tuple(feature_shape)
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ValueError(f"feature_shape must be a sequence of non-negative ints, got {feature_shape!r}.")
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"dtype must be a floating-point or complex dtype for the running mean, got {dtype!r}.")
    count = jnp.zeros((), jnp.int32) if with_count else None
    nonfinite = jnp.zeros((), jnp.int32) if track_nonfinite else None
    shape = tuple(int(d) for d in shape)
    mean = jnp.zeros(shape, dtype)
    return BatchNormState(mean, jnp.ones(shape, statistics.real_dtype(mean.dtype)), count, nonfinite)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static description of how ``x`` is reduced, derived once from its shape and the options."""

    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    group_size: int | None  # ghost-batch size along the first reduction axis, or None


def _layout(
    x: jax.Array | jax.ShapeDtypeStruct,
    axis: Axes,
    virtual_batch_size: int | None,
    train: bool,
    devices: int = 1,
) -> _Layout:
    """``devices``: how many devices' elements are pooled (see :func:`statistics.merged_devices`), so that one
    element per device (``vmap`` over single examples, ``pmap`` with one example per device) is allowed."""
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    if not isinstance(axis, (tuple, list)):
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
    given = []
    for a in axis:
        if not isinstance(a, (int, np.integer)) or isinstance(a, (bool, np.bool_)):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
        a = int(a)
        if not -x.ndim <= a < x.ndim:
            raise ValueError(
                f"axis={a} is out of range for an input of rank {x.ndim} (shape {x.shape}); expected an "
                f"axis in [-{x.ndim}, {x.ndim - 1}]."
            )
        given.append(a % x.ndim)
    if len(set(given)) != len(given):
        raise ValueError(f"axis={axis!r} names the same axis twice for an input of shape {x.shape}.")
    feature_axes = tuple(sorted(given))
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    if not reduction_axes:
        raise ValueError(
            f"axis={axis!r} leaves no axis to reduce for an input of shape {x.shape}: batch norm needs a "
            "batch axis besides the feature axes."
        )
    n_reduced = 1
    for a in reduction_axes:
        n_reduced *= x.shape[a]
    if train and n_reduced == 0:
        raise ValueError(
            f"batch norm in train mode got an empty batch: the input of shape {x.shape} has no element to "
            f"reduce along the axes {reduction_axes} (feature axes {tuple(sorted(feature_axes))}), so there "
            "are no batch statistics. Skip empty batches, or pad them and pass a `mask` (an all-False mask "
            "keeps the running statistics)."
        )
    group_size = None
    if virtual_batch_size is not None:  # validated always; used in train mode only (eval has no batch stats)
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}.")
        batch = x.shape[reduction_axes[0]]
        if train and batch % virtual_batch_size:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} does not divide the batch: the input has "
                f"{batch} entries along axis {reduction_axes[0]} (shape {x.shape}). Pad the batch or "
                "choose a divisor."
            )
        if train:
            group_size = virtual_batch_size
            n_reduced = n_reduced // batch * virtual_batch_size
    if train and n_reduced * devices == 1:
        raise ValueError(
            f"batch norm in train mode needs more than one element per feature, but the input of shape "
            f"{x.shape} with feature axes {feature_axes} has exactly one"
            + (f" per ghost batch (virtual_batch_size={virtual_batch_size})" if group_size else "")
            + ": the variance would be 0 and every output would equal the bias. Use a larger batch, or eval "
            "mode with the running statistics (use_running_average=True, and test_local_stats=False where set)."
        )
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    return _Layout(feature_axes, reduction_axes, feature_shape, group_size)


def _check_inputs(x, scale, bias, state, mask, feature_shape):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"x must be a floating-point array, got dtype {x.dtype} (complex dtypes are accepted too). Cast it "
            "first, e.g. x.astype(jnp.float32)."
        )
    named = [("scale", scale), ("bias", bias)]
    if state is not None:
        if not isinstance(state, BatchNormState):
            raise TypeError(
                f"state must be a BatchNormState (from init_state, or the module's batch_stats); got "
                f"{type(state).__name__}."
            )
        named += [("state.mean", state.mean), ("state.var", state.var)]
        for name, value in named[2:]:
            if not jnp.issubdtype(jnp.result_type(value), jnp.inexact):
                raise TypeError(
                    f"{name} has dtype {jnp.result_type(value)}; running statistics must be floating point (an "
                    "integer state would truncate every update). Build it with init_state."
                )
    for name, value in named:
        if value is not None and tuple(jnp.shape(value)) != feature_shape:
            raise ValueError(
                f"{name} has shape {tuple(jnp.shape(value))} but the input of shape {x.shape} has feature "
                f"shape {feature_shape} along the feature axes; they must match."
            )
    if mask is not None:
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(
                f"mask must be a boolean array, got dtype {jnp.result_type(mask)}. Statistics use the True elements "
                "(a mask selects, it does not weight): pass `mask != 0` for a 0/1 mask."
            )
        try:
            broadcast = jnp.broadcast_shapes(jnp.shape(mask), x.shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {jnp.shape(mask)} is not broadcastable to the input shape {x.shape}."
            ) from None
        if broadcast != x.shape:
            raise ValueError(
                f"mask of shape {jnp.shape(mask)} would broadcast the input of shape {x.shape} to a larger "
                "shape; it must be broadcastable to the input shape."
            )


def _check_options(momentum: float | None, epsilon: float, convention: Convention, state, dtype: Any = None) -> None:
    """Trace-time checks of the hyper-parameters shared by :func:`batch_norm` and :func:`bnjax.batch_renorm`."""
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"dtype (the output dtype) must be a floating-point or complex dtype, got {np.dtype(dtype)}: a "
            "normalized output cast to integers would be truncated to a few values."
        )
    if convention not in ("flax", "torch"):
        raise ValueError(f'convention must be "flax" or "torch", got {convention!r}.')
    if momentum is None:
        if not (convention == "torch" and (state is None or state.count is not None)):
            raise ValueError(
                "momentum=None (cumulative average) needs convention='torch' and a state with a batch count "
                "(init_state(..., with_count=True))."
            )
    else:
        what = "the weight on the old running value" if convention == "flax" else "the weight on the new batch"
        check_scalar(momentum, "momentum", low=0.0, high=1.0, hint=f" With convention={convention!r} it is {what}.")
    check_scalar(
        epsilon,
        "epsilon",
        low=0.0,
        low_open=True,
        hint=" It keeps 1/sqrt(var + epsilon) finite for a constant feature; Flax's default is 1e-5.",
    )


def _usable(mom: Moments) -> jax.Array:
    """bool, ``mom``'s shape: the batch statistics exist (a valid element) and are finite."""
    return (mom.count > 0) & jnp.isfinite(mom.offset) & jnp.isfinite(mom.m2)


def _stats_dtype(x_dtype) -> jnp.dtype:
    """Statistics accumulate in at least float32 (bfloat16/float16 inputs are promoted; complex64 stays)."""
    return jnp.promote_types(x_dtype, jnp.float32)


def _grouped(a: jax.Array, layout: _Layout) -> jax.Array:
    """Split the first reduction axis into (groups, group_size) when ghost batches are used."""
    if layout.group_size is None:
        return a
    ax = layout.reduction_axes[0]
    g = layout.group_size
    return a.reshape(a.shape[:ax] + (a.shape[ax] // g, g) + a.shape[ax + 1 :])


def _ungrouped(a: jax.Array, layout: _Layout) -> jax.Array:
    if layout.group_size is None:
        return a
    ax = layout.reduction_axes[0]
    return a.reshape(a.shape[:ax] + (a.shape[ax] * a.shape[ax + 1],) + a.shape[ax + 2 :])


def batch_moments(
    x: jax.Array,
    *,
    axis: Axes = -1,
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    virtual_batch_size: int | None = None,
    sync: Sync = "auto",
) -> Moments:
    """Global per-feature moments of ``x`` (merged across ``axis_name`` when given, by ``sync``).

    The result's fields have ``x``'s rank with reduced axes kept as size 1 (with ghost batches, the first
    reduction axis is split into ``(groups, 1)``). Use ``Moments.mean`` / ``Moments.var`` for the statistics.
    """
    x = jnp.asarray(x)
    devices = statistics.merged_devices(axis_name, axis_index_groups)
    layout = _layout(x, axis, virtual_batch_size, train=True, devices=devices)
    _check_inputs(x, None, None, None, mask, layout.feature_shape)
    return _moments(x, layout, mask, axis_name, axis_index_groups, sync)


def _moments(x, layout, mask, axis_name, axis_index_groups, sync) -> Moments:
    xs = _grouped(x.astype(_stats_dtype(x.dtype)), layout)
    m = None if mask is None else _grouped(jnp.broadcast_to(mask, x.shape), layout)
    axes = layout.reduction_axes
    if layout.group_size is not None:
        # The first reduction axis became (groups, members): groups are kept, members and every later
        # reduction axis (all of which come after it) move up by one.
        axes = tuple(a + 1 for a in axes)
    local = statistics.local_moments(xs, axes, m)
    return statistics.global_moments(local, axis_name, axis_index_groups, sync)


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    state: BatchNormState | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    convention: Convention = "flax",
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    virtual_batch_size: int | None = None,
    dtype: Any = None,
    sync: Sync = "auto",
) -> tuple[jax.Array, BatchNormState | None]:
    """Batch normalization as a pure function.

    ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` per feature, where the feature axes are ``axis``
    and ``mean``/``var`` are taken over every other axis (batch, and spatial axes of convolutions).

    Args:
      x: input of any float or complex dtype, e.g. (N, C), (N, W, C), (N, H, W, C) or channels-first with
        ``axis=1``. For complex ``x`` (as in Flax) the mean is complex and the variance real,
        ``E|x - mean|^2``; ``scale`` and ``bias`` may be real or complex.
      scale: optional ``[*feature_shape]`` multiplier (omitted means 1).
      bias: optional ``[*feature_shape]`` offset (omitted means 0).
      state: running statistics (:class:`BatchNormState`); required when ``train=False``. In train mode
        with ``state=None`` no running statistics are updated and ``None`` is returned for them.
      train: True normalizes with the batch statistics and updates ``state``; False normalizes with the
        running statistics and returns ``state`` unchanged.
      axis: feature axis or axes (negative allowed).
      momentum: with ``convention="flax"`` (default) the weight on the *old* running value,
        ``new = momentum * old + (1 - momentum) * batch``. With ``convention="torch"`` the weight on the
        *latest batch*, ``new = (1 - momentum) * old + momentum * batch``, and ``None`` means a cumulative
        (equal-weight) average over the batches seen (needs ``state.count``). A number in ``[0, 1]``.
      epsilon: added to the variance before the square root; a finite number ``> 0``.
      convention: ``"flax"`` stores the biased batch variance; ``"torch"`` stores the unbiased one
        (``n / (n - 1)``), as PyTorch does, and counts batches in ``state.count`` when it is not None.
      mask: optional boolean array broadcastable to ``x``; statistics use the ``True`` elements only (all
        elements are still normalized). If no element is valid (globally), the batch statistics fall back to
        the running ones, so outputs stay finite and the running statistics stay unchanged. With
        ``state=None`` there are none to fall back to: such a feature gets mean 0 and variance 0, so its
        outputs are ``x / sqrt(epsilon)`` (times ``scale``, plus ``bias``), finite on purpose so that fully
        masked padding cannot turn a masked loss's gradient NaN; Flax returns NaN there.
      axis_name: device axis name (or tuple of names) bound by ``pmap``/``shard_map``/``vmap``; statistics are
        an exact count-weighted merge across it. Leave None under plain ``jit`` with sharded arrays.
      axis_index_groups: optional groups of device indices along ``axis_name`` to merge within.
      virtual_batch_size: ghost batch norm: normalize consecutive sub-batches of this size along the first
        reduction axis separately (merged across ``axis_name`` sub-batch by sub-batch). The running
        statistics are updated with the count-weighted average of the sub-batches' means and variances.
      dtype: output dtype; None promotes ``x``'s dtype with those of ``scale`` and ``bias`` (as Flax does).
      sync: how statistics are merged across ``axis_name``: ``"gather"`` (one ``all_gather``, traffic
        growing with the device count), ``"allreduce"`` (two ``psum`` rounds, traffic independent of it) or
        ``"auto"`` (gather only while ``4 * devices * features`` is at most 4096 floats); both are exact and give
        the same results. See :func:`bnjax.statistics.global_moments` and :func:`~bnjax.statistics.choose_sync`.

    Returns:
      ``(y, new_state)``: ``y`` has ``x``'s shape; statistics are computed in float32 or wider. With
      ``axis_name``, ``new_state`` is the same on every device and typed so (not mapped under ``vmap``,
      invariant under ``shard_map``): it can leave a ``shard_map`` through ``out_specs=P()`` as it is.

    Non-finite batches (guarded running statistics). In train mode, a feature whose (global) batch mean or
    variance is not finite (a NaN or Inf among its valid elements, or a variance overflowing float32) keeps
    its running statistics, and ``state.count`` only advances when some feature was updated. Its outputs are
    normalized with the running statistics (as with an all-False mask) when ``state`` is given, so only the
    non-finite elements themselves come out non-finite; with ``state=None`` the feature's outputs are NaN.
    ``state.nonfinite``, when tracked (``init_state(..., track_nonfinite=True)``), counts such updates.

    Raises:
      ValueError/TypeError at trace time: momentum outside ``[0, 1]``, ``epsilon <= 0``, an empty batch in
      train mode, mismatched shapes, bad axes or masks, an unknown ``sync`` (see README, "Failure behaviour").
    """
    x = jnp.asarray(x)
    train = check_bool(train, "train")
    _check_options(momentum, epsilon, convention, state, dtype)
    statistics.check_sync(sync)
    devices = statistics.merged_devices(axis_name, axis_index_groups) if train else 1
    layout = _layout(x, axis, virtual_batch_size, train, devices)
    _check_inputs(x, scale, bias, state, mask, layout.feature_shape)

    shape = [1] * x.ndim
    for a, s in zip(layout.feature_axes, layout.feature_shape):
        shape[a] = s
    bshape = tuple(shape)
    acc = _stats_dtype(x.dtype)
    acc_real = statistics.real_dtype(acc)  # the variance's dtype (real also for complex inputs)

    if train:
        # Work in the grouped layout (a no-op without ghost batches): broadcast shapes gain a size-1 axis.
        bshape = _grouped_shape(bshape, layout)
        mom = _moments(x, layout, mask, axis_name, axis_index_groups, sync)
        offset, var = mom.offset, mom.var
        if state is not None:
            # No valid element anywhere, or non-finite statistics (a NaN/Inf in the batch): normalize that
            # feature with the running statistics, which the update below leaves unchanged.
            have = _usable(mom)
            offset = jnp.where(have, offset, state.mean.reshape(bshape).astype(acc) - mom.shift)
            var = jnp.where(have, var, state.var.reshape(bshape).astype(acc_real))
        # y = ((x - K) - offset) * mul + bias, written as one multiply-add per element on the small x - K
        # (K is the merged shift, the same on every device, so every statistic below is device-invariant).
        xc = _grouped(x.astype(acc), layout) - mom.shift
        mul = lax.rsqrt(var + epsilon)
        new_state = None if state is None else _update(state, mom, layout, momentum, convention)
    else:
        if state is None:
            raise ValueError("train=False normalizes with the running statistics, so `state` is required.")
        xc = x.astype(acc) - state.mean.reshape(bshape).astype(acc)
        mul = lax.rsqrt(state.var.reshape(bshape).astype(acc_real) + epsilon)
        offset = None
        new_state = state

    dtypes = [x.dtype]
    if scale is not None:
        mul = mul * scale.reshape(bshape)
        dtypes.append(jnp.result_type(scale))
    add = None if offset is None else -offset * mul
    if bias is not None:
        b = bias.reshape(bshape)
        add = b if add is None else add + b
        dtypes.append(jnp.result_type(bias))
    y = xc * mul if add is None else xc * mul + add
    if train:
        y = _ungrouped(y, layout)
    out_dtype = jnp.result_type(*dtypes) if dtype is None else dtype
    return y.astype(out_dtype), new_state


def _grouped_shape(shape: Sequence[int], layout: _Layout) -> tuple[int, ...]:
    """A broadcast shape (size 1 on reduction axes) in the grouped layout."""
    shape = tuple(shape)
    if layout.group_size is None:
        return shape
    ax = layout.reduction_axes[0]
    return shape[:ax] + (1, 1) + shape[ax + 1 :]


def _update(
    state: BatchNormState, mom: Moments, layout: _Layout, momentum: float | None, convention: Convention
) -> BatchNormState:
    """EWMA (or cumulative) update of the running statistics from the batch moments."""
    feature_dims = _feature_dims(layout)
    axes = tuple(i for i in range(mom.count.ndim) if i not in feature_dims)
    var_g = mom.var
    if convention == "torch":
        var_g = mom.m2 / jnp.maximum(mom.count - 1.0, 1.0)
    # Count-weighted average over ghost batches (the identity for a single group).
    total = jnp.sum(mom.count, axis=axes, keepdims=True)
    w = mom.count / jnp.maximum(total, 1.0)
    batch_mean = jnp.sum(w * mom.mean, axis=axes).reshape(layout.feature_shape)
    batch_var = jnp.sum(w * var_g, axis=axes).reshape(layout.feature_shape)
    seen = total.reshape(layout.feature_shape) > 0
    # Guard: a feature whose batch statistics are non-finite (NaN/Inf input, or an overflowing variance)
    # keeps its running statistics, instead of carrying the NaN forever.
    finite = jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    have = seen & finite

    if convention == "flax":
        assert momentum is not None  # _check_options: the Flax convention takes a float momentum
        new_mean = momentum * state.mean + (1.0 - momentum) * batch_mean
        new_var = momentum * state.var + (1.0 - momentum) * batch_var
    else:
        if momentum is None:
            assert state.count is not None  # _check_options: momentum=None needs a batch count
            w_new: jax.Array | float = 1.0 / (state.count.astype(jnp.float32) + 1.0)
        else:
            w_new = momentum
        new_mean = (1.0 - w_new) * state.mean + w_new * batch_mean
        new_var = (1.0 - w_new) * state.var + w_new * batch_var
    mean_dtype = state.mean.dtype
    if jnp.iscomplexobj(batch_mean) and not jnp.iscomplexobj(state.mean):
        mean_dtype = jnp.promote_types(mean_dtype, jnp.complex64)  # a complex batch makes it complex, as in Flax
    new_mean = jnp.where(have, new_mean, state.mean).astype(mean_dtype)
    new_var = jnp.where(have, new_var, state.var).astype(state.var.dtype)
    count = state.count
    if count is not None:
        count = count + jnp.any(have).astype(count.dtype)
    nonfinite = state.nonfinite
    if nonfinite is not None:
        nonfinite = nonfinite + jnp.any(seen & ~finite).astype(nonfinite.dtype)
    return BatchNormState(new_mean, new_var, count, nonfinite)


def _feature_dims(layout: _Layout) -> tuple[int, ...]:
    """Axes of the (possibly grouped) moments that carry features."""
    if layout.group_size is None:
        return layout.feature_axes
    ax = layout.reduction_axes[0]
    return tuple(a + 1 if a > ax else a for a in layout.feature_axes)
