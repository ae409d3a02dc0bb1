"""Edge-of-stability tracker: thresholds, Adam preconditioner, sharpness against eigh, warm start, records."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from test_curvature_helpers import explicit_hessian, loss_fn_for, make_problem


def test_thresholds() -> None:
    assert cv.gd_rule(0.1).threshold == pytest.approx(20.0)
    assert cv.heavy_ball_rule(0.1, 0.9).threshold == pytest.approx(38.0)
    assert cv.adam_rule(0.01).threshold == pytest.approx(3800.0)
    assert cv.adam_rule(0.01).preconditioned and not cv.gd_rule(0.1).preconditioned
    with pytest.raises(ValueError, match="learning rate"):
        cv.gd_rule(-1.0)
    with pytest.raises(ValueError, match="beta"):
        cv.heavy_ball_rule(0.1, 1.0)


def _problem():
    problem = make_problem("mlp", bn=True, n=16)
    return problem, loss_fn_for(problem, "train"), (problem["x"], problem["y"])


def test_gd_tracking_with_batch_stats_matches_eigh_and_warm_starts() -> None:
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats = problem["stats"]
        tracker = cv.EoSTracker(loss_fn, cv.gd_rule(0.5), every=3, tol=1e-8, residual_tol=1e-6, max_iters=40)
        state = tracker.init(problem["params"], jax.random.key(0))
        params, records = problem["params"], []
        grad = jax.jit(jax.grad(loss_fn))
        for step in range(7):
            record, state = tracker.update(state, step, params, batch, stats)
            if record is not None:
                records.append((record, params))
            params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad(params, batch, stats))
        assert [r["step"] for r, _ in records] == [0, 3, 6]
        for record, p in records:
            top = np.linalg.eigvalsh(explicit_hessian({**problem, "params": p}, "train"))[-1]
            np.testing.assert_allclose(record["sharpness"], top, rtol=1e-4)
            np.testing.assert_allclose(record["loss"], float(loss_fn(p, batch, stats)), rtol=1e-10)
            assert record["threshold"] == pytest.approx(4.0)
        # Measuring again at unchanged parameters: the warm start is already converged -> one HVP.
        again, _ = tracker.measure(state, 6, records[-1][1], batch, stats)
    assert again["hvps"] == 1
    assert records[0][0]["hvps"] > 3


def test_adam_preconditioned_sharpness_matches_eigh() -> None:
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats, params = problem["stats"], problem["params"]
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)
        for _ in range(3):
            updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch, stats), opt_state)
            params = optax.apply_updates(params, updates)
        precond = cv.adam_preconditioner(opt_state)
        nu = opt_state[0].nu
        expected_p = jax.tree.map(lambda n: jnp.sqrt(n / (1 - 0.999**3)) + 1e-8, nu)
        tracker = cv.EoSTracker(loss_fn, cv.adam_rule(1e-2), every=1, tol=1e-8, residual_tol=1e-6, max_iters=40)
        record, _ = tracker.update(
            tracker.init(params, jax.random.key(1)), 0, params, batch, stats, opt_state=opt_state
        )
        h = explicit_hessian({**problem, "params": params}, "train")
        d = 1 / np.sqrt(np.asarray(ravel_pytree(precond)[0]))
        with pytest.raises(ValueError, match="opt_state"):
            tracker.update(tracker.init(params, jax.random.key(1)), 0, params, batch, stats)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), precond, expected_p)
    np.testing.assert_allclose(record["sharpness"], np.linalg.eigvalsh(d[:, None] * h * d[None])[-1], rtol=1e-4)
    assert record["threshold"] == pytest.approx(3800.0) and record["preconditioned"]


def test_power_method_tracker_and_chunked_data() -> None:
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        tracker = cv.EoSTracker(
            loss_fn,
            cv.heavy_ball_rule(0.1, 0.9),
            chunk_size=8,
            method="power",
            tol=1e-10,
            residual_tol=1e-7,
            max_iters=2000,
        )
        record, _ = tracker.measure(
            tracker.init(problem["params"], jax.random.key(2)), 0, problem["params"], batch, problem["stats"]
        )
        top = np.linalg.eigvalsh(explicit_hessian(problem, "train", chunk_size=8))
    # Power iteration finds the largest magnitude, which is the top eigenvalue for these problems.
    np.testing.assert_allclose(record["sharpness"], top[np.argmax(np.abs(top))], rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        cv.EoSTracker(loss_fn, cv.gd_rule(0.1), method="arnoldi")
    with pytest.raises(ValueError, match="every"):
        cv.EoSTracker(loss_fn, cv.gd_rule(0.1), every=0)


def test_records_save_load_and_plot(tmp_path) -> None:
    records = [
        {
            "step": s,
            "loss": 1.0 / (s + 1),
            "sharpness": 1.5 * s,
            "threshold": 20.0,
            "hvps": 2,
            "residual": 1e-3,
            "preconditioned": False,
        }
        for s in range(0, 50, 10)
    ]
    for suffix in (".json", ".npz"):
        path = cv.save_records(records, tmp_path / f"eos{suffix}")
        assert cv.load_records(path) == records
    arrays = cv.records_to_arrays(records)
    np.testing.assert_array_equal(arrays["step"], [0, 10, 20, 30, 40])
    png = cv.plot_records(records, tmp_path / "eos.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="suffix"):
        cv.save_records(records, tmp_path / "eos.csv")


def _tree_close(a, b, rtol: float) -> None:
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-12), a, b)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_fused_value_and_grad_matches_gradient_and_measure(method: str) -> None:
    """The fused path returns the exact training gradient and the same record as `measure`, with the same
    HVP count (its first HVP comes out of the gradient pass), and matches eigh; off-step it is the gradient."""
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats, params = problem["stats"], problem["params"]
        tracker = cv.EoSTracker(
            loss_fn,
            cv.gd_rule(0.5),
            every=2,
            chunk_size=8,
            method=method,
            tol=1e-9,
            residual_tol=1e-7,
            max_iters=60 if method == "lanczos" else 2000,
        )
        expected_vg = cv.dataset_value_and_grad(loss_fn, params, batch, stats, chunk_size=8)
        state = tracker.init(params, jax.random.key(3))
        (loss, grads), record, fused_state = tracker.value_and_grad(state, 4, params, batch, stats)
        measured, measured_state = tracker.measure(state, 4, params, batch, stats)
        (loss_off, grads_off), none, same_state = tracker.value_and_grad(fused_state, 5, params, batch, stats)
        top = np.linalg.eigvalsh(explicit_hessian(problem, "train", chunk_size=8))
    np.testing.assert_allclose(loss, expected_vg[0], rtol=1e-12)
    _tree_close(grads, expected_vg[1], 1e-10)
    assert record["hvps"] == measured["hvps"] > 2
    np.testing.assert_allclose(record["sharpness"], measured["sharpness"], rtol=1e-8)
    np.testing.assert_allclose(record["sharpness"], top[-1], rtol=1e-4)
    np.testing.assert_allclose(record["loss"], measured["loss"], rtol=1e-12)
    _tree_close(fused_state.vector, measured_state.vector, 1e-5)
    assert none is None and same_state is fused_state
    np.testing.assert_allclose(loss_off, expected_vg[0], rtol=1e-12)
    _tree_close(grads_off, expected_vg[1], 1e-10)


def test_fused_with_aux_and_adam_preconditioner() -> None:
    """has_aux: the value is (loss, aux) with aux chunk-weighted; Adam: fused preconditioned sharpness = eigh."""
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats, params = problem["stats"], problem["params"]

        def loss_with_aux(p, b, s):
            return loss_fn(p, b, s), {"mean_x": jnp.mean(b[0]), "n": jnp.asarray(b[0].shape[0], jnp.float64)}

        opt = optax.adam(1e-2)
        opt_state = opt.init(params)
        for _ in range(2):
            updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch, stats), opt_state)
            params = optax.apply_updates(params, updates)
        tracker = cv.EoSTracker(
            loss_with_aux,
            cv.adam_rule(1e-2),
            every=1,
            chunk_size=10,
            tol=1e-9,
            residual_tol=1e-6,
            max_iters=60,
            has_aux=True,
        )
        state = tracker.init(params, jax.random.key(4))
        ((loss, aux), grads), record, _ = tracker.value_and_grad(state, 0, params, batch, stats, opt_state=opt_state)
        expected_loss, expected_grads = cv.dataset_value_and_grad(loss_fn, params, batch, stats, chunk_size=10)
        h = explicit_hessian({**problem, "params": params}, "train", chunk_size=10)
        d = 1 / np.sqrt(np.asarray(ravel_pytree(cv.adam_preconditioner(opt_state))[0]))
        with pytest.raises(ValueError, match="opt_state"):
            tracker.value_and_grad(state, 0, params, batch, stats)
    # 16 examples in chunks of 10 and 6: aux is their size-weighted mean, i.e. the plain mean over examples.
    np.testing.assert_allclose(aux["mean_x"], np.mean(np.asarray(batch[0])), rtol=1e-12)
    np.testing.assert_allclose(aux["n"], (10 * 10 + 6 * 6) / 16, rtol=1e-12)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    _tree_close(grads, expected_grads, 1e-10)
    np.testing.assert_allclose(record["sharpness"], np.linalg.eigvalsh(d[:, None] * h * d[None])[-1], rtol=1e-4)
    assert record["preconditioned"] and record["loss"] == pytest.approx(float(loss))
    with pytest.raises(TypeError, match="has_aux"):
        cv.EoSTracker(loss_fn, cv.gd_rule(0.1), has_aux=1)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_topk_tracking_matches_eigh_along_gd(placement: str) -> None:
    """k=3: every checkpoint's three top eigenvalues equal eigh's (descending), per pair residual and
    convergence; the warm block at unchanged parameters costs k HVPs; the fused path agrees."""
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats, params = problem["stats"], problem["params"]
        tracker = cv.EoSTracker(
            loss_fn, cv.gd_rule(0.5), every=2, tol=1e-8, residual_tol=1e-4, max_iters=60, k=3, placement=placement
        )
        state = tracker.init(params, jax.random.key(5))
        assert jnp.shape(state.eigenvalue) == (3,)
        assert all(x.shape[0] == 3 for x in jax.tree.leaves(state.vector))
        grad = jax.jit(jax.grad(loss_fn))
        checked = 0
        for step in range(3):
            if tracker.due(step):
                (_, grads), record, state = tracker.value_and_grad(state, step, params, batch, stats)
                top = np.linalg.eigvalsh(explicit_hessian({**problem, "params": params}, "train"))[::-1][:3]
                np.testing.assert_allclose(record["eigenvalues"], top, rtol=1e-6)
                assert record["sharpness"] == record["eigenvalues"][0]
                assert record["residual"] == record["residuals"][0] and max(record["residuals"]) <= 1e-4
                assert record["converged"] and record["pairs_converged"] == [True, True, True]
                checked += 1
            else:
                grads = grad(params, batch, stats)
            params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        # At unchanged parameters the warm block is converged: one product per vector.
        record, state = tracker.measure(state, 3, params, batch, stats)
        again, _ = tracker.measure(state, 3, params, batch, stats)
        top = np.linalg.eigvalsh(explicit_hessian({**problem, "params": params}, "train"))[::-1][:3]
    assert checked == 2 and again["hvps"] == 3 < record["hvps"]
    np.testing.assert_allclose(again["eigenvalues"], top, rtol=1e-6)


def test_gap_stopping_rule_on_a_quadratic() -> None:
    """stopping='gap' (change test, or Kato-Temple estimate res**2 theta / (theta - theta_2) <= tol) on a
    quadratic loss (Hessian = A, known spectrum): from the same warm starts it stops no later than the change
    rule, earlier in total, and stays within 1e-3 of the top eigenvalue."""
    with jax.enable_x64(True):
        n = 40
        q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
        lams = np.concatenate([[10.0, 8.0, 7.5], np.linspace(6.0, 0.1, n - 3)])
        a = jnp.asarray(q @ np.diag(lams) @ q.T)

        def loss_fn(p, a):
            return 0.5 * p["w"] @ a @ p["w"]

        params = {"w": jnp.ones(n)}
        trackers = {s: cv.EoSTracker(loss_fn, cv.gd_rule(0.1), stopping=s) for s in ("change", "gap")}
        hvps = {"change": 0, "gap": 0}
        for i, noise in enumerate([0.02, 0.05, 0.1, 0.2]):
            warm = q[:, 0] + noise * np.random.default_rng(i).normal(size=n)
            state = cv.TrackerState({"w": jnp.asarray(warm)}, jnp.asarray(10.0 * (1 - noise)))
            records = {s: t.measure(state, 0, params, a)[0] for s, t in trackers.items()}
            for s, record in records.items():
                np.testing.assert_allclose(record["sharpness"], 10.0, rtol=1e-3)
                assert record["converged"]
                hvps[s] += record["hvps"]
            assert records["gap"]["hvps"] <= records["change"]["hvps"]
        with pytest.raises(ValueError, match="stopping"):
            cv.EoSTracker(loss_fn, cv.gd_rule(0.1), stopping="residual")
        with pytest.raises(ValueError, match="k=1"):
            cv.EoSTracker(loss_fn, cv.gd_rule(0.1), stopping="gap", k=2)
    assert hvps["gap"] < hvps["change"], hvps


def test_topk_validation_and_k1_records() -> None:
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        params = problem["params"]
        for bad in (0, -1, 2.0, True, "3"):
            with pytest.raises(ValueError, match="`k`"):
                cv.EoSTracker(loss_fn, cv.gd_rule(0.1), k=bad)
        with pytest.raises(ValueError, match="method='lanczos'"):
            cv.EoSTracker(loss_fn, cv.gd_rule(0.1), k=2, method="power")
        with pytest.raises(ValueError, match="max_iters"):
            cv.EoSTracker(loss_fn, cv.gd_rule(0.1), k=5, max_iters=4)
        n = sum(x.size for x in jax.tree.leaves(params))
        big = cv.EoSTracker(loss_fn, cv.gd_rule(0.1), k=n + 1, max_iters=n + 1)
        with pytest.raises(ValueError, match="too large"):
            big.measure(big.init(params, jax.random.key(0)), 0, params, batch, problem["stats"])
        three = cv.EoSTracker(loss_fn, cv.gd_rule(0.1), k=3)
        one = cv.EoSTracker(loss_fn, cv.gd_rule(0.1), max_iters=5)
        with pytest.raises(ValueError, match="k=3"):
            three.measure(one.init(params, jax.random.key(0)), 0, params, batch, problem["stats"])
        state = one.init(params, jax.random.key(0))
    # k=1 keeps today's state (a scalar eigenvalue, a vector like params; its records: the other tests).
    assert jnp.shape(state.eigenvalue) == ()
    check_like_params = jax.tree.map(lambda a, b: a.shape == b.shape, state.vector, params)
    assert all(jax.tree.leaves(check_like_params))


def test_topk_records_save_load_and_plot(tmp_path) -> None:
    records = [
        {
            "step": s,
            "loss": 1.0 / (s + 1),
            "sharpness": 3.0 + s,
            "threshold": 20.0,
            "hvps": 4,
            "residual": 1e-3,
            "converged": True,
            "preconditioned": False,
            "eigenvalues": [3.0 + s, 2.0 + s, 1.0 + s],
            "residuals": [1e-3, 2e-3, 3e-3],
            "pairs_converged": [True, True, False],
        }
        for s in range(0, 30, 10)
    ]
    for suffix in (".json", ".npz"):
        path = cv.save_records(records, tmp_path / f"eos{suffix}")
        assert cv.load_records(path) == records
    assert cv.records_to_arrays(records)["eigenvalues"].shape == (3, 3)
    png = cv.plot_records(records, tmp_path / "eos.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_start_is_unit_gradient_plus_unit_random() -> None:
    with jax.enable_x64(True):
        grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-1.0, 2.0])}
        key = jax.random.key(4)
        r = np.asarray(ravel_pytree(cv.random_like(key, grads))[0])
        g = np.asarray(ravel_pytree(grads)[0])
        got = np.asarray(ravel_pytree(cv.gradient_start(key, grads))[0])
        np.testing.assert_allclose(got, g / np.linalg.norm(g) + r / np.linalg.norm(r), rtol=1e-12)
        # A zero or non-finite gradient contributes nothing: the start is the random unit vector, finite.
        for bad in (0.0, np.nan, np.inf):
            start = cv.gradient_start(key, jax.tree.map(lambda x: jnp.full_like(x, bad), grads))
            np.testing.assert_allclose(np.asarray(ravel_pytree(start)[0]), r / np.linalg.norm(r), rtol=1e-12)
    with pytest.raises(ValueError, match="pytree of float arrays"):
        cv.gradient_start(key, {"a": jnp.arange(3)})
    with pytest.raises(ValueError, match="cold_start"):
        cv.EoSTracker(lambda p: p, cv.gd_rule(0.1), cold_start="gradients")


def _krylov_top(m: np.ndarray, x0: np.ndarray, steps: int) -> float:
    """Top Ritz value of ``m`` on the Krylov space of ``x0`` after ``steps`` products (float64 reference)."""
    cols = [x0 / np.linalg.norm(x0)]
    for _ in range(steps - 1):
        cols.append(m @ cols[-1])
    q, _ = np.linalg.qr(np.stack(cols, axis=1))
    return float(np.linalg.eigvalsh(q.T @ m @ q)[-1])


@pytest.mark.parametrize(
    "cold_start, rule, budget, placement",
    [
        ("gradient", "gd", None, "device"),
        ("gradient", "gd", 0, "host"),
        ("gradient", "adam", None, "host"),
        ("gradient", "adam", 0, "device"),
        ("random", "gd", None, "device"),
        ("random", "adam", 0, "host"),
    ],
)
def test_cold_start_spans_the_krylov_space_of_its_start(cold_start, rule, budget, placement) -> None:
    """The cold measurement's Ritz value after 3 products is the top eigenvalue of the operator on the Krylov
    space of its start: unit gradient + unit random vector (``"gradient"``; the gradient in the preconditioned
    coordinates, ``D g`` for ``D H D``) or the random vector alone; with linearization or without, either loop."""
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        stats, params = problem["stats"], problem["params"]
        kwargs = {}
        if rule == "adam":
            opt = optax.adam(1e-2)
            opt_state = opt.init(params)
            for _ in range(2):
                updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch, stats), opt_state)
                params = optax.apply_updates(params, updates)
            kwargs = {"opt_state": opt_state}
        grad = jax.grad(loss_fn)(params, batch, stats)
        h = explicit_hessian({**problem, "params": params}, "train")
        d = np.ones(h.shape[0])
        if rule == "adam":
            d = 1 / np.sqrt(np.asarray(ravel_pytree(cv.adam_preconditioner(kwargs["opt_state"]))[0]))
        tracker = cv.EoSTracker(
            loss_fn, cv.adam_rule(1e-2) if rule == "adam" else cv.gd_rule(0.5), every=1, tol=0.0,
            residual_tol=0.0, max_iters=1, placement=placement, linearize_budget=budget, cold_start=cold_start,
        )  # fmt: skip
        state = tracker.init(params, jax.random.key(2))
        record, _ = tracker.update(state, 0, params, batch, stats, **kwargs)
        r = np.asarray(ravel_pytree(state.vector)[0])
        zg = d * np.asarray(ravel_pytree(grad)[0])
        starts = {"random": r, "gradient": r / np.linalg.norm(r) + zg / np.linalg.norm(zg)}
    assert record["hvps"] == 3  # a cold measurement may use 3 * max_iters
    m = d[:, None] * h * d[None]
    expected = {name: _krylov_top(m, x0, 3) for name, x0 in starts.items()}
    np.testing.assert_allclose(record["sharpness"], expected[cold_start], rtol=1e-9)
    # The two starts' Krylov spaces differ, so the comparison above can tell which start was used.
    assert abs(expected["random"] - expected["gradient"]) > 1e-6 * abs(expected[cold_start])


def test_cold_gradient_start_topk_matches_eigh() -> None:
    with jax.enable_x64(True):
        problem, loss_fn, batch = _problem()
        params, stats = problem["params"], problem["stats"]
        tracker = cv.EoSTracker(
            loss_fn, cv.gd_rule(0.5), tol=1e-10, residual_tol=1e-6, max_iters=40, k=3, cold_start="gradient"
        )
        record, _ = tracker.update(tracker.init(params, jax.random.key(3)), 0, params, batch, stats)
        top = np.linalg.eigvalsh(explicit_hessian(problem, "train"))[::-1][:3]
    np.testing.assert_allclose(record["eigenvalues"], top, rtol=1e-6)
    assert record["converged"]
