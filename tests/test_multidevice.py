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
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nnx
from bnjax.batchnorm import BatchNormState, batch_norm
from reference import bn_forward

MOMENTUM = 0.9
EPS = 1e-5
TOL = dict(rtol=2e-5, atol=2e-5)

# (axis names, mesh shape): one name over 8 devices, or a tuple of names over a 2 x 4 mesh.
AXES = {"name": (("d",), (8,)), "tuple": (("a", "b"), (2, 4))}
KINDS = ["pmap", "shard_map", "vmap"]
SYNCS = ["gather", "allreduce"]  # the two cross-device merges; every multi-device check runs both
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
            out = per_device(kind, names, sizes, lambda r: (r[:, 0], lax.axis_index(_axis_name(names))), [rows])
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
    """One device: forward, grads of sum(valid * y * dy) w.r.t. (x, scale, bias), updated running stats.

    Computed with each merge: a dict ``sync -> (y, grads, mean, var)`` (one compilation checks both).
    """
    return {sync: _local_step_with(x, dy, mask, scale, bias, axis_name, axis_index_groups, sync) for sync in SYNCS}


def _local_step_with(x, dy, mask, scale, bias, axis_name, axis_index_groups, sync):
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
            sync=sync,
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


# Every scenario and transform with one axis name; a tuple of names for a subset (each case compiles).
CASES = [
    pytest.param(s, k, v, "name", id=f"{s}-{i}-name") for s in SCENARIOS for (k, v), i in zip(GRAD_KINDS, GRAD_IDS)
] + [pytest.param("random_masks", k, True, "tuple", id=f"random_masks-{k}-tuple") for k in KINDS]


