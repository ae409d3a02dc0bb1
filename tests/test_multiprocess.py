"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 2 CPU devices each).

Training: the result (params and batch_stats after one SGD step, with uneven valid counts and a padded last
shard) must equal a single-process, single-device run of the same model with ``flax.linen.BatchNorm`` on the
whole batch. Curvature: the top Hessian eigenvalue of the train-mode data-set loss, with the data sharded over
both processes and data-parallel chunks, must equal the one-process, one-device value on the rows permuted
into the same chunks, and the compiled program must move no data between devices. The worker is
``tests/multiprocess_worker.py``; children are killed on any failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from multiprocess_worker import CHUNK_SIZE, Net, make_curvature_data, make_data, sgd_step, top_eigenvalue_fn

WORKER = Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 45


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path, task: str = "train") -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"  # replaces conftest's 8
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    port = _free_port()
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            cmd = [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(out), task]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        logs = [p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace") for p in procs]
        for i, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_process_training_step_matches_single_process(tmp_path):
    out = tmp_path / "result.npz"
    _run_workers(out)
    got = np.load(out)
    assert int(got["device_count"]) == NUM_PROCESSES * DEVICES_PER_PROCESS

    x, t, mask = make_data()
    model = Net(lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw))
    variables = model.init(jax.random.key(0), x[:2])
    want = jax.jit(lambda p, s: sgd_step(model, p, s, x, t, mask, float(mask.sum())))(
        variables["params"], variables["batch_stats"]
    )
    # The step moved the parameters, so comparing them is not vacuous.
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(variables["params"]))]
    assert min(moved) > 1e-4
    for tag in ("jit", "shard_map"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(want):
            np.testing.assert_allclose(
                got[tag + jax.tree_util.keystr(path)], leaf, rtol=1e-5, atol=1e-6, err_msg=f"{tag} {path}"
            )


def test_two_process_top_hessian_eigenvalue_matches_single_process(tmp_path):
    out = tmp_path / "curvature.npz"
    _run_workers(out, "curvature")
    got = np.load(out)
    devices = NUM_PROCESSES * DEVICES_PER_PROCESS
    assert int(got["device_count"]) == devices
    assert int(got["data_moves"]) == 0 and bool(got["converged"])

    x, t = make_curvature_data()
    # Chunk c on `devices` shards = the c-th CHUNK_SIZE/devices rows of every shard.
    rows = np.arange(len(x)).reshape(devices, -1)
    local = CHUNK_SIZE // devices
    perm = np.concatenate([rows[:, s : s + local].ravel() for s in range(0, rows.shape[1], local)])
    variables = Net(nn.BatchNorm).init(jax.random.key(0), x[:2])
    want, converged = top_eigenvalue_fn(None)(variables["params"], variables["batch_stats"], (x[perm], t[perm]))
    assert bool(converged)
    np.testing.assert_allclose(float(got["eigenvalue"]), float(want), rtol=1e-4)
