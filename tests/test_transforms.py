"""Batch norm with ``axis_name`` under every transform that binds one (8 forced CPU devices).

The merged statistics are the same on every device and typed so: not mapped under ``vmap``/``nn.vmap``/
``nnx.vmap`` (so ``batch_stats`` broadcast with ``variable_axes=None``/``in_axes=None`` can be written), and
invariant under ``shard_map(check_vma=True)`` (so updated statistics leave through ``out_specs=P()`` without a
``pmean``). References: single-device BN on the flattened batch (``flax.linen.BatchNorm`` with
``use_fast_variance=False``, or bnjax without ``axis_name``), and Flax's own module under the same transform
(equal counts per device, where Flax's ``pmean`` of per-device moments is exact).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nnx

SYNCS = ["gather", "allreduce"]
TOL = dict(rtol=2e-5, atol=2e-5)
FLAX_BN = functools.partial(nn.BatchNorm, use_fast_variance=False)


def _data(shape=(8, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * [0.5, 2.0, 1.0, 3.0] + [1.0, -3.0, 0.2, 5.0]).astype(np.float32)


def _assert_tree_close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


# ----------------------------------------------------------------------------- linen: vmap, scan, remat


class Block(nn.Module):
    """Dense -> batch norm (``norm``) -> relu, the unit Flax's own BN-under-vmap test wraps."""

    norm: functools.partial

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, kernel_init=nn.initializers.normal(1.0))(x)
        return nn.relu(self.norm(use_running_average=False, momentum=0.9)(h))


def _vmapped(norm):
    # Flax's scenario: parameters and statistics shared across the mapped axis, one BN over the whole batch.
    return nn.vmap(
        Block,
        in_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(norm)


@pytest.mark.parametrize("sync", SYNCS)
def test_linen_vmap_equals_the_flattened_batch_and_flax(sync):
    """``nn.vmap(..., axis_name="batch")`` over 8 sub-batches of 3 = one BN over the 24 samples."""
    x = _data()  # (8 mapped, 3 samples, 4 features)
    flat = x.reshape(24, 4)
    ours = _vmapped(functools.partial(bnjax.BatchNorm, axis_name="batch", sync=sync))
    variables = ours.init(jax.random.key(0), x)
    y, upd = ours.apply(variables, x, mutable=["batch_stats"])
    # Flax's own module in the same scenario, and a plain Block on the flattened batch (same variables).
    y_flax, upd_flax = _vmapped(functools.partial(FLAX_BN, axis_name="batch")).apply(
        variables, x, mutable=["batch_stats"]
    )
    y_flat, upd_flat = Block(FLAX_BN).apply(variables, flat, mutable=["batch_stats"])
    np.testing.assert_allclose(y.reshape(24, 4), y_flat, **TOL)
    np.testing.assert_allclose(y, y_flax, **TOL)
    _assert_tree_close(upd, upd_flat)
    _assert_tree_close(upd, upd_flax)


class Stack(nn.Module):
    """Three ``Block``s, either ``nn.scan``ned (stacked parameters) or each ``nn.remat``ed."""

    norm: functools.partial
    how: str

    @nn.compact
    def __call__(self, x):
        if self.how == "scan":
            scanned = nn.scan(
                lambda block, h, _: (block(h), None),
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=3,
            )
            h, _ = scanned(Block(self.norm), x, None)
            return h
        for _ in range(3):
            x = nn.remat(Block)(self.norm)(x)
        return x


@pytest.mark.parametrize("how", ["scan", "remat"])
@pytest.mark.parametrize("sync", SYNCS)
def test_linen_scan_and_remat_over_bn_blocks_under_vmap(how, sync):
    """Outputs, parameter gradients and batch_stats equal the flattened batch, and Flax's module."""
    x = _data((8, 3, 4), seed=1)
    flat = x.reshape(24, 4)
    ours = Stack(functools.partial(bnjax.BatchNorm, axis_name="batch", sync=sync), how)
    variables = Stack(FLAX_BN, how).init(jax.random.key(0), flat)  # interchangeable variable trees

    def loss(model, params, x, mapped):
        def f(x):
            return model.apply({**variables, "params": params}, x, mutable=["batch_stats"])

        if mapped:  # batch_stats broadcast (not mapped): they must come out unmapped
            f = jax.vmap(f, axis_name="batch", out_axes=(0, None))
        y, upd = f(x)
        return jnp.sum(y.reshape(24, -1) ** 2 * jnp.arange(1.0, 5.0)[None, :]), (y, upd)

    grad = jax.jit(jax.grad(loss, argnums=1, has_aux=True), static_argnums=(0, 3))
    g, (y, upd) = grad(ours, variables["params"], x, True)
    g_ref, (y_ref, upd_ref) = grad(Stack(FLAX_BN, how), variables["params"], flat, False)
    flax_stack = Stack(functools.partial(FLAX_BN, axis_name="batch"), how)
    g_flax, (_, upd_flax) = grad(flax_stack, variables["params"], x, True)
    np.testing.assert_allclose(y.reshape(24, 4), y_ref, **TOL)
    _assert_tree_close((g, upd), (g_ref, upd_ref))
    _assert_tree_close((g, upd), (g_flax, upd_flax))


# ----------------------------------------------------------------------------- shard_map, check_vma=True


def _mesh():
    return jax.make_mesh((8,), ("d",))


@pytest.mark.parametrize("sync", SYNCS)
def test_shard_map_returns_updated_batch_stats_replicated_without_pmean(sync):
    """Default ``check_vma=True``: batch_stats leave through ``out_specs=P()`` as they are."""
    x = _data((24, 4), seed=2)
    model = Block(functools.partial(bnjax.BatchNorm, axis_name="d", sync=sync))
    variables = Block(FLAX_BN).init(jax.random.key(0), x)
    mesh = _mesh()

    def step(variables, x):
        y, upd = model.apply(variables, x, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P())))
    y, stats = f(variables, jax.device_put(x, NamedSharding(mesh, P("d"))))
    y_ref, upd_ref = Block(FLAX_BN).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, **TOL)
    _assert_tree_close(stats, upd_ref["batch_stats"])


