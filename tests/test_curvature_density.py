"""Hutchinson trace and SLQ against the explicit float64 Hessian of the small models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import curvature as cv
from test_curvature_eigen import MODELS, setup


@pytest.mark.parametrize("kind,bn", MODELS)
def test_hutchinson_within_its_exact_standard_error(kind: str, bn: bool) -> None:
    problem, matvec, args, h, _, _ = setup(kind, bn)
    # Exact variance of one Rademacher sample: 2 (||H||_F^2 - sum_i H_ii^2). Enough samples that the 4-sigma
    # bound is tighter than |tr H| / 2, so a factor-of-2 bug cannot pass.
    var_one = 2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))
    num = int(np.ceil(1.2 * var_one * (8 / np.trace(h)) ** 2 / 100)) * 100
    sigma = np.sqrt(var_one / num)
    with jax.enable_x64(True):
        est = cv.hutchinson_trace(matvec, jax.random.key(3), problem["params"], *args, num_samples=num)
    assert 4 * sigma < 0.5 * abs(np.trace(h)), "bound too loose to catch a factor-of-2 bug"
    assert abs(float(est.trace) - np.trace(h)) < 4 * sigma
    np.testing.assert_allclose(float(est.stderr), sigma, rtol=0.25)  # the reported error is honest
    np.testing.assert_allclose(float(est.trace), np.mean(np.asarray(est.samples)), rtol=1e-12)


def test_hutchinson_is_exact_for_a_diagonal_operator() -> None:
    with jax.enable_x64(True):
        d = jnp.arange(1.0, 8.0)
        est = cv.hutchinson_trace(lambda v, d: d * v, jax.random.key(0), d, d, num_samples=3)
    np.testing.assert_allclose(np.asarray(est.samples), 28.0, rtol=1e-12)
    assert float(est.stderr) == 0.0


@pytest.mark.parametrize("kind,bn", MODELS)
def test_slq_quadrature_moments_and_support(kind: str, bn: bool) -> None:
    problem, matvec, args, h, evals, _ = setup(kind, bn)
    m, probes, key = 12, 64, jax.random.key(5)
    with jax.enable_x64(True):
        dens = cv.slq_density(matvec, key, problem["params"], *args, num_probes=probes, num_iters=m)
        # Gauss quadrature with m nodes is exact for degree < 2m: with the same probes, SLQ's trace of H and
        # of H^3 equal Hutchinson's estimates z^T H z and z^T H^3 z exactly.
        hutch1 = cv.hutchinson_trace(matvec, key, problem["params"], *args, num_samples=probes)
        h3 = jnp.asarray(h @ h @ h)
        hutch3 = cv.hutchinson_trace(matvec, key, problem["params"], h3, problem["params"], num_samples=probes)
        tr1, tr3 = float(dens.trace_of()), float(dens.trace_of(lambda t: t**3))
    np.testing.assert_allclose(tr1, float(hutch1.trace), rtol=1e-8)
    np.testing.assert_allclose(tr3, float(hutch3.trace), rtol=1e-8)
    assert abs(tr1 - np.trace(h)) < 4 * float(hutch1.stderr)
    np.testing.assert_allclose(np.asarray(dens.weights).sum(axis=1), 1.0, rtol=1e-10)
    span = evals[-1] - evals[0]
    assert np.all(np.asarray(dens.nodes) >= evals[0] - 1e-8 * span)
    assert np.all(np.asarray(dens.nodes) <= evals[-1] + 1e-8 * span)
    # The extreme Ritz values converge to the extreme eigenvalues.
    np.testing.assert_allclose(np.asarray(dens.nodes).max(), evals[-1], rtol=1e-4)
    grid = np.linspace(evals[0] - 1, evals[-1] + 1, 4001)
    with jax.enable_x64(True):
        density = np.asarray(dens.smoothed(jnp.asarray(grid), sigma=0.05 * span))
    np.testing.assert_allclose(np.sum(density) * (grid[1] - grid[0]), 1.0, rtol=1e-3)
