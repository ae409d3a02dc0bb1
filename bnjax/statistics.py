"""Per-feature moments of a batch: local shifted sums and an exact count-weighted merge across devices.

One routine serves every case bnjax supports: a single device, masks, ghost (virtual) batches and named
device axes (``pmap``, ``shard_map``, ``vmap(axis_name=...)``). Nothing here knows about Flax.

Numerics. Moments are accumulated around a per-feature *shift* ``K`` (the mean of the first sample's valid
elements), which costs no extra pass over the data: ``d = mean(x - K)`` and ``M2 = sum((x - K - d)^2)``.
Because ``x - K`` is small and (for ``x`` and ``K`` within a factor of two) exact in floating point, the
statistics do not suffer the catastrophic cancellation of ``E[x^2] - E[x]^2``, and the caller can normalize
as ``((x - K) - d) / sigma`` without ever rounding the mean itself to the input's precision.

Cross-device merge. Every device ends with the exact global ``(count, K*, mean - K*, M2)`` around one common
shift ``K*`` (the count-weighted mean of the devices' means), so the merged statistics are the same value on
every device and typed so (not mapped under ``vmap``, invariant under ``shard_map(check_vma=True)``). Two
ways, chosen by ``sync``: ``"gather"`` all-gathers each device's ``(count, shift, offset, M2)`` and applies
Chan et al.'s parallel formula (one round, traffic ``O(devices x features)``); ``"allreduce"`` agrees on
``K*`` with one small ``psum`` and then sums the shifted sums ``(sum(x - K*), sum((x - K*)^2))`` re-expressed
from each device's moments (two rounds, traffic ``O(features)``). Devices (or sub-batches) with no valid
element contribute nothing.

Complex inputs. The mean is complex and the variance real, ``E|x - mean|^2`` (as in Flax): ``count`` and ``m2`` stay
real, ``shift`` and ``offset`` take the input's complex dtype, and every square below is a squared modulus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lax.parallel import all_gather_invariant

AxisName = Any  # a hashable axis name or a tuple of them
Sync = Literal["auto", "gather", "allreduce"]
SYNC_MODES = ("auto", "gather", "allreduce")
# sync="auto" gathers while the gathered moments hold at most this many floats per device (see choose_sync).
AUTO_GATHER_MAX_FLOATS = 4096


class Moments(NamedTuple):
    """Per-feature moments relative to a shift; every field has the same shape (``keepdims`` layout).

    Fields:

    - ``count``: number of valid elements reduced, float32 (the real dtype of the accumulation).
    - ``shift``: the shift ``K`` the moments are taken around (no gradient flows through it); complex for a
      complex input.
    - ``offset``: ``mean - shift``; complex for a complex input.
    - ``m2``: sum of squared deviations from the mean, ``sum(|x - mean|^2)``; always real.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; the public field name is kept
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
    ndim = jnp.ndim(x)
    if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 0 <= a < ndim for a in axes):
        raise ValueError(
            f"reduction_axes must be a non-empty sequence of distinct axes in [0, {ndim}) of the input of shape "
            f"{jnp.shape(x)}; got {reduction_axes!r}."
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"reduction_axes must be distinct; got {reduction_axes!r}.")
    if mask is not None and (jnp.result_type(mask) != jnp.bool_ or jnp.shape(mask) != jnp.shape(x)):
        raise ValueError(
            f"mask must be a boolean array of the input's shape {jnp.shape(x)} (broadcast it first); got dtype "
            f"{jnp.result_type(mask)} and shape {jnp.shape(mask)}. A mask selects elements, it does not weight them."
        )
    first = axes[0]
    x_first = _first_entry(x, first)
    real = real_dtype(x.dtype)
    if mask is None:
        shift = jnp.mean(x_first, axis=axes, keepdims=True)
        count = jnp.full(shift.shape, _size(x.shape, axes), real)
    else:
        m_first = _first_entry(mask, first)
        n_first = jnp.sum(m_first, axis=axes, keepdims=True, dtype=real)
        shift = jnp.sum(jnp.where(m_first, x_first, 0), axis=axes, keepdims=True) / jnp.maximum(n_first, 1)
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=real)
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
    s2_scaled = jnp.sum(_abs_sq(xc * _SQUARE_SCALE), axis=axes, keepdims=True)
    offset = s1 / n
    # sum(|xc - offset|^2) = s2 - |s1|^2 / n; |offset| is about one std, so this loses at most a bit or two.
    s1_scaled = s1 * _SQUARE_SCALE
    m2_scaled = jnp.maximum(s2_scaled - jnp.real(jnp.conj(s1_scaled) * (s1_scaled / n)), 0.0)
    return offset, m2_scaled * (1.0 / _SQUARE_SCALE**2)


