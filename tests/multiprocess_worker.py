"""One process of the 2-process data-parallel test (``tests/test_multiprocess.py``); also the shared model.

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz [TASK]`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=K`` in the environment: it joins the
``jax.distributed`` job on 127.0.0.1:PORT (gloo CPU collectives) and takes its rows of the global batch.
TASK ``train`` (default) runs one SGD step of :class:`Net` (with ``bnjax.BatchNorm``) in two ways (sharded
``jit`` without ``axis_name``, and ``shard_map`` with ``axis_name``), and process 0 writes the resulting
params and batch_stats to OUT.npz. TASK ``curvature`` computes the top Hessian eigenvalue of :class:`Net`'s
train-mode data-set loss (chunks of :data:`CHUNK_SIZE`, data-parallel over all devices) with Lanczos under
one ``jax.jit``, and process 0 writes it and the collectives that move data (none expected) to OUT.npz.
Importing this module has no side effect (the test imports the model and data from it).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

GLOBAL_BATCH = 16
LEARNING_RATE = 0.1
CHUNK_SIZE = 8


class Net(nn.Module):
    """Conv -> batch norm -> relu -> mean pool -> Dense, on (N, 6, 2) inputs; ``norm`` builds the BN layer."""

    norm: Any

    @nn.compact
    def __call__(self, x, mask=None, train=True):
        h = nn.Conv(4, kernel_size=(3,), use_bias=False)(x)  # a bias before BN gets no gradient
        h = self.norm(use_running_average=not train, momentum=0.9)(h, mask=mask)
        return nn.Dense(1)(jnp.mean(nn.relu(h), axis=1))


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global batch: x (16, 6, 2), targets (16, 1) and a per-sample mask (16, 1, 1) with uneven counts.

    Rows 12..15 (the last device's shard with 4 devices) are padding: invalid, and filled with garbage.
    """
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(GLOBAL_BATCH, 6, 2)) + 3.0).astype(np.float32)
    t = rng.normal(size=(GLOBAL_BATCH, 1)).astype(np.float32)
    mask = np.ones((GLOBAL_BATCH, 1, 1), bool)
    mask[12:] = False
    mask[5:7] = False
    x[12:] = 1e3
    return x, t, mask


