"""Data-parallel chunked operators on data sharded over 8 forced CPU devices.

Reference for every result: the same operator on one device, unsharded, ``shards=1``, on the rows permuted
into the same chunks (chunk ``c`` = the ``c``-th slice of ``chunk_size / D`` rows of every shard), built here
with NumPy. The compiled programs must contain no collective but all-reduces (no all-gather, all-to-all or
collective-permute of data-shaped arrays, nor of anything else); the unsharded layout (``shards=1`` under
``jit``, the default there before) moves rows between devices (all-gathers or collective-permutes), which
shows the check can fail.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax import curvature as cv
from test_curvature_helpers import cross_entropy

D = 8
N = 48  # 6 rows per device
FEATURES, HIDDEN, CLASSES = 5, 7, 3  # no parameter axis equals N or a chunk size below


class Net(nn.Module):
    """5 -> 7 -> BN -> tanh -> 3, float32."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        h = bnjax.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(HIDDEN)(x))
        return nn.Dense(CLASSES)(jnp.tanh(h))


def _problem():
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (N, FEATURES)) * 2.0 + 1.0
    y = jax.random.randint(ky, (N,), 0, CLASSES)
    model = Net()
    variables = model.init(kp, x[:4])
    _, upd = model.apply(variables, x, mutable=["batch_stats"])
    mesh = jax.make_mesh((D,), ("batch",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    return model, (x, y), sharded, variables["params"], upd["batch_stats"]


MODEL, DATA, SHARDED, PARAMS, STATS = _problem()


def chunk_order(n: int, chunk_size: int, shards: int) -> np.ndarray:
    """Row order whose consecutive chunks of ``chunk_size`` (and a smaller last one) are the data-parallel
    chunks: the ``c``-th slice of ``chunk_size / shards`` rows of every shard, in shard order."""
    rows = np.arange(n).reshape(shards, n // shards)
    local = chunk_size // shards
    starts = range(0, n // shards, local)
    return np.concatenate([rows[:, s : s + local].ravel() for s in starts])


def one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def reference_data(chunk_size: int):
    perm = chunk_order(N, chunk_size, D)
    return one_device(jax.tree.map(lambda a: np.asarray(a)[perm], DATA))


MOVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def data_moves(hlo: str) -> list[str]:
    """Collectives in compiled HLO text that move arrays between devices other than by all-reduce.

    A data-parallel program reduces (BN statistics, parameter-sized sums) and moves nothing else; any
    all-gather, all-to-all, collective-permute or reduce-scatter here would carry examples (the replicated
    parameters never need one).
    """
    pattern = re.compile(r"=\s*\S.*?\s(" + "|".join(MOVES) + r")(?:-start)?\(")
    return [line.strip()[:160] for line in hlo.splitlines() if pattern.search(line)]


def reductions_in_loops(hlo: str) -> list[str]:
    """All-reduces that compiled HLO text runs inside a ``while`` body (once per iteration: per chunk)."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    found, computation = [], None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            computation = header.group(1)
        elif computation in bodies and re.search(r"=\s*\S.*?\sall-reduce(?:-start)?\(", line):
            found.append(line.strip()[:160])
    return found


def test_data_moves_finds_gathers_and_ignores_all_reduces() -> None:
    mesh = jax.make_mesh((D,), ("batch",), axis_types=(AxisType.Auto,))
    x = jax.ShapeDtypeStruct((N, FEATURES), jnp.float32, sharding=NamedSharding(mesh, P("batch")))
    gather = jax.jit(lambda x: jnp.cumsum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    assert data_moves(gather.lower(x).compile().as_text())
    assert data_moves(jax.jit(lambda x: jnp.sum(x, axis=0)).lower(x).compile().as_text()) == []


def test_chunk_order_is_contiguous_with_one_shard_and_interleaves_shards() -> None:
    np.testing.assert_array_equal(chunk_order(6, 4, 1), np.arange(6))
    np.testing.assert_array_equal(chunk_order(8, 4, 2), [0, 1, 4, 5, 2, 3, 6, 7])


@pytest.mark.parametrize(
    "bn_mode, per_example", [("eval", False), ("eval", True), ("train", False)]
)  # per_example only where it holds: train-mode BN couples a chunk's examples
@pytest.mark.parametrize("chunk_size", [16, 32])  # 3 chunks; 1 chunk of 32 and a last one of 16
def test_operators_on_sharded_data_equal_one_device_and_gather_no_data(
    bn_mode: str, per_example: bool, chunk_size: int
) -> None:
    fns = cv.flax_curvature_fns(MODEL.apply, cross_entropy, bn_mode=bn_mode)
    assert fns.per_example == (bn_mode == "eval")
    vector = cv.random_like(jax.random.key(3), PARAMS)

    def operators(params, vector, data, stats, shards):
        kw = dict(chunk_size=chunk_size, chunk_loop="scan", shards=shards, per_example=per_example)
        mv = dict(chunk_loop="scan", shards=shards, per_example=per_example)
        return {
            "loss": cv.dataset_loss(fns.loss_fn, params, data, stats, **kw),
            "value_and_grad": cv.dataset_value_and_grad(fns.loss_fn, params, data, stats, **kw),
            "hvp": cv.dataset_hessian_matvec(fns.loss_fn, chunk_size, **mv)(vector, params, data, stats),
            "ggn": cv.dataset_ggn_matvec(fns.output_fn, fns.output_loss, chunk_size, **mv)(vector, params, data, stats),
        }

    sharded = jax.jit(operators, static_argnums=4)
    compiled = sharded.lower(PARAMS, vector, SHARDED, STATS, D).compile()
    assert data_moves(compiled.as_text()) == []
    # Each chunk's parameter-sized result is reduced across devices inside the chunk loop, unless the loss is
    # declared per-example: then the devices keep partial sums and reduce once, after the loop.
    if chunk_size == 16:
        assert (reductions_in_loops(compiled.as_text()) == []) == per_example
    got = compiled(PARAMS, vector, SHARDED, STATS)
    want = jax.jit(operators, static_argnums=4)(
        *one_device((PARAMS, vector)), reference_data(chunk_size), one_device(STATS), 1
    )
    tol = dict(rtol=1e-5, atol=1e-6) if bn_mode == "eval" else dict(rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol), got, want)
    # The layout matters in train mode: the unpermuted rows form other chunks (other BN statistics).
    if bn_mode == "train":
        plain = jax.jit(operators, static_argnums=4)(*one_device((PARAMS, vector)), one_device(DATA), STATS, 1)
        assert not np.allclose(np.asarray(plain["loss"]), np.asarray(got["loss"]), rtol=1e-4)
        return
    if per_example:
        return
    # Without `shards` under jit the sharding is invisible and rows move between devices (the old code).
    gathered = jax.jit(operators, static_argnums=4).lower(PARAMS, vector, SHARDED, STATS, None).compile()
    assert any("all-gather" in m or "collective-permute" in m for m in data_moves(gathered.as_text()))


def test_per_example_is_a_different_function_for_train_mode_bn() -> None:
    """The declaration matters: with train-mode BN it would normalize each shard's rows on their own."""
    fns = cv.flax_curvature_fns(MODEL.apply, cross_entropy, bn_mode="train")
    loss = jax.jit(
        lambda d, pe: cv.dataset_loss(fns.loss_fn, PARAMS, d, STATS, chunk_size=16, shards=D, per_example=pe),
        static_argnums=1,
    )
    per_shard = cv.dataset_loss(fns.loss_fn, *one_device((PARAMS, DATA)), STATS, chunk_size=16 // D)
    np.testing.assert_allclose(float(loss(SHARDED, True)), float(per_shard), rtol=1e-5)
    assert not np.isclose(float(loss(SHARDED, False)), float(per_shard), rtol=1e-4)
    with pytest.raises(TypeError, match="per_example"):
        cv.dataset_hessian_matvec(fns.loss_fn, 16, per_example="yes")


def test_shards_are_read_from_concrete_arrays_and_explicit_types() -> None:
    assert cv.data_shards(SHARDED) == D
    assert cv.data_shards(DATA) == 1
    assert cv.data_shards((SHARDED[0], np.asarray(DATA[1]))) == D  # unsharded leaves count 1
    mesh = jax.make_mesh((D,), ("batch",), axis_types=(AxisType.Explicit,))
    x = jax.device_put(DATA[0], NamedSharding(mesh, P("batch")))
    with jax.set_mesh(mesh):
        assert jax.jit(lambda x: jnp.asarray(cv.data_shards(x)))(x) == D
    fns = cv.flax_curvature_fns(MODEL.apply, cross_entropy, bn_mode="eval")
    eager = cv.dataset_loss(fns.loss_fn, PARAMS, SHARDED, STATS, chunk_size=16)  # shards read from SHARDED
    ref = cv.dataset_loss(fns.loss_fn, PARAMS, reference_data(16), STATS, chunk_size=16)
    np.testing.assert_allclose(float(eager), float(ref), rtol=1e-5)


def test_shard_validation_messages() -> None:
    mean = lambda c: jnp.mean(c[0])  # noqa: E731
    with pytest.raises(ValueError, match="multiple of shards=8"):
        cv.chunked_mean(mean, SHARDED, chunk_size=12)
    with pytest.raises(ValueError, match="sharded into 8 shards"):
        cv.chunked_mean(mean, SHARDED, chunk_size=16, shards=4)
    with pytest.raises(ValueError, match="equal shards"):
        cv.chunked_mean(mean, (jnp.ones(10),), chunk_size=4, shards=4)
    with pytest.raises(ValueError, match="shards"):
        cv.dataset_hessian_matvec(lambda p, c: 0.0, 4, shards=0)


def test_lanczos_and_tracker_on_sharded_data_equal_one_device() -> None:
    chunk_size = 16
    fns = cv.flax_curvature_fns(MODEL.apply, cross_entropy, bn_mode="train")
    v0 = cv.random_like(jax.random.key(4), PARAMS)
    kw = dict(max_iters=20, tol=1e-6, placement="device")
    mv_sharded = cv.dataset_hessian_matvec(fns.loss_fn, chunk_size, shards=D)
    mv_one = cv.dataset_hessian_matvec(fns.loss_fn, chunk_size)
    solve = jax.jit(lambda mv, v0, p, data, s: cv.lanczos_top(mv, v0, p, data, s, **kw), static_argnums=0)
    lowered = solve.lower(mv_sharded, v0, PARAMS, SHARDED, STATS).compile()
    assert data_moves(lowered.as_text()) == []
    got = lowered(v0, PARAMS, SHARDED, STATS)
    want = solve(mv_one, *one_device((v0, PARAMS)), reference_data(chunk_size), one_device(STATS))
    np.testing.assert_allclose(float(got.eigenvalue), float(want.eigenvalue), rtol=1e-4)

    def tracker(shards):
        return cv.EoSTracker(fns.loss_fn, cv.gd_rule(0.1), chunk_size=chunk_size, shards=shards, max_iters=20)

    state = tracker(D).init(PARAMS, jax.random.key(5))
    record, _ = tracker(D).measure(state, 0, PARAMS, SHARDED, STATS)
    ref, _ = tracker(None).measure(one_device(state), 0, one_device(PARAMS), reference_data(chunk_size), STATS)
    np.testing.assert_allclose(record["sharpness"], ref["sharpness"], rtol=1e-4)
    np.testing.assert_allclose(record["loss"], ref["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match=r"EoSTracker\(\.\.\., shards=8\)"):
        tracker(None).measure(state, 0, PARAMS, SHARDED, STATS)
    # Eval mode, declared per-example (one reduction per product): the same sharpness as one device.
    ev = cv.flax_curvature_fns(MODEL.apply, cross_entropy, bn_mode="eval")
    kw = dict(chunk_size=chunk_size, max_iters=20, tol=1e-6)
    record, _ = cv.EoSTracker(ev.loss_fn, cv.gd_rule(0.1), shards=D, per_example=ev.per_example, **kw).measure(
        state, 0, PARAMS, SHARDED, STATS
    )
    ref, _ = cv.EoSTracker(ev.loss_fn, cv.gd_rule(0.1), **kw).measure(
        one_device(state), 0, one_device(PARAMS), one_device(DATA), STATS
    )
    np.testing.assert_allclose(record["sharpness"], ref["sharpness"], rtol=1e-4)