def _abs_sq(a: jax.Array) -> jax.Array:
    """``|a|^2`` elementwise, real: ``a * a`` for a real ``a``, ``re^2 + im^2`` for a complex one."""
    if jnp.iscomplexobj(a):
        return lax.square(jnp.real(a)) + lax.square(jnp.imag(a))
    return a * a


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of ``dtype``'s precision: float32 for complex64, ``dtype`` itself when it is real."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)


def merge_moments(stacked: Moments, local_shift: jax.Array, axis: int = 0) -> Moments:
    """Chan's parallel merge of moments stacked along ``axis``, expressed relative to ``local_shift``.

    Args:
      stacked: :class:`Moments` with one entry per part along ``axis``.
      local_shift: the shift the merged moments are expressed around (shape of one part).
      axis: the axis of ``stacked`` that enumerates the parts.

    Returns:
      Merged :class:`Moments` with ``shift = local_shift``. Parts with ``count == 0`` contribute nothing.
    """
    # count and m2 are real; jnp.real undoes the complex dtype a stack with complex fields gave them.
    n_i = jnp.real(stacked.count)
    # Mean of part i relative to our shift; shifts are close to each other, so the difference is exact-ish.
    e_i = (stacked.shift - jnp.expand_dims(local_shift, axis)) + stacked.offset
    n = jnp.sum(n_i, axis=axis)
    offset = jnp.sum(n_i * e_i, axis=axis) / jnp.maximum(n, 1.0)
    dev = jnp.where(n_i > 0, e_i - jnp.expand_dims(offset, axis), 0.0)
    m2 = jnp.sum(jnp.real(stacked.m2) + jnp.real(n_i * dev * jnp.conj(dev)), axis=axis)
    return Moments(n, local_shift, offset, m2)


def global_moments(
    local: Moments,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    sync: Sync = "auto",
) -> Moments:
    """Merge ``local`` moments across the named device axes (identity when ``axis_name`` is None).

    Both merges give every device (of a group) the same exact global moments, expressed around the same
    shift ``K*`` (the count-weighted mean of the devices' means, held constant for differentiation), so the
    result is typed *replicated* wherever that exists: not mapped under ``vmap``/``nn.vmap``, invariant under
    ``shard_map(check_vma=True)``. Gradients flow through the collectives (the transpose of ``psum`` is a
    ``psum``; that of ``all_gather`` a reduce-scatter, or under ``check_vma=True`` a slice of cotangents that are
    already summed over devices), so they match single-device batch norm on the global batch.

    Args:
      local: this device's moments, every field of the same shape (``F`` elements: features times ghost
        batches).
      axis_name: a bound axis name, a tuple of them, or None.
      axis_index_groups: optional partition of the linear device indices along ``axis_name`` (row-major over
        a tuple of names); each group merges only its members' moments.
      sync: ``"gather"``: one ``all_gather`` of ``(count, shift, offset, M2)``, then Chan's merge on every
        device: one round, ``4 * D * F`` floats received per device (``D`` devices on the axis).
        ``"allreduce"``: two ``psum`` rounds, of ``(count, count * mean)`` to agree on ``K*`` and of
        ``(sum(x - K*), sum((x - K*)^2))``: ``2 * F`` floats per round whatever ``D`` is (``2 * G * F`` with
        ``G`` groups, each device adding its contribution to its group's row). ``"auto"``: see :func:`choose_sync`.

    Returns:
      :class:`Moments` of ``local``'s shape with ``shift = K*``; a group whose devices hold no valid element
      gets ``count = 0``, ``offset = m2 = 0`` and ``K* = 0``.

    ``axis_index_groups`` are emulated by masking (gather) or by one row per group (all-reduce), because
    ``all_gather`` and ``psum`` reject groups under ``shard_map`` and ``vmap``: the same code runs under every
    transform.
    """
    check_sync(sync)
    if axis_name is None:
        return local
    check_axis_name(axis_name)
    names = _names(axis_name)
    size = math.prod(lax.axis_size(name) for name in names)
    group = None
    if axis_index_groups is not None:
        group_of = _group_of(axis_index_groups, size)
        group = (group_of, jnp.asarray(group_of)[lax.axis_index(axis_name)])
    if choose_sync(sync, size, local.count.size) == "gather":
        return _gather_merge(local, names, group)
    return _allreduce_merge(local, axis_name, group)


