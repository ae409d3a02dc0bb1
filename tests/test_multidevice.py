"""Cross-device statistics on the 8 forced CPU devices: pmap, shard_map, vmap(axis_name) and sharded jit.

The reference is always single-device batch norm on the concatenated (valid part of the) global batch:
``flax.linen.BatchNorm`` with ``use_fast_variance=False`` (an independent implementation, exact on one
device) and float64 NumPy.

What the "right" gradient is, per transform (all checked below):
  * ``pmap`` / ``vmap`` / ``shard_map(check_vma=False)`` with ``jax.grad`` *inside*: each device gets
    d(sum_d L_d)/d(its inputs). For the local shard ``x_d`` that is exactly the global gradient; for
    replicated parameters it is this device's contribution, and ``psum`` over devices gives the global
    gradient (``pmean`` if each ``L_d`` is a per-device mean). This needs the transpose of ``all_gather``
    to be a reduce-scatter (the cross-device terms flow back to the device that owns them).
  * ``shard_map(check_vma=True)`` (the default): the gradient of the global function. With ``jax.grad``
    outside, the parameter gradient is complete; with ``jax.grad`` inside, the gradient w.r.t. a
    replicated (``P()``) parameter is *already* summed over devices (the transpose of the implicit
    ``pvary``), so a further ``psum`` would count it ``D`` times.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax.batchnorm import BatchNormState, batch_norm
from reference import bn_forward

MOMENTUM = 0.9
EPS = 1e-5
TOL = dict(rtol=2e-5, atol=2e-5)

# (axis names, mesh shape): one name over 8 devices, or a tuple of names over a 2 x 4 mesh.
AXES = {"name": (("d",), (8,)), "tuple": (("a", "b"), (2, 4))}
KINDS = ["pmap", "shard_map", "vmap"]
# shard_map with check_vma=False has per-device (pmap-like) gradient semantics: see the module docstring.
GRAD_KINDS = [("pmap", True), ("vmap", True), ("shard_map", True), ("shard_map", False)]
GRAD_IDS = ["pmap", "vmap", "shard_map", "shard_map-no-vma"]


def _axis_name(names):
    return names if len(names) > 1 else names[0]


def per_device(kind, names, sizes, fn, sharded, replicated=(), check_vma=True):
    """Run ``fn(*local_shards, *replicated)`` once per device and stack its outputs to ``(D, ...)``.

    ``sharded`` arrays are split into ``D = prod(sizes)`` equal shards along axis 0 (device ``i`` gets rows
    ``i*n:(i+1)*n``, ``i`` the row-major index over ``names``); ``replicated`` arrays go to every device.
    With ``kind="pmap"`` and several names, the first is pmapped and the others vmapped inside it.
    The mapped function is cached on ``fn`` (pass the same function object to reuse the compilation).
    """
    n_dev = math.prod(sizes)
    f = _mapped(kind, names, sizes, fn, len(sharded), len(replicated), check_vma)
    if kind == "shard_map":
        mesh = jax.make_mesh(sizes, names, devices=jax.devices()[:n_dev])
        placed = [jax.device_put(a, NamedSharding(mesh, P(names))) for a in sharded]
        return jax.tree.map(np.asarray, f(*placed, *replicated))
    split = [jnp.reshape(a, sizes + (a.shape[0] // n_dev,) + a.shape[1:]) for a in sharded]
    out = f(*split, *replicated)
    return jax.tree.map(lambda o: np.asarray(o).reshape((n_dev,) + o.shape[len(names) :]), out)


@functools.cache
def _mapped(kind, names, sizes, fn, n_sharded, n_replicated, check_vma):
    if kind == "shard_map":
        mesh = jax.make_mesh(sizes, names, devices=jax.devices()[: math.prod(sizes)])
        spec = P(names)
        return jax.jit(
            jax.shard_map(
                lambda *args: jax.tree.map(lambda o: o[None], fn(*args)),
                mesh=mesh,
                in_specs=(spec,) * n_sharded + (P(),) * n_replicated,
                out_specs=spec,
                check_vma=check_vma,
            )
        )
    in_axes = (0,) * n_sharded + (None,) * n_replicated
    f = fn
    for i, name in reversed(list(enumerate(names))):
        if kind == "pmap" and i == 0:  # nested pmap is not supported by JAX: pmap outside, vmap inside
            f = jax.pmap(f, axis_name=name, in_axes=in_axes)
        else:
            f = jax.vmap(f, in_axes=in_axes, axis_name=name)
    return f if kind == "pmap" else jax.jit(f)


def test_per_device_helper_splits_in_row_major_device_order():
    for kind in KINDS:
        for names, sizes in AXES.values():
            rows = np.arange(16.0)[:, None]
            out = per_device(
                kind, names, sizes, lambda r: (r[:, 0], lax.axis_index(_axis_name(names))), [rows]
            )
            np.testing.assert_array_equal(out[0], rows.reshape(8, 2))
            np.testing.assert_array_equal(out[1], np.arange(8))


# ----------------------------------------------------------------------------- functional core


def _problem(scenario, n_per_dev=3, seed=0):
    """Global x (8*n, 2, 3) (NWC: batch and width reduced, 3 features), upstream dy and a mask or None."""
    rng = np.random.default_rng(seed)
    shape = (8 * n_per_dev, 2, 3)
    x = (rng.normal(size=shape) * [0.5, 2.0, 1.0] + [1.0, -3.0, 0.2]).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    if scenario == "equal":
        return x, dy, None
    if scenario == "random_masks":  # per element, so every device and feature has its own count
        mask = rng.random(shape) < 0.6
        mask[0] = True  # at least one valid element per feature globally
    elif scenario == "one_device_empty":
        mask = rng.random(shape) < 0.7
        mask[0] = True
        mask[2 * n_per_dev : 3 * n_per_dev] = False  # device 2 has nothing valid
    elif scenario == "padded_last_shard":  # 8*n - 2 real samples, the last shard padded with garbage
        mask = np.ones(shape, bool)
        mask[-2:] = False
        x[-2:] = 1e3
    else:
        raise AssertionError(scenario)
    return x, dy, mask


@jax.jit
def _flax_reference(x, dy, mask, scale, bias):
    """Single-device flax.linen.BatchNorm on the whole global batch: y, grads (x, scale, bias), new stats."""
    bn = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS, use_fast_variance=False)
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}

    def loss(x, scale, bias):
        y, upd = bn.apply(
            {"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
            x,
            mask=mask,
            mutable=["batch_stats"],
        )
        valid = jnp.ones(x.shape, bool) if mask is None else mask
        return jnp.sum(jnp.where(valid, y * dy, 0.0)), (y, upd["batch_stats"])

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, grads, new


def _local_step(x, dy, mask, scale, bias, *, axis_name, axis_index_groups=None):
    """One device: forward, grads of sum(valid * y * dy) w.r.t. (x, scale, bias), updated running stats."""
    state = BatchNormState(jnp.zeros(3), jnp.ones(3))

    def loss(x, scale, bias):
        y, new = batch_norm(
            x,
            scale,
            bias,
            state,
            train=True,
            momentum=MOMENTUM,
            epsilon=EPS,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        valid = jnp.ones(x.shape, bool) if mask is None else mask
        return jnp.sum(jnp.where(valid, y * dy, 0.0)), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, grads, new.mean, new.var


@functools.cache
def _step_fn(axis_name, masked):
    if masked:
        return functools.partial(_local_step, axis_name=axis_name)
    return lambda x, dy, scale, bias: _local_step(x, dy, None, scale, bias, axis_name=axis_name)


SCENARIOS = ["equal", "random_masks", "one_device_empty", "padded_last_shard"]


@pytest.mark.parametrize("axes", list(AXES), ids=list(AXES))
@pytest.mark.parametrize("kind, check_vma", GRAD_KINDS, ids=GRAD_IDS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_single_device_on_global_batch(scenario, kind, check_vma, axes):
    """Outputs, gradients and running statistics equal single-device BN on the concatenated valid batch."""
    names, sizes = AXES[axes]
    x, dy, mask = _problem(scenario)
    scale = np.array([0.5, 1.0, 2.0], np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    y_ref, (dx_ref, ds_ref, db_ref), stats_ref = _flax_reference(x, dy, mask, scale, bias)

    step = _step_fn(_axis_name(names), masked=mask is not None)
    sharded = [x, dy] if mask is None else [x, dy, mask]
    y, (dx, ds, db), mean, var = per_device(kind, names, sizes, step, sharded, [scale, bias], check_vma)

    valid = np.ones(x.shape, bool) if mask is None else mask
    np.testing.assert_allclose(y.reshape(x.shape)[valid], np.asarray(y_ref)[valid], **TOL)
    np.testing.assert_allclose(dx.reshape(x.shape), dx_ref, **TOL)
    if kind == "shard_map" and check_vma:  # already the global gradient on every device
        np.testing.assert_allclose(ds, np.broadcast_to(ds_ref, ds.shape), **TOL)
        np.testing.assert_allclose(db, np.broadcast_to(db_ref, db.shape), **TOL)
    else:  # each device holds its own contribution; their sum is the global gradient
        np.testing.assert_allclose(ds.sum(0), ds_ref, **TOL)
        np.testing.assert_allclose(db.sum(0), db_ref, **TOL)
    # Every device ends with the same running statistics: those of the global valid batch.
    _, mean64, var64, _ = bn_forward(x, mask=mask)
    np.testing.assert_allclose(mean, np.broadcast_to((1 - MOMENTUM) * mean64, mean.shape), **TOL)
    np.testing.assert_allclose(var, np.broadcast_to(MOMENTUM + (1 - MOMENTUM) * var64, var.shape), **TOL)
    np.testing.assert_allclose(mean, np.broadcast_to(stats_ref["mean"], mean.shape), **TOL)
    np.testing.assert_allclose(var, np.broadcast_to(stats_ref["var"], var.shape), **TOL)
