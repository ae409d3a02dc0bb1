"""Data-parallel training of a small CNN with ``bnjax.BatchNorm`` three ways: pmap, shard_map, sharded jit.

    PYTHONPATH=. python experiments/data_parallel.py                               # 20 steps, ~25 s CPU time
    PYTHONPATH=. python experiments/data_parallel.py --steps 2 --global-batch 16   # the test's run, ~20 s

Runs on 8 forced CPU devices (sets ``XLA_FLAGS`` itself when no device count is given). Every way trains
the same model from the same initialization on the same global batches of scikit-learn's digits (optax SGD
with momentum, mean cross-entropy over the global batch); the batch is split over the devices. Expected:
the three end with the same params and batch_stats up to float32 reduction order (max relative difference
~1e-6); the script exits with status 1 if any differs by more than ``--rtol``/``--atol``.

- ``pmap``: ``jax.grad`` inside; each device's gradient is its contribution to the global loss (the
  transpose of BN's ``all_gather`` sends the cross-device terms back), so the update uses ``psum``.
- ``shard_map`` (``check_vma=True``): the same local loss; the gradient w.r.t. replicated params is already
  summed over devices, so there is no ``psum``. Updated batch_stats are equal on every device but typed
  device-varying (they come from an ``all_gather``); ``pmean`` makes them replicated for ``out_specs=P()``.
- sharded ``jit``: no ``axis_name`` at all; the batch carries a ``NamedSharding`` and XLA inserts the
  reductions. The recommended path.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
from experiments.data import digits  # noqa: E402

AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Config:
    """Data-parallel equivalence check (defaults: the full run, ~25 s of CPU time, mostly compilation)."""

    steps: int = 20
    global_batch: int = 64  # split over the devices
    devices: int = 8
    learning_rate: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5


class CNN(nn.Module):
    """Conv(8) -> BN -> relu -> Conv(16, stride 2) -> BN -> relu -> mean pool -> Dense(10), on (N, 8, 8, 1)."""

    axis_name: Any = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(bnjax.BatchNorm, use_running_average=not train, axis_name=self.axis_name)
        x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = nn.relu(norm()(nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _loss(model, params, batch_stats, x, y, global_batch):
    """Sum of cross-entropies of this shard divided by the *global* batch size, and the new batch_stats."""
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / global_batch, upd["batch_stats"]


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train_pmap(config, tx, variables, batches):
    model = CNN(axis_name=AXIS)
    devices = jax.devices()[: config.devices]

    def step(params, batch_stats, opt_state, x, y):
        grads, batch_stats = jax.grad(_loss, argnums=1, has_aux=True)(
            model, params, batch_stats, x, y, config.global_batch
        )
        params, opt_state = _apply(tx, lax.psum(grads, AXIS), opt_state, params)
        return params, batch_stats, opt_state

    step = jax.pmap(step, axis_name=AXIS, devices=devices)
    replicate = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (len(devices),) + a.shape), tree)  # noqa: E731
    params, stats = replicate(variables["params"]), replicate(variables["batch_stats"])
    opt_state = replicate(tx.init(variables["params"]))
    for x, y in batches:
        split = lambda a: a.reshape((len(devices), -1) + a.shape[1:])  # noqa: E731
        params, stats, opt_state = step(params, stats, opt_state, split(x), split(y))
    return jax.tree.map(lambda a: np.asarray(a[0]), (params, stats))


def _mesh(config):
    # Auto axes: with Explicit ones (jax.make_mesh's default), JAX 0.10 cannot shard a Conv kernel's gradient.
    return jax.make_mesh((config.devices,), (AXIS,), axis_types=(AxisType.Auto,))


def train_shard_map(config, tx, variables, batches):
    model = CNN(axis_name=AXIS)
    mesh = _mesh(config)

    def step(params, batch_stats, opt_state, x, y):
        grads, batch_stats = jax.grad(_loss, argnums=1, has_aux=True)(
            model, params, batch_stats, x, y, config.global_batch
        )
        params, opt_state = _apply(tx, grads, opt_state, params)  # grads already summed (check_vma=True)
        return params, lax.pmean(batch_stats, AXIS), opt_state

    rep, shard = P(), P(AXIS)
    step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(rep, rep, rep, shard, shard), out_specs=(rep, rep, rep)))
    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    sharding = NamedSharding(mesh, shard)
    for x, y in batches:
        params, stats, opt_state = step(params, stats, opt_state, *jax.device_put((x, y), sharding))
    return jax.tree.map(np.asarray, (params, stats))


def train_jit(config, tx, variables, batches):
    model = CNN(axis_name=None)
    mesh = _mesh(config)

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        grads, batch_stats = jax.grad(_loss, argnums=1, has_aux=True)(
            model, params, batch_stats, x, y, config.global_batch
        )
        params, opt_state = _apply(tx, grads, opt_state, params)
        return params, batch_stats, opt_state

    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    sharding = NamedSharding(mesh, P(AXIS))
    for x, y in batches:
        params, stats, opt_state = step(params, stats, opt_state, *jax.device_put((x, y), sharding))
    return jax.tree.map(np.asarray, (params, stats))


WAYS = {"pmap": train_pmap, "shard_map": train_shard_map, "jit": train_jit}


def check(config: Config) -> None:
    if jax.device_count() < config.devices:
        raise ValueError(
            f"devices={config.devices} but JAX sees {jax.device_count()}; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={config.devices} before starting Python."
        )
    if config.global_batch % config.devices:
        raise ValueError(f"global_batch={config.global_batch} must be a multiple of devices={config.devices}.")


def run(config: Config) -> dict:
    """Train every way; return per-way wall time and the max differences to the ``jit`` result."""
    check(config)
    data = digits(seed=config.seed)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(data.x_train))
    n = config.global_batch
    batches = [
        (data.x_train[order[i * n : (i + 1) * n]], data.y_train[order[i * n : (i + 1) * n]])
        for i in (k % (len(order) // n) for k in range(config.steps))
    ]
    variables = CNN().init(jax.random.key(config.seed), data.x_train[:2])
    tx = optax.sgd(config.learning_rate, momentum=config.momentum)
    results, seconds = {}, {}
    for name, train in WAYS.items():
        start = time.perf_counter()
        results[name] = train(config, tx, variables, batches)
        seconds[name] = time.perf_counter() - start
    ref = results["jit"]
    moved = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(variables["params"]))
    )
    summary = {"steps": config.steps, "max_param_change": moved, "ways": {}}
    for name, (params, stats) in results.items():
        diff = lambda u, v: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)))  # noqa: E731
        close = all(
            np.allclose(a, b, rtol=config.rtol, atol=config.atol)
            for a, b in zip(jax.tree.leaves((params, stats)), jax.tree.leaves(ref))
        )
        summary["ways"][name] = {
            "seconds": seconds[name],
            "max_abs_diff_params": diff(params, ref[0]),
            "max_abs_diff_batch_stats": diff(stats, ref[1]),
            "close": close,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    config = Config(**vars(parser.parse_args(argv)))
    summary = run(config)
    print(
        f"{config.steps} steps, global batch {config.global_batch} on {config.devices} devices; "
        f"largest parameter change {summary['max_param_change']:.3g}"
    )
    print("| way | seconds | max |diff| params vs jit | max |diff| batch_stats vs jit | same |")
    print("|---|---|---|---|---|")
    for name, r in summary["ways"].items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['max_abs_diff_params']:.2e} | "
            f"{r['max_abs_diff_batch_stats']:.2e} | {r['close']} |"
        )
    if not all(r["close"] for r in summary["ways"].values()):
        print("FAIL: the three ways disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
