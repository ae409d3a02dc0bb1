"""Parameter-subset operators against blocks of explicit Hessians; Hutchinson's diagonal and Hutch++ against
exact values, their stated variances, and matfree's estimators on the same probes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matfree.stochtrace
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from test_curvature_helpers import MLP


def _block_indices(params, subset: cv.ParamSubset) -> np.ndarray:
    """Flat indices (ravel_pytree order = leaf order) of the subset's leaves."""
    sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    starts = np.cumsum([0, *sizes])
    return np.concatenate([np.arange(starts[i], starts[i + 1]) for i, keep in enumerate(subset.selected) if keep])


def _bn_loss(p, x, y):
    """Dense -> batch norm (batch statistics) -> tanh -> Dense, squared error: 56 parameters."""
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None]
    h = (h - jnp.mean(h, axis=0, keepdims=True)) / jnp.sqrt(jnp.var(h, axis=0, keepdims=True) + 1e-5)
    h = jnp.tanh(h * p["BatchNorm_0"]["scale"][None] + p["BatchNorm_0"]["bias"][None])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None] - y) ** 2)


def test_subset_operators_give_the_blocks_of_the_explicit_hessian() -> None:
    """Each subset's operator, applied to the subset's basis vectors, is that block of jax.hessian's matrix (so
    its trace and diagonal are the block's), and the solvers run on subset vectors: Lanczos's top eigenvalue =
    eigh of the BN block."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 5)
        normal = lambda k, shape: jax.random.normal(k, shape, jnp.float64)
        params = {
            "Dense_0": {"kernel": normal(keys[0], (4, 6)), "bias": jnp.zeros(6)},
            "BatchNorm_0": {"scale": 1 + 0.3 * normal(keys[1], (6,)), "bias": 0.1 * normal(keys[2], (6,))},
            "Dense_1": {"kernel": normal(keys[3], (6, 2)), "bias": jnp.zeros(2)},
        }
        x, y = normal(keys[4], (16, 4)), jnp.linspace(-1, 1, 32).reshape(16, 2)
        flat, unravel = ravel_pytree(params)
        h = np.asarray(jax.jit(jax.hessian(lambda f: _bn_loss(unravel(f), x, y)))(flat))
        hessian = cv.hessian_matvec(_bn_loss)
        bn = cv.param_subset(params, cv.batchnorm_params())
        assert bn.paths == ("BatchNorm_0/bias", "BatchNorm_0/scale") and bn.size == 12
        cases = {
            "bn": bn,
            "dense_1": cv.param_subset(params, cv.layer("Dense_1")),
            "all_but_bn": cv.param_subset(params, cv.everything_but(cv.batchnorm_params())),
        }
        assert cases["all_but_bn"].size == h.shape[0] - 12
        dense = {}
        for name, subset in cases.items():
            mv = cv.subset_matvec(hessian, subset)
            unravel_sub = ravel_pytree(subset.restrict(params))[1]
            apply = jax.jit(jax.vmap(lambda e: ravel_pytree(mv(unravel_sub(e), params, x, y))[0]))
            dense[name] = np.asarray(apply(jnp.eye(subset.size)))
        mv_bn = cv.subset_matvec(hessian, bn)
        v0 = bn.restrict(cv.random_like(jax.random.key(1), params))
        top = cv.lanczos_top(mv_bn, v0, params, x, y, tol=1e-10, residual_tol=1e-8, max_iters=12, linearize_budget=0)
    blocks = {name: h[np.ix_(*2 * [_block_indices(params, s)])] for name, s in cases.items()}
    for name in cases:
        np.testing.assert_allclose(dense[name], blocks[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert bool(top.converged)
    np.testing.assert_allclose(float(top.eigenvalue), np.linalg.eigvalsh(blocks["bn"])[-1], rtol=1e-7)
    assert jax.tree.structure(top.eigenvector) == jax.tree.structure(v0)
    # A block is not the whole: the BN block's top eigenvalue is below the full Hessian's.
    assert float(top.eigenvalue) < np.linalg.eigvalsh(h)[-1] * (1 - 1e-3)


def test_batchnorm_params_from_a_flax_models_batch_stats() -> None:
    """The BN modules named by ``batch_stats`` (bnjax.BatchNorm in a linen model; shapes only)."""
    with jax.enable_x64(True):
        variables = jax.eval_shape(MLP(bn=True).init, jax.random.key(0), jnp.zeros((4, 6)))
    params, stats = variables["params"], variables["batch_stats"]
    by_stats = cv.param_subset(params, cv.batchnorm_params(stats))
    assert by_stats.paths == ("BatchNorm_0/bias", "BatchNorm_0/scale") and by_stats.size == 24
    assert by_stats.selected == cv.param_subset(params, cv.batchnorm_params()).selected
    renamed = {"bn1" if k == "BatchNorm_0" else k: v for k, v in params.items()}
    assert cv.param_subset(renamed, cv.batchnorm_params(prefixes=("bn",))).size == 24
    with pytest.raises(ValueError, match="selects no parameter"):
        cv.param_subset(renamed, cv.batchnorm_params())


def test_subset_vectors_and_errors() -> None:
    params = {"BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}, "Dense_0": {"kernel": jnp.ones((2, 3))}}
    sub = cv.param_subset(params, cv.layer("Dense_0/kernel"))
    assert sub.paths == ("Dense_0/kernel",) and sub.size == 6
    v = sub.restrict(jax.tree.map(lambda x: x + 2.0, params))
    assert v["BatchNorm_0"] == {"scale": None, "bias": None}
    full = sub.embed(v)
    np.testing.assert_array_equal(full["Dense_0"]["kernel"], 3.0)
    np.testing.assert_array_equal(full["BatchNorm_0"]["scale"], 0.0)
    assert cv.path_names(jax.tree_util.tree_leaves_with_path(params)[0][0]) == ("BatchNorm_0", "bias")
    with pytest.raises(ValueError, match="selects no parameter.*BatchNorm_0/bias"):
        cv.param_subset(params, cv.layer("Conv_0"))
    with pytest.raises(ValueError, match="subset vector"):
        sub.embed(params)
    with pytest.raises(ValueError, match="Dense_0/kernel has shape"):
        sub.embed({"BatchNorm_0": {"scale": None, "bias": None}, "Dense_0": {"kernel": jnp.ones(6)}})
    with pytest.raises(ValueError, match="structure"):
        sub.restrict({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="prefixes"):
        cv.batchnorm_params(prefixes="bn")
    with pytest.raises(TypeError, match="ParamSubset"):
        cv.subset_matvec(lambda v: v, params)


def _symmetric(n: int, seed: int, eigenvalues: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.normal(size=n) if eigenvalues is None else eigenvalues
    return (u * lam) @ u.T


def _matvec(v, a):
    return a @ v


def _probes(key, num: int, n: int) -> jax.Array:
    """The Rademacher probes bnjax's estimators draw from ``key`` (one split key each)."""
    return jax.vmap(lambda k: jax.random.rademacher(k, (n,), jnp.float64))(jax.random.split(key, num))


