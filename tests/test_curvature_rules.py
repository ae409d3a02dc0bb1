"""Stability rules: every threshold checked by running the real optax optimizer on a diagonal quadratic
(bounded just below the threshold, divergent just above), preconditioners against optax's own updates, and
learning-rate schedules in the tracker's records."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv

LR, B1, WD, EPS = 0.05, 0.9, 10.0, 1e-3  # lr * WD = 0.5: the decay moves the threshold by 25%
# Second moments held fixed (the quadratic model of a preconditioned rule freezes P; optax's own
# transforms with decay 1 keep nu at its initial value).
NU = np.array([4.0, 0.25, 1.0, 9.0])


def _frozen_adam(weight_decay: float) -> optax.GradientTransformation:
    """Adam(W) with its second moment held at ``NU``: P = sqrt(NU) + EPS, optax's own m_hat, decay and lr."""
    return optax.chain(
        optax.scale_by_rms(decay=1.0, eps=EPS, initial_scale=jnp.asarray(NU), eps_in_sqrt=False),
        optax.ema(B1, debias=True),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(LR),
    )


# name -> (optimizer, rule, diagonal preconditioner P of the quadratic model)
CASES = {
    "gd": (optax.sgd(LR), cv.gd_rule(LR), np.ones(4)),
    "heavy_ball": (optax.sgd(LR, momentum=B1), cv.heavy_ball_rule(LR, B1), np.ones(4)),
    "nesterov": (optax.sgd(LR, momentum=B1, nesterov=True), cv.nesterov_rule(LR, B1), np.ones(4)),
    "rmsprop": (
        optax.rmsprop(LR, decay=1.0, eps=EPS, initial_scale=jnp.asarray(NU)),
        cv.rmsprop_rule(LR, eps=EPS),
        np.sqrt(NU + EPS),
    ),
    "rmsprop_nesterov": (
        optax.rmsprop(LR, decay=1.0, eps=EPS, initial_scale=jnp.asarray(NU), momentum=0.5, nesterov=True),
        cv.rmsprop_rule(LR, eps=EPS, momentum=0.5, nesterov=True),
        np.sqrt(NU + EPS),
    ),
    "adam": (_frozen_adam(0.0), cv.adam_rule(LR, B1, eps=EPS), np.sqrt(NU) + EPS),
    "adamw": (_frozen_adam(WD), cv.adamw_rule(LR, B1, eps=EPS, weight_decay=WD), np.sqrt(NU) + EPS),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_threshold_separates_bounded_from_divergent_optax_runs(name: str) -> None:
    """Coordinates with preconditioned curvature 3% below the rule's threshold stay bounded under the real
    optimizer; 3% above, they blow up. An error of the formula beyond 3% (e.g. Nesterov's or AdamW's against
    heavy ball's or Adam's) fails one side."""
    opt, rule, p = CASES[name]
    ratio = np.array([0.97, 0.97, 1.03, 1.03])
    # Curvature h along each coordinate: preconditioned sharpness h / P = ratio * threshold.
    h = ratio * rule.threshold * p
    with jax.enable_x64(True):
        x0 = jnp.ones(4)
        grad = lambda x: jnp.asarray(h) * x

        def step(carry, _):
            x, state = carry
            updates, state = opt.update(grad(x), state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), jnp.abs(x)

        _, path = jax.lax.scan(step, (x0, opt.init(x0)), length=600)
        path = np.asarray(path)
    # The asymptotic growth rate decides (Adam's bias correction of m inflates the first steps: a transient):
    # the envelope over the last 100 steps against the one over steps 200-300.
    assert np.all(np.isfinite(path)), path[-1]
    growth = path[-100:].max(axis=0) / path[200:300].max(axis=0)
    assert np.all(growth[:2] < 1e-2), growth  # decaying below the threshold
    assert np.all(growth[2:] > 1e2), growth  # diverging above it


def test_threshold_values_and_errors() -> None:
    assert cv.nesterov_rule(0.1, 0.9).threshold == pytest.approx(3.8 / 2.8 / 0.1)
    assert cv.nesterov_rule(0.1, 0.0).threshold == pytest.approx(cv.gd_rule(0.1).threshold)
    assert cv.rmsprop_rule(0.01).threshold == pytest.approx(200.0) and cv.rmsprop_rule(0.01).preconditioned
    assert cv.rmsprop_rule(0.01, momentum=0.9).threshold == pytest.approx(380.0)
    assert cv.adamw_rule(0.01, weight_decay=0.1).threshold == pytest.approx(3800.0 - 1.9)
    assert cv.adamw_rule(0.01, weight_decay=0.0).threshold == pytest.approx(cv.adam_rule(0.01).threshold)
    with pytest.raises(ValueError, match="nesterov"):
        cv.rmsprop_rule(0.1, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay"):
        cv.adamw_rule(0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="b1"):
        cv.adamw_rule(0.1, b1=1.0)
    with pytest.raises(ValueError, match="learning rate"):
        cv.nesterov_rule("0.1", 0.9)
    with pytest.raises(ValueError, match="step 0"):
        cv.gd_rule(lambda step: -1.0)


def test_schedule_thresholds_per_step() -> None:
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=4, decay_steps=20, end_value=0.01)
    rule = cv.heavy_ball_rule(schedule, 0.5)
    assert rule.scheduled and rule.threshold_at(0) == np.inf
    for step in (2, 4, 11, 20, 30):
        assert rule.threshold_at(step) == pytest.approx(3.0 / float(schedule(step)), rel=1e-6)
    wd = optax.linear_schedule(0.0, 1.0, 10)
    adamw = cv.adamw_rule(schedule, weight_decay=wd)
    assert adamw.threshold_at(5) == pytest.approx(38.0 / float(schedule(5)) - 19.0 * 0.5, rel=1e-6)
    with pytest.raises(TypeError, match="threshold_at"):
        rule.threshold  # noqa: B018
    assert cv.gd_rule(0.1).threshold_at(123) == pytest.approx(20.0)


def _params_and_grads():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(keys[0], (3, 2)), "b": jax.random.normal(keys[1], (2,))}
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape, p.dtype), params) for k in keys[1:]]
    return params, grads


