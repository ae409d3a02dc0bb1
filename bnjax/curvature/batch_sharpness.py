"""Mini-batch curvature for SGD: batch sharpness and the mini-batch ``lambda_max`` average.

Andreyev & Beneventano, "Edge of Stochastic Stability: Revisiting the Edge of Stability for SGD" (arXiv
2412.20553) show that under mini-batch SGD with step ``eta`` the quantity that settles at ``2/eta`` is not the
top eigenvalue of the full-batch Hessian but *batch sharpness*, the expected directional curvature of the
mini-batch loss ``L_B`` along its own gradient ``g_B = grad L_B``::

    batch sharpness = E_B[ g_B^T H_B g_B / ||g_B||^2 ],        H_B = hess L_B,

with ``B`` a uniformly random batch of ``batch_size`` distinct examples. Their public code
(github.com/arseniqum/edge-of-stochastic-stability, ``utils/measure.py``, ``calculate_averaged_grad_H_grad``)
estimates it by Monte Carlo over independently drawn batches (each batch ``randperm(N)[:b]``: distinct examples,
batches drawn with replacement from one another), as the *mean of the per-batch ratios* (the default,
``average="ratios"`` here); their ``expectation_inside=True`` option, the ratio of means
``E_B[g_B^T H_B g_B] / E_B[||g_B||^2]``, is ``average="ratio_of_means"`` here. They stop adaptively (at least
20 and at most 1000 batches, relative standard error 0.5%); here the number of batches is fixed
(``num_batches``, static) and the standard error is reported instead. They also average the top eigenvalue of
the mini-batch Hessian over batches, ``E_B[lambda_max(H_B)]`` (``calculate_averaged_lambdamax``: at most 50
batches, 5% relative standard error): :func:`batch_lambda_max`.

Batch norm: a batch is one call of ``loss_fn`` on its ``batch_size`` examples, so a train-mode BN loss
normalizes each batch with its own statistics, which is the function SGD takes its step on (their code keeps
the network in train mode for the same reason).

Both estimators loop over batches with :mod:`bnjax.loops` (``placement``): one compiled program, or (``"auto"``
on CPU for convolutional losses, whose backward convolutions XLA:CPU runs 15-20x slower inside loop bodies)
one jitted call per batch. They run under ``jax.jit`` and ``jax.vmap`` (e.g. over seeds) with
``placement="auto"`` or ``"device"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import loops
from bnjax._validate import check_float_tree, check_key, check_positive_int
from bnjax.curvature.eigen import (
    DEFAULT_LINEARIZE_BUDGET,
    _check_iters,
    _check_start,
    _check_tolerance,
    _driver_and_operator,
    _Layout,
    _rescaled,
    _top_pair,
    _unit,
    random_like,
)
from bnjax.curvature.hvp import hvp
from bnjax.curvature.operators import _num_examples

PyTree = Any
Average = Literal["ratios", "ratio_of_means"]
AVERAGES = ("ratios", "ratio_of_means")


class BatchSharpness(NamedTuple):
    """Batch-sharpness estimate over ``m`` random batches (a NamedTuple, hence a pytree through ``jit``).

    Per batch ``i``: ``curvature[i] = g_i^T H_i g_i`` and ``grad_sq_norm[i] = ||g_i||^2`` (gradient and
    Hessian of that batch's loss), ``ratios[i] = curvature[i] / grad_sq_norm[i]``.
    """

    estimate: jax.Array  # () mean(ratios) ("ratios") or mean(curvature) / mean(grad_sq_norm) ("ratio_of_means")
    stderr: jax.Array  # () standard error of `estimate` over batches; 0 for the full batch, NaN for one mini-batch
    ratios: jax.Array  # (m,) g^T H g / ||g||^2 of each batch
    curvature: jax.Array  # (m,) g^T H g of each batch
    grad_sq_norm: jax.Array  # (m,) ||g||^2 of each batch
    indices: jax.Array  # (m, batch_size) int32: the examples of each batch
    num_batches: jax.Array  # () int32: m
    hvps: jax.Array  # () int32: Hessian-vector products used (one per batch, each with its gradient)


class BatchLambdaMax(NamedTuple):
    """Estimate of ``E_B[lambda_max(H_B)]`` over ``m`` random batches (a pytree)."""

    estimate: jax.Array  # () mean of `eigenvalues`
    stderr: jax.Array  # () std(eigenvalues, ddof=1) / sqrt(m); 0 for the full batch, NaN for one mini-batch
    eigenvalues: jax.Array  # (m,) top (algebraically largest) eigenvalue of each batch's Hessian
    converged: jax.Array  # (m,) bool: each solve's stopping rule held (read it before trusting the values)
    eigenvector: PyTree  # like params, unit norm: the last batch's top eigenvector (a warm start for a next call)
    indices: jax.Array  # (m, batch_size) int32
    num_batches: jax.Array  # () int32: m
    hvps: jax.Array  # () int32: Hessian-vector products used, all batches together


# -- batches ------------------------------------------------------------------------------------------------


def _check_batches(data: PyTree, batch_size: Any, num_batches: Any) -> tuple[int, int, int]:
    """``(N, batch_size, m)`` validated; ``m = 1`` for the full batch (every draw is the same set)."""
    n = _num_examples(data)
    batch_size = check_positive_int(batch_size, "batch_size")
    num_batches = check_positive_int(num_batches, "num_batches")
    if batch_size > n:
        raise ValueError(
            f"`batch_size={batch_size}` exceeds the {n} examples of `data`; a batch holds distinct examples, so "
            f"use batch_size <= {n} (batch_size={n} is the full batch)."
        )
    return n, batch_size, 1 if batch_size == n else num_batches


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Batch ``i``: ``batch_size`` distinct examples drawn uniformly from ``keys[i]`` (``permutation[:b]``, as
    the paper's code and the experiments' SGD do); the whole data set, in order, for the full batch."""

    n: int
    batch_size: int

    def indices(self, keys: jax.Array, i: Any) -> jax.Array:
        if self.batch_size == self.n:
            return jnp.arange(self.n, dtype=jnp.int32)
        return jax.random.permutation(keys[i], self.n)[: self.batch_size].astype(jnp.int32)

    def __call__(self, keys: jax.Array, i: Any, data: PyTree) -> tuple[jax.Array, PyTree]:
        idx = self.indices(keys, i)
        return idx, jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def _standard_error(samples: jax.Array, full_batch: bool) -> jax.Array:
    m = samples.shape[0]
    if full_batch:
        return jnp.zeros((), samples.dtype)
    if m < 2:
        return jnp.full((), jnp.nan, samples.dtype)
    return jnp.std(samples, ddof=1) / jnp.sqrt(m)


def _ratio_of_means_stderr(x: jax.Array, y: jax.Array, full_batch: bool) -> jax.Array:
    """Delta-method standard error of ``mean(x) / mean(y)`` (the formula of the paper's code)::

    var(R) ~ (var x / ybar^2 - 2 cov(x, y) xbar / ybar^3 + var y xbar^2 / ybar^4) / m   (ddof=1 moments)
    """
    m = x.shape[0]
    if full_batch:
        return jnp.zeros((), x.dtype)
    if m < 2:
        return jnp.full((), jnp.nan, x.dtype)
    xbar, ybar = jnp.mean(x), jnp.mean(y)
    dx, dy = x - xbar, y - ybar
    var_x, var_y, cov = (jnp.sum(a * b) / (m - 1) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    var = (var_x / ybar**2 - 2 * cov * xbar / ybar**3 + var_y * xbar**2 / ybar**4) / m
    return jnp.sqrt(jnp.maximum(var, 0))


# -- batch sharpness ----------------------------------------------------------------------------------------


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class _GradCurvature:
    """``(g^T H g, ||g||^2)`` of ``loss_fn`` on one batch: linearize the gradient once, whose tangent along
    ``g`` is ``H g`` (one gradient and one Hessian-vector product)."""

    loss_fn: Callable[..., jax.Array]

    def __call__(self, params: PyTree, batch: PyTree, args: tuple) -> tuple[jax.Array, jax.Array]:
        grad, hvp_at = jax.linearize(jax.grad(lambda p: self.loss_fn(p, batch, *args)), params)
        return _vdot(grad, hvp_at(grad)), _vdot(grad, grad)


@dataclasses.dataclass(frozen=True)
class _BatchSharpnessSolve:
    driver: loops.Driver
    sampler: _Batch
    piece: _GradCurvature
    num_batches: int
    average: str
    dtype: str

    def __call__(self, key: jax.Array, params: PyTree, data: PyTree, args: tuple) -> BatchSharpness:
        d, m, b, dtype = self.driver, self.num_batches, self.sampler.batch_size, self.dtype
        keys = jax.random.split(key, m)

        def one_batch(i: Any, carry: tuple) -> tuple:
            idx, batch = d.call(self.sampler, keys, i, data)
            curvature, sq_norm = d.call(self.piece, params, batch, args)
            return d.call(_store_sharpness, carry, i, idx, curvature, sq_norm)

        init = (jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((m, b), jnp.int32))
        curvature, sq_norm, indices = d.fori_loop(m, one_batch, init)
        summary = _SharpnessSummary(self.average, self.sampler.batch_size == self.sampler.n)
        return d.call(summary, curvature, sq_norm, indices)


def _store_sharpness(carry: tuple, i: Any, idx: jax.Array, curvature: jax.Array, sq_norm: jax.Array) -> tuple:
    curv, sq, indices = carry
    return curv.at[i].set(curvature.astype(curv.dtype)), sq.at[i].set(sq_norm.astype(sq.dtype)), indices.at[i].set(idx)


@dataclasses.dataclass(frozen=True)
class _SharpnessSummary:
    average: str
    full_batch: bool

    def __call__(self, curvature: jax.Array, sq_norm: jax.Array, indices: jax.Array) -> BatchSharpness:
        ratios = curvature / sq_norm
        if self.average == "ratios":
            estimate, stderr = jnp.mean(ratios), _standard_error(ratios, self.full_batch)
        else:
            estimate = jnp.mean(curvature) / jnp.mean(sq_norm)
            stderr = _ratio_of_means_stderr(curvature, sq_norm, self.full_batch)
        m = jnp.asarray(ratios.shape[0], jnp.int32)
        return BatchSharpness(estimate, stderr, ratios, curvature, sq_norm, indices, m, m)


def _check_average(average: Any) -> str:
    if average not in AVERAGES:
        raise ValueError(
            f"`average` must be one of {AVERAGES}: 'ratios' is the paper's E_B[g^T H g / ||g||^2], "
            f"'ratio_of_means' is E_B[g^T H g] / E_B[||g||^2]; got {average!r}."
        )
    return average


def batch_sharpness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: PyTree,
    *args: Any,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
    average: Average = "ratios",
    placement: loops.Placement = "auto",
) -> BatchSharpness:
    """Batch sharpness ``E_B[g_B^T H_B g_B / ||g_B||^2]`` (Andreyev & Beneventano, arXiv 2412.20553).

    Monte Carlo over ``num_batches`` independent batches ``B``, each ``batch_size`` distinct examples drawn
    uniformly from ``data`` (as the paper's code does; see the module docstring). For each batch one
    ``jax.linearize`` of the batch gradient gives ``g_B`` and ``H_B g_B`` (one gradient and one
    Hessian-vector product, ``H_B`` never formed).

    Variance: with ``average="ratios"`` (the paper's estimator) the batches are i.i.d., so ``stderr =
    std(ratios, ddof=1) / sqrt(m)`` is the standard error of the mean; with ``"ratio_of_means"`` it is the
    delta-method standard error of ``mean(curvature) / mean(grad_sq_norm)`` (as in the paper's code; the
    ratio of means is biased by O(1/m), the mean of ratios is unbiased for its own expectation). The full
    batch (``batch_size == N``) is not random: one batch, the ordinary Rayleigh quotient of the full-batch
    Hessian along the full gradient, ``stderr = 0``. A batch whose gradient is zero gives a NaN ratio.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> scalar``, the mean loss of a batch (``batch`` has the
        structure of ``data`` with a leading axis of ``batch_size``); e.g. ``flax_curvature_fns(...).loss_fn``
        with ``args = (batch_stats,)`` (``bn_mode="train"``: each batch with its own BN statistics).
      params: the point (pytree of float arrays).
      data: pytree of arrays with a common leading example axis ``N``, e.g. ``(x, y)``.
      *args: further arguments of ``loss_fn``, not batched.
      batch_size: examples per batch (static), ``1 <= batch_size <= N``.
      num_batches: number of batches ``m`` (static, positive; ``>= 2`` for a standard error of a mini-batch
        estimate). Ignored (1) for the full batch.
      key: PRNG key for the batches.
      average: ``"ratios"`` (default, the paper's definition) or ``"ratio_of_means"``.
      placement: ``"auto"``, ``"device"`` or ``"host"``: where the loop over batches runs (:mod:`bnjax.loops`).

    Returns:
      :class:`BatchSharpness`; dtype of the parameters. A 95% interval is about ``estimate ± 1.96 stderr``.
    """
    check_key(key)
    n, batch_size, num_batches = _check_batches(data, batch_size, num_batches)
    checked_average = _check_average(average)
    check_float_tree(params, "params")
    _Layout.of(params, "params")  # float32/float64 leaves, as the solvers need
    dtype = jnp.result_type(*jax.tree.leaves(params))
    piece = _GradCurvature(loss_fn)
    driver = loops.driver_for(placement, piece, params, _sample_batch(data, batch_size), args)
    plan = _BatchSharpnessSolve(driver, _Batch(n, batch_size), piece, num_batches, checked_average, str(dtype))
    return driver.run(plan, key, params, data, args)


# -- mini-batch lambda_max ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BatchHessian:
    """The Hessian of one batch's loss as a matvec ``matvec(v, params, batch, *args)`` (hashable by
    ``loss_fn``, so repeated calls reuse the compiled solver)."""

    loss_fn: Callable[..., jax.Array]

    def __call__(self, vector: PyTree, params: PyTree, batch: PyTree, *args: Any) -> PyTree:
        return hvp(self.loss_fn, params, vector, batch, *args)


@dataclasses.dataclass(frozen=True)
class _BatchLambdaMaxSolve:
    driver: loops.Driver
    sampler: _Batch
    op: Any  # _Operator of _BatchHessian
    num_batches: int
    max_iters: int

    def __call__(self, key, x0, params, data, args, tol, residual_tol) -> BatchLambdaMax:
        d, m, b = self.driver, self.num_batches, self.sampler.batch_size
        keys = jax.random.split(key, m)

        def one_batch(i: Any, carry: tuple) -> tuple:
            idx, batch = d.call(self.sampler, keys, i, data)
            # Warm start from the previous batch's eigenvector: the batches' top eigenvectors are correlated.
            pair = _top_pair(
                d, "lanczos", self.op, carry[-1], jnp.inf, tol, residual_tol, self.max_iters,
                params=(params, batch, *args),
            )  # fmt: skip
            return d.call(_store_top, carry, i, idx, pair.eigenvalue, pair.iterations, pair.converged, pair.vector)

        dtype = x0.dtype
        init = (
            jnp.zeros(m, dtype), jnp.zeros(m, bool), jnp.zeros((m, b), jnp.int32), jnp.zeros((), jnp.int32), x0,
        )  # fmt: skip
        values, converged, indices, hvps, vector = d.fori_loop(m, one_batch, init)
        full = self.sampler.batch_size == self.sampler.n
        return d.call(_LambdaSummary(self.op.layout, full), values, converged, indices, hvps, vector)


def _store_top(carry: tuple, i: Any, idx: jax.Array, value, iterations, converged, vector) -> tuple:
    values, conv, indices, hvps, previous = carry
    # A batch with a NaN/Inf gives a non-finite vector: the next batch starts from the last finite one instead
    # (else every later batch would be NaN too), and the returned eigenvector is the last finite one.
    vector = jnp.where(jnp.all(jnp.isfinite(vector)), vector, previous)
    return (
        values.at[i].set(value.astype(values.dtype)), conv.at[i].set(converged), indices.at[i].set(idx),
        hvps + iterations.astype(jnp.int32), vector,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _LambdaSummary:
    layout: Any
    full_batch: bool

    def __call__(self, values, converged, indices, hvps, vector) -> BatchLambdaMax:
        m = jnp.asarray(values.shape[0], jnp.int32)
        stderr = _standard_error(values, self.full_batch)
        return BatchLambdaMax(
            jnp.mean(values), stderr, values, converged, self.layout.unravel(vector), indices, m, hvps
        )


def batch_lambda_max(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: PyTree,
    *args: Any,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
    v0: PyTree | None = None,
    tol: float = 1e-3,
    residual_tol: float = 1e-2,
    max_iters: int = 30,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> BatchLambdaMax:
    """Mini-batch ``lambda_max`` average ``E_B[lambda_max(H_B)]`` (Andreyev & Beneventano, arXiv 2412.20553).

    The same batches as :func:`batch_sharpness` draws from the same ``key`` (``num_batches`` independent
    batches of ``batch_size`` distinct examples). Each batch's top eigenvalue is found by the adaptive Lanczos
    of :func:`~bnjax.curvature.lanczos_top` (stopping rule ``tol`` / ``residual_tol``, at most ``max_iters``
    HVPs), warm-started from the previous batch's eigenvector; the first batch starts from ``v0``. Batch
    Hessians share most of their top direction, so warm starts save HVPs; pass the returned ``eigenvector``
    as ``v0`` of the next call (e.g. at the next training checkpoint).

    Variance: i.i.d. batches, ``stderr = std(eigenvalues, ddof=1) / sqrt(m)`` (it ignores the solver's own
    error, bounded by ``residual * |lambda|`` per batch). Full batch: one batch, ``stderr = 0``; it equals
    the top eigenvalue of the full-batch Hessian (:func:`~bnjax.curvature.lanczos_top`).

    Args:
      loss_fn, params, data, batch_size, num_batches, key: as in :func:`batch_sharpness`.
      *args: as in :func:`batch_sharpness`.
      v0: start vector of the first solve (pytree like ``params``, nonzero and finite); ``None``: random from
        ``key``.
      tol, residual_tol, max_iters: :func:`~bnjax.curvature.lanczos_top`'s stopping rule, per batch
        (``max_iters`` static, at most the parameter count).
      placement, linearize_budget: as in :func:`~bnjax.curvature.lanczos_top` (``linearize_budget`` for one
        batch's Hessian).

    Returns:
      :class:`BatchLambdaMax`; read ``converged`` before trusting the values.
    """
    check_key(key)
    n, batch_size, num_batches = _check_batches(data, batch_size, num_batches)
    _check_tolerance(tol, "tol")
    _check_tolerance(residual_tol, "residual_tol")
    if v0 is None:  # a stream apart from the batches' keys, so the batches equal batch_sharpness's
        v0 = random_like(jax.random.fold_in(key, 2**31 - 1), params)
    matvec = _BatchHessian(loss_fn)
    example = _sample_batch(data, batch_size)
    driver, op = _driver_and_operator(matvec, v0, (params, example, *args), placement, linearize_budget)
    x0 = op.layout.ravel(v0)
    _check_start(x0)
    x0 = _unit(_rescaled(x0))  # the eigenvector returned when no batch is finite is then a unit vector too
    max_iters = _check_iters(max_iters, op.layout.size, "max_iters")
    plan = _BatchLambdaMaxSolve(driver, _Batch(n, batch_size), op, num_batches, max_iters)
    return driver.run(plan, key, x0, params, data, args, tol, residual_tol)


def _sample_batch(data: PyTree, batch_size: int) -> PyTree:
    """A batch-shaped slice of ``data`` (the leading rows), for tracing the operator's shapes."""
    return jax.tree.map(lambda x: lax.slice_in_dim(x, 0, batch_size, axis=0), data)
