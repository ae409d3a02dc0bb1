"""Tiny models and explicit-Hessian references for the curvature tests (float64; call inside enable_x64)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import bnjax
from bnjax.curvature import flax_curvature_fns


class MLP(nn.Module):
    """6 -> 12 -> 3 tanh MLP (123 params; +24 with BN)."""

    bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(12, param_dtype=jnp.float64)(x)
        if self.bn:
            x = bnjax.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


class CNN(nn.Module):
    """(8, 8, 1) -> conv3x3(4) -> conv3x3(4), stride 2 -> mean pool -> 3 (~210 params)."""

    bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = jnp.tanh(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
        x = nn.Conv(4, (3, 3), strides=2, param_dtype=jnp.float64)(x)
        if self.bn:
            x = bnjax.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=jnp.float64)(x)
        x = jnp.mean(jnp.tanh(x), axis=(1, 2))
        return nn.Dense(3, param_dtype=jnp.float64)(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; ``logits (B, C)``, integer ``labels (B,)``."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def make_problem(kind: str, bn: bool, n: int = 24, seed: int = 0) -> dict[str, Any]:
    """A model, float64 data and variables. BN running stats are made non-trivial by one train pass."""
    model = MLP(bn) if kind == "mlp" else CNN(bn)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    shape = (n, 6) if kind == "mlp" else (n, 8, 8, 1)
    x = jax.random.normal(k1, shape, jnp.float64) + 0.5
    y = jax.random.randint(k2, (n,), 0, 3)
    variables = jax.jit(model.init)(k3, x)
    stats = None
    if bn:
        _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
        stats = upd["batch_stats"]
    return dict(model=model, x=x, y=y, params=variables["params"], stats=stats)


def loss_fn_for(problem: dict[str, Any], bn_mode: str | None) -> Callable[..., jax.Array]:
    """The library's loss ``(params, batch, batch_stats) -> scalar`` for ``problem``."""
    mode = bn_mode if problem["stats"] is not None else None
    return flax_curvature_fns(problem["model"].apply, cross_entropy, bn_mode=mode).loss_fn


def explicit_hessian(
    problem: dict[str, Any], bn_mode: str | None = "train", chunk_size: int | None = None
) -> np.ndarray:
    """Dense Hessian of the (chunked) mean loss by ``jax.hessian`` on the flat parameters.

    Independent of the library's chunking: a Python loop over chunks, each weighted by its size.
    """
    flat, unravel = ravel_pytree(problem["params"])
    x, y, stats = problem["x"], problem["y"], problem["stats"]
    size = x.shape[0] if chunk_size is None else chunk_size
    fn = _hessian_fn(problem["model"], bn_mode if stats is not None else None, size, unravel)
    return np.asarray(fn(flat, x, y, stats))


@functools.cache
def _hessian_fn(model: nn.Module, bn_mode: str | None, size: int, unravel: Callable) -> Callable:
    """Compiled once per model/mode/chunking (parameters, data and statistics are arguments)."""

    def chunk_loss(p: Any, xc: jax.Array, yc: jax.Array, stats: Any) -> jax.Array:
        if bn_mode is None:
            return cross_entropy(model.apply({"params": p}, xc), yc)
        variables = {"params": p, "batch_stats": stats}
        if bn_mode == "eval":
            return cross_entropy(model.apply(variables, xc, train=False), yc)
        out, _ = model.apply(variables, xc, train=True, mutable=["batch_stats"])
        return cross_entropy(out, yc)

    def total(f: jax.Array, x: jax.Array, y: jax.Array, stats: Any) -> jax.Array:
        p, n = unravel(f), x.shape[0]
        parts = [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]
        return sum(len(xc) * chunk_loss(p, xc, yc, stats) for xc, yc in parts) / n

    return jax.jit(jax.hessian(total))


# Tests of the helpers themselves: a wrong reference would make every comparison meaningless.


def test_explicit_hessian_matches_finite_differences_of_the_gradient() -> None:
    with jax.enable_x64(True):
        problem = make_problem("mlp", bn=True, n=12)
        h = explicit_hessian(problem, "train", chunk_size=5)
        flat, unravel = ravel_pytree(problem["params"])
        loss = loss_fn_for(problem, "train")

        def chunked(f: jax.Array) -> jax.Array:  # sizes 5, 5, 2
            x, y, s = problem["x"], problem["y"], problem["stats"]
            parts = [(5, slice(0, 5)), (5, slice(5, 10)), (2, slice(10, 12))]
            return sum(w * loss(unravel(f), (x[sl], y[sl]), s) for w, sl in parts) / 12

        grad = jax.jit(jax.grad(chunked))
        e = np.zeros(flat.size)
        for i in (0, 7, flat.size - 1):
            e[:] = 0
            e[i] = 1e-6
            fd = (np.asarray(grad(flat + e)) - np.asarray(grad(flat - e))) / 2e-6
            np.testing.assert_allclose(h[:, i], fd, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(h, h.T, atol=1e-12)