@pytest.mark.parametrize("scenario, kind, check_vma, axes", CASES)
def test_matches_single_device_on_global_batch(scenario, kind, check_vma, axes):
    """Outputs, gradients and running statistics equal single-device BN on the concatenated valid batch."""
    names, sizes = AXES[axes]
    x, dy, mask = _problem(scenario)
    scale = np.array([0.5, 1.0, 2.0], np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    y_ref, (dx_ref, ds_ref, db_ref), stats_ref = _flax_reference(x, dy, mask, scale, bias)

    step = _step_fn(_axis_name(names), masked=mask is not None)
    sharded = [x, dy] if mask is None else [x, dy, mask]
    for out in per_device(kind, names, sizes, step, sharded, [scale, bias], check_vma).values():
        _check_against_single_device(kind, check_vma, x, mask, out, y_ref, (dx_ref, ds_ref, db_ref), stats_ref)


def _check_against_single_device(kind, check_vma, x, mask, out, y_ref, grads_ref, stats_ref):
    y, (dx, ds, db), mean, var = out
    dx_ref, ds_ref, db_ref = grads_ref
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


@functools.cache
def _grouped_step_fn(axis_name, groups):
    return lambda x, dy, scale, bias: _local_step(
        x, dy, None, scale, bias, axis_name=axis_name, axis_index_groups=groups
    )


@pytest.mark.parametrize("kind, axes", [(k, "name") for k in KINDS] + [("vmap", "tuple")])
def test_axis_index_groups_merge_within_each_group(kind, axes):
    """Groups (here not contiguous) merge only their members' statistics, under every transform."""
    names, sizes = AXES[axes]
    groups = ((0, 5, 2, 7), (1, 3, 4, 6))
    x, dy, _ = _problem("equal")
    scale = np.array([0.5, 1.0, 2.0], np.float32)
    bias = np.zeros(3, np.float32)
    step = _grouped_step_fn(_axis_name(names), groups)
    for out in per_device(kind, names, sizes, step, [x, dy], [scale, bias]).values():
        _check_groups(kind, groups, x, dy, scale, bias, out)


def _check_groups(kind, groups, x, dy, scale, bias, out):
    y, (dx, ds, _), mean, _ = out
    n = x.shape[0] // 8
    ds_total = np.zeros(3)
    for group in groups:
        rows = np.concatenate([np.arange(d * n, (d + 1) * n) for d in group])
        y_ref, (dx_ref, ds_ref, _), stats_ref = _flax_reference(x[rows], dy[rows], None, scale, bias)
        np.testing.assert_allclose(y.reshape(x.shape)[rows], y_ref, **TOL)
        np.testing.assert_allclose(dx.reshape(x.shape)[rows], dx_ref, **TOL)
        np.testing.assert_allclose(mean[list(group)], np.broadcast_to(stats_ref["mean"], (4, 3)), **TOL)
        if kind != "shard_map":  # per-device contributions: the group's sum is the group's gradient
            np.testing.assert_allclose(ds[list(group)].sum(0), ds_ref, **TOL)
        ds_total += ds_ref
    # The loss is the sum over both groups; shard_map hands every device the whole gradient.
    got = ds if kind == "shard_map" else ds.sum(0, keepdims=True)
    np.testing.assert_allclose(got, np.broadcast_to(ds_total, got.shape), **TOL)


def test_axis_index_groups_must_partition_the_devices():
    x, dy, _ = _problem("equal")
    step = _grouped_step_fn("d", ((0, 1, 2), (4, 5, 6, 7)))
    with pytest.raises(ValueError, match="axis_index_groups.*partition"):
        per_device("vmap", ("d",), (8,), step, [x, dy], [np.ones(3, np.float32), np.zeros(3, np.float32)])


# ----------------------------------------------------------------------------- the two merges


@functools.cache
def _precision_step(axis_name, sync):
    return lambda x, mask: batch_norm(
        x,
        None,
        None,
        BatchNormState(jnp.zeros(4), jnp.ones(4)),
        train=True,
        epsilon=EPS,
        mask=mask,
        axis_name=axis_name,
        sync=sync,
    )


@pytest.mark.parametrize("kind, axes", [("shard_map", "name"), ("vmap", "tuple"), ("pmap", "name")])
def test_merges_are_exact_at_mean_1e3_std_1e_2_with_uneven_and_empty_devices(kind, axes):
    """The case shifted sums exist for, across devices: within 1e-5 of the largest output, both merges.

    Device d holds 6 rows of which the first ``counts[d]`` are valid (a padded shard; two devices empty),
    and device means differ by many standard deviations, so K* differs from every local shift.
    """
    names, sizes = AXES[axes]
    rng = np.random.default_rng(7)
    counts = [6, 0, 2, 5, 1, 0, 6, 3]
    x = 1e3 + 1e-2 * rng.standard_normal((48, 4)) + 0.05 * np.repeat(np.arange(8.0), 6)[:, None]
    x = x.astype(np.float32)
    mask = np.zeros((48, 1), bool)
    for d, k in enumerate(counts):
        mask[6 * d : 6 * d + k] = True
    y64, mean64, var64, _ = bn_forward(x, mask=mask, eps=EPS)
    valid = np.broadcast_to(mask, x.shape)
    bound = 1e-5 * np.abs(y64[valid]).max()
    ys = {}
    for sync in SYNCS:
        y, new = per_device(kind, names, sizes, _precision_step(_axis_name(names), sync), [x, mask])
        ys[sync] = y.reshape(x.shape)[valid]
        assert np.abs(ys[sync] - y64[valid]).max() <= bound, sync
        np.testing.assert_allclose(new.mean, np.broadcast_to(0.01 * mean64, new.mean.shape), rtol=1e-6)
        np.testing.assert_allclose(new.var, np.broadcast_to(0.99 + 0.01 * var64, new.var.shape), rtol=1e-6)
    assert np.abs(ys["gather"] - ys["allreduce"]).max() <= bound


def _lowered_collectives(sync, n_devices, n_features):
    """The collective ops (StableHLO names) of one train-mode batch norm under shard_map."""
    mesh = jax.make_mesh((n_devices,), ("d",), devices=jax.devices()[:n_devices])
    f = jax.shard_map(
        lambda x: batch_norm(x, None, None, None, train=True, axis_name="d", sync=sync)[0],
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P("d"),
    )
    x = jax.ShapeDtypeStruct((2 * n_devices, n_features), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    text = jax.jit(f).lower(x).as_text()
    return [line.split("=", 1)[1].strip() for line in text.splitlines() if "stablehlo.all_" in line]


def test_allreduce_traffic_does_not_grow_with_the_device_count():
    """Two all-reduces of (2, 1, F) floats whatever the axis size; the gather's result grows with it."""
    for n in (2, 8):
        ops = _lowered_collectives("allreduce", n, 64)
        assert len(ops) == 2 and all("all_reduce" in op for op in ops), ops
        gather = _lowered_collectives("gather", n, 64)
        assert len(gather) == 1 and f"tensor<{n}x4x1x64xf32>" in gather[0], gather


@pytest.mark.parametrize(
    "n_devices, n_features, expected",
    [(2, 64, "gather"), (8, 128, "gather"), (8, 129, "allreduce"), (2, 2048, "allreduce"), (256, 2048, "allreduce")],
)
def test_auto_gathers_only_small_payloads(n_devices, n_features, expected):
    assert bnjax.statistics.choose_sync("auto", n_devices, n_features) == expected
    assert bnjax.statistics.choose_sync("gather", n_devices, n_features) == "gather"


@pytest.mark.parametrize(
    "call",
    [
        lambda x: batch_norm(x, None, None, None, train=True, sync="ring"),
        lambda x: bnjax.BatchNorm(use_running_average=False, sync="ring").init(jax.random.key(0), x),
        lambda x: bnjax.nnx.BatchNorm(3, sync="ring", rngs=nnx.Rngs(0)),
        lambda x: bnjax.batch_renorm(x, None, None, bnjax.init_state((3,)), train=False, sync="ring"),
    ],
    ids=["functional", "linen", "nnx", "renorm"],
)
def test_unknown_sync_is_a_clear_value_error(call):
    with pytest.raises(ValueError, match=r"sync='ring' is not a cross-device merge; expected one of 'auto'"):
        call(np.ones((4, 3), np.float32))


# ----------------------------------------------------------------------------- a small Flax model


class MLP(nn.Module):
    """Dense -> batch norm -> relu -> Dense; ``norm`` builds the batch-norm layer (bnjax's or Flax's)."""

    norm: functools.partial

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.Dense(4)(x)
        h = self.norm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS)(h, mask=mask)
        return nn.Dense(1)(nn.relu(h))


FLAX_NORM = functools.partial(nn.BatchNorm, use_fast_variance=False)


def _model_data(n_per_dev=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8 * n_per_dev, 5)).astype(np.float32) + 2.0
    t = rng.normal(size=(8 * n_per_dev, 1)).astype(np.float32)
    mask = rng.random((8 * n_per_dev, 1)) < 0.6
    mask[: 2 * n_per_dev] = False  # devices 0 and 1 have no valid sample
    mask[-1] = True
    return x, t, mask


