"""Benchmark of the curvature toolkit (issue 4) on MNIST-1D (1000 training examples).

Command: ``PYTHONPATH=. python experiments/bench_curvature.py [--quick]`` (full: ~10 min, quick: ~3 min on 2 idle
CPU cores). Writes ``experiments/results/bench_curvature.json`` and prints a markdown table.

Models: a tanh MLP 40-200-200-10 with square loss (the flagship's model) and a 1-D CNN with ``bnjax.BatchNorm``
(twice: conv 16 width 5 stride 2 - BN - relu; then mean pool - dense 10) with cross-entropy, curvature in
``bn_mode="train"`` over chunks of 500 (two ghost batches). All ratios are medians of repeats in this run.

Measured, per model:

* HVP time / gradient time (both over the whole data set, same chunking, jitted);
* HVPs to reach the top eigenvalue to 1e-3 relative (reference: Lanczos to residual 1e-5): power iteration
  from a random start (smallest ``max_iters`` that reaches it, by bisection) and Lanczos (leading blocks of one
  60-step decomposition);
* along a full-batch GD run, every 10 steps: HVPs the tracker's warm-started solve uses (its stopping rule),
  the fraction of its estimates within 1e-3 of the reference, and the fewest warm-started Lanczos steps that
  reach 1e-3 (oracle count);
* wall-time overhead of :class:`bnjax.curvature.EoSTracker` (every 10 steps) on the GD loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from mnist1d.data import get_dataset_args, make_dataset

import bnjax
from bnjax import curvature as cv

TARGETS = {"hvp_over_grad": 2.5, "warm_hvps_per_checkpoint": 5.0, "tracking_overhead": 0.30}


@dataclasses.dataclass(frozen=True)
class Config:
    """Full run by default; ``--quick`` shortens the GD runs and the repeats."""

    n_train: int = 1000
    repeats: int = 15  # timing repeats (median)
    gd_steps: int = 1500  # GD steps for the warm-start study
    overhead_steps: int = 500  # GD steps per overhead timing
    overhead_repeats: int = 3
    every: int = 10
    rel_tol: float = 1e-3
    seed: int = 0


PRESETS = {"quick": Config(repeats=7, gd_steps=600, overhead_steps=300, overhead_repeats=3)}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = jnp.tanh(nn.Dense(200)(x))
        x = jnp.tanh(nn.Dense(200)(x))
        return nn.Dense(10)(x)


class BNCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x[..., None]  # (B, 40) -> (B, 40, 1): NWC
        for _ in range(2):
            x = nn.Conv(16, (5,), strides=2, use_bias=False)(x)
            x = nn.relu(bnjax.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(jnp.mean(x, axis=1))


def square_loss(out: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(y, 10)) ** 2, axis=-1))


def cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    model: nn.Module
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    bn: bool
    chunk_size: int
    lr: float


BENCHES = [
    Bench("MLP tanh 200-200, square loss", MLP(), square_loss, False, 1000, 0.1),
    Bench("CNN + BN (train mode), cross-entropy", BNCNN(), cross_entropy, True, 500, 0.5),
]


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_bench(b: Bench, x: jax.Array, y: jax.Array, cfg: Config) -> dict[str, Any]:
    variables = b.model.init(jax.random.key(cfg.seed), x[:8])
    params, stats = variables["params"], variables.get("batch_stats")
    fns = cv.flax_curvature_fns(b.model.apply, b.loss, bn_mode="train" if b.bn else None)
    data = (x, y)
    hess = cv.dataset_hessian_matvec(fns.loss_fn, b.chunk_size)
    n_params = sum(p.size for p in jax.tree.leaves(params))

    value_and_grad = jax.jit(lambda p: cv.dataset_value_and_grad(fns.loss_fn, p, data, stats, chunk_size=b.chunk_size))
    hvp = jax.jit(lambda p, v: hess(v, p, data, stats))
    v = cv.random_like(jax.random.key(1), params)
    t_grad = median_time(lambda: value_and_grad(params), cfg.repeats)
    t_hvp = median_time(lambda: hvp(params, v), cfg.repeats)

    # Reference and cold-start counts at the initial point.
    ref = cv.lanczos_top(hess, v, params, data, stats, tol=1e-7, residual_tol=1e-5, max_iters=100)
    lam = float(ref.eigenvalue)

    def power_ok(iters: int) -> bool:
        r = cv.power_iteration(hess, v, params, data, stats, tol=0.0, residual_tol=0.0, max_iters=iters)
        return abs(float(r.eigenvalue) - lam) <= cfg.rel_tol * abs(lam)

    lo, hi = 1, 1000
    if not power_ok(hi):
        power_cold = None  # did not converge within 1000 HVPs
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if power_ok(mid) else (mid + 1, hi)
        power_cold = lo
    dec = cv.lanczos_decomposition(hess, v, params, data, stats, num_iters=60)
    lanczos_cold = _first_ok(dec, lam, cfg.rel_tol)

    # Warm start along a full-batch GD run.
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - b.lr * g, p, value_and_grad(p)[1]))
    tracker = cv.EoSTracker(fns.loss_fn, cv.gd_rule(b.lr), every=cfg.every, chunk_size=b.chunk_size)
    state = tracker.init(params, jax.random.key(2))
    decompose = jax.jit(lambda vec, p: cv.lanczos_decomposition(hess, vec, p, data, stats, num_iters=20))
    reference = jax.jit(lambda p: cv.lanczos_top(hess, v, p, data, stats, tol=1e-7, residual_tol=1e-5, max_iters=100))
    p, hvps, errors, oracle, records = params, [], [], [], []
    for s in range(cfg.gd_steps + 1):
        if tracker.due(s):
            warm_vector = state.vector
            record, state = tracker.update(state, s, p, data, stats)
            records.append(record)
            if s > 0:  # the first measurement is a cold start
                true = float(reference(p).eigenvalue)
                hvps.append(record["hvps"])
                errors.append(abs(record["sharpness"] - true) / abs(true))
                oracle.append(_first_ok(decompose(warm_vector, p), true, cfg.rel_tol) or 21)
        if s < cfg.gd_steps:
            p = step(p)

    # Tracking overhead on the same GD loop (compiled beforehand; medians of interleaved repeats).
    def gd_loop(track: bool) -> float:
        q, st = params, tracker.init(params, jax.random.key(3))
        t0 = time.perf_counter()
        for s in range(cfg.overhead_steps):
            if track:
                _, st = tracker.update(st, s, q, data, stats)
            q = step(q)
        jax.block_until_ready(q)
        return time.perf_counter() - t0

    gd_loop(True)
    plain, tracked = [], []
    for _ in range(cfg.overhead_repeats):
        plain.append(gd_loop(False))
        tracked.append(gd_loop(True))
    t_plain, t_tracked = float(np.median(plain)), float(np.median(tracked))
    return {
        "model": b.name,
        "params": int(n_params),
        "lr": b.lr,
        "grad_ms": 1e3 * t_grad,
        "hvp_ms": 1e3 * t_hvp,
        "hvp_over_grad": t_hvp / t_grad,
        "top_eigenvalue_at_init": lam,
        "power_cold_hvps": power_cold,
        "lanczos_cold_hvps": lanczos_cold,
        "warm_hvps_per_checkpoint": float(np.mean(hvps)),
        "warm_within_tol_fraction": float(np.mean(np.asarray(errors) <= cfg.rel_tol)),
        "warm_median_rel_error": float(np.median(errors)),
        "warm_oracle_lanczos_hvps": float(np.mean(oracle)),
        "checkpoints": len(hvps),
        "final_sharpness": records[-1]["sharpness"],
        "threshold": records[-1]["threshold"],
        "gd_plain_s": t_plain,
        "gd_tracked_s": t_tracked,
        "tracking_overhead": t_tracked / t_plain - 1,
    }


def _first_ok(dec: cv.LanczosDecomposition, lam: float, rel_tol: float) -> int | None:
    """Fewest Lanczos steps whose top Ritz value is within ``rel_tol`` of ``lam`` (None if none)."""
    a, bta = np.asarray(dec.alphas, np.float64), np.asarray(dec.betas, np.float64)
    for m in range(1, len(a) + 1):
        t = np.diag(a[:m]) + np.diag(bta[: m - 1], 1) + np.diag(bta[: m - 1], -1)
        if abs(np.linalg.eigvalsh(t)[-1] - lam) <= rel_tol * abs(lam):
            return m
    return None


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("parameters", "params", "{:d}"),
        ("gradient time (ms)", "grad_ms", "{:.2f}"),
        ("HVP time (ms)", "hvp_ms", "{:.2f}"),
        ("HVP / gradient (target ≤ 2.5)", "hvp_over_grad", "{:.2f}"),
        ("HVPs to 1e-3, power iteration, random start", "power_cold_hvps", "{}"),
        ("HVPs to 1e-3, Lanczos, random start", "lanczos_cold_hvps", "{}"),
        ("HVPs / checkpoint, tracker warm start (target ≤ 5)", "warm_hvps_per_checkpoint", "{:.2f}"),
        ("  tracker estimates within 1e-3", "warm_within_tol_fraction", "{:.0%}"),
        ("  tracker median relative error", "warm_median_rel_error", "{:.1e}"),
        ("  fewest warm Lanczos HVPs to 1e-3 (oracle mean)", "warm_oracle_lanczos_hvps", "{:.2f}"),
        ("final sharpness / threshold 2/lr", None, None),
        ("tracking overhead, every 10 steps (target ≤ 30%)", "tracking_overhead", "{:.0%}"),
    ]
    out = ["| measure | " + " | ".join(r["model"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r['final_sharpness']:.2f} / {r['threshold']:.2f}" for r in results]
        else:
            cells = ["n/a" if r[key] is None else fmt.format(r[key]) for r in results]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter GD runs and fewer repeats")
    parser.add_argument("--out", default="experiments/results/bench_curvature.json")
    args = parser.parse_args()
    cfg = PRESETS["quick"] if args.quick else Config()
    ds_args = get_dataset_args()
    ds_args.num_samples = int(np.ceil(cfg.n_train / 0.8))  # mnist1d keeps 80% for training
    ds = make_dataset(ds_args)
    x = jnp.asarray(ds["x"][: cfg.n_train], jnp.float32)
    y = jnp.asarray(ds["y"][: cfg.n_train], jnp.int32)
    t0 = time.perf_counter()
    results = [run_bench(b, x, y, cfg) for b in BENCHES]
    payload = {
        "command": "PYTHONPATH=. python experiments/bench_curvature.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "config": dataclasses.asdict(cfg),
        "targets": TARGETS,
        "device": f"{jax.devices()[0].platform}, {jax.device_count()} devices",
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table": table(results),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(payload["table"])
    print(f"\nwrote {out} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
