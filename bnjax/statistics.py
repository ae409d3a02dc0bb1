"""Per-feature moments of a batch: local shifted sums and an exact count-weighted merge across devices.

One routine serves every case bnjax supports: a single device, masks, ghost (virtual) batches and named
device axes (``pmap``, ``shard_map``, ``vmap(axis_name=...)``). Nothing here knows about Flax.

Numerics. Moments are accumulated around a per-feature *shift* ``K`` (the mean of the first sample's valid
elements), which costs no extra pass over the data: ``d = mean(x - K)`` and ``M2 = sum((x - K - d)^2)``.
Because ``x - K`` is small and (for ``x`` and ``K`` within a factor of two) exact in floating point, the
statistics do not suffer the catastrophic cancellation of ``E[x^2] - E[x]^2``, and the caller can normalize
as ``((x - K) - d) / sigma`` without ever rounding the mean itself to the input's precision.

Cross-device merge. Each device contributes ``(count, shift, offset, M2)``; the merge is Chan et al.'s
parallel formula, carried out on every device relative to its *own* shift, so each device gets the exact
global ``mean - K_local`` and ``M2``. Devices (or sub-batches) with no valid element contribute nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Any  # a hashable axis name or a tuple of them


class Moments(NamedTuple):
    """Per-feature moments relative to a shift; every field has the same shape (``keepdims`` layout).

    Fields:
      count: number of valid elements reduced, float32.
      shift: the shift ``K`` the moments are taken around (no gradient flows through it).
      offset: ``mean - shift``.
      m2: sum of squared deviations from the mean, ``sum((x - mean)^2)``.
    """

    count: jax.Array
    shift: jax.Array
    offset: jax.Array
    m2: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset

    @property
    def var(self) -> jax.Array:
        """Biased variance ``m2 / count``; 0 where ``count == 0``."""
        return self.m2 / jnp.maximum(self.count, 1.0)


def local_moments(
    x: jax.Array,
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
) -> Moments:
    """Moments of ``x`` over ``reduction_axes``, keeping reduced axes with size 1.

    Args:
      x: array in the accumulation dtype (float32 or wider).
      reduction_axes: non-negative axes to reduce; the first one is the "sample" axis whose first entry
        provides the shift.
      mask: optional boolean array of ``x``'s shape; ``False`` elements are ignored.

    Returns:
      :class:`Moments` whose fields have ``x``'s shape with ``reduction_axes`` set to 1.
    """
    axes = tuple(reduction_axes)
    first = axes[0]
    x_first = _first_entry(x, first)
    if mask is None:
        shift = jnp.mean(x_first, axis=axes, keepdims=True)
        count = jnp.full(shift.shape, _size(x.shape, axes), x.dtype)
    else:
        m_first = _first_entry(mask, first)
        n_first = jnp.sum(m_first, axis=axes, keepdims=True, dtype=x.dtype)
        shift = jnp.sum(jnp.where(m_first, x_first, 0), axis=axes, keepdims=True) / jnp.maximum(n_first, 1)
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype)
    # A non-finite first sample must not make every other sample's x - K non-finite too: callers fall back
    # to the running statistics for such features and normalize the finite samples with them.
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    xc = x - shift
    if mask is not None:
        xc = jnp.where(mask, xc, 0)
    offset, m2 = _shifted_moments(xc, axes, count)
    return Moments(count, shift, offset, m2)


# Overflow guard at no extra cost: squares are summed as (x - K) * 2^-16, an exact power-of-two scaling, and
# scaled back once per feature. x - K in float32 can exceed sqrt(float32 max) ~ 1.8e19 while the variance is
# far below the float32 maximum; the scaled sum of squares, m2 + n * offset^2 <= (n + 1) * m2 scaled by
# 2^-32, cannot overflow while m2 fits and n < 2^32. The price: squares of |x - K| below 2^-47 (~7e-15)
# underflow, which only matters for variances below ~1e-28, far under any epsilon. Results are otherwise
# bit-identical to the unscaled sums.
_SQUARE_SCALE = 2.0**-16


def _shifted_moments(xc: jax.Array, axes: tuple[int, ...], count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(offset, m2)`` of the shifted values ``xc`` (masked entries already 0) over ``axes``, overflow-safe."""
    n = jnp.maximum(count, 1.0)
    s1 = jnp.sum(xc, axis=axes, keepdims=True)
    xs = xc * _SQUARE_SCALE
    s2_scaled = jnp.sum(xs * xs, axis=axes, keepdims=True)
    offset = s1 / n
    # sum((xc - offset)^2) = s2 - s1 * offset; |offset| is about one std, so this loses at most a bit or two.
    s1_scaled = s1 * _SQUARE_SCALE
    m2_scaled = jnp.maximum(s2_scaled - s1_scaled * (s1_scaled / n), 0.0)
    return offset, m2_scaled * (1.0 / _SQUARE_SCALE**2)


