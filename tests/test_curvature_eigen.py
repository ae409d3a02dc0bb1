"""Every eigen-solver against numpy.linalg.eigh of the explicit float64 Hessian of small MLPs and CNNs,
with and without batch norm (train mode, chunked with an uneven last chunk).

The solvers only see a matvec. End to end (real chunked HVPs through the Flax model) is tested per model
with the matvec itself and with the adaptive Lanczos solve; the other solvers get the model's explicit
Hessian as a pytree matvec, which keeps compile time (the bulk of the cost here) small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from test_curvature_helpers import explicit_hessian, loss_fn_for, make_problem

MODELS = [("mlp", False), ("mlp", True), ("cnn", False), ("cnn", True)]
CHUNK = 12  # 24 examples in 2 chunks (uneven last chunks: test_curvature_operators.py)


@functools.cache
def model_setup(kind: str, bn: bool):
    """(problem, HVP matvec, its params, explicit Hessian, eigenvalues ascending, eigenvectors)."""
    with jax.enable_x64(True):
        problem = make_problem(kind, bn)
        matvec = cv.dataset_hessian_matvec(loss_fn_for(problem, "train"), CHUNK)
        args = (problem["params"], (problem["x"], problem["y"]), problem["stats"])
        h = explicit_hessian(problem, "train", chunk_size=CHUNK)
    evals, evecs = np.linalg.eigh(h)
    return problem, matvec, args, h, evals, evecs


def dense_matvec(vector, h, template):
    """The explicit Hessian ``h`` as a pytree matvec (vectors shaped like ``template``)."""
    x, unravel = ravel_pytree(vector)
    del template
    return unravel(h @ x)


@functools.cache
def setup(kind: str, bn: bool):
    """Like :func:`model_setup` but the matvec multiplies by the explicit Hessian."""
    problem, _, _, h, evals, evecs = model_setup(kind, bn)
    with jax.enable_x64(True):
        args = (jnp.asarray(h), problem["params"])
    return problem, dense_matvec, args, h, evals, evecs


def flat(tree) -> np.ndarray:
    """Flatten like ``ravel_pytree`` but in NumPy, so float64 survives outside ``enable_x64``."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def start(problem, seed: int = 1, num: int | None = None):
    return cv.random_like(jax.random.key(seed), problem["params"], num)


