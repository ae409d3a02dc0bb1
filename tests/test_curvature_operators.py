"""HVP, GGN-vector products, chunked data-set operators and bn_mode, against explicit float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from test_curvature_helpers import cross_entropy, explicit_hessian, loss_fn_for, make_problem


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_hvp_and_gnvp_match_explicit_matrices() -> None:
    with jax.enable_x64(True):
        problem = make_problem("mlp", bn=False, n=8)
        model, x, y, params = problem["model"], problem["x"], problem["y"], problem["params"]
        flat_p, unravel = ravel_pytree(params)
        v = cv.random_like(jax.random.key(0), params)

        def output_fn(p, x):
            return model.apply({"params": p}, x)

        def output_loss(z, x):
            del x
            return cross_entropy(z, y)

        hv = jax.jit(lambda p, v: cv.hvp(lambda p, x: output_loss(output_fn(p, x), x), p, v, x))(params, v)
        gv = jax.jit(lambda p, v: cv.gnvp(output_fn, output_loss, p, v, x))(params, v)
        h = jax.hessian(lambda f: output_loss(output_fn(unravel(f), x), x))(flat_p)
        z = output_fn(params, x)
        jac = jax.jacobian(lambda f: output_fn(unravel(f), x))(flat_p).reshape(z.size, -1)
        h_out = jax.hessian(lambda z: output_loss(z, x))(z).reshape(z.size, z.size)
        g = jac.T @ h_out @ jac
    np.testing.assert_allclose(flat(hv), np.asarray(h) @ flat(v), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(flat(gv), np.asarray(g) @ flat(v), rtol=1e-10, atol=1e-13)
    assert np.linalg.eigvalsh(np.asarray(g)).min() > -1e-12  # PSD, unlike this H
    assert np.linalg.eigvalsh(np.asarray(h)).min() < -1e-6


def test_chunked_mean_weights_an_uneven_last_chunk() -> None:
    data = {"a": jnp.arange(10.0), "b": jnp.arange(20.0).reshape(10, 2)}
    out = cv.chunked_mean(lambda c: (jnp.mean(c["a"]), jnp.mean(c["b"], axis=0)), data, chunk_size=4)
    np.testing.assert_allclose(float(out[0]), 4.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out[1]), [9.0, 10.0], rtol=1e-6)
    whole = cv.chunked_mean(lambda c: jnp.mean(c["a"]), data, chunk_size=100)
    np.testing.assert_allclose(float(whole), 4.5, rtol=1e-6)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_dataset_hvp_with_bn_modes_matches_explicit_hessian(bn_mode: str) -> None:
    with jax.enable_x64(True):
        problem = make_problem("mlp", bn=True, n=11)
        stats = problem["stats"]
        stats_before = jax.tree.map(np.array, stats)
        loss_fn = loss_fn_for(problem, bn_mode)
        v = cv.random_like(jax.random.key(1), problem["params"])
        batch = (problem["x"], problem["y"])
        hv = jax.jit(lambda p, v, s: cv.dataset_hvp(loss_fn, p, v, batch, s, chunk_size=4))(problem["params"], v, stats)
        loss = cv.dataset_loss(loss_fn, problem["params"], batch, stats, chunk_size=4)
        _, grad = cv.dataset_value_and_grad(loss_fn, problem["params"], batch, stats, chunk_size=4)
        h = explicit_hessian(problem, bn_mode, chunk_size=4)  # chunks 4, 4, 3
        h_other = explicit_hessian(problem, "eval" if bn_mode == "train" else "train", chunk_size=4)
    np.testing.assert_allclose(flat(hv), h @ flat(v), rtol=1e-9, atol=1e-12)
    # The modes are different functions: confusing them would be caught here.
    assert np.linalg.norm(h - h_other) > 1e-2 * np.linalg.norm(h)
    # Running statistics untouched (the function returns no new ones).
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, stats), stats_before)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))


def test_eval_mode_chunking_does_not_change_the_hessian_but_train_mode_does() -> None:
    with jax.enable_x64(True):
        problem = make_problem("mlp", bn=True, n=12)
        h_eval = [explicit_hessian(problem, "eval", chunk_size=c) for c in (3, 12)]
        h_train = [explicit_hessian(problem, "train", chunk_size=c) for c in (3, 12)]
    np.testing.assert_allclose(h_eval[0], h_eval[1], rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(h_train[0] - h_train[1]) > 1e-2 * np.linalg.norm(h_train[1])


def test_input_validation() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    loss = lambda p, x: jnp.sum(x @ p["w"] + p["b"]) ** 2  # noqa: E731
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="same pytree structure"):
        cv.hvp(loss, params, {"w": jnp.ones((3, 2))}, x)
    with pytest.raises(ValueError, match="shape"):
        cv.hvp(loss, params, {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}, x)
    with pytest.raises(TypeError, match="floating"):
        cv.hvp(loss, params, {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2)}, x)
    with pytest.raises(ValueError, match="chunk_size"):
        cv.dataset_hvp(loss, params, params, x, chunk_size=0)
    with pytest.raises(ValueError, match="leading"):
        cv.chunked_mean(lambda c: jnp.mean(c[0]), (jnp.ones(4), jnp.ones(5)), chunk_size=2)
    with pytest.raises(ValueError, match="bn_mode"):
        cv.flax_curvature_fns(lambda *a, **k: None, cross_entropy, bn_mode="training")
    with jax.enable_x64(True):
        problem = make_problem("mlp", bn=True, n=4)
    fns = cv.flax_curvature_fns(problem["model"].apply, cross_entropy, bn_mode=None)
    with pytest.raises(ValueError, match="bn_mode"):
        fns.loss_fn(problem["params"], (problem["x"], problem["y"]), problem["stats"])
