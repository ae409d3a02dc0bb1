"""Stochastic trace and spectral-density estimates: Hutchinson and stochastic Lanczos quadrature (SLQ).

Both use Rademacher probes (entries ±1) and the matvec convention of :mod:`bnjax.curvature.hvp`. The probe
loop has the eigen-solvers' two placements (``placement``: one compiled program, or driven from Python with
one jitted call per matvec) and linearizes the operator once when it fits ``linearize_budget`` (see
:mod:`bnjax.curvature.eigen`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import loops
from bnjax._validate import check_positive_int
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
    num_samples = check_positive_int(num_samples, "num_samples")
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2 to estimate a standard error; got {num_samples}.")
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    return driver.run(_Hutchinson(op, driver, num_samples), key, params)


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
        """Density on ``grid`` (shape ``(g,)``) with each node replaced by a Gaussian of width ``sigma``; ``(g,)``."""
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
    num_probes = check_positive_int(num_probes, "num_probes")
    driver, op = _driver_and_operator(matvec, like, params, placement, linearize_budget, "like")
    num_iters = _check_iters(num_iters, op.layout.size)
    return driver.run(_SLQ(op, driver, num_probes, num_iters), key, params)