PRECONDITIONED = {
    "rmsprop": (optax.rmsprop(0.01), cv.rmsprop_rule(0.01)),
    "rmsprop_bias": (optax.rmsprop(0.01, decay=0.8, bias_correction=True), cv.rmsprop_rule(0.01, decay=0.8)),
    "rmsprop_centered": (optax.rmsprop(0.01, centered=True), cv.rmsprop_rule(0.01)),
    "rmsprop_eps_out": (
        optax.rmsprop(0.01, eps=1e-3, eps_in_sqrt=False),
        cv.rmsprop_rule(0.01, eps=1e-3, eps_in_sqrt=False),
    ),
    "adam": (optax.adam(0.01, b2=0.9, eps=1e-3), cv.adam_rule(0.01, b2=0.9, eps=1e-3)),
    "adamw": (
        optax.adamw(0.01, b2=0.9, eps=1e-3, weight_decay=0.1),
        cv.adamw_rule(0.01, b2=0.9, eps=1e-3, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("name", sorted(PRECONDITIONED))
def test_preconditioner_is_the_one_optax_divided_by(name: str) -> None:
    """After three real updates, the rule's P is the divisor of optax's last update: for RMSProp
    ``u = -lr g / P``; for Adam(W) ``u = -lr (m_hat / P + wd x)`` with m_hat from the state."""
    opt, rule = PRECONDITIONED[name]
    with jax.enable_x64(True):
        params, grads = _params_and_grads()
        state = opt.init(params)
        for g in grads:
            updates, state = opt.update(g, state, params)
        precond = cv.rule_preconditioner(rule, state)
        if name.startswith("rmsprop"):
            expected = jax.tree.map(lambda g, u: -0.01 * g / u, grads[-1], updates)
        else:
            adam = state[0]
            wd = 0.1 if name == "adamw" else 0.0
            m_hat = jax.tree.map(lambda m: m / (1 - 0.9**3), adam.mu)
            expected = jax.tree.map(lambda m, u, x: m / (-u / 0.01 - wd * x), m_hat, updates, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), precond, expected)


def test_bad_optimizer_states_name_what_was_found() -> None:
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="Adam state.*found 0.*ScaleByRmsState"):
        cv.rule_preconditioner(cv.adam_rule(0.1), optax.rmsprop(0.1).init(params))
    with pytest.raises(ValueError, match="RMSProp state.*found 0"):
        cv.rule_preconditioner(cv.rmsprop_rule(0.1), optax.sgd(0.1).init(params))
    two = (optax.adam(0.1).init(params), optax.rmsprop(0.1).init(params))
    with pytest.raises(ValueError, match="found 2"):
        cv.adam_preconditioner(two)
    with pytest.raises(ValueError, match="plain sharpness"):
        cv.rule_preconditioner(cv.gd_rule(0.1), two)
    # The tracker checks the preconditioner against the parameters it measures at.
    tracker = cv.EoSTracker(lambda p: jnp.sum(p["w"] ** 2), cv.rmsprop_rule(0.1), every=1)
    other = optax.rmsprop(0.1).init({"v": jnp.ones(2)})
    with pytest.raises(ValueError, match="preconditioner"):
        tracker.measure(tracker.init(params, jax.random.key(0)), 0, params, opt_state=other)


def test_tracker_rmsprop_sharpness_matches_eigh_and_schedule_thresholds() -> None:
    """RMSProp's preconditioned sharpness from the tracker = eigh of D H D (D = P^{-1/2}), and each record's
    threshold is the one of its step's learning rate."""
    schedule = optax.linear_schedule(0.02, 0.005, 6)
    with jax.enable_x64(True):
        kx, ka, kb = jax.random.split(jax.random.key(2), 3)
        x, y = jax.random.normal(kx, (16, 4), jnp.float64), jnp.linspace(-1.0, 1.0, 16)
        params = {"a": jax.random.normal(ka, (4, 3), jnp.float64), "b": jax.random.normal(kb, (3,), jnp.float64)}
        loss_fn = lambda p, x, y: jnp.mean((jnp.tanh(x @ p["a"]) @ p["b"] - y) ** 2)
        opt = optax.rmsprop(schedule, decay=0.9)
        opt_state = opt.init(params)
        grad = jax.jit(jax.grad(loss_fn))
        apply = jax.jit(lambda g, s, p: opt.update(g, s, p))
        rule = cv.rmsprop_rule(schedule, decay=0.9)
        tracker = cv.EoSTracker(loss_fn, rule, every=3, tol=1e-8, residual_tol=1e-6, max_iters=15)
        state, records = tracker.init(params, jax.random.key(1)), []
        for step in range(7):
            updates, opt_state = apply(grad(params, x, y), opt_state, params)
            params = optax.apply_updates(params, updates)
            record, state = tracker.update(state, step, params, x, y, opt_state=opt_state)
            if record is not None:
                records.append(record)
        d = 1 / np.sqrt(np.asarray(ravel_pytree(cv.rule_preconditioner(rule, opt_state))[0]))
        flat, unravel = ravel_pytree(params)
        h = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), x, y)))(flat))
    assert [r["step"] for r in records] == [0, 3, 6]
    for r in records:
        assert r["threshold"] == pytest.approx(2.0 / float(schedule(r["step"])), rel=1e-6)
    np.testing.assert_allclose(records[-1]["sharpness"], np.linalg.eigvalsh(d[:, None] * h * d[None])[-1], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_weight_decay_edge_lies_between_the_decayed_and_undecayed_thresholds(seed: int) -> None:
    """``optax.adamw(mask=...)`` on a coupled quadratic (the mask does not commute with the Hessian, so the
    dynamics do not separate): below the rule's (decayed) threshold the real optimizer stays bounded, above the
    undecayed one it diverges, as the warning and ``adamw_rule``'s docstring state."""
    rule = cv.adamw_rule(LR, B1, eps=EPS, weight_decay=WD)
    lower, upper = rule.threshold, rule.threshold + rule.decay_coefficient * WD
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(4, 4)))[0]
    shape = q @ np.diag([0.2, 0.5, 0.8, 1.0]) @ q.T  # top eigenvalue 1, every coordinate coupled
    p = 1.0 + EPS  # P with nu held at 1
    mask = {"a": True, "b": False}

    def growth(top: float) -> float:
        opt = optax.chain(
            optax.scale_by_rms(decay=1.0, eps=EPS, initial_scale=1.0, eps_in_sqrt=False),
            optax.ema(B1, debias=True),
            optax.add_decayed_weights(WD, mask=mask),
            optax.scale_by_learning_rate(LR),
        )
        with jax.enable_x64(True):
            x0 = {"a": jnp.ones(2), "b": jnp.ones(2)}
            h = jnp.asarray(top * p * shape)

            def step(carry, _):
                x, state = carry
                flat, unravel = ravel_pytree(x)
                updates, state = opt.update(unravel(h @ flat), state, x)
                x = optax.apply_updates(x, updates)
                return (x, state), jnp.linalg.norm(ravel_pytree(x)[0])

            _, path = jax.lax.scan(step, (x0, opt.init(x0)), length=600)
            path = np.asarray(path)
        if not np.all(np.isfinite(path)):
            return np.inf  # overflowed: diverged
        return float(path[-100:].max() / path[200:300].max())

    assert growth(0.97 * lower) < 1e-2
    assert growth(1.03 * upper) > 1e2


def test_a_masked_decay_warns_and_an_unmasked_one_does_not() -> None:
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    rule = cv.adamw_rule(0.01, weight_decay=0.1)
    for mask, warns in (({"w": True, "b": False}, True), (None, False)):
        opt = optax.adamw(0.01, weight_decay=0.1, mask=mask)
        state = opt.update(grads, opt.init(params), params)[1]
        if warns:
            with pytest.warns(UserWarning, match=r"optax.masked .* between that threshold and the undecayed one"):
                cv.rule_preconditioner(rule, state)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cv.rule_preconditioner(rule, state)
    opt = optax.adam(0.01)  # Adam has no decay: a mask elsewhere in the chain changes nothing it measures
    masked = optax.chain(opt, optax.masked(optax.add_decayed_weights(0.1), {"w": True, "b": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cv.rule_preconditioner(cv.adam_rule(0.01), masked.update(grads, masked.init(params), params)[1])
