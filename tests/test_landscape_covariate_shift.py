"""Santurkar et al.'s internal covariate shift against hand-computed values and a direct loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bnjax
from bnjax.curvature.operators import flax_curvature_fns
from bnjax.landscape import internal_covariate_shift, layer_groups, module_call_order

CHAIN = ("z", "a", "m")  # not sorted: the layer order is the chain's, not the dict's


def _linear_chain_loss(params, batch):
    x, y = batch
    out = x
    for k in CHAIN:
        out = out @ params[k]
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def _chain_grads_np(ws, x, y):
    """Hand-derived gradients of 0.5/n ||x W1 W2 W3 - y||^2, float64."""
    n = x.shape[0]
    w1, w2, w3 = ws
    r = x @ w1 @ w2 @ w3 - y
    return [x.T @ r @ (w2 @ w3).T / n, (x @ w1).T @ r @ w3.T / n, (x @ w1 @ w2).T @ r / n]


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_three_layer_linear_chain_matches_hand_computation(optimizer, chunk_size):
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3, 3), (3, 2)]
    ws = [rng.normal(size=s) for s in shapes]
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 2))
    params = {k: jnp.asarray(w, jnp.float32) for k, w in zip(CHAIN, ws)}
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    grads = jax.grad(_linear_chain_loss)(params, batch)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    res = jax.jit(functools.partial(internal_covariate_shift, _linear_chain_loss, layers=CHAIN, chunk_size=chunk_size))(
        params, batch, updates=updates
    )
    u = [np.asarray(updates[k], np.float64) for k in CHAIN]
    g = _chain_grads_np(ws, x, y)
    g_shift = [
        g[0],
        _chain_grads_np([ws[0] + u[0], ws[1], ws[2]], x, y)[1],
        _chain_grads_np([ws[0] + u[0], ws[1] + u[1], ws[2]], x, y)[2],
    ]
    dist = [np.linalg.norm(a - b) for a, b in zip(g, g_shift)]
    cos = [np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(g, g_shift)]
    scale = max(np.linalg.norm(a) for a in g)
    np.testing.assert_allclose(res.grad_distance, dist, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(res.cosine, cos, rtol=1e-5)
    np.testing.assert_allclose(res.grad_norm, [np.linalg.norm(a) for a in g], rtol=1e-5)
    np.testing.assert_allclose(res.shifted_grad_norm, [np.linalg.norm(a) for a in g_shift], rtol=1e-5)
    assert min(dist[1:]) > 1e-2 * scale  # the shift is not trivially zero


def test_scalar_chain_by_hand_with_grouped_layers():
    # L = 0.5 * mean((x a b c - y)^2) with layers [(a, b), c]: layer 2's gradient after a and b moved.
    x, y = np.array([1.0, 2.0, -1.0]), np.array([0.5, 1.0, 0.0])
    a, b, c = 0.8, -1.2, 0.5
    ua, ub, uc = 0.1, -0.2, 0.3
    params = {k: jnp.array(v, jnp.float32) for k, v in zip("abc", (a, b, c))}
    updates = {k: jnp.array(v, jnp.float32) for k, v in zip("abc", (ua, ub, uc))}
    loss = lambda p, batch: 0.5 * jnp.mean((batch[0] * p["a"] * p["b"] * p["c"] - batch[1]) ** 2)
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    res = internal_covariate_shift(loss, params, batch, updates=updates, layers=[("a", "b"), "c"])
    dc = lambda a, b, c: np.mean((x * a * b * c - y) * x * a * b)
    g, g2 = dc(a, b, c), dc(a + ua, b + ub, c)
    np.testing.assert_allclose(res.grad_distance, [0.0, abs(g - g2)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.cosine, [1.0, np.sign(g * g2)], rtol=1e-6)
    assert layer_groups(params, [("a", "b"), "c"]) == (("a", "b"), ("c",))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(5)(x)
        x = bnjax.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dense(4)(x)
        x = bnjax.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(nn.relu(x))


def test_flax_bn_model_matches_direct_loop():
    model = _Net()
    x = jax.random.normal(jax.random.key(0), (12, 3))
    y = jax.random.normal(jax.random.key(1), (12, 2))
    variables = model.init(jax.random.key(2), x, train=False)
    mse = lambda out, t: jnp.mean((out - t) ** 2)
    fns = flax_curvature_fns(model.apply, mse, bn_mode="train")
    params, stats = variables["params"], variables["batch_stats"]
    opt = optax.sgd(0.5, momentum=0.9)
    grads = jax.grad(fns.loss_fn)(params, (x, y), stats)
    updates, _ = opt.update(grads, opt.init(params), params)
    names = ("Dense_0", "BatchNorm_0", "Dense_1", "BatchNorm_1", "Dense_2")
    assert module_call_order(model.apply, variables, x, train=False) == names
    res = jax.jit(functools.partial(internal_covariate_shift, fns.loss_fn, layers=names))(
        params, (x, y), stats, updates=updates
    )

    def direct_loss(p):
        out, _ = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return mse(out, y)

    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]).astype(np.float64)
    direct_grad = jax.jit(jax.grad(direct_loss))
    full = direct_grad(params)
    for i, name in enumerate(names):
        moved = {k: (jax.tree.map(jnp.add, params[k], updates[k]) if j < i else params[k]) for j, k in enumerate(names)}
        g = flat(full[name])
        g2 = flat(direct_grad(moved)[name])
        np.testing.assert_allclose(res.grad_distance[i], np.linalg.norm(g - g2), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(res.cosine[i], g @ g2 / np.linalg.norm(g) / np.linalg.norm(g2), rtol=1e-5)


def test_bad_layers_and_updates_raise():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    loss = lambda p, batch: jnp.sum(p["a"]) * jnp.sum(p["b"])
    with pytest.raises(ValueError, match="not listed: \\['b'\\]"):
        internal_covariate_shift(loss, params, None, updates=params, layers=["a"])
    with pytest.raises(TypeError, match="sequence"):
        layer_groups(params, "ab")
    with pytest.raises(ValueError, match="unknown keys: \\['c'\\]"):
        layer_groups(params, ["a", "b", "c"])
    with pytest.raises(ValueError, match="listed twice"):
        layer_groups(params, ["a", ("a", "b")])
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        layer_groups({"params": params}, ["params"])
    with pytest.raises(TypeError, match="dict"):
        layer_groups([jnp.ones(2)], [0])
    with pytest.raises(ValueError, match="updates"):
        internal_covariate_shift(loss, params, None, updates={"a": jnp.ones(2)}, layers=["a", "b"])
