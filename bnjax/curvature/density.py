"""Stochastic trace, diagonal and spectral-density estimates: Hutchinson's trace and diagonal, Hutch++ and
stochastic Lanczos quadrature (SLQ).

All use Rademacher probes (entries ±1) and the matvec convention of :mod:`bnjax.curvature.hvp`. The probe
loop has the eigen-solvers' two placements (``placement``: one compiled program, or driven from Python with
one jitted call per matvec) and linearizes the operator once when it fits ``linearize_budget`` (see
:mod:`bnjax.curvature.eigen`).

Why bnjax's own estimators and not matfree's (``matfree.stochtrace``, whose Monte Carlo trace and diagonal
estimators compute the same formulas): matfree is not a core dependency (those are jax, jaxlib, flax, optax,
numpy and tqdm), and making it an optional extra would mean two code paths for the same estimate. The
estimators here are a few lines each, written once against :class:`bnjax.loops.Driver` (so they get the loop
placement that XLA:CPU's slow backward convolutions in loop bodies need, and the once-per-point
linearization), stream their samples (matfree's ``vmap`` over probes holds all of them at once), and return
standard errors. matfree (0.6.3, in the ``dev`` extra) is the independent reference of the tests: on the same
probes its estimates agree with these to rounding (``tests/test_curvature_subsets.py``). It has no Hutch++
(its XTrace/XDiag are a different, exchangeable-probe estimator) and no warm-started adaptive Lanczos.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import loops
from bnjax._validate import check_key, check_positive_int, check_scalar
from bnjax.curvature.eigen import (
    DEFAULT_LINEARIZE_BUDGET,
    LanczosDecomposition,
    _check_iters,
    _decomposition,
    _driver_and_operator,
    _iterate_from,
    _Operator,
    _Prepare,
    _tridiagonal,
)
from bnjax.curvature.hvp import Matvec

PyTree = Any


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of ``tr(A)``; a pytree."""

    trace: jax.Array  # () mean of the samples
    stderr: jax.Array  # () standard error of the mean: std(samples, ddof=1) / sqrt(num_samples)
    samples: jax.Array  # (num_samples,) z^T A z for each Rademacher probe z


@dataclasses.dataclass(frozen=True)
class _Probe:
    """Rademacher probe ``i`` of ``keys``: a flat ``(n,)`` vector of ±1."""

    n: int
    dtype: str

    def __call__(self, keys: jax.Array, i: Any) -> jax.Array:
        return jax.random.rademacher(keys[i], (self.n,), self.dtype)


class _ProbeState(NamedTuple):
    i: jax.Array  # int32[]: probes done
    samples: jax.Array  # (num_samples,) z^T A z so far
    keys: jax.Array  # (num_samples,) one PRNG key per probe
    query: jax.Array  # (n,) the current probe
    done: jax.Array  # bool[]


def _hutchinson_absorb(s: _ProbeState, w: jax.Array) -> _ProbeState:
    num = s.samples.shape[0]
    i = s.i + 1
    nxt = _Probe(s.query.size, str(s.query.dtype))(s.keys, jnp.minimum(i, num - 1))
    return _ProbeState(i, s.samples.at[s.i].set(jnp.vdot(s.query, w)), s.keys, nxt, i >= num)


@dataclasses.dataclass(frozen=True)
class _Hutchinson:
    op: _Operator
    driver: loops.Driver
    num_samples: int

    def __call__(self, key: jax.Array, params: tuple) -> TraceEstimate:
        d, layout = self.driver, self.op.layout
        keys = jax.random.split(key, self.num_samples)
        z0 = d.call(_Probe(layout.size, layout.dtype), keys, 0)
        operands, first = d.call(_Prepare(self.op), z0, params)
        state = _ProbeState(jnp.int32(0), jnp.zeros(self.num_samples, layout.dtype), keys, z0, jnp.asarray(False))
        state = _iterate_from(d, _hutchinson_absorb, self.op, operands, state, first)
        n = self.num_samples
        return TraceEstimate(jnp.mean(state.samples), jnp.std(state.samples, ddof=1) / jnp.sqrt(n), state.samples)