def test_hutchinson_diagonal_unbiased_with_honest_errors_and_equal_to_matfree() -> None:
    n, num = 30, 400
    a = _symmetric(n, 0) + np.diag(np.linspace(1.0, 3.0, n))
    key = jax.random.key(4)
    with jax.enable_x64(True):
        est = cv.hutchinson_diagonal(_matvec, key, jnp.zeros(n), jnp.asarray(a), num_samples=num)
        exact_diag = cv.hutchinson_diagonal(
            _matvec, key, jnp.zeros(n), jnp.diag(jnp.arange(1.0, n + 1)), num_samples=num
        )
        sampler = lambda k: _probes(k, num, n)
        mf = matfree.stochtrace.estimator_monte_carlo_mean_and_sem(matfree.stochtrace.monte_carlo_diagonal(), sampler)
        mf_mean, mf_sem = mf(_matvec, key, jnp.asarray(a))
    diag, stderr = np.asarray(est.diagonal), np.asarray(est.stderr)
    # Exact variance of one sample of entry j: the off-diagonal squared norm of row j.
    sigma = np.sqrt((np.sum(a**2, axis=1) - np.diag(a) ** 2) / num)
    z = (diag - np.diag(a)) / sigma
    assert np.max(np.abs(z)) < 4.5 and abs(np.mean(z)) < 4 / np.sqrt(n), z  # unbiased, per entry and on average
    assert 4.5 * sigma.max() < 0.5 * np.abs(np.diag(a)).mean(), "bound too loose to catch a scaling bug"
    np.testing.assert_allclose(np.mean(stderr / sigma), 1.0, rtol=0.1)  # the reported errors are honest
    np.testing.assert_allclose(np.asarray(exact_diag.diagonal), np.arange(1.0, n + 1), rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(exact_diag.stderr), 0.0)
    # matfree on the same probes: the same estimate; its sem uses ddof=0.
    np.testing.assert_allclose(diag, np.asarray(mf_mean), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stderr * np.sqrt((num - 1) / num), np.asarray(mf_sem), rtol=1e-10)