# ----------------------------------------------------------------------------- nnx: vmap, shard_map


def _nnx_pair(sync):
    ours = bnjax.nnx.BatchNorm(4, momentum=0.9, axis_name="d", sync=sync, rngs=nnx.Rngs(0))
    reference = bnjax.nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))  # no axis_name: the flattened batch
    return ours, reference


@pytest.mark.parametrize("sync", SYNCS)
def test_nnx_vmap_with_the_module_broadcast(sync):
    x = _data((8, 3, 4), seed=3)
    ours, reference = _nnx_pair(sync)
    theirs = nnx.BatchNorm(4, momentum=0.9, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0))
    apply = nnx.vmap(lambda bn, x: bn(x), in_axes=(None, 0), axis_name="d")
    y = apply(ours, x)
    y_flax = apply(theirs, x)
    y_ref = reference(x.reshape(24, 4))
    np.testing.assert_allclose(y.reshape(24, 4), y_ref, **TOL)
    np.testing.assert_allclose(y, y_flax, **TOL)
    for name in ("mean", "var"):
        np.testing.assert_allclose(getattr(ours, name)[...], getattr(reference, name)[...], **TOL)
        np.testing.assert_allclose(getattr(ours, name)[...], getattr(theirs, name)[...], **TOL)


@pytest.mark.parametrize("sync", SYNCS)
def test_nnx_shard_map_with_replicated_module_state(sync):
    x = _data((24, 4), seed=4)
    ours, reference = _nnx_pair(sync)
    mesh = _mesh()
    apply = nnx.shard_map(lambda bn, x: bn(x), mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))
    y = nnx.jit(apply)(ours, jax.device_put(x, NamedSharding(mesh, P("d"))))
    np.testing.assert_allclose(y, reference(x), **TOL)
    for name in ("mean", "var"):
        np.testing.assert_allclose(getattr(ours, name)[...], getattr(reference, name)[...], **TOL)
