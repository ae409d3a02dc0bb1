"""Property-based tests (hypothesis) of the functional core against a float64 NumPy reference.

Drawn: shapes (2-4 axes), feature axes (one or two), input dtypes (float32, bfloat16, float16), input offset
and spread, masks (none, random, all-False), ghost batch sizes (divisors of the batch), device splits (vmap
with an axis name). Checked: outputs and next running statistics against float64 NumPy on the same (rounded)
inputs, within bounds that scale with the dtype; and the invariants (row permutation, shift and positive
scale of the input, splitting a batch across devices). Example counts are kept small for CI (10 per test);
set ``BNJAX_HYPOTHESIS_EXAMPLES`` for a longer search.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnjax

SETTINGS = settings(
    max_examples=int(os.environ.get("BNJAX_HYPOTHESIS_EXAMPLES", 10)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Bound on |y - y_ref| / (1 + |y_ref|): the output is rounded to the input dtype (statistics are float32).
Y_TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
MOMENTUM, EPS = 0.5, 1e-3


@st.composite
def cases(draw, ghost=True, masks=True):
    ndim = draw(st.integers(2, 4))
    batch = draw(st.sampled_from([2, 4, 6]))
    shape = (batch,) + tuple(draw(st.integers(1, 3)) for _ in range(ndim - 1))
    # Features never on axis 0, so the batch axis is the first reduction axis (ghost batches, device splits).
    candidates = list(range(1, ndim))
    n_feat = draw(st.integers(1, min(2, len(candidates))))
    feature_axes = tuple(sorted(draw(st.permutations(candidates))[:n_feat]))
    mask_kind = draw(st.sampled_from(["none", "random", "all-false"] if masks else ["none"]))
    groups = [g for g in (None, 2, batch // 2) if g is None or (batch % g == 0 and g >= 2)] if ghost else [None]
    return dict(
        shape=shape,
        axis=feature_axes if len(feature_axes) > 1 else feature_axes[0],
        feature_axes=feature_axes,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        loc=draw(st.sampled_from([0.0, 3.0, -100.0, 1000.0])),
        spread=draw(st.sampled_from([1e-2, 1.0, 50.0])),
        mask_kind=mask_kind,
        group=draw(st.sampled_from(groups)),
        seed=draw(st.integers(0, 2**16)),
    )


def _draw_arrays(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["shape"]) * case["spread"] + case["loc"]
    x = np.asarray(x.astype(np.float32).astype(DTYPES[case["dtype"]]))
    fshape = tuple(case["shape"][a] for a in case["feature_axes"])
    state = bnjax.BatchNormState(
        jnp.asarray(rng.standard_normal(fshape), jnp.float32), jnp.asarray(rng.uniform(0.5, 2, fshape), jnp.float32)
    )
    mask = None
    if case["mask_kind"] == "random":
        mask = rng.uniform(size=case["shape"]) < 0.6
    elif case["mask_kind"] == "all-false":
        mask = np.zeros(case["shape"], bool)
    return x, state, mask


def _reference(x, feature_axes, mask, group, state, shift_stride=None):
    """float64 train-mode batch norm (no scale/bias) and the Flax-convention running update.

    Returns ``(y, new_mean, new_var, y_slack, var_slack)``. The slacks are the stated precision bound for a
    feature whose shift falls back to 0 because a sample that provides one (the first of each ghost batch,
    or of each device: every ``shift_stride``-th sample) has no valid element: its variance then has the
    precision of ``E[x^2] - E[x]^2`` around 0, an error up to ~16 float32 ulps of ``max|x|^2``, and ``y`` a
    few ulps of ``|x| / sigma``.
    """
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else mask.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i not in feature_axes)
    g = x.shape[0] if group is None else group
    xg = x.reshape((x.shape[0] // g, g) + x.shape[1:])
    wg = w.reshape(xg.shape)
    axes = tuple(a + 1 for a in red)  # the group axis 0 is kept
    bshape = [1] * xg.ndim
    for a in feature_axes:
        bshape[a + 1] = x.shape[a]
    run_mean = np.asarray(state.mean, np.float64).reshape(bshape)
    run_var = np.asarray(state.var, np.float64).reshape(bshape)
    n = wg.sum(axes, keepdims=True)
    mean = (wg * xg).sum(axes, keepdims=True) / np.maximum(n, 1)
    var = (wg * (xg - mean) ** 2).sum(axes, keepdims=True) / np.maximum(n, 1)
    have = n > 0
    mean_used, var_used = np.where(have, mean, run_mean), np.where(have, var, run_var)
    y = ((xg - mean_used) / np.sqrt(var_used + EPS)).reshape(x.shape)
    total = n.sum(0)
    weights = n / np.maximum(total, 1)
    batch_mean, batch_var = (weights * mean).sum(0), (weights * var).sum(0)
    new_mean = np.where(total > 0, MOMENTUM * run_mean[0] + (1 - MOMENTUM) * batch_mean, run_mean[0])
    new_var = np.where(total > 0, MOMENTUM * run_var[0] + (1 - MOMENTUM) * batch_var, run_var[0])
    # Precision bound of a zero shift (see the docstring).
    stride = shift_stride or g
    starts = w[::stride]
    no_shift = np.any(starts.sum(tuple(a for a in red[1:]), keepdims=True) == 0, axis=0, keepdims=True)
    biggest = np.max(w * np.abs(x), axis=red, keepdims=True)
    dv = np.where(no_shift, 1e-6 * biggest**2, 0.0)  # x's rank, features kept
    var_x = np.broadcast_to(var_used, xg.shape).reshape(x.shape) + EPS
    # The variance error moves y by |y| dv / (2 var); the product (x - 0) * m - mean * m of two large terms
    # adds a few ulps of |x| / sigma.
    y_slack = np.abs(y) * dv / var_x + np.where(no_shift, 8 * 2.0**-24 * np.abs(x) / np.sqrt(var_x), 0.0)
    fshape = np.shape(state.mean)
    return y, new_mean.reshape(fshape), new_var.reshape(fshape), y_slack, (1 - MOMENTUM) * dv.reshape(fshape)


def _bn(x, state, case, mask, epsilon=EPS):
    fn = jax.jit(
        lambda x, s, m: bnjax.batch_norm(
            x,
            state=s,
            train=True,
            axis=case["axis"],
            momentum=MOMENTUM,
            epsilon=epsilon,
            mask=m,
            virtual_batch_size=case["group"],
        )
    )
    return fn(x, state, mask)


def _assert_stats_close(got, want_mean, want_var, x, var_slack=0.0):
    scale = float(np.max(np.abs(np.asarray(x, np.float64)))) + 1.0
    np.testing.assert_allclose(got.mean, want_mean, rtol=2e-5, atol=2e-6 * scale)
    assert np.all(np.abs(np.asarray(got.var, np.float64) - want_var) <= 2e-4 * np.abs(want_var) + 1e-6 + var_slack)


def _assert_y_close(y, y_ref, dtype, slack=0.0, factor=1.0):
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    bound = factor * Y_TOL[dtype] * (1 + np.abs(y_ref)) + slack
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


@SETTINGS
@given(cases())
def test_matches_float64_reference(case):
    x, state, mask = _draw_arrays(case)
    y, new = _bn(x, state, case, mask)
    y_ref, mean_ref, var_ref, y_slack, var_slack = _reference(x, case["feature_axes"], mask, case["group"], state)
    assert y.dtype == DTYPES[case["dtype"]] and y.shape == x.shape
    _assert_y_close(y, y_ref, case["dtype"], y_slack)
    _assert_stats_close(new, mean_ref, var_ref, x, var_slack)


@SETTINGS
@given(cases(ghost=False), st.randoms(use_true_random=False))
def test_row_permutation_permutes_outputs_and_keeps_statistics(case, random):
    x, state, mask = _draw_arrays(case)
    perm = np.array(random.sample(range(x.shape[0]), x.shape[0]))
    y, new = _bn(x, state, case, mask)
    y_p, new_p = _bn(x[perm], state, case, None if mask is None else mask[perm])
    # Both runs are within the reference's bound; the permuted one may have its shift from another row.
    _, _, _, y_slack, var_slack = _reference(x, case["feature_axes"], mask, None, state, shift_stride=1)
    _assert_y_close(y_p, np.asarray(y, np.float64)[perm], case["dtype"], 2 * y_slack[perm], factor=2)
    _assert_stats_close(new_p, new.mean, new.var, x, 2 * var_slack)


@SETTINGS
@given(
    cases(ghost=False, masks=False),  # with a feature left without valid elements, y would not be invariant
    st.sampled_from([0.25, 0.5, 3.0, 1000.0]),
    st.sampled_from([0.0, -7.5, 1e3]),
)
def test_shift_and_positive_scale_leave_outputs_unchanged(case, a, b):
    case = {**case, "dtype": "float32", "spread": max(case["spread"], 1.0)}  # exact-enough transform
    x, state, mask = _draw_arrays(case)
    x2 = (np.asarray(x, np.float64) * a + b).astype(np.float32)
    # Rounding a * x + b to float32 moves each value by up to half an ulp of |x2|: relative to the spread,
    # that is the precision the invariance can hold to.
    x2_64 = np.asarray(x2, np.float64)
    red = tuple(i for i in range(x.ndim) if i not in case["feature_axes"])
    rounding = 2.0**-23 * np.max(np.abs(x2_64), axis=red) / np.maximum(np.std(x2_64, axis=red), 1e-30)
    zero = bnjax.BatchNormState(jnp.zeros_like(state.mean), jnp.zeros_like(state.var))
    # A tiny epsilon: with Flax's 1e-5, y itself changes once a^2 var approaches epsilon.
    y, new = _bn(x, zero, case, mask, epsilon=1e-12)
    y2, new2 = _bn(x2, zero, case, mask, epsilon=1e-12)
    bshape = [x.shape[i] if i in case["feature_axes"] else 1 for i in range(x.ndim)]
    y_err = np.abs(np.asarray(y2, np.float64) - np.asarray(y, np.float64))
    assert np.all(y_err <= 1e-4 + 4 * rounding.reshape(bshape) * (1 + np.abs(np.asarray(y)))), np.max(y_err)
    # From a zero state: new = (1 - momentum) * batch statistics, so mean -> a * mean + (1 - momentum) * b.
    np.testing.assert_allclose(
        new2.mean,
        a * np.asarray(new.mean, np.float64) + (1 - MOMENTUM) * b,
        rtol=1e-5,
        atol=1e-5 * (abs(b) + a * (abs(case["loc"]) + case["spread"])),
    )
    want_var = a * a * np.asarray(new.var, np.float64)
    assert np.all(np.abs(np.asarray(new2.var, np.float64) - want_var) <= (1e-4 + 8 * rounding) * want_var)


@SETTINGS
@given(cases(), st.sampled_from([2, 3]))
def test_splitting_the_batch_across_devices_changes_nothing(case, devices):
    shape = (case["shape"][0] * devices,) + case["shape"][1:]  # each device holds `batch` rows
    case = {**case, "shape": shape}
    x, state, mask = _draw_arrays(case)
    y, new = _bn(x, state, case, mask)

    def split(a):
        return a.reshape((devices, a.shape[0] // devices) + a.shape[1:])

    if case["group"] is not None:
        # Ghost batches are per device: the global reference groups device by device, which is the same
        # split of the rows as long as the group size divides the per-device batch.
        assert (shape[0] // devices) % case["group"] == 0
    per_device = jax.vmap(
        lambda x, m: bnjax.batch_norm(
            x,
            state=state,
            train=True,
            axis=case["axis"],
            momentum=MOMENTUM,
            epsilon=EPS,
            mask=m,
            virtual_batch_size=case["group"],
            axis_name="d",
        ),
        in_axes=(0, None if mask is None else 0),
        axis_name="d",
    )
    y_d, new_d = jax.jit(per_device)(split(x), None if mask is None else split(mask))
    if case["group"] is None:
        # Each device shifts by its own first sample: the bound of both runs (see _reference) applies.
        _, _, _, y_slack, var_slack = _reference(x, case["feature_axes"], mask, None, state, shape[0] // devices)
        _assert_y_close(np.asarray(y_d).reshape(shape), np.asarray(y, np.float64), case["dtype"], 2 * y_slack, 2)
        for d in range(devices):
            _assert_stats_close(jax.tree.map(lambda a: a[d], new_d), new.mean, new.var, x, 2 * var_slack)
    else:
        # Virtual batch k = sub-batch k of every device: compare with the float64 reference of that grouping.
        xs = split(x)
        k = xs.shape[1] // case["group"]
        regroup = (
            lambda a: np.moveaxis(  # noqa: E731
                a.reshape((devices, k, case["group"]) + a.shape[2:]), 0, 1
            ).reshape((k * devices * case["group"],) + a.shape[2:])
        )
        ms = None if mask is None else regroup(split(mask))
        y_ref, mean_ref, var_ref, y_slack, var_slack = _reference(
            regroup(xs), case["feature_axes"], ms, devices * case["group"], state, shift_stride=case["group"]
        )
        _assert_y_close(regroup(np.asarray(y_d, np.float64)), y_ref, case["dtype"], y_slack)
        _assert_stats_close(jax.tree.map(lambda a: a[0], new_d), mean_ref, var_ref, x, var_slack)
