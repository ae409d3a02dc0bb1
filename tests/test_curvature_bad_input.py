"""Bad input to the curvature solvers and estimators: a clear error naming the argument at trace time, or a
result that says it did not converge, never a silent wrong answer (found by an audit of the public API)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax import curvature as cv

X = jax.random.normal(jax.random.key(0), (16, 3))
Y = jnp.sin(X[:, :2])
PARAMS = {"w": 0.5 * jax.random.normal(jax.random.key(1), (3, 2)), "b": jnp.zeros(2)}
V0 = cv.random_like(jax.random.key(2), PARAMS)


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"][None]) - y) ** 2)


MV = cv.hessian_matvec(loss_fn)


def explicit_hessian(data=(X, Y)):
    flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
    h = jax.hessian(lambda f: loss_fn(unravel(f), data))(flat)
    return np.linalg.eigvalsh(np.asarray(h, np.float64))


def test_lanczos_pairs_of_a_nan_operator_are_nan_and_not_converged():
    bad = (X.at[3, 0].set(jnp.nan), Y)
    mv = cv.dataset_hessian_matvec(loss_fn, 5)
    for run in (cv.lanczos, jax.jit(cv.lanczos, static_argnums=0, static_argnames=("k", "num_iters"))):
        r = run(mv, V0, PARAMS, bad, k=2, num_iters=6)
        assert not np.any(np.asarray(r.converged))
        assert np.all(np.isnan(np.asarray(r.eigenvalue)))
    clean = cv.lanczos(MV, V0, PARAMS, (X, Y), k=2, num_iters=8)  # the finite case is untouched
    np.testing.assert_allclose(clean.eigenvalue, explicit_hessian()[::-1][:2], rtol=1e-4)
    assert np.all(np.asarray(clean.converged))


def test_smallest_eigenvalue_with_a_shift_below_lambda_max_is_not_converged():
    eig = explicit_hessian()
    assert eig[0] < 0 < eig[-1]
    for shift in (0.0, jnp.float32(0.0)):
        r = cv.smallest_eigenvalue(MV, V0, PARAMS, (X, Y), shift=shift, max_iters=300)
        assert not bool(r.converged)  # it found lambda_max here: a positive shifted value proves shift < lambda_max
    r = cv.smallest_eigenvalue(MV, V0, PARAMS, (X, Y), shift=2 * eig[-1], max_iters=3000, tol=1e-9)
    assert bool(r.converged)
    np.testing.assert_allclose(r.eigenvalue, eig[0], rtol=1e-3)


def test_a_complete_krylov_basis_counts_as_converged():
    n = sum(x.size for x in jax.tree.leaves(PARAMS))
    r = cv.lanczos_top(MV, V0, PARAMS, (X, Y), max_iters=n, tol=0.0, residual_tol=1e-6)
    assert bool(r.converged)
    np.testing.assert_allclose(r.eigenvalue, explicit_hessian()[-1], rtol=1e-5)


def test_batch_lambda_max_recovers_after_a_nan_batch():
    x = jax.random.normal(jax.random.key(3), (64, 3)).at[5, 0].set(jnp.nan)
    data = (x, jnp.sin(x[:, :2]))
    r = cv.batch_lambda_max(loss_fn, PARAMS, data, batch_size=8, num_batches=10, key=jax.random.key(4), max_iters=8)
    vector = jax.flatten_util.ravel_pytree(r.eigenvector)[0]
    assert np.all(np.isfinite(np.asarray(vector)))
    hit = np.array([5 in np.asarray(i) for i in np.asarray(r.indices)])
    assert hit.any() and not hit.all()
    values = np.asarray(r.eigenvalues)
    assert np.all(np.isfinite(values[~hit])) and np.all(np.asarray(r.converged)[~hit])
    assert not np.any(np.asarray(r.converged)[hit])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.complex64])
def test_solvers_name_unsupported_dtypes(dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    v0 = jax.tree.map(lambda x: x.astype(dtype), V0)
    with pytest.raises(TypeError, match=r"`v0` must have float32 or float64 leaves"):
        cv.lanczos_top(MV, v0, params, (X, Y))
    with pytest.raises(TypeError, match=r"`like` must have float32 or float64 leaves"):
        cv.hutchpp_trace(MV, jax.random.key(0), v0, params, (X, Y), rank=2, num_samples=2)


def test_start_vector_dtype_must_match_the_parameters():
    v0 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), V0)
    with pytest.raises(TypeError, match=r"`vector` leaf \['b'\] has dtype bfloat16 but the matching `params` leaf"):
        cv.hvp(loss_fn, PARAMS, v0, (X, Y))


def test_integer_parameter_leaves_are_named():
    params = {**PARAMS, "step": jnp.int32(3)}
    with pytest.raises(TypeError, match=r"`params` leaf \['step'\] has dtype int32"):
        cv.hvp(loss_fn, params, {**V0, "step": jnp.float32(0)}, (X, Y))
    with pytest.raises(ValueError, match=r"`params` must be a nonempty pytree of float arrays"):
        cv.random_like(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"nonempty pytree"):
        cv.random_like(jax.random.key(0), {})


@pytest.mark.parametrize("key", [0, np.int32(3), jnp.zeros(3), jax.random.split(jax.random.key(0), 2)])
def test_keys_are_checked(key):
    with pytest.raises((TypeError, ValueError), match=r"`key` must be"):
        cv.hutchinson_trace(MV, key, V0, PARAMS, (X, Y), num_samples=2)
    with pytest.raises((TypeError, ValueError), match=r"`key` must be"):
        cv.random_like(key, PARAMS)
    with pytest.raises((TypeError, ValueError), match=r"`key` must be"):
        cv.batch_lambda_max(loss_fn, PARAMS, (X, Y), batch_size=4, num_batches=2, key=key, max_iters=8)


def test_raw_and_typed_keys_work():
    for key in (jax.random.PRNGKey(0), jax.random.key(0)):
        assert np.isfinite(float(cv.hutchinson_trace(MV, key, V0, PARAMS, (X, Y), num_samples=2).trace))


def test_scalar_arguments_must_be_scalars():
    with pytest.raises(TypeError, match=r"`eigenvalue0` must be a real scalar.*shape \(2,\)"):
        cv.lanczos_top(MV, V0, PARAMS, (X, Y), eigenvalue0=jnp.ones(2), max_iters=8)
    with pytest.raises(TypeError, match=r"`tol` must be a real scalar.*'1e-4'"):
        cv.power_iteration(MV, V0, PARAMS, (X, Y), tol="1e-4")
    with pytest.raises(TypeError, match=r"`residual_tol` must be a real scalar"):
        cv.lanczos(MV, V0, PARAMS, (X, Y), k=1, num_iters=4, residual_tol=jnp.array([1e-4, 1e-3]))
    with pytest.raises(TypeError, match=r"`shift` must be a real scalar"):
        cv.smallest_eigenvalue(MV, V0, PARAMS, (X, Y), shift=jnp.ones(2))
    with pytest.raises(ValueError, match=r"`eigenvalue0` is NaN"):
        cv.power_iteration(MV, V0, PARAMS, (X, Y), eigenvalue0=float("nan"))
    # None means no warm start, as inf does
    a = cv.lanczos_top(MV, V0, PARAMS, (X, Y), eigenvalue0=None, max_iters=8)
    b = cv.lanczos_top(MV, V0, PARAMS, (X, Y), max_iters=8)
    assert float(a.eigenvalue) == float(b.eigenvalue) and int(a.iterations) == int(b.iterations)


@pytest.mark.parametrize("scale", [1e-22, 1e22])
def test_start_vectors_of_extreme_magnitude(scale):
    v0 = jax.tree.map(lambda x: x * scale, V0)
    top = cv.lanczos_top(MV, v0, PARAMS, (X, Y), tol=1e-6, residual_tol=1e-4, max_iters=8)
    power = cv.power_iteration(MV, v0, PARAMS, (X, Y), max_iters=500, tol=1e-7, residual_tol=1e-3)
    for r in (top, power):
        assert bool(r.converged)
        np.testing.assert_allclose(r.eigenvalue, explicit_hessian()[-1], rtol=1e-3)


def test_ordinary_start_vectors_are_untouched_bit_for_bit():
    from bnjax.curvature.eigen import _rescaled

    x = jax.flatten_util.ravel_pytree(V0)[0]
    assert np.array_equal(np.asarray(_rescaled(x)), np.asarray(x))


def test_matvec_returning_another_structure_is_rejected():
    def swapped(v, p, batch):
        out = MV(v, p, batch)
        return {"b": out["w"].reshape(-1)[:2], "w": jnp.concatenate([out["b"], out["w"].reshape(-1)[2:]]).reshape(3, 2)}

    def as_list(v, p, batch):
        out = MV(v, p, batch)
        return [out["b"], out["w"]]

    for mv in (as_list,):
        with pytest.raises(ValueError, match=r"`matvec` returned a vector with structure"):
            cv.lanczos_top(mv, V0, PARAMS, (X, Y), max_iters=8)
    r = cv.lanczos_top(swapped, V0, PARAMS, (X, Y), max_iters=8)  # same structure and shapes: the caller's business
    assert np.isfinite(float(r.eigenvalue))


def test_chunked_mean_averages_integer_results_in_float():
    data = jnp.arange(8)
    got = cv.chunked_mean(lambda c: jnp.mean(c).astype(jnp.int32), data, 3)  # chunk means 1, 4, 6 (truncated)
    assert jnp.issubdtype(got.dtype, jnp.floating)
    np.testing.assert_allclose(got, (3 * 1 + 3 * 4 + 2 * 6) / 8)
    flags = cv.chunked_mean(lambda c: jnp.all(c < 5), data, 4)  # bool: the share of chunks (weighted)
    np.testing.assert_allclose(flags, 0.5)


def test_flax_loss_needs_an_inputs_targets_pair():
    model = nn.Dense(2)
    p = model.init(jax.random.key(0), X)["params"]
    fns = cv.flax_curvature_fns(model.apply, lambda out, y: jnp.mean((out - y) ** 2), bn_mode=None)
    np.testing.assert_allclose(fns.loss_fn(p, (X, Y), None), jnp.mean((model.apply({"params": p}, X) - Y) ** 2))
    for batch in (jnp.concatenate([X[:, :2], Y], 0), {"x": X, "y": Y}, (X,)):
        with pytest.raises(ValueError, match=r"`batch` must be an \(inputs, targets\) pair"):
            fns.loss_fn(p, batch, None)


def test_smoothed_density_needs_a_positive_width():
    d = cv.slq_density(MV, jax.random.key(0), V0, PARAMS, (X, Y), num_probes=2, num_iters=4)
    grid = jnp.linspace(-1, 1, 5)
    assert np.all(np.isfinite(np.asarray(d.smoothed(grid, 0.1))))
    for sigma in (0.0, -0.1):
        with pytest.raises(ValueError, match=r"`sigma`"):
            d.smoothed(grid, sigma)


def masked_loss(p, x, y):
    """Square loss over the rows with a finite target: a NaN label gives a finite loss and a NaN gradient."""
    r = (jnp.tanh(x @ p["w"] + p["b"][None]) - y) ** 2
    keep = jnp.isfinite(y)
    return jnp.sum(jnp.where(keep, r, 0.0)) / jnp.sum(keep)


@pytest.mark.parametrize("k", [1, 2])
def test_tracker_recovers_after_a_checkpoint_with_a_nan_gradient(k):
    tracker = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, k=k, max_iters=8)
    state = tracker.init(PARAMS, jax.random.key(0))
    _, state = tracker.measure(state, 0, PARAMS, X, Y)
    bad, state_bad = tracker.measure(state, 1, PARAMS, X, Y.at[0, 0].set(jnp.nan))
    assert np.isfinite(bad["loss"]) and not bad["converged"]
    for leaf in jax.tree.leaves(state_bad):
        assert np.all(np.isfinite(np.asarray(leaf)))  # the last finite state is kept
    again, _ = tracker.measure(state_bad, 2, PARAMS, X, Y)
    assert again["converged"]
    np.testing.assert_allclose(again["sharpness"], explicit_hessian()[-1], rtol=1e-3)


def test_tracker_before_the_first_adam_update_records_no_sharpness():
    import optax

    opt = optax.adam(1e-2)
    opt_state = opt.init(PARAMS)
    tracker = cv.EoSTracker(lambda p, x, y: masked_loss(p, x, y), cv.adam_rule(1e-2), every=1, max_iters=8)
    state = tracker.init(PARAMS, jax.random.key(0))
    (value, grads), record, new_state = tracker.value_and_grad(state, 0, PARAMS, X, Y, opt_state=opt_state)
    assert np.isnan(record["sharpness"]) and record["hvps"] == 0 and not record["converged"]
    assert new_state is state
    np.testing.assert_allclose(value, masked_loss(PARAMS, X, Y), rtol=1e-6)
    updates, opt_state = opt.update(grads, opt_state, PARAMS)
    params = optax.apply_updates(PARAMS, updates)
    record, _ = tracker.measure(state, 1, params, X, Y, opt_state=opt_state)
    assert record["converged"] and record["hvps"] > 0 and record["sharpness"] < 1e5


def test_injected_hyperparameters_must_match_the_rule():
    import optax

    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.9)
    state = opt.init(PARAMS)
    with pytest.raises(ValueError, match=r"has b2=0.9 but the 'adam' rule was built with b2=0.999"):
        cv.rule_preconditioner(cv.adam_rule(1e-3), state)
    p = cv.rule_preconditioner(cv.adam_rule(1e-3, b2=0.9), state)  # the matching rule reads it
    assert jax.tree.structure(p) == jax.tree.structure(PARAMS)
    rms = optax.inject_hyperparams(optax.rmsprop)(learning_rate=1e-3, decay=0.8).init(PARAMS)
    with pytest.raises(ValueError, match=r"has decay=0.8"):
        cv.rule_preconditioner(cv.rmsprop_rule(1e-3), rms)


def test_rules_take_scalar_arrays_and_reject_missing_momentum():
    assert cv.gd_rule(jnp.array(0.1)).threshold_at(0) == pytest.approx(20.0)
    assert cv.heavy_ball_rule(0.1, jnp.array(0.9)).threshold_at(0) == pytest.approx(38.0)
    for rule in (cv.heavy_ball_rule, cv.nesterov_rule):
        with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\); got None"):
            rule(0.1, None)
    with pytest.raises(ValueError, match=r"`eps` must be finite"):
        cv.adam_rule(1e-3, eps=float("inf"))
    with pytest.raises(ValueError, match=r"`weight_decay` must be finite"):
        cv.adamw_rule(1e-3, weight_decay=float("inf"))


def test_tracker_names_jit_and_bad_steps():
    tracker = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, max_iters=8)
    state = tracker.init(PARAMS, jax.random.key(0))
    with pytest.raises(TypeError, match=r"run in the Python training loop"):
        jax.jit(lambda s, p: tracker.measure(s, 0, p, X, Y)[1])(state, PARAMS)
    with pytest.raises(TypeError, match=r"`step` must be an integer"):
        tracker.measure(state, 2.7, PARAMS, X, Y)
    record, _ = tracker.measure(state, np.int64(3), PARAMS, X, Y)
    assert record["step"] == 3


def test_records_of_different_k_and_bad_files(tmp_path):
    r1 = {"step": 0, "sharpness": 1.0, "converged": True}
    r3 = {**r1, "eigenvalues": [1.0, 0.5, 0.2]}
    with pytest.raises(ValueError, match=r"Record 1 has fields"):
        cv.save_records([r1, r3], tmp_path / "a.npz")
    with pytest.raises(ValueError, match=r"hold \[2, 3\] eigenvalues"):
        cv.records_to_arrays([r3, {**r1, "eigenvalues": [1.0, 0.5]}])
    for name, content in (("e.json", b""), ("d.json", b'{"step": 0}'), ("e.npz", b""), ("c.npz", b"not a zip")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"does not hold records saved by save_records"):
            cv.load_records(path)
    with pytest.raises(ValueError, match=r"Unsupported suffix '.txt'"):
        cv.load_records(tmp_path / "r.txt")
    with pytest.raises(FileNotFoundError):
        cv.load_records(tmp_path / "missing.json")
    saved = cv.save_records([r3, r3], tmp_path / "k3.npz")
    assert cv.load_records(saved) == [r3, r3]


def test_tracker_loss_structure_is_checked_against_has_aux():
    pair_fn = lambda p, batch: (loss_fn(p, batch), {"n": jnp.float32(1.0)})  # noqa: E731
    cases = (
        (cv.EoSTracker(loss_fn, cv.gd_rule(0.1), has_aux=True), r"has_aux=True\) needs `loss_fn` to return a pair"),
        (cv.EoSTracker(pair_fn, cv.gd_rule(0.1)), r"returned a tuple of 2 items, not a scalar loss; pass has_aux"),
        (
            cv.EoSTracker(loss_fn, cv.gd_rule(0.1), has_aux=True, chunk_size=4),
            r"it returned an array of shape \(\)",
        ),
    )
    for tracker, message in cases:
        state = tracker.init(PARAMS, jax.random.key(0))
        with pytest.raises(TypeError, match=message):
            tracker.measure(state, 0, PARAMS, (X, Y))
        with pytest.raises(TypeError, match=message):
            tracker.value_and_grad(state, 0, PARAMS, (X, Y))
    tracker = cv.EoSTracker(pair_fn, cv.gd_rule(0.1), has_aux=True)  # the right structure still works
    (value, _), record, _ = tracker.value_and_grad(tracker.init(PARAMS, jax.random.key(0)), 0, PARAMS, (X, Y))
    np.testing.assert_allclose(record["sharpness"], explicit_hessian()[-1], rtol=1e-3)
    assert float(value[1]["n"]) == 1.0


def test_batch_sharpness_rejects_integer_params_like_the_solvers():
    with pytest.raises(ValueError, match=r"`params` must be a nonempty pytree of float arrays"):
        cv.batch_sharpness(
            loss_fn, {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2)}, (X, Y), batch_size=4, num_batches=2,
            key=jax.random.key(0),
        )  # fmt: skip


def test_flags_accept_numpy_bools_and_name_a_traced_one():
    mv = cv.dataset_hessian_matvec(loss_fn, 4, per_example=np.bool_(False))
    flat = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]  # noqa: E731
    np.testing.assert_allclose(flat(mv(V0, PARAMS, (X, Y))), flat(MV(V0, PARAMS, (X, Y))), rtol=1e-5, atol=1e-6)

    with pytest.raises(TypeError, match=r"`train` must be True or False .* mark it static \(static_argnames\)"):
        jax.jit(lambda x, t: bnjax.batch_norm(x, train=t)[0])(X, True)


# -- third audit (2026-12-07): rules against the optimizer state, tracker state, subsets, estimators ----------


def _trained_state(opt, steps=2):
    import optax

    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(masked_loss)(params, X, Y), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_injected_learning_rate_momentum_b1_and_decay_must_match_the_rule():
    """The threshold is coefficient / lr: a rule with another lr, b1 or momentum than the optimizer's reported a
    threshold 63x off without a word (only b2/eps were compared)."""
    import optax

    cases = [
        (optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.5), cv.adam_rule(1e-3), "learning_rate=0.01"),
        (optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.5), cv.adam_rule(1e-2), "b1=0.5"),
        (optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.5), cv.heavy_ball_rule(0.5, 0.9),
         "momentum=0.5"),
        (optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.5), cv.adamw_rule(1e-2),
         "weight_decay=0.5"),
    ]  # fmt: skip
    for opt, rule, seen in cases:
        params, state = _trained_state(opt)
        tracker = cv.EoSTracker(masked_loss, rule, every=1, max_iters=8)
        with pytest.raises(ValueError, match=rf"has {seen} but the '\w+' rule was built with"):
            tracker.measure(tracker.init(params, jax.random.key(0)), 2, params, X, Y, opt_state=state)
    # The matching rules measure; the threshold is the optimizer's.
    params, state = _trained_state(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.5))
    tracker = cv.EoSTracker(masked_loss, cv.adam_rule(1e-2, b1=0.5), every=1, max_iters=8)
    record, _ = tracker.measure(tracker.init(params, jax.random.key(0)), 2, params, X, Y, opt_state=state)
    assert record["threshold"] == pytest.approx(3 / (0.5 * 1e-2))


def test_plain_rules_check_the_optimizer_state_they_are_given():
    import optax

    tracker = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, max_iters=8)
    state = tracker.init(PARAMS, jax.random.key(0))
    for opt in (optax.adam(1e-2), optax.rmsprop(1e-2)):
        params, opt_state = _trained_state(opt)
        with pytest.raises(ValueError, match=r"measures plain sharpness, but `opt_state` holds ScaleBy"):
            tracker.measure(state, 2, params, X, Y, opt_state=opt_state)
    params, momentum_state = _trained_state(optax.sgd(0.1, momentum=0.9))
    with pytest.warns(UserWarning, match=r"`opt_state` holds momentum .* the 'gd' rule assumes momentum 0"):
        tracker.measure(state, 2, params, X, Y, opt_state=momentum_state)
    heavy = cv.EoSTracker(masked_loss, cv.heavy_ball_rule(0.1, 0.9), every=1, max_iters=8)
    with pytest.warns(UserWarning, match=r"`opt_state` has no momentum .* the 'heavy_ball' rule assumes momentum 0.9"):
        heavy.measure(state, 2, params, X, Y, opt_state=_trained_state(optax.sgd(0.1))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching pairs and no state at all are silent
        heavy.measure(state, 2, params, X, Y, opt_state=momentum_state)
        tracker.measure(state, 2, params, X, Y, opt_state=_trained_state(optax.sgd(0.1))[1])
        tracker.measure(state, 2, params, X, Y)


def test_stability_rules_built_directly_are_checked():
    for kwargs, match in (
        (dict(coefficient=float("nan")), r"`coefficient` must be a finite number > 0"),
        (dict(coefficient=-2.0), r"`coefficient` must be a finite number > 0"),
        (dict(eps=-1.0), r"`eps` must be a number >= 0"),
        (dict(preconditioner="Adam"), r"`preconditioner` must be None, 'adam' or 'rms'"),
        (dict(name="sgd"), r"`name` must be one of"),
        (dict(learning_rate=float("inf")), r"must be a finite positive number"),
    ):
        args = {"name": "gd", "learning_rate": 0.1, "coefficient": 2.0, **kwargs}
        with pytest.raises(ValueError, match=match):
            cv.StabilityRule(**args)
    for build in (cv.gd_rule, lambda lr: cv.adam_rule(lr), lambda lr: cv.heavy_ball_rule(lr, 0.9)):
        with pytest.raises(ValueError, match=r"must be a finite positive number"):
            build(float("inf"))  # at construction, not after the products are paid for
    assert cv.StabilityRule("gd", 1, 2).threshold == 2.0


def test_block_tracking_records_nan_not_the_previous_values_at_a_bad_checkpoint():
    tracker = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, k=2, max_iters=8)
    good, state = tracker.measure(tracker.init(PARAMS, jax.random.key(0)), 0, PARAMS, X, Y)
    bad, kept = tracker.measure(state, 1, PARAMS, X, Y.at[0, 0].set(jnp.nan))
    assert np.isnan(bad["sharpness"]) and np.all(np.isnan(bad["eigenvalues"])) and not bad["converged"]
    np.testing.assert_array_equal(kept.eigenvalue, state.eigenvalue)  # the warm start is kept, not recorded
    assert np.isfinite(good["sharpness"])


def test_tracker_state_is_checked():
    tracker = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, max_iters=8)
    state = tracker.init(PARAMS, jax.random.key(0))
    nan = state._replace(vector=jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), state.vector))
    with pytest.raises(ValueError, match=r"`state.vector` has non-finite entries"):
        tracker.measure(nan, 0, PARAMS, X, Y)
    with pytest.raises(ValueError, match=r"With k=1, `state.eigenvalue` is a scalar; got shape \(2,\)"):
        tracker.measure(state._replace(eigenvalue=jnp.ones(2)), 0, PARAMS, X, Y)
    with pytest.raises(TypeError, match=r"`state.eigenvalue` must be a number or an array; got NoneType"):
        tracker.measure(state._replace(eigenvalue=None), 0, PARAMS, X, Y)
    block = cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=1, max_iters=8, k=2)
    start = block.init(PARAMS, jax.random.key(0))
    record, _ = block.measure(start._replace(eigenvalue=[np.inf] * 2), 0, PARAMS, X, Y)  # a list is an array
    assert record == block.measure(start, 0, PARAMS, X, Y)[0]
    assert cv.EoSTracker(masked_loss, cv.gd_rule(0.1), every=np.int64(5), k=np.int64(1)).every == 5


def test_subsets_refuse_an_empty_complement_and_misplaced_collections():
    model = nn.Sequential([nn.Dense(3), bnjax.BatchNorm(use_running_average=False), nn.Dense(2)])
    v = model.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"everything_but\(...\) selects every parameter: its predicate selects none"):
        cv.param_subset(v["params"], cv.everything_but(cv.layer("Dense_9")))
    with pytest.raises(ValueError, match=r"pass `variables\['batch_stats'\]`, not the whole variables"):
        cv.batchnorm_params(v)
    with pytest.raises(ValueError, match=r"leaves named \['bias', 'kernel', 'scale'\], which are parameters"):
        cv.batchnorm_params(v["params"])
    bn = cv.param_subset(v["params"], cv.batchnorm_params(v["batch_stats"]))
    rest = cv.param_subset(v["params"], cv.everything_but(cv.batchnorm_params(v["batch_stats"])))
    assert bn.size == 6 and rest.size + bn.size == sum(x.size for x in jax.tree.leaves(v["params"]))
    with pytest.raises(TypeError, match=r"The predicate must return a bool; for the path layers_0/bias"):
        cv.param_subset(v["params"], lambda path: jnp.asarray(True))
    mv = cv.subset_matvec(lambda vec, p: {"other": 0.0}, bn)
    with pytest.raises(ValueError, match=r"subset_matvec: the inner `matvec` must return a vector like the parameters"):
        mv(bn.restrict(v["params"]), v["params"])


def test_equinox_batchnorm_parameters_are_named_weight_and_bias():
    import equinox as eqx

    import bnjax.equinox

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        bn: bnjax.equinox.BatchNorm

        def __init__(self):
            self.lin, self.bn = eqx.nn.Linear(3, 4, key=jax.random.key(0)), bnjax.equinox.BatchNorm(4, "batch")

    f = bnjax.as_functional(*eqx.nn.make_with_state(Net)())
    subset = cv.param_subset(f.variables["params"], cv.batchnorm_params(prefixes=("bn",)))
    assert subset.paths == ("bn/weight", "bn/bias")


def test_estimators_refuse_integer_products_and_low_precision_params():
    a = jnp.diag(jnp.arange(1.0, 6.0))
    with pytest.raises(TypeError, match=r"`matvec` returned leaves of dtype \['int32'\] for a float32 vector"):
        cv.hutchinson_trace(lambda v, m: (0.3 * m @ v).astype(jnp.int32), jax.random.key(0), jnp.ones(5), a,
                            num_samples=4)  # fmt: skip
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    with pytest.raises(TypeError, match=r"`params` must have float32 or float64 leaves; got dtypes \['bfloat16'\]"):
        cv.batch_sharpness(masked_loss, bf16, (X, Y), batch_size=4, num_batches=2, key=jax.random.key(0))


def test_batch_lambda_max_eigenvector_is_unit_even_when_no_batch_is_finite():
    loss = lambda p, batch: masked_loss(p, *batch)  # noqa: E731
    v0 = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), PARAMS)
    r = cv.batch_lambda_max(loss, PARAMS, (X, jnp.full_like(Y, jnp.nan)), batch_size=4, num_batches=2,
                            key=jax.random.key(0), v0=v0, max_iters=5)  # fmt: skip
    assert not np.any(np.asarray(r.converged))
    norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(r.eigenvector)))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)


def test_smoothed_density_checks_its_grid():
    density = cv.slq_density(MV, jax.random.key(0), PARAMS, PARAMS, (X, Y), num_probes=2, num_iters=4)
    for grid in (0.5, jnp.ones((3, 2)), jnp.ones(3, jnp.complex64)):
        with pytest.raises(ValueError, match=r"`grid` must be a 1-D array of real points"):
            density.smoothed(grid, 0.1)
    assert density.smoothed([0.0, 1.0], 0.1).shape == (2,)  # a list is a grid