def assert_rel(actual, expected, rtol: float) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=0)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_model_matvec_and_adaptive_lanczos_end_to_end(kind: str, bn: bool) -> None:
    problem, matvec, args, h, evals, _ = model_setup(kind, bn)
    with jax.enable_x64(True):
        v = start(problem)
        hv = flat(jax.jit(matvec)(v, *args))
        r = cv.lanczos_top(matvec, v, *args, tol=1e-10, residual_tol=1e-6, max_iters=80)
    assert 100 <= hv.size <= 2000, "the issue asks for ~100-2000 parameters"
    np.testing.assert_allclose(hv, h @ flat(v), rtol=1e-9, atol=1e-12)
    assert int(r.iterations) < 80, "did not converge"
    assert_rel(r.eigenvalue, evals[-1], 1e-4)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_power_iteration_and_warm_start(kind: str, bn: bool) -> None:
    problem, matvec, args, _, evals, evecs = setup(kind, bn)
    top = evals[np.argmax(np.abs(evals))]
    with jax.enable_x64(True):
        r = cv.power_iteration(matvec, start(problem), *args, tol=1e-10, residual_tol=1e-6, max_iters=5000)
        assert int(r.iterations) < 5000, "did not converge"
        assert_rel(r.eigenvalue, top, 1e-4)
        assert float(r.residual) <= 1e-6
        assert abs(flat(r.eigenvector) @ evecs[:, np.argmax(np.abs(evals))]) > 1 - 1e-4
        # A converged warm start with its eigenvalue costs exactly one matvec and keeps the answer.
        w = cv.power_iteration(
            matvec, r.eigenvector, *args, tol=1e-6, residual_tol=1e-5, max_iters=50, eigenvalue0=r.eigenvalue
        )
        assert int(w.iterations) == 1
        assert_rel(w.eigenvalue, top, 1e-4)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_power_iteration_topk_by_deflation(kind: str, bn: bool) -> None:
    problem, matvec, args, _, evals, _ = setup(kind, bn)
    expected = evals[np.argsort(-np.abs(evals))[:3]]
    if np.min(np.abs(np.diff(np.abs(expected)))) < 1e-3 * abs(expected[0]):
        pytest.fail("test problem has (nearly) tied magnitudes; pick another seed")
    with jax.enable_x64(True):
        r = cv.power_iteration_topk(
            matvec, start(problem, num=3), *args, k=3, tol=1e-12, residual_tol=1e-7, max_iters=5000
        )
    assert np.all(np.asarray(r.iterations) < 5000)
    assert_rel(r.eigenvalue, expected, 1e-4)
    vecs = np.stack([flat(jax.tree.map(lambda a: a[i], r.eigenvector)) for i in range(3)])
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-6)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_smallest_eigenvalue_by_spectral_shift(kind: str, bn: bool) -> None:
    problem, matvec, args, _, evals, _ = setup(kind, bn)
    with jax.enable_x64(True):
        r = cv.smallest_eigenvalue(matvec, start(problem), *args, tol=1e-12, residual_tol=1e-7, max_iters=20000)
    assert evals[0] < 0, "the test needs an indefinite Hessian"
    assert_rel(r.eigenvalue, evals[0], 1e-4)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_lanczos_both_ends(kind: str, bn: bool) -> None:
    problem, matvec, args, _, evals, _ = setup(kind, bn)
    m = 60
    with jax.enable_x64(True):
        top = cv.lanczos(matvec, start(problem), *args, k=3, num_iters=m)
        bottom = cv.lanczos(matvec, start(problem), *args, k=2, num_iters=m, which="smallest")
    assert_rel(top.eigenvalue, evals[::-1][:3], 1e-4)
    assert_rel(bottom.eigenvalue, evals[:2], 1e-4)
    assert np.all(np.asarray(top.iterations) == m)
    # The Ritz residual estimate is honest: it matches the true residual of the returned vector.
    h = setup(kind, bn)[3]
    v = flat(jax.tree.map(lambda a: a[0], top.eigenvector))
    true_res = np.linalg.norm(h @ v - float(top.eigenvalue[0]) * v) / abs(float(top.eigenvalue[0]))
    np.testing.assert_allclose(float(top.residual[0]), true_res, rtol=1e-2, atol=1e-9)


@pytest.mark.parametrize("kind,bn", MODELS)
def test_lanczos_top_adaptive_and_warm(kind: str, bn: bool) -> None:
    problem, matvec, args, _, evals, _ = setup(kind, bn)
    with jax.enable_x64(True):
        r = cv.lanczos_top(matvec, start(problem), *args, tol=1e-10, residual_tol=1e-6, max_iters=80)
        assert int(r.iterations) < 80, "did not converge"
        assert_rel(r.eigenvalue, evals[-1], 1e-4)
        w = cv.lanczos_top(
            matvec, r.eigenvector, *args, tol=1e-6, residual_tol=1e-5, max_iters=80, eigenvalue0=r.eigenvalue
        )
    assert int(w.iterations) == 1
    assert_rel(w.eigenvalue, evals[-1], 1e-4)


