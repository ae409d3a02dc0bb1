"""Stochastic trace and spectral-density estimates: Hutchinson and stochastic Lanczos quadrature (SLQ).

Both use Rademacher probes (entries ±1) and the matvec convention of :mod:`bnjax.curvature.hvp`; the probe
loop is a ``lax.map`` inside one compiled function.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._validate import check_positive_int
from bnjax.curvature.eigen import _check_iters, _flatten, _lanczos_flat, _tridiagonal
from bnjax.curvature.hvp import Matvec

PyTree = Any


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of ``tr(A)``; a pytree."""

    trace: jax.Array  # () mean of the samples
    stderr: jax.Array  # () standard error of the mean: std(samples, ddof=1) / sqrt(num_samples)
    samples: jax.Array  # (num_samples,) z^T A z for each Rademacher probe z


def _rademacher(key: jax.Array, n: int, dtype: Any) -> jax.Array:
    return jax.random.rademacher(key, (n,), dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames="num_samples")
def hutchinson_trace(
    matvec: Matvec, key: jax.Array, like: PyTree, *params: Any, num_samples: int
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
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2 to estimate a standard error; got {num_samples}.")
    x0, mv, _ = _flatten(matvec, like, params)

    def sample(k: jax.Array) -> jax.Array:
        z = _rademacher(k, x0.size, x0.dtype)
        return jnp.vdot(z, mv(z))

    samples = lax.map(sample, jax.random.split(key, num_samples))
    return TraceEstimate(jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(num_samples), samples)


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


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_probes", "num_iters"))
def slq_density(
    matvec: Matvec, key: jax.Array, like: PyTree, *params: Any, num_probes: int, num_iters: int
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_probes`` Rademacher probes, ``num_iters`` Lanczos steps each.

    Costs ``num_probes * num_iters`` matvecs; memory ``num_iters * n`` for one basis at a time (probes run
    sequentially in a ``lax.map``).
    """
    num_probes = check_positive_int(num_probes, "num_probes")
    x0, mv, _ = _flatten(matvec, like, params)
    num_iters = _check_iters(num_iters, x0.size)

    def one_probe(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        dec = _lanczos_flat(mv, _rademacher(k, x0.size, x0.dtype), num_iters)
        theta, s = jnp.linalg.eigh(_tridiagonal(dec.alphas, dec.betas))
        return theta, s[0] ** 2

    nodes, weights = lax.map(one_probe, jax.random.split(key, num_probes))
    return SpectralDensity(nodes, weights, jnp.asarray(x0.size))
