"""Orbax checkpoints: Flax <-> bnjax BatchNorm variables, and an EoS-tracked run resumed from a checkpoint.

* A ``flax.linen.BatchNorm`` model's ``params`` and ``batch_stats`` saved with Orbax restore into the same model
  built with ``bnjax.BatchNorm`` (and back) and give the same outputs; the same for NNX state.
* ``EoSTracker``'s state (a ``TrackerState`` NamedTuple: warm-start vector and eigenvalue) goes into the same
  checkpoint as params and optimizer state; a run restored from it gives the records of an uninterrupted run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx

import bnjax
import bnjax.nnx
from bnjax.curvature import eos


def _save(path, tree):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)


def _restore(path, like):
    """Restore into the structure, shapes and dtypes of ``like`` (NamedTuples and optax states included)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))


# -- Flax <-> bnjax variables ---------------------------------------------------------------------------------


class _Net(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = self.norm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(2)(nn.relu(x))


FLAX_NORMS = {"flax": nn.BatchNorm, "bnjax": bnjax.BatchNorm}


def _train_linen(model, x, steps=3):
    """A few SGD steps so that params and batch_stats are far from their initial values."""
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def step(variables):
        def loss(params):
            y, upd = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(y**2), upd

        grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, **upd}

    for _ in range(steps):
        variables = step(variables)
    return variables


@pytest.mark.parametrize("source, target", [("flax", "bnjax"), ("bnjax", "flax")])
def test_linen_batch_stats_round_trip(tmp_path, source, target):
    x = jax.random.normal(jax.random.key(1), (16, 4)) * 3.0 + 1.0
    src, dst = _Net(FLAX_NORMS[source]), _Net(FLAX_NORMS[target])
    trained = _train_linen(src, x)
    _save(tmp_path / "ckpt", trained)
    restored = _restore(tmp_path / "ckpt", dst.init(jax.random.key(2), x, train=False))
    assert jax.tree.structure(restored) == jax.tree.structure(trained)
    jax.tree.map(np.testing.assert_array_equal, restored, trained)
    # Eval mode uses exactly the restored running statistics; train mode and one more update agree too.
    np.testing.assert_allclose(dst.apply(restored, x, train=False), src.apply(trained, x, train=False), atol=1e-5)
    y_dst, upd_dst = dst.apply(restored, x, train=True, mutable=["batch_stats"])
    y_src, upd_src = src.apply(trained, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_dst, y_src, atol=1e-4)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), upd_dst, upd_src)


class _NNXNet(nnx.Module):
    def __init__(self, norm, rngs):
        self.dense = nnx.Linear(4, 6, rngs=rngs)
        self.norm = norm(6, momentum=0.8, rngs=rngs)
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.dense(x))))


NNX_NORMS = {"flax": nnx.BatchNorm, "bnjax": bnjax.nnx.BatchNorm}


@pytest.mark.parametrize("source, target", [("flax", "bnjax"), ("bnjax", "flax")])
def test_nnx_state_round_trip(tmp_path, source, target):
    x = jax.random.normal(jax.random.key(1), (16, 4)) * 3.0 + 1.0
    src = _NNXNet(NNX_NORMS[source], nnx.Rngs(0))
    for _ in range(3):  # train-mode calls move the running statistics away from (0, 1)
        src(x * 1.5)
    _save(tmp_path / "ckpt", nnx.state(src))
    dst = nnx.eval_shape(lambda: _NNXNet(NNX_NORMS[target], nnx.Rngs(1)))
    graphdef, abstract = nnx.split(dst)
    restored = nnx.merge(graphdef, _restore(tmp_path / "ckpt", abstract))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(restored), nnx.state(src))
    src.eval()
    restored.eval()
    np.testing.assert_allclose(restored(x), src(x), atol=1e-5)


# -- an EoS-tracked run resumed from a checkpoint ------------------------------------------------------------


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def _problem():
    kx, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (32, 3))
    y = jnp.sin(x[:, :1] * 2.0)
    params = {
        "w1": jax.random.normal(k1, (3, 8)) / np.sqrt(3),
        "b1": jnp.zeros((1, 8)),
        "w2": jax.random.normal(k2, (8, 1)) / np.sqrt(8),
    }
    return params, x, y


RULES = {
    "heavy_ball": (optax.sgd(0.5, momentum=0.5), eos.heavy_ball_rule(0.5, 0.5)),
    "adam": (optax.adam(0.02), eos.adam_rule(0.02)),
}


def _run(opt, tracker, params, opt_state, tstate, steps, x, y):
    """Steps ``steps`` of full-batch training, measuring after each update; returns the records and the state."""
    train_step = _train_step(opt)
    records = []
    for step in steps:
        params, opt_state = train_step(params, opt_state, x, y)
        record, tstate = tracker.update(tstate, step, params, x, y, opt_state=opt_state)
        if record is not None:
            records.append(record)
    return records, (params, opt_state, tstate)


@functools.cache
def _train_step(opt):
    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = jax.grad(_mlp_loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return train_step


@pytest.mark.parametrize(("rule", "k"), [*((r, 1) for r in sorted(RULES)), ("heavy_ball", 3)])
def test_eos_tracker_resumes_from_an_orbax_checkpoint(tmp_path, rule, k):
    opt, stability = RULES[rule]
    params, x, y = _problem()
    steps, stop = range(6), 2

    def fresh():
        # Host-driven solver without linearization: the cheapest to compile for a test this small. With k=3 the
        # state holds the top-3 Ritz vectors (leaves (3, ...)) and values.
        tracker = eos.EoSTracker(_mlp_loss, stability, every=2, max_iters=6, placement="host", linearize_budget=0, k=k)
        return tracker, opt.init(params), tracker.init(params, jax.random.key(3))

    # The uninterrupted run, checkpointed (params, optimizer state, tracker state) at `stop` on the way.
    tracker, opt_state, tstate = fresh()
    first, (p, o, t) = _run(opt, tracker, params, opt_state, tstate, steps[:stop], x, y)
    _save(tmp_path / "ckpt", {"params": p, "opt_state": o, "tracker": t})
    rest, _ = _run(opt, tracker, p, o, t, steps[stop:], x, y)
    del tracker, p, o, t

    # A resumed run: new objects (as in a new process), state restored from the checkpoint.
    tracker, opt_state, tstate = fresh()
    restored = _restore(tmp_path / "ckpt", {"params": params, "opt_state": opt_state, "tracker": tstate})
    assert isinstance(restored["tracker"], eos.TrackerState) and np.all(np.isfinite(restored["tracker"].eigenvalue))
    resumed, _ = _run(opt, tracker, restored["params"], restored["opt_state"], restored["tracker"], steps[stop:], x, y)

    assert [r["step"] for r in first + rest] == [0, 2, 4]
    assert resumed == rest  # every field: loss, sharpness, HVP count, residual, converged, ...