def test_lanczos_survives_an_invariant_subspace() -> None:
    """A start vector in a 2-D invariant subspace breaks the recurrence down after 2 steps; the restart
    must still deliver the true top eigenvalues (not spurious zeros)."""
    with jax.enable_x64(True):
        a = jnp.diag(jnp.arange(1.0, 21.0))
        v0 = jnp.zeros(20).at[0].set(1.0).at[1].set(1.0)
        r = cv.lanczos(lambda v, a: a @ v, v0, a, k=3, num_iters=20)
    np.testing.assert_allclose(np.asarray(r.eigenvalue), [20.0, 19.0, 18.0], rtol=1e-10)


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("num_iters", [5, 13, 48])
def test_lanczos_basis_stays_semi_orthogonal(num_iters: int, placement: str) -> None:
    """Float32, a well-separated top cluster over a dense bulk: the plain three-term recurrence loses
    orthogonality as soon as the top Ritz values converge (max |q_i . q_k| = 0.76 after 13 steps here), so only
    partial reorthogonalization keeps the basis semi-orthogonal (|q_i . q_k| <= sqrt(eps), Simon's condition
    for Ritz values accurate to working precision), and the top Ritz values are then the eigenvalues (no
    spurious copies)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(400, 400)))
    evals = np.concatenate([[100.0, 99.5, 99.0], rng.uniform(0.0, 1.0, 397)])
    a = jnp.asarray((q * evals) @ q.T, jnp.float32)
    mv = lambda v, a: a @ v
    dec = cv.lanczos_decomposition(mv, jnp.ones(400), a, num_iters=num_iters, placement=placement)
    basis = np.asarray(dec.basis, np.float64)
    assert np.abs(basis @ basis.T - np.eye(num_iters)).max() <= np.sqrt(np.finfo(np.float32).eps)
    if num_iters == 48:
        top = cv.lanczos(mv, jnp.ones(400), a, k=3, num_iters=num_iters, placement=placement)
        np.testing.assert_allclose(np.asarray(top.eigenvalue), evals[:3], rtol=1e-5)


def test_lanczos_reorthogonalizes_only_when_needed() -> None:
    """With no converged Ritz pair (a spread spectrum, few steps) the basis stays orthogonal by itself and
    Simon's estimate must not ask for reorthogonalization at every step (that would be full
    reorthogonalization's cost); where the top pair has converged it must (the estimate follows the loss)."""
    from bnjax import loops
    from bnjax.curvature import eigen

    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    for evals, few in ((rng.uniform(-1.0, 1.0, 300), True), (np.r_[100.0, rng.uniform(0.0, 1.0, 299)], False)):
        a = jnp.asarray((q * evals) @ q.T, jnp.float32)
        op = eigen._Operator(lambda v, a: a @ v, eigen._Layout.of(jnp.ones(300)), False)
        state = eigen._LanczosInit(40)(jnp.ones(300, jnp.float32), jnp.inf, 0.0, 0.0)
        out = eigen._lanczos_solve(loops.Driver("device"), op, (a,), state, False)
        basis = np.asarray(out.basis, np.float64)
        assert np.abs(basis @ basis.T - np.eye(40)).max() <= np.sqrt(np.finfo(np.float32).eps)
        assert (int(out.reorths) <= 4) if few else (int(out.reorths) >= 10)


def test_solver_input_errors() -> None:
    problem, matvec, args, _, _, _ = model_setup("mlp", False)
    n = flat(problem["params"]).size
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="num_iters"):
            cv.lanczos(matvec, start(problem), *args, k=2, num_iters=n + 1)
        with pytest.raises(ValueError, match="must not exceed"):
            cv.lanczos(matvec, start(problem), *args, k=5, num_iters=4)
        with pytest.raises(ValueError, match="positive"):
            cv.lanczos(matvec, start(problem), *args, k=0, num_iters=4)
        with pytest.raises(ValueError, match="which"):
            cv.lanczos(matvec, start(problem), *args, k=1, num_iters=4, which="top")
        with pytest.raises(ValueError, match="leading axis"):
            cv.power_iteration_topk(matvec, start(problem, num=2), *args, k=3)
        with pytest.raises(ValueError, match="same pytree structure"):
            cv.power_iteration(matvec, {"wrong": jnp.ones(3)}, *args)