def _model_loss_and_stats(model, variables, x, t, mask):
    """sum over valid samples of (f(x) - t)^2, and the updated batch_stats."""
    out, upd = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    return jnp.sum(jnp.where(mask, (out - t) ** 2, 0.0)), upd["batch_stats"]


@functools.cache
def _model_step(axis_name, sync):
    model = MLP(functools.partial(bnjax.BatchNorm, axis_name=axis_name, sync=sync))

    def step(x, t, mask, params, stats):
        loss = lambda p: _model_loss_and_stats(model, {"params": p, "batch_stats": stats}, x, t, mask)  # noqa: E731
        grads, new_stats = jax.grad(loss, has_aux=True)(params)
        return grads, new_stats

    return step


@jax.jit
def _flax_model_reference(x, t, mask, variables):
    model = MLP(FLAX_NORM)
    loss = lambda p: _model_loss_and_stats(model, {**variables, "params": p}, x, t, mask)  # noqa: E731
    return jax.grad(loss, has_aux=True)(variables["params"])


def _model_variables(x):
    # Flax's and bnjax's BatchNorm have interchangeable variable trees.
    return MLP(FLAX_NORM).init(jax.random.key(0), x[:2], mask=None)


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize(
    "kind, check_vma, axes",
    [("pmap", True, "name"), ("vmap", True, "name"), ("shard_map", True, "name"), ("shard_map", True, "tuple")],
)
def test_flax_model_gradients_and_batch_stats_match_single_device(kind, check_vma, axes, sync):
    """Gradients of every parameter (incl. the Dense layer *before* BN) and batch_stats, with uneven masks."""
    names, sizes = AXES[axes]
    x, t, mask = _model_data()
    variables = _model_variables(x)
    grads_ref, stats_ref = _flax_model_reference(x, t, mask, variables)
    grads, stats = per_device(
        kind,
        names,
        sizes,
        _model_step(_axis_name(names), sync),
        [x, t, mask],
        [variables["params"], variables["batch_stats"]],
        check_vma,
    )
    if not (kind == "shard_map" and check_vma):
        grads = jax.tree.map(lambda g: g.sum(0, keepdims=True), grads)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, np.broadcast_to(r, g.shape), rtol=1e-4, atol=1e-5),
        (grads, stats),
        (grads_ref, stats_ref),
    )