def choose_sync(sync: Sync, axis_size: int, n_features: int) -> str:
    """The merge ``sync`` stands for on an axis of ``axis_size`` devices: ``"gather"`` or ``"allreduce"``.

    ``"auto"`` gathers when the gathered array, ``4 * axis_size * n_features`` floats per device, holds at
    most ``AUTO_GATHER_MAX_FLOATS`` (16 KiB), and all-reduces otherwise. The gather never moves fewer bytes:
    its all-gather has ``4 * D * F`` floats of result per device and it grows with ``D``, while the
    all-reduce's two rounds carry ``2 * F`` floats each whatever ``D`` is (compiled-HLO figures of
    ``experiments/bench_scale.py``). Its one advantage is one round instead of two, which only pays where a
    collective's fixed latency (microseconds on an accelerator interconnect) exceeds the time to move the
    extra bytes: small payloads. On forced CPU devices the all-reduce was as fast or faster in every measured
    case (README, "Scale: synchronization traffic"), so the threshold is kept small.

    Args:
      sync: ``"auto"``, ``"gather"`` or ``"allreduce"``.
      axis_size: number of devices merged over (the product of the sizes of the named axes).
      n_features: elements of one device's moment arrays (features times ghost batches).
    """
    check_sync(sync)
    if sync != "auto":
        return sync
    return "gather" if 4 * axis_size * n_features <= AUTO_GATHER_MAX_FLOATS else "allreduce"


def check_sync(sync: Any) -> None:
    """Raise a ValueError naming the accepted values when ``sync`` is not one of them."""
    if sync not in SYNC_MODES:
        raise ValueError(
            f"sync={sync!r} is not a cross-device merge; expected one of {', '.join(map(repr, SYNC_MODES))} "
            '("auto" gathers small payloads and all-reduces the rest).'
        )


def _common_shift(count: jax.Array, mean: jax.Array, axis: int | None = None) -> jax.Array:
    """``K* = sum(count * mean) / sum(count)`` over ``axis`` (0 when nothing is valid), without gradient.

    ``K*`` is within rounding of the global mean, so ``x - K*`` is as exact as ``x - K_local`` and the
    re-centred sums below lose nothing to cancellation.
    """
    count, mean = lax.stop_gradient(count), lax.stop_gradient(mean)
    weighted = count * mean if axis is None else jnp.sum(count * mean, axis=axis)
    n = count if axis is None else jnp.sum(count, axis=axis)
    shift = weighted / jnp.maximum(n, 1.0)
    # A NaN/Inf on one device must not make x - K* non-finite on every device (as local_moments' shift):
    # such a feature falls back to the running statistics and its finite elements stay finite.
    return jnp.where(jnp.isfinite(shift), shift, 0.0)


def _gather_merge(local: Moments, names: tuple, group) -> Moments:
    packed = jnp.stack(local, axis=0)
    # One gather per name, last name first: the parts then come out in the row-major device order of
    # lax.axis_index(axis_name). (JAX's batching rule rejects all_gather over a tuple that includes a vmap axis.)
    gathered = packed
    for name in reversed(names):
        gathered = _all_gather(gathered, name)
    gathered = gathered.reshape((-1,) + packed.shape)
    parts = Moments(*(gathered[:, i] for i in range(4)))
    parts = parts._replace(count=jnp.real(parts.count), m2=jnp.real(parts.m2))  # real again after a complex stack
    if group is not None:
        group_of, mine = group
        member = (jnp.asarray(group_of) == mine).reshape((-1,) + (1,) * local.count.ndim)
        parts = parts._replace(count=jnp.where(member, parts.count, 0.0), m2=jnp.where(member, parts.m2, 0.0))
    return merge_moments(parts, _common_shift(parts.count, parts.mean, axis=0), axis=0)


def _all_gather(a: jax.Array, name) -> jax.Array:
    """``all_gather`` over one axis name, typed invariant under ``shard_map(check_vma=True)``.

    There ``lax.all_gather`` is typed device-varying although every device receives the same array, and
    the merged statistics would inherit that type; ``all_gather_invariant`` (same HLO, not exported by JAX)
    is typed invariant and its transpose is the slice that is right under that typing. Elsewhere (``pmap``,
    ``vmap``, ``check_vma=False``) the plain gather, whose transpose is the reduce-scatter those need.
    """
    if name in _varying_axes(lax.axis_index(name)):
        return all_gather_invariant(a, name)
    return lax.all_gather(a, name)