def make_curvature_data() -> tuple[np.ndarray, np.ndarray]:
    """Global data set for the curvature task: x (16, 6, 2), targets (16, 1); no padding."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(GLOBAL_BATCH, 6, 2)) + 1.0
    return x.astype(np.float32), rng.normal(size=(GLOBAL_BATCH, 1)).astype(np.float32)


def top_eigenvalue_fn(shards: int | None):
    """Jitted ``(params, batch_stats, data) -> (top eigenvalue, converged)`` of the train-mode Hessian."""
    import bnjax
    from bnjax import curvature as cv

    model = Net(bnjax.BatchNorm)
    fns = cv.flax_curvature_fns(model.apply, lambda out, t: jnp.mean((out - t) ** 2), bn_mode="train")
    hessian = cv.dataset_hessian_matvec(fns.loss_fn, CHUNK_SIZE, shards=shards)

    def top(params, batch_stats, data):
        v0 = cv.random_like(jax.random.key(7), params)
        result = cv.lanczos_top(hessian, v0, params, data, batch_stats, tol=1e-6, max_iters=30, placement="device")
        return result.eigenvalue, result.converged

    return jax.jit(top)


def loss_and_stats(model, params, batch_stats, x, t, mask):
    """Sum of squared errors over the valid samples, and the updated batch_stats."""
    out, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, mask=mask, mutable=["batch_stats"])
    return jnp.sum(jnp.where(mask[:, :, 0], (out - t) ** 2, 0.0)), upd["batch_stats"]


def sgd_step(model, params, batch_stats, x, t, mask, n_valid):
    """One optax SGD step on the mean loss over the ``n_valid`` valid samples of the global batch."""
    tx = optax.sgd(LEARNING_RATE)

    def loss(p):
        total, stats = loss_and_stats(model, p, batch_stats, x, t, mask)
        return total / n_valid, stats

    grads, new_stats = jax.grad(loss, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), new_stats


def _curvature(process_id: int, num_processes: int, out_path: str) -> None:
    import re

    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, t = make_curvature_data()
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("batch"))
    rows = slice(process_id * GLOBAL_BATCH // num_processes, (process_id + 1) * GLOBAL_BATCH // num_processes)
    data = tuple(jax.make_array_from_process_local_data(sharding, a[rows]) for a in (x, t))
    variables = Net(nn.BatchNorm).init(jax.random.key(0), x[:2])
    top = top_eigenvalue_fn(jax.device_count())
    compiled = top.lower(variables["params"], variables["batch_stats"], data).compile()
    moves = re.findall(r"\s(all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", compiled.as_text())
    eigenvalue, converged = compiled(variables["params"], variables["batch_stats"], data)
    if process_id == 0:
        np.savez(
            out_path,
            eigenvalue=np.asarray(eigenvalue.addressable_data(0)),
            converged=np.asarray(converged.addressable_data(0)),
            data_moves=np.array(len(moves)),
            device_count=np.array(jax.device_count()),
        )


def _main(process_id: int, num_processes: int, port: int, out_path: str, task: str = "train") -> None:
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import bnjax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
    )
    if task == "curvature":
        _curvature(process_id, num_processes, out_path)
        jax.distributed.shutdown()
        return
    x, t, mask = make_data()
    n_valid = float(mask.sum())
    # Auto axes: with Explicit ones (jax.make_mesh's default) JAX 0.10 cannot shard a Conv kernel's gradient.
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("batch"))
    rows = slice(process_id * GLOBAL_BATCH // num_processes, (process_id + 1) * GLOBAL_BATCH // num_processes)
    # Each process holds only its rows; the global arrays are assembled without any process seeing the rest.
    x_g, t_g, m_g = (jax.make_array_from_process_local_data(sharding, a[rows]) for a in (x, t, mask))

    variables = Net(nn.BatchNorm).init(jax.random.key(0), x[:2])  # same on every process

    # 1. Sharded jit, no axis_name: XLA inserts the cross-process reductions.
    jit_model = Net(bnjax.BatchNorm)
    with jax.set_mesh(mesh):
        step = jax.jit(lambda p, s, *b: sgd_step(jit_model, p, s, *b, n_valid))
        params_jit, stats_jit = step(variables["params"], variables["batch_stats"], x_g, t_g, m_g)

    # 2. shard_map with axis_name: bnjax's all_gather merges the moments across processes.
    sm_model = Net(functools.partial(bnjax.BatchNorm, axis_name="batch"))

    def local_step(params, batch_stats, x, t, mask):
        def local_loss(p):
            total, stats = loss_and_stats(sm_model, p, batch_stats, x, t, mask)
            return total / n_valid, stats

        grads, stats = jax.grad(local_loss, has_aux=True)(params)
        # check_vma=True: grads w.r.t. the replicated params are already summed over devices. The
        # running statistics are equal everywhere but typed device-varying (from an all_gather); pmean
        # makes them replicated for out_specs=P().
        tx = optax.sgd(LEARNING_RATE)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), jax.lax.pmean(stats, "batch")

    sm_step = jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch"), P("batch")), out_specs=P())
    )
    params_sm, stats_sm = sm_step(variables["params"], variables["batch_stats"], x_g, t_g, m_g)

    if process_id == 0:
        flat = {}
        for tag, tree in [("jit", (params_jit, stats_jit)), ("shard_map", (params_sm, stats_sm))]:
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                flat[tag + jax.tree_util.keystr(path)] = np.asarray(leaf.addressable_data(0))
        flat["device_count"] = np.array(jax.device_count())
        np.savez(out_path, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
