"""Batch sharpness and the mini-batch lambda_max average against explicit float64 Hessians of tiny models.

References are independent of the library: each batch's loss is differentiated with ``jax.hessian`` on the flat
parameters, and the ratios, eigenvalues (``numpy.linalg.eigh``) and standard errors are NumPy formulas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from test_curvature_helpers import loss_fn_for, make_problem

N, B, M = 12, 4, 6


@functools.cache
def problem(bn: bool):
    with jax.enable_x64(True):
        p = make_problem("mlp", bn, n=N)
    return p, loss_fn_for(p, "train"), (p["x"], p["y"])


@functools.cache
def reference_fns(bn: bool):
    """Jitted gradient and Hessian of one batch's loss on the flat parameters (compiled once per model)."""
    p, loss, _ = problem(bn)
    _, unravel = ravel_pytree(p["params"])

    def batch_loss(f, idx):
        return loss(unravel(f), (p["x"][idx], p["y"][idx]), p["stats"])

    return jax.jit(jax.grad(batch_loss)), jax.jit(jax.hessian(batch_loss))


def reference(bn: bool, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per batch ``(g^T H g, ||g||^2, lambda_max(H))`` from the explicit gradient and Hessian."""
    p, _, _ = problem(bn)
    flat, _ = ravel_pytree(p["params"])
    grad, hess = reference_fns(bn)
    curv, sq, top = [], [], []
    for idx in np.asarray(indices):
        g, h = np.asarray(grad(flat, idx)), np.asarray(hess(flat, idx))
        curv.append(g @ h @ g)
        sq.append(g @ g)
        top.append(np.linalg.eigh(h)[0][-1])
    return np.array(curv), np.array(sq), np.array(top)


def test_batch_sharpness_and_lambda_max_match_explicit_hessians() -> None:
    # BN in train mode: each batch is normalized with its own statistics (the batches are coupled).
    bn = True
    p, loss, data = problem(bn)
    key = jax.random.key(3)
    with jax.enable_x64(True):
        est = cv.batch_sharpness(loss, p["params"], data, p["stats"], batch_size=B, num_batches=M, key=key)
        top = cv.batch_lambda_max(
            loss, p["params"], data, p["stats"], batch_size=B, num_batches=M, key=key, tol=1e-10, residual_tol=1e-7,
            max_iters=80,
        )  # fmt: skip
        curv, sq, lam = reference(bn, est.indices)
    idx = np.asarray(est.indices)
    assert idx.shape == (M, B) and all(len(set(row)) == B for row in idx), "a batch holds distinct examples"
    assert len({tuple(sorted(row)) for row in idx}) > 1, "batches must differ"
    np.testing.assert_array_equal(np.asarray(top.indices), idx)  # same key, same batches
    ratios = curv / sq
    np.testing.assert_allclose(np.asarray(est.curvature), curv, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(est.grad_sq_norm), sq, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(est.ratios), ratios, rtol=1e-9)
    np.testing.assert_allclose(float(est.estimate), ratios.mean(), rtol=1e-9)
    np.testing.assert_allclose(float(est.stderr), ratios.std(ddof=1) / np.sqrt(M), rtol=1e-9)
    # Mini-batch lambda_max: each batch's top eigenvalue, their mean and standard error.
    assert bool(np.all(top.converged))
    np.testing.assert_allclose(np.asarray(top.eigenvalues), lam, rtol=1e-6)
    np.testing.assert_allclose(float(top.estimate), lam.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(top.stderr), lam.std(ddof=1) / np.sqrt(M), rtol=1e-4)
    assert int(est.hvps) == M and int(top.hvps) > M
    assert np.all(ratios <= lam + 1e-9), "a Rayleigh quotient never exceeds lambda_max"


def test_ratio_of_means_and_its_delta_method_standard_error() -> None:
    p, loss, data = problem(True)
    with jax.enable_x64(True):
        est = cv.batch_sharpness(
            loss, p["params"], data, p["stats"], batch_size=B, num_batches=M, key=jax.random.key(4),
            average="ratio_of_means",
        )  # fmt: skip
        curv, sq, _ = reference(True, est.indices)
    xbar, ybar = curv.mean(), sq.mean()
    cov = np.cov(curv, sq, ddof=1)
    var = (cov[0, 0] / ybar**2 - 2 * cov[0, 1] * xbar / ybar**3 + cov[1, 1] * xbar**2 / ybar**4) / M
    np.testing.assert_allclose(float(est.estimate), xbar / ybar, rtol=1e-9)
    np.testing.assert_allclose(float(est.stderr), np.sqrt(var), rtol=1e-8)
    assert abs(xbar / ybar - np.mean(curv / sq)) > 1e-3 * abs(xbar / ybar), "the two averages must differ here"


def test_full_batch_is_the_rayleigh_quotient_along_the_full_gradient() -> None:
    p, loss, data = problem(False)
    with jax.enable_x64(True):
        est = cv.batch_sharpness(
            loss, p["params"], data, p["stats"], batch_size=N, num_batches=5, key=jax.random.key(0)
        )
        top = cv.batch_lambda_max(
            loss, p["params"], data, p["stats"], batch_size=N, num_batches=5, key=jax.random.key(0), tol=1e-10,
            residual_tol=1e-7, max_iters=80,
        )  # fmt: skip
        curv, sq, lam = reference(False, np.arange(N)[None])
    assert int(est.num_batches) == 1 and int(top.num_batches) == 1
    np.testing.assert_allclose(float(est.estimate), curv[0] / sq[0], rtol=1e-9)
    np.testing.assert_allclose(float(top.estimate), lam[0], rtol=1e-6)
    assert float(est.stderr) == 0.0 and float(top.stderr) == 0.0


def test_placements_vmap_and_warm_start_agree() -> None:
    p, loss, data = problem(True)
    key = jax.random.key(1)
    kw = dict(batch_size=B, num_batches=M, key=key)
    with jax.enable_x64(True):
        dev = cv.batch_sharpness(loss, p["params"], data, p["stats"], placement="device", **kw)
        host = cv.batch_sharpness(loss, p["params"], data, p["stats"], placement="host", **kw)
        keys = jax.random.split(key, 2)
        per_seed = jax.jit(
            jax.vmap(
                lambda k: cv.batch_sharpness(loss, p["params"], data, p["stats"], batch_size=B, num_batches=M, key=k)
            )
        )(keys)
        one = cv.batch_sharpness(loss, p["params"], data, p["stats"], batch_size=B, num_batches=M, key=keys[1])
        # The full batch twice: the second solve starts at the first one's eigenvector.
        lkw = dict(batch_size=N, num_batches=1, key=key, tol=1e-9, residual_tol=1e-6, max_iters=60)
        cold = cv.batch_lambda_max(loss, p["params"], data, p["stats"], **lkw)
        warm = cv.batch_lambda_max(loss, p["params"], data, p["stats"], v0=cold.eigenvector, **lkw)
    np.testing.assert_allclose(np.asarray(host.ratios), np.asarray(dev.ratios), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(per_seed.ratios[1]), np.asarray(one.ratios), rtol=1e-12)
    np.testing.assert_allclose(float(warm.estimate), float(cold.estimate), rtol=1e-8)
    assert int(warm.hvps) <= 3 < int(cold.hvps), "a converged warm start must cost a few products"


def test_single_minibatch_has_no_standard_error() -> None:
    p, loss, data = problem(False)
    with jax.enable_x64(True):
        est = cv.batch_sharpness(loss, p["params"], data, None, batch_size=B, num_batches=1, key=jax.random.key(0))
    assert np.isnan(float(est.stderr)) and np.isfinite(float(est.estimate))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=N + 1, num_batches=2), "exceeds the 12 examples"),
        (dict(batch_size=0, num_batches=2), "batch_size"),
        (dict(batch_size=B, num_batches=0), "num_batches"),
        (dict(batch_size=2.5, num_batches=2), "batch_size"),
        (dict(batch_size=B, num_batches=2, average="median"), "average"),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    p, loss, data = problem(False)
    with pytest.raises(ValueError, match=match):
        cv.batch_sharpness(loss, p["params"], data, None, key=jax.random.key(0), **kwargs)
    if "average" not in kwargs:
        with pytest.raises(ValueError, match=match):
            cv.batch_lambda_max(loss, p["params"], data, None, key=jax.random.key(0), **kwargs)


def test_bad_data_and_solver_arguments() -> None:
    p, loss, data = problem(False)
    key = jax.random.key(0)
    with jax.enable_x64(True), pytest.raises(ValueError, match="same leading"):
        cv.batch_sharpness(loss, p["params"], (p["x"], p["y"][:5]), None, batch_size=B, num_batches=2, key=key)
    with jax.enable_x64(True), pytest.raises(ValueError, match="max_iters"):
        cv.batch_lambda_max(loss, p["params"], data, None, batch_size=B, num_batches=2, key=key, max_iters=10**6)
    with jax.enable_x64(True), pytest.raises(ValueError, match="zero vector"):
        zero = jax.tree.map(jnp.zeros_like, p["params"])
        cv.batch_lambda_max(loss, p["params"], data, None, batch_size=B, num_batches=2, key=key, v0=zero)