def _varying_axes(a: jax.Array) -> frozenset:
    """The mesh axes ``a`` is typed device-varying along (empty outside ``shard_map(check_vma=True)``)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)  # JAX 0.10; earlier versions keep the set in ``aval.vma``
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _allreduce_merge(local: Moments, axis_name: AxisName, group) -> Moments:
    # Round 1: agree on K*. Round 2: each device's shifted sums around K*, from its own moments:
    # sum(x - K*) = n (d_i), sum((x - K*)^2) = M2_i + n d_i^2 with d_i = (K_i - K*) + offset_i.
    # K* carries no gradient, so round 1 is not differentiated (no collective for it in the backward pass).
    # For a complex input the stacks are complex; count and the sum of squares are their real parts.
    first = lax.stop_gradient(jnp.stack([local.count, local.count * local.mean]))
    count, weighted = _psum(first, axis_name, group)
    count = jnp.real(count)
    shift = _common_shift(count, weighted / jnp.maximum(count, 1.0))
    d = (local.shift - shift) + local.offset
    s1, s2 = _psum(jnp.stack([local.count * d, local.m2 + jnp.real(local.count * d * jnp.conj(d))]), axis_name, group)
    offset = s1 / jnp.maximum(count, 1.0)
    # |offset| is within rounding of 0 (K* is the mean), so s2 - |s1|^2 / n does not cancel.
    m2 = jnp.maximum(jnp.real(s2) - jnp.real(jnp.conj(s1) * offset), 0.0)
    return Moments(count, shift, offset, m2)


def _psum(a: jax.Array, axis_name: AxisName, group) -> jax.Array:
    """``psum`` over ``axis_name``, or within this device's group: one row per group, summed, ours read back."""
    if group is None:
        return lax.psum(a, axis_name)
    group_of, mine = group
    n_groups = int(group_of.max()) + 1
    rows = jnp.where((jnp.arange(n_groups) == mine).reshape((-1,) + (1,) * a.ndim), a[None], 0.0)
    return lax.dynamic_index_in_dim(lax.psum(rows, axis_name), mine, axis=0, keepdims=False)


def _group_of(axis_index_groups: Sequence[Sequence[int]], axis_size: int) -> np.ndarray:
    """int[axis_size]: the group index of each device; validates that the groups partition the devices."""
    flat = [i for group in axis_index_groups for i in group]
    if sorted(flat) != list(range(axis_size)):
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} must partition the device indices 0..{axis_size - 1} "
            f"along the axis (each index in exactly one group), got the indices {sorted(flat)}."
        )
    group_of = np.empty(axis_size, np.int32)
    for g, group in enumerate(axis_index_groups):
        group_of[list(group)] = g
    return group_of


def merged_devices(axis_name: AxisName | None, axis_index_groups: Sequence[Sequence[int]] | None = None) -> int:
    """Static number of devices whose elements one merge pools: 1 without ``axis_name``, the product of the
    named axes' sizes, or the smallest group's size with ``axis_index_groups``. Checks the names are bound."""
    if axis_name is None:
        return 1
    check_axis_name(axis_name)
    if axis_index_groups is not None:
        nested = isinstance(axis_index_groups, Sequence) and all(
            isinstance(g, Sequence) and len(g) > 0 and all(isinstance(i, (int, np.integer)) for i in g)
            for g in axis_index_groups
        )
        if not nested or len(axis_index_groups) == 0:
            raise ValueError(
                f"axis_index_groups must be a non-empty sequence of non-empty groups of device indices, e.g. "
                f"[[0, 1], [2, 3]]; got {axis_index_groups!r}."
            )
        return min(len(group) for group in axis_index_groups)
    return math.prod(lax.axis_size(name) for name in _names(axis_name))


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
    if sharding is None or axis >= len(spec) or spec[axis] is None:
        return lax.slice_in_dim(a, 0, 1, axis=axis)
    out_spec = jax.sharding.PartitionSpec(*spec[:axis], None, *spec[axis + 1 :])
    index = (slice(None),) * axis + (jnp.zeros((1,), jnp.int32),)
    return a.at[index].get(out_sharding=jax.sharding.NamedSharding(sharding.mesh, out_spec))


def _size(shape: Sequence[int], axes: Sequence[int]) -> int:
    size = 1
    for a in axes:
        size *= shape[a]
    return size