def test_hutchpp_exact_on_low_rank_and_equal_to_matfree_on_the_deflated_part() -> None:
    n, k = 40, 5
    lam = np.zeros(n)
    lam[:k] = [5.0, -3.0, 2.0, 1.0, 0.5]
    low_rank = _symmetric(n, 1, lam)
    full = _symmetric(n, 2, 10.0 / np.arange(1, n + 1) ** 2)
    key = jax.random.key(7)
    with jax.enable_x64(True):
        exact = cv.hutchpp_trace(_matvec, key, jnp.zeros(n), jnp.asarray(low_rank), rank=k, num_samples=6)
        est = cv.hutchpp_trace(_matvec, key, jnp.zeros(n), jnp.asarray(full), rank=k, num_samples=6)
        host = cv.hutchpp_trace(_matvec, key, jnp.zeros(n), jnp.asarray(full), rank=k, num_samples=6, placement="host")
        # The same sketch and probes by hand: Q from A S, then matfree's Monte Carlo trace of the deflated A'.
        sketch_key, probe_key = jax.random.split(key)
        s = jax.random.rademacher(sketch_key, (k, n), jnp.float64)
        q = jnp.linalg.qr(jnp.asarray(full) @ s.T)[0]
        proj = jnp.eye(n) - q @ q.T
        deflated = proj @ jnp.asarray(full) @ proj
        mf = matfree.stochtrace.estimator_monte_carlo(
            matfree.stochtrace.monte_carlo_trace(), lambda kk: _probes(kk, 6, n)
        )
        mf_part = float(mf(_matvec, probe_key, deflated))
        low_part = float(jnp.trace(q.T @ jnp.asarray(full) @ q))
    assert float(exact.trace) == pytest.approx(np.trace(low_rank), rel=1e-12)
    assert float(exact.stderr) < 1e-12  # nothing left to estimate after deflation
    np.testing.assert_allclose(float(est.trace), low_part + mf_part, rtol=1e-12)
    np.testing.assert_allclose(float(host.trace), float(est.trace), rtol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        cv.hutchpp_trace(_matvec, key, jnp.zeros(3), jnp.eye(3), rank=4, num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        cv.hutchpp_trace(_matvec, key, jnp.zeros(3), jnp.eye(3), rank=1, num_samples=1)


def test_hutchpp_unbiased_and_beats_hutchinson_at_equal_cost() -> None:
    """Over many keys: Hutch++'s mean is within 4 standard errors of tr(A), its stderr matches its spread, and
    on a decaying spectrum its mean squared error is far below the exact variance of Hutchinson's estimator
    with the same number of matvecs (2 * 5 + 6 = 16)."""
    n, trials = 40, 100
    a_np = _symmetric(n, 3, 10.0 / np.arange(1, n + 1) ** 2)
    exact = float(np.trace(a_np))
    hutchinson_var = 2 * (np.sum(a_np**2) - np.sum(np.diag(a_np) ** 2)) / 16
    with jax.enable_x64(True):
        a, like = jnp.asarray(a_np), jnp.zeros(n)
        # The shapes of the test above: one compiled program serves both.
        runs = [cv.hutchpp_trace(_matvec, jax.random.key(i), like, a, rank=5, num_samples=6) for i in range(trials)]
    pp_est = np.array([float(r.trace) for r in runs])
    assert abs(pp_est.mean() - exact) < 4 * pp_est.std(ddof=1) / np.sqrt(trials)
    np.testing.assert_allclose(np.mean([float(r.stderr) for r in runs]), pp_est.std(), rtol=0.5)
    assert np.mean((pp_est - exact) ** 2) < 0.1 * hutchinson_var