@pytest.mark.parametrize("sync", SYNCS)
def test_outer_grad_of_shard_map_loss_is_the_global_gradient(sync):
    """The shard_map idiom: psum the local losses inside, differentiate the whole thing outside."""
    x, t, mask = _model_data()
    variables = _model_variables(x)
    grads_ref, _ = _flax_model_reference(x, t, mask, variables)
    model = MLP(functools.partial(bnjax.BatchNorm, axis_name="d", sync=sync))
    mesh = jax.make_mesh((8,), ("d",))

    def global_loss(params, x, t, mask):
        def local(params, x, t, mask):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            return lax.psum(_model_loss_and_stats(model, v, x, t, mask)[0], "d")

        spec = P("d")
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, spec, spec), out_specs=P())(params, x, t, mask)

    placed = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, t, mask)]
    grads = jax.jit(jax.grad(global_loss))(variables["params"], *placed)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), grads, grads_ref)


# ----------------------------------------------------------------------------- Flax's cross-device statistics


@functools.cache
def _batch_stats_step(norm_cls, momentum):
    def step(x, mask):
        bn = norm_cls(use_running_average=False, momentum=momentum, axis_name="d")
        variables = bn.init(jax.random.key(0), x)
        y, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    return step


UNEVEN_COUNTS = [1, 1, 1, 2, 3, 4, 4, 4]  # valid samples per device (of 4); device d's mean is about d


def _uneven(empty_devices):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8 * 4, 3)).astype(np.float32) + np.arange(8).repeat(4)[:, None].astype(np.float32)
    mask = np.zeros((8 * 4, 1), bool)
    for d, k in enumerate(UNEVEN_COUNTS):
        mask[4 * d : 4 * d + k] = d not in empty_devices
    return x, mask


def test_flax_averages_per_device_means_bnjax_merges_exactly():
    """Uneven valid counts: Flax's pmean of per-device means is not the global mean; bnjax's merge is."""
    x, mask = _uneven(empty_devices=())
    _, mean64, var64, _ = bn_forward(x, mask=mask)
    _, flax_stats = per_device("pmap", ("d",), (8,), _batch_stats_step(FLAX_NORM, 0.0), [x, mask])
    _, ours = per_device("pmap", ("d",), (8,), _batch_stats_step(bnjax.BatchNorm, 0.0), [x, mask])
    np.testing.assert_allclose(ours["mean"], np.broadcast_to(mean64, (8, 3)), **TOL)
    np.testing.assert_allclose(ours["var"], np.broadcast_to(var64, (8, 3)), **TOL)
    # Flax computes exactly the unweighted average of the per-device means, which is far from the truth.
    per_device_means = np.stack([x[4 * d : 4 * d + k].mean(0) for d, k in enumerate(UNEVEN_COUNTS)])
    np.testing.assert_allclose(flax_stats["mean"], np.broadcast_to(per_device_means.mean(0), (8, 3)), **TOL)
    assert np.all(np.abs(flax_stats["mean"] - mean64) > 0.5)