def merge_moments(stacked: Moments, local_shift: jax.Array, axis: int = 0) -> Moments:
    """Chan's parallel merge of moments stacked along ``axis``, expressed relative to ``local_shift``.

    Args:
      stacked: :class:`Moments` with one entry per part along ``axis``.
      local_shift: the shift the merged moments are expressed around (shape of one part).
      axis: the axis of ``stacked`` that enumerates the parts.

    Returns:
      Merged :class:`Moments` with ``shift = local_shift``. Parts with ``count == 0`` contribute nothing.
    """
    n_i = stacked.count
    # Mean of part i relative to our shift; shifts are close to each other, so the difference is exact-ish.
    e_i = (stacked.shift - jnp.expand_dims(local_shift, axis)) + stacked.offset
    n = jnp.sum(n_i, axis=axis)
    offset = jnp.sum(n_i * e_i, axis=axis) / jnp.maximum(n, 1.0)
    dev = jnp.where(n_i > 0, e_i - jnp.expand_dims(offset, axis), 0.0)
    m2 = jnp.sum(stacked.m2 + n_i * dev * dev, axis=axis)
    return Moments(n, local_shift, offset, m2)


def global_moments(
    local: Moments,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Merge ``local`` moments across the named device axes (identity when ``axis_name`` is None).

    One ``all_gather`` of the four moment arrays (per axis name); its transpose (a reduce-scatter) makes the backward pass
    use the global reductions too, so gradients match single-device batchnorm on the global batch.

    ``axis_index_groups`` (a partition of the linear device indices along ``axis_name``) is applied after a
    gather over the whole axis, by giving the parts outside this device's group a count of zero: the same
    code then works under ``pmap``, ``shard_map`` and ``vmap`` (whose ``all_gather`` rejects groups), and the
    extra traffic is a few floats per feature and device.
    """
    if axis_name is None:
        return local
    check_axis_name(axis_name)
    packed = jnp.stack(local, axis=0)
    # One gather per name, last name first: the parts then come out in the row-major device order of
    # lax.axis_index(axis_name). (JAX's batching rule rejects all_gather over a tuple that includes a vmap axis.)
    gathered = packed
    for name in reversed(_names(axis_name)):
        gathered = lax.all_gather(gathered, name, axis=0)
    gathered = gathered.reshape((-1,) + packed.shape)
    parts = Moments(*(gathered[:, i] for i in range(4)))
    if axis_index_groups is not None:
        same_group = _same_group_table(axis_index_groups, gathered.shape[0])
        member = jnp.asarray(same_group)[lax.axis_index(axis_name)]
        member = member.reshape((-1,) + (1,) * local.count.ndim)
        parts = parts._replace(
            count=jnp.where(member, parts.count, 0.0), m2=jnp.where(member, parts.m2, 0.0)
        )
    return merge_moments(parts, local.shift, axis=0)


def _same_group_table(axis_index_groups: Sequence[Sequence[int]], axis_size: int) -> np.ndarray:
    """bool[axis_size, axis_size]: whether devices i and j are in the same group; validates the groups."""
    flat = [i for group in axis_index_groups for i in group]
    if sorted(flat) != list(range(axis_size)):
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} must partition the device indices 0..{axis_size - 1} "
            f"along the axis (each index in exactly one group), got the indices {sorted(flat)}."
        )
    group_of = np.empty(axis_size, np.int64)
    for g, group in enumerate(axis_index_groups):
        group_of[list(group)] = g
    return group_of[:, None] == group_of[None, :]


def check_axis_name(axis_name: AxisName) -> None:
    """Raise a ValueError naming ``axis_name`` when it is not bound by an enclosing pmap/shard_map/vmap."""
    for name in _names(axis_name):
        try:
            lax.axis_index(name)
        except NameError as err:
            raise ValueError(
                f"axis_name={axis_name!r}: the axis {name!r} is not bound. Call batch norm inside "
                f"jax.pmap(..., axis_name={name!r}), jax.shard_map over a mesh with that axis, or "
                f"jax.vmap(..., axis_name={name!r}); with plain jax.jit over sharded arrays use "
                "axis_name=None (global statistics come out automatically)."
            ) from err


def _names(axis_name: AxisName) -> tuple:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _first_entry(a: jax.Array, axis: int) -> jax.Array:
    """``a``'s entry 0 along ``axis`` (kept as size 1), also when that axis is sharded over an Explicit mesh.

    ``jax.make_mesh`` builds Explicit axes by default, and under ``jit`` a static slice of size 1 along a
    sharded axis is a sharding type error; a gather with a replicated ``out_sharding`` is allowed (it lowers
    to a dynamic slice on the owning device plus a tiny all-reduce).
    """
    sharding = getattr(jax.typeof(a), "sharding", None)
    spec = () if sharding is None else tuple(sharding.spec)
    if axis >= len(spec) or spec[axis] is None:
        return lax.slice_in_dim(a, 0, 1, axis=axis)
    out_spec = jax.sharding.PartitionSpec(*spec[:axis], None, *spec[axis + 1 :])
    index = (slice(None),) * axis + (jnp.zeros((1,), jnp.int32),)
    return a.at[index].get(out_sharding=jax.sharding.NamedSharding(sharding.mesh, out_spec))


def _size(shape: Sequence[int], axes: Sequence[int]) -> int:
    size = 1
    for a in axes:
        size *= shape[a]
    return size