def hutchinson_trace(
    matvec: Matvec,
    key: jax.Array,
    like: PyTree,
    *params: Any,
    num_samples: int,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ≈ mean_i z_i^T A z_i`` with Rademacher probes ``z_i``.

    Unbiased; the variance of one sample is ``2 * (||A||_F^2 - sum_i A_ii^2)`` (zero for a diagonal ``A``),
    estimated by ``stderr``. A 95% interval is ``trace ± 2 * stderr``.

    Args:
      matvec: ``matvec(vector, *params) -> vector`` of a symmetric operator.
      key: PRNG key for the probes.
      like: a pytree shaped like the vectors (usually the parameters); only shapes and dtypes are used.
      *params: the matvec's parameters.
      num_samples: number of probes = matvecs (static, >= 2 for a standard error).
      placement, linearize_budget: as in :func:`~bnjax.curvature.power_iteration`.
    """
    check_key(key)
    num_samples = _check_num_samples(num_samples)
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    return driver.run(_Hutchinson(op, driver, num_samples), key, params)


def _check_num_samples(num_samples: Any) -> int:
    num_samples = check_positive_int(num_samples, "num_samples")
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2 to estimate a standard error; got {num_samples}.")
    return num_samples


# -- Hutchinson's diagonal estimator --------------------------------------------------------------------------


class DiagonalEstimate(NamedTuple):
    """Hutchinson estimate of ``diag(A)``; a pytree. Both fields are pytrees like the vectors (``like``)."""

    diagonal: PyTree  # mean over probes of z * (A z), elementwise
    stderr: PyTree  # standard error of each entry: std(samples, ddof=1) / sqrt(num_samples)


class _DiagonalState(NamedTuple):
    i: jax.Array  # int32[]: probes done
    mean: jax.Array  # (n,) running mean of z * (A z) (Welford)
    m2: jax.Array  # (n,) running sum of squared deviations (Welford)
    keys: jax.Array  # (num_samples,) one PRNG key per probe
    query: jax.Array  # (n,) the current probe
    done: jax.Array  # bool[]


def _diagonal_absorb(s: _DiagonalState, w: jax.Array) -> _DiagonalState:
    num = s.keys.shape[0]
    i = s.i + 1
    x = s.query * w
    delta = x - s.mean
    mean = s.mean + delta / i.astype(x.dtype)
    nxt = _Probe(s.query.size, str(s.query.dtype))(s.keys, jnp.minimum(i, num - 1))
    return _DiagonalState(i, mean, s.m2 + delta * (x - mean), s.keys, nxt, i >= num)


@dataclasses.dataclass(frozen=True)
class _HutchinsonDiagonal:
    op: _Operator
    driver: loops.Driver
    num_samples: int

    def __call__(self, key: jax.Array, params: tuple) -> DiagonalEstimate:
        d, layout = self.driver, self.op.layout
        keys = jax.random.split(key, self.num_samples)
        z0 = d.call(_Probe(layout.size, layout.dtype), keys, 0)
        operands, first = d.call(_Prepare(self.op), z0, params)
        zeros = jnp.zeros(layout.size, layout.dtype)
        state = _DiagonalState(jnp.int32(0), zeros, zeros, keys, z0, jnp.asarray(False))
        state = _iterate_from(d, _diagonal_absorb, self.op, operands, state, first)
        n = self.num_samples
        stderr = jnp.sqrt(state.m2 / (n - 1) / n)
        return DiagonalEstimate(layout.unravel(state.mean), layout.unravel(stderr))


def hutchinson_diagonal(
    matvec: Matvec,
    key: jax.Array,
    like: PyTree,
    *params: Any,
    num_samples: int,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> DiagonalEstimate:
    """Hutchinson's diagonal estimator ``diag(A) ≈ mean_i z_i * (A z_i)`` with Rademacher probes ``z_i``.

    Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix" (2007). Unbiased:
    ``E[z_j (A z)_j] = A_jj + sum_{k != j} A_jk E[z_j z_k] = A_jj``; the variance of one sample of entry ``j``
    is ``sum_{k != j} A_jk^2`` (the off-diagonal squared norm of row ``j``; zero for a diagonal ``A``, which
    the estimator then returns exactly), estimated by ``stderr`` per entry. Costs ``num_samples`` matvecs
    and memory of three vectors (a running mean and variance, Welford's update).

    Args:
      matvec: ``matvec(vector, *params) -> vector`` of a square operator (symmetry is not needed).
      key: PRNG key for the probes (the same key gives the probes of :func:`hutchinson_trace`).
      like: a pytree shaped like the vectors (usually the parameters, or a subset's vector, see
        :func:`~bnjax.curvature.param_subset`); only shapes and dtypes are used.
      *params: the matvec's parameters.
      num_samples: number of probes = matvecs (static, >= 2 for a standard error).
      placement, linearize_budget: as in :func:`~bnjax.curvature.power_iteration`.

    Returns:
      A :class:`DiagonalEstimate` whose fields are pytrees like ``like``.
    """
    check_key(key)
    num_samples = _check_num_samples(num_samples)
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    return driver.run(_HutchinsonDiagonal(op, driver, num_samples), key, params)


# -- Hutch++ ----------------------------------------------------------------------------------------------------


class _RowsState(NamedTuple):
    i: jax.Array  # int32[]: rows multiplied
    rows: jax.Array  # (k, n) the vectors to multiply
    out: jax.Array  # (k, n) A @ rows[j] for j < i
    query: jax.Array  # (n,) rows[i]
    done: jax.Array  # bool[]


def _rows_absorb(s: _RowsState, w: jax.Array) -> _RowsState:
    k = s.rows.shape[0]
    i = s.i + 1
    return _RowsState(i, s.rows, s.out.at[s.i].set(w), s.rows[jnp.minimum(i, k - 1)], i >= k)


class _ResidualState(NamedTuple):
    i: jax.Array  # int32[]: probes done
    samples: jax.Array  # (num_samples,) p^T A p with p = (I - Q Q^T) g
    keys: jax.Array  # (num_samples,) one PRNG key per probe g
    basis: jax.Array  # (k, n) orthonormal rows: Q^T
    query: jax.Array  # (n,) the current projected probe p
    done: jax.Array  # bool[]


@dataclasses.dataclass(frozen=True)
class _ProjectedProbe:
    """Rademacher probe ``i`` of ``keys`` with the span of ``basis``'s rows projected out."""

    n: int
    dtype: str

    def __call__(self, keys: jax.Array, i: Any, basis: jax.Array) -> jax.Array:
        g = _Probe(self.n, self.dtype)(keys, i)
        return g - basis.T @ (basis @ g)


def _residual_absorb(s: _ResidualState, w: jax.Array) -> _ResidualState:
    num = s.keys.shape[0]
    i = s.i + 1
    nxt = _ProjectedProbe(s.query.size, str(s.query.dtype))(s.keys, jnp.minimum(i, num - 1), s.basis)
    return s._replace(i=i, samples=s.samples.at[s.i].set(jnp.vdot(s.query, w)), query=nxt, done=i >= num)


def _orthonormal_rows(y: jax.Array) -> jax.Array:
    """``Q^T`` of the thin QR of ``Y^T``: orthonormal rows spanning the rows of ``y`` ``(k, n)``."""
    return jnp.linalg.qr(y.T)[0].T


def _low_rank_trace(q: jax.Array, aq: jax.Array) -> jax.Array:
    return jnp.sum(q * aq)


def _apply_rows(d: loops.Driver, op: _Operator, operands: Any, rows: jax.Array, first: jax.Array | None) -> jax.Array:
    """``A @ rows[j]`` for every row (one matvec each); ``first`` is ``A @ rows[0]`` if already computed."""
    state = _RowsState(jnp.int32(0), rows, jnp.zeros_like(rows), rows[0], jnp.asarray(False))
    return _iterate_from(d, _rows_absorb, op, operands, state, first).out


@dataclasses.dataclass(frozen=True)
class _HutchPlusPlus:
    op: _Operator
    driver: loops.Driver
    rank: int
    num_samples: int

    def __call__(self, key: jax.Array, params: tuple) -> TraceEstimate:
        d, layout = self.driver, self.op.layout
        sketch_key, probe_key = jax.random.split(key)
        sketch = d.call(_Sketch(self.rank, layout.size, layout.dtype), sketch_key)
        operands, first = d.call(_Prepare(self.op), sketch[0], params)
        q = d.call(_orthonormal_rows, _apply_rows(d, self.op, operands, sketch, first))
        low = d.call(_low_rank_trace, q, _apply_rows(d, self.op, operands, q, None))
        keys = jax.random.split(probe_key, self.num_samples)
        p0 = d.call(_ProjectedProbe(layout.size, layout.dtype), keys, 0, q)
        samples = jnp.zeros(self.num_samples, layout.dtype)
        state = _ResidualState(jnp.int32(0), samples, keys, q, p0, jnp.asarray(False))
        state = _iterate_from(d, _residual_absorb, self.op, operands, state, None)
        total = low + state.samples
        return TraceEstimate(jnp.mean(total), jnp.std(total, ddof=1) / jnp.sqrt(self.num_samples), total)


@dataclasses.dataclass(frozen=True)
class _Sketch:
    """``(rank, n)`` Rademacher rows."""

    rank: int
    n: int
    dtype: str

    def __call__(self, key: jax.Array) -> jax.Array:
        return jax.random.rademacher(key, (self.rank, self.n), self.dtype)


def hutchpp_trace(
    matvec: Matvec,
    key: jax.Array,
    like: PyTree,
    *params: Any,
    rank: int,
    num_samples: int,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021).

    Algorithm 1 of the paper with a sketch of ``rank`` Rademacher vectors ``S`` and ``num_samples`` Rademacher
    probes ``g_i``: ``Q = orth(A S)``, then ``tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T))``, the first term
    exact, the second by Hutchinson with the projected probes ``p_i = (I - QQ^T) g_i``. Costs
    ``2 * rank + num_samples`` matvecs and ``2 * rank`` vectors of memory. Unbiased; exact when ``A`` has rank
    ``<= rank`` (then ``Q`` spans its range and the deflated part is zero). The deflated operator keeps the
    small eigenvalues only, so for a matrix with a few dominant eigenvalues (a Hessian's outliers) the
    variance falls far below Hutchinson's at the same number of matvecs: for positive semi-definite ``A``,
    ``O(1 / epsilon)`` matvecs give a relative error ``epsilon`` instead of ``O(1 / epsilon^2)``.

    The standard error is conditional on the sketch: ``samples`` are ``tr(Q^T A Q) + p_i^T A p_i``, whose mean
    is ``trace``, and ``stderr = std(samples, ddof=1) / sqrt(num_samples)``, the error of the Hutchinson part
    (variance of one sample ``2 (||A'||_F^2 - sum_i A'_ii^2)`` with ``A' = (I - QQ^T) A (I - QQ^T)``); the
    sketch's own randomness only changes which part of ``A`` is deflated.

    Args:
      matvec: ``matvec(vector, *params) -> vector`` of a symmetric operator.
      key: PRNG key for the sketch and the probes.
      like: a pytree shaped like the vectors; only shapes and dtypes are used.
      *params: the matvec's parameters.
      rank: sketch size ``k`` (static, ``1 <= rank <= n``); the paper splits a budget of ``m`` matvecs as
        ``rank = num_samples = m / 3``.
      num_samples: probes of the deflated part (static, >= 2 for a standard error).
      placement, linearize_budget: as in :func:`~bnjax.curvature.power_iteration`.
    """
    check_key(key)
    num_samples = _check_num_samples(num_samples)
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    rank = check_positive_int(rank, "rank")
    if rank > op.layout.size:
        raise ValueError(
            f"`rank`={rank} exceeds the operator dimension {op.layout.size}: the sketch spans at most n "
            f"directions. Use rank <= {op.layout.size}."
        )
    return driver.run(_HutchPlusPlus(op, driver, rank, num_samples), key, params)


class SpectralDensity(NamedTuple):
    """SLQ estimate of the eigenvalue density: for each probe a Gauss quadrature rule (nodes, weights).

    The density is ``mean_p sum_i weights[p, i] * delta(lambda - nodes[p, i])``; each probe's weights sum to 1,
    so ``n * mean_p sum_i weights[p, i] * f(nodes[p, i])`` estimates ``tr f(A)`` (exact in expectation for
    polynomials of degree < 2 * num_iters).
    """

    nodes: jax.Array  # (num_probes, num_iters) Ritz values
    weights: jax.Array  # (num_probes, num_iters) squared first components of the Ritz vectors
    dimension: jax.Array  # () int: n, the operator dimension

    def smoothed(self, grid: jax.Array, sigma: float) -> jax.Array:
        """Density on ``grid`` (shape ``(g,)``) with each node replaced by a Gaussian of width ``sigma`` (``> 0``);
        ``(g,)``."""
        check_scalar(sigma, "sigma", low=0.0, low_open=True, hint=" It is the width of each node's Gaussian.")
        grid = jnp.asarray(grid)
        if grid.ndim != 1 or not jnp.issubdtype(grid.dtype, jnp.number) or jnp.iscomplexobj(grid):
            raise ValueError(
                f"`grid` must be a 1-D array of real points, e.g. jnp.linspace(lo, hi, 200); got shape {grid.shape} "
                f"and dtype {grid.dtype}."
            )
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
        return jnp.mean(jnp.sum(self.weights[None] * kernel, axis=-1), axis=-1)

    def trace_of(self, f: Any = lambda x: x) -> jax.Array:
        """Estimate of ``tr f(A)`` (``f`` elementwise, default the identity: the trace); a scalar."""
        return self.dimension * jnp.mean(jnp.sum(self.weights * f(self.nodes), axis=-1))


def _store_quadrature(carry: tuple, p: Any, dec: LanczosDecomposition) -> tuple:
    theta, s = jnp.linalg.eigh(_tridiagonal(dec.alphas, dec.betas))
    nodes, weights = carry
    return nodes.at[p].set(theta), weights.at[p].set(s[0] ** 2)


@dataclasses.dataclass(frozen=True)
class _SLQ:
    op: _Operator
    driver: loops.Driver
    num_probes: int
    num_iters: int

    def __call__(self, key: jax.Array, params: tuple) -> SpectralDensity:
        d, layout = self.driver, self.op.layout
        probe = _Probe(layout.size, layout.dtype)
        keys = jax.random.split(key, self.num_probes)
        operands, _ = d.call(_Prepare(self.op), d.call(probe, keys, 0), params)

        def one_probe(p: Any, carry: tuple) -> tuple:
            dec = _decomposition(d, self.op, operands, d.call(probe, keys, p), self.num_iters)
            return d.call(_store_quadrature, carry, p, dec)

        zeros = jnp.zeros((self.num_probes, self.num_iters), layout.dtype)
        nodes, weights = d.fori_loop(self.num_probes, one_probe, (zeros, zeros))
        return SpectralDensity(nodes, weights, jnp.asarray(layout.size))


def slq_density(
    matvec: Matvec,
    key: jax.Array,
    like: PyTree,
    *params: Any,
    num_probes: int,
    num_iters: int,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_probes`` Rademacher probes, ``num_iters`` Lanczos steps each.

    Costs ``num_probes * num_iters`` matvecs; memory ``num_iters * n`` for one basis at a time (probes run
    one after the other). ``placement`` and ``linearize_budget`` as in :func:`~bnjax.curvature.power_iteration`.
    """
    check_key(key)
    num_probes = check_positive_int(num_probes, "num_probes")
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    num_iters = _check_iters(num_iters, op.layout.size)
    return driver.run(_SLQ(op, driver, num_probes, num_iters), key, params)