def test_empty_device_makes_flax_nan_while_bnjax_ignores_it():
    x, mask = _uneven(empty_devices=(2,))
    _, mean64, _, _ = bn_forward(x, mask=mask)
    y_flax, flax_stats = per_device("pmap", ("d",), (8,), _batch_stats_step(FLAX_NORM, 0.0), [x, mask])
    y, ours = per_device("pmap", ("d",), (8,), _batch_stats_step(bnjax.BatchNorm, 0.0), [x, mask])
    assert np.all(np.isnan(y_flax)) and np.all(np.isnan(flax_stats["mean"]))
    np.testing.assert_allclose(ours["mean"], np.broadcast_to(mean64, (8, 3)), **TOL)
    assert np.all(np.isfinite(y))


def test_zero_global_count_keeps_running_statistics_where_flax_gives_nan():
    x, mask = _uneven(empty_devices=tuple(range(8)))
    y_flax, flax_stats = per_device("pmap", ("d",), (8,), _batch_stats_step(FLAX_NORM, 0.9), [x, mask])
    y, ours = per_device("pmap", ("d",), (8,), _batch_stats_step(bnjax.BatchNorm, 0.9), [x, mask])
    assert np.all(np.isnan(flax_stats["mean"])) and np.all(np.isnan(y_flax))
    np.testing.assert_array_equal(ours["mean"], np.zeros((8, 3)))
    np.testing.assert_array_equal(ours["var"], np.ones((8, 3)))
    # Normalized with the (unchanged) running statistics: mean 0, var 1.
    np.testing.assert_allclose(y.reshape(x.shape), x / np.sqrt(1 + EPS), **TOL)


# ----------------------------------------------------------------------------- sharded jit, no axis_name


MESH_TYPES = [AxisType.Explicit, AxisType.Auto]


@jax.jit
def _bnjax_model_grads(x, t, mask, variables):
    model = MLP(bnjax.BatchNorm)  # axis_name=None: XLA's SPMD partitioner inserts the all-reduces
    loss = lambda p: _model_loss_and_stats(model, {**variables, "params": p}, x, t, mask)  # noqa: E731
    return jax.grad(loss, has_aux=True)(variables["params"])


@pytest.mark.parametrize("axis_type", MESH_TYPES, ids=lambda a: a.name)
def test_sharded_jit_gives_global_statistics_without_axis_name(axis_type):
    x, t, mask = _model_data()
    variables = _model_variables(x)
    grads_ref, stats_ref = _flax_model_reference(x, t, mask, variables)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    placed = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, t, mask)]
    with jax.set_mesh(mesh):  # Explicit axes: lets the Dense kernel's gradient resolve to replicated
        grads, stats = _bnjax_model_grads(*placed, variables)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), (grads, stats), (grads_ref, stats_ref)
    )


