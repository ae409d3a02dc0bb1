"""Top-k tracking: the tracker's warm-started block Lanczos (``EoSTracker(..., k=3)``) against
``jax.experimental.sparse.linalg.lobpcg_standard`` warm-started from the previous eigenvectors, along a short
full-batch GD run on MNIST-1D (the two models of ``experiments/bench_warmstart.py``).

Command: ``PYTHONPATH=. python experiments/bench_topk.py [--quick]`` (quick: 498 s on 2 CPU cores shared with other
jobs at load ~6, 2026-12-04; the full form runs twice the GD steps).
Writes ``experiments/results/bench_topk.json`` and prints a markdown table.

Per checkpoint (every ``every`` steps; the first, cold, is left out of the means) each method starts from its
own previous top-k vectors; errors are of the top ``k`` eigenvalues against a cold Lanczos reference (80 steps).
HVPs: the tracker's count; for LOBPCG ``k`` (its initial ``A X``) plus ``4 k`` per iteration (it applies the
operator to the ``3 k`` columns of its ``[X, P, R]`` basis and again to the new ``X``), the batched columns
by ``jax.vmap`` of the HVP. LOBPCG's stopping rule is on residuals only (``||r|| < tol * 10 n (theta +
||A x||)``), so it is run with the ``tol`` that stops at relative residuals 1e-2 (the tracker's
``residual_tol``) and 1e-3. Wall time per measurement: medians over the warm checkpoints
(the first call of each compiles); LOBPCG runs its own ``while_loop`` inside ``jit`` (no host placement), the
tracker uses ``placement="auto"`` (the host loop on CPU for the conv net).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time
from typing import Any

import jax
import numpy as np
from jax.experimental.sparse.linalg import lobpcg_standard
from jax.flatten_util import ravel_pytree

from bnjax import curvature as cv
from bnjax import loops
from experiments.bench_batchnorm import check_out, write_payload
from experiments.bench_warmstart import BENCHES, Bench, mnist1d_train


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int = 1000
    k: int = 3
    gd_steps: int = 200
    every: int = 10
    lobpcg_residuals: tuple[float, ...] = (1e-2, 1e-3)  # relative residual LOBPCG stops at (tol from it)
    lobpcg_max_iters: int = 20
    seed: int = 0


PRESETS = {"quick": dataclasses.replace(Config(), gd_steps=100)}


def run_bench(b: Bench, x: jax.Array, y: jax.Array, cfg: Config) -> dict[str, Any]:
    variables = b.model.init(jax.random.key(cfg.seed), x[:8])
    params, stats = variables["params"], variables.get("batch_stats")
    fns = cv.flax_curvature_fns(b.model.apply, b.loss, bn_mode="train" if b.bn else None)
    data, k = (x, y), cfg.k
    hess = cv.dataset_hessian_matvec(fns.loss_fn, b.chunk_size)
    flat, unravel = ravel_pytree(params)
    n = flat.size

    def block_matvec(p: Any) -> Any:
        hvp = lambda col: ravel_pytree(hess(unravel(col), p, data, stats))[0]  # noqa: E731
        return jax.vmap(hvp, in_axes=1, out_axes=1)

    # lobpcg_standard stops when ||r|| < tol * 10 n (theta + ||A x||) ~ tol * 20 n theta: the tol that stops at
    # relative residual r is r / (20 n).
    tols = {r: r / (20 * n) for r in cfg.lobpcg_residuals}
    lobpcg = {
        r: jax.jit(lambda p, X, tol=tol: lobpcg_standard(block_matvec(p), X, m=cfg.lobpcg_max_iters, tol=tol))
        for r, tol in tols.items()
    }
    reference = jax.jit(lambda p: cv.lanczos(hess, cv.random_like(jax.random.key(9), params), p, data, stats, k=k,
                                             num_iters=80).eigenvalue)  # fmt: skip
    tracker = cv.EoSTracker(fns.loss_fn, cv.gd_rule(b.lr), every=cfg.every, chunk_size=b.chunk_size, k=k)
    state = tracker.init(params, jax.random.key(2))
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - b.lr * g, p, jax.grad(fns.loss_fn)(p, data, stats)))
    blocks = {r: jax.random.normal(jax.random.key(3), (n, k), flat.dtype) for r in cfg.lobpcg_residuals}
    rows: dict[str, dict[str, list[float]]] = {
        name: {"hvps": [], "err_top": [], "err_max": [], "seconds": []}
        for name in ["tracker", *(f"lobpcg residual {r:g}" for r in cfg.lobpcg_residuals)]
    }
    p = params
    for s in range(cfg.gd_steps + 1):
        if s % cfg.every == 0:
            true = np.asarray(reference(p), np.float64)
            warm = s > 0
            t0 = time.perf_counter()
            record, state = tracker.update(state, s, p, data, stats)
            elapsed = time.perf_counter() - t0
            _add(rows["tracker"], warm, record["hvps"], np.asarray(record["eigenvalues"]), true, elapsed)
            for r, fn in lobpcg.items():
                t0 = time.perf_counter()
                theta, blocks[r], iters = jax.block_until_ready(fn(p, blocks[r]))
                elapsed = time.perf_counter() - t0
                _add(rows[f"lobpcg residual {r:g}"], warm, k + 4 * k * int(iters), np.asarray(theta), true, elapsed)
        if s < cfg.gd_steps:
            p = step(p)
    summary = {
        name: {
            "hvps_per_checkpoint": float(np.mean(r["hvps"])),
            "median_top_rel_error": float(np.median(r["err_top"])),
            "max_top_rel_error": float(np.max(r["err_top"])),
            "max_topk_rel_error": float(np.max(r["err_max"])),
            "median_seconds": float(np.median(r["seconds"])),
        }
        for name, r in rows.items()
    }
    placement = loops.resolve_placement("auto", fns.loss_fn, params, data, stats)
    return {
        "model": b.name,
        "params": int(n),
        "tracker_placement": placement,
        "k": k,
        "lobpcg_tols": {f"{r:g}": t for r, t in tols.items()},
        "methods": summary,
    }


def _add(row: dict[str, list[float]], warm: bool, hvps: int, values: np.ndarray, true: np.ndarray, secs: float):
    if not warm:  # the cold start is left out of the means
        return
    errors = np.abs(np.sort(values)[::-1] - true) / np.abs(true[0])
    row["hvps"].append(hvps)
    row["err_top"].append(float(errors[0]))
    row["err_max"].append(float(errors.max()))
    row["seconds"].append(secs)


def table(results: list[dict[str, Any]]) -> str:
    out = [
        "| model | method | HVPs / checkpoint | top eigenvalue error: median / max | max error of the top k "
        "(relative to the top) | s / measurement |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["methods"].items():
            label = (
                f"EoSTracker k={r['k']} (block Lanczos, {r['tracker_placement']} loop)" if name == "tracker" else name
            )
            out.append(
                f"| {r['model']} | {label} | {m['hvps_per_checkpoint']:.1f} | {m['median_top_rel_error']:.1e} / "
                f"{m['max_top_rel_error']:.1e} | {m['max_topk_rel_error']:.1e} | {m['median_seconds']:.3f} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter GD run")
    parser.add_argument("--out", default="experiments/results/bench_topk.json")
    args = parser.parse_args()
    check_out(parser, args.out)
    cfg = PRESETS["quick"] if args.quick else Config()
    x, y = mnist1d_train(cfg.n_train)
    t0 = time.perf_counter()
    results = [run_bench(b, x, y, cfg) for b in BENCHES]
    payload = {
        "command": "PYTHONPATH=. python experiments/bench_topk.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "config": dataclasses.asdict(cfg),
        "device": f"{jax.devices()[0].platform}, {jax.device_count()} devices",
        "load_average": list(__import__("os").getloadavg()),
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table": table(results),
    }
    write_payload(payload, args.out)


if __name__ == "__main__":
    main()