@pytest.mark.parametrize("axis_type", MESH_TYPES, ids=lambda a: a.name)
@pytest.mark.parametrize("virtual_batch_size", [None, 2])
def test_sharded_jit_functional_core_keeps_the_batch_sharded(axis_type, virtual_batch_size):
    """NHWC input sharded over the batch: exact statistics, and the output stays sharded like the input."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(16, 3, 2, 3)) * 2.0 + 5.0).astype(np.float32)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    state = bnjax.init_state((3,))
    f = jax.jit(lambda x: batch_norm(x, None, None, state, train=True, virtual_batch_size=virtual_batch_size))
    y, new = f(xs)
    assert y.sharding.spec[0] == "d"
    g = 16 if virtual_batch_size is None else virtual_batch_size
    groups = x.reshape(16 // g, g, 3, 2, 3)
    y_ref = np.concatenate([bn_forward(b, eps=EPS)[0] for b in groups])
    stats_ref = [bn_forward(b)[1:3] for b in groups]
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(new.mean, 0.01 * np.mean([m for m, _ in stats_ref], 0), **TOL)
    np.testing.assert_allclose(new.var, 0.99 + 0.01 * np.mean([v for _, v in stats_ref], 0), **TOL)


# ----------------------------------------------------------------------------- ghost batches across devices


@functools.cache
def _ghost_step_fn(axis_name, virtual_batch_size, sync):
    state = BatchNormState(jnp.zeros(3), jnp.ones(3))

    def step(x, dy, scale):
        def loss(x, scale):
            y, new = batch_norm(
                x,
                scale,
                None,
                state,
                train=True,
                momentum=MOMENTUM,
                epsilon=EPS,
                axis_name=axis_name,
                virtual_batch_size=virtual_batch_size,
                sync=sync,
            )
            return jnp.sum(y * dy), (y, new)

        (_, (y, new)), (dx, ds) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, scale)
        return y, dx, ds, new.mean, new.var

    return step


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize("kind", KINDS)
def test_ghost_batches_with_axis_name(kind, sync):
    """Sub-batch k of every device forms virtual batch k: each is normalized as one single-device batch."""
    g, k = 2, 3  # virtual batch size per device, sub-batches per device
    x, dy, _ = _problem("equal", n_per_dev=g * k)
    scale = np.array([0.5, 1.0, 2.0], np.float32)
    y, dx, ds, mean, var = per_device(kind, ("d",), (8,), _ghost_step_fn("d", g, sync), [x, dy], [scale])
    # rows of virtual batch j: device d's rows d*g*k + j*g + [0, g)
    idx = np.arange(8 * g * k).reshape(8, k, g).transpose(1, 0, 2).reshape(k, 8 * g)
    ds_total, means, variances = np.zeros(3), [], []
    for rows in idx:
        y_ref, (dx_ref, ds_ref, _), stats_ref = _flax_reference(x[rows], dy[rows], None, scale, np.zeros(3, np.float32))
        np.testing.assert_allclose(y.reshape(x.shape)[rows], y_ref, **TOL)
        np.testing.assert_allclose(dx.reshape(x.shape)[rows], dx_ref, **TOL)
        ds_total += ds_ref
        means.append(stats_ref["mean"])
        variances.append(stats_ref["var"])
    got = ds if kind == "shard_map" else ds.sum(0, keepdims=True)
    np.testing.assert_allclose(got, np.broadcast_to(ds_total, got.shape), **TOL)
    # Equal counts: the running update uses the average of the virtual batches' statistics.
    np.testing.assert_allclose(mean, np.broadcast_to(np.mean(means, 0), mean.shape), **TOL)
    np.testing.assert_allclose(var, np.broadcast_to(np.mean(variances, 0), var.shape), **TOL)


# ----------------------------------------------------------------------------- errors


def _bn_with_axis(axis_name, virtual_batch_size=None):
    return lambda x: batch_norm(
        x, None, None, None, train=True, axis_name=axis_name, virtual_batch_size=virtual_batch_size
    )[0]


@pytest.mark.parametrize("kind", ["jit", *KINDS])
@pytest.mark.parametrize("axis_name", ["zz", ("d", "zz")], ids=["name", "tuple"])
def test_unbound_axis_name_is_a_clear_value_error(kind, axis_name):
    x = np.ones((16, 3), np.float32)
    unbound = "d" if kind == "jit" and isinstance(axis_name, tuple) else "zz"
    with pytest.raises(ValueError, match=rf"the axis '{unbound}' is not bound.*axis_name=None"):
        if kind == "jit":
            jax.jit(_bn_with_axis(axis_name))(x)
        else:
            per_device(kind, ("d",), (8,), _bn_with_axis(axis_name), [x])


@pytest.mark.parametrize("kind", ["jit", *KINDS])
def test_virtual_batch_size_must_divide_the_local_batch(kind):
    x = np.ones((8 * 3, 2), np.float32)  # 3 rows per device
    with pytest.raises(ValueError, match="virtual_batch_size=2 does not divide the batch"):
        if kind == "jit":
            jax.jit(_bn_with_axis(None, 2))(x[:3])
        else:
            per_device(kind, ("d",), (8,), _bn_with_axis("d", 2), [x])


# ----------------------------------------------------------------------------- the data-parallel example


def test_data_parallel_example_three_ways_agree():
    """experiments/data_parallel.py: pmap, shard_map and sharded jit end with the same params and stats."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "experiments/data_parallel.py", "--steps", "2", "--global-batch", "16"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| pmap", "| shard_map", "| jit"))]
    assert len(rows) == 3 and all(row.rstrip().endswith("| True |") for row in rows), proc.stdout
