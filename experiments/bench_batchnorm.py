"""Benchmark: bnjax.BatchNorm vs flax.linen.BatchNorm vs an elementwise floor, as ratios from one run.

    python experiments/bench_batchnorm.py            # full shapes (a few minutes on 2 CPU cores)
    python experiments/bench_batchnorm.py --quick    # small shapes, seconds

For each case, train-mode forward and forward+backward (gradient w.r.t. input and parameters) are timed under
``jax.jit`` for: bnjax, Flax's default (``use_fast_variance=True``), Flax's exact two-pass path, and the plain
elementwise ``x * a + b`` on the same array (the memory-traffic floor). Variants are interleaved round by
round and the median per variant is reported, so machine noise hits all of them alike. Results go to
``experiments/results/bench_batchnorm.json`` and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnjax

CASES = {
    "conv (256,32,32,64) f32": ((256, 32, 32, 64), jnp.float32),
    "dense (1024,4096) f32": ((1024, 4096), jnp.float32),
    "conv (128,32,32,64) bf16": ((128, 32, 32, 64), jnp.bfloat16),
}
QUICK_CASES = {
    "conv (32,16,16,32) f32": ((32, 16, 16, 32), jnp.float32),
    "dense (256,1024) f32": ((256, 1024), jnp.float32),
    "conv (32,16,16,32) bf16": ((32, 16, 16, 32), jnp.bfloat16),
}


def _bn_fns(module: nn.Module, x: jax.Array):
    variables = module.init(jax.random.key(0), x)

    def forward(x, params):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return y

    return forward, variables["params"]


def _floor_fns(x: jax.Array):
    c = x.shape[-1]
    params = {"scale": jnp.full((c,), 1.5, jnp.float32), "bias": jnp.full((c,), 0.5, jnp.float32)}

    def forward(x, params):
        return (x * params["scale"] + params["bias"]).astype(x.dtype)

    return forward, params


def _compiled(forward, params, x):
    fwd = jax.jit(forward)
    ct = jnp.ones_like(forward(x, params))

    @jax.jit
    def fwd_bwd(x, params):
        y, pullback = jax.vjp(forward, x, params)
        return y, pullback(ct)

    return {"forward": lambda: fwd(x, params), "forward+backward": lambda: fwd_bwd(x, params)}


def time_interleaved(fns: dict, repeats: int, warmup: int = 2, samples: bool = False, lead: int = 0) -> dict:
    """Median seconds per call of each zero-argument function, timed round-robin so noise hits all alike
    (after ``warmup`` untimed calls of each, the first of which compiles). With ``samples`` the lists of
    per-round seconds instead: entry ``i`` of every list comes from the same round, so ratios can be paired.

    ``lead`` untimed calls of a function come right before each of its timed calls, so a timed call never
    follows another function's call directly. Use it where the functions belong to different frameworks: a
    JAX gradient of the benchmark's CNN right after a PyTorch call took 21-25 ms against 16-18 ms after one of
    its own (2 cores; PyTorch's OpenMP workers keep spinning for a while after each operation, and the caches
    hold the other framework's buffers), which is not how either runs in a user's program."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    rounds: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            for _ in range(lead):
                jax.block_until_ready(f())
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            rounds[k].append(time.perf_counter() - t0)
    return rounds if samples else {k: statistics.median(v) for k, v in rounds.items()}


def positive_int(text: str) -> int:
    """argparse ``type``: a positive integer (``--repeats 0`` used to mean the default)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Fail at once, not after the timings, when the results file ``out`` cannot be written."""
    path = pathlib.Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {out}: cannot create its folder ({err.strerror or err}).")
    writable = os.access(path.parent, os.W_OK | os.X_OK) and (not path.exists() or os.access(path, os.W_OK))
    if path.is_dir() or not writable:
        parser.error(f"--out {out}: not a writable file path.")


def write_payload(payload: dict, out: str) -> None:
    """Write a benchmark's ``payload`` (with ``table`` and ``wall_s``) as JSON to ``out``; print the table."""
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(payload["table"])
    print(f"\nwrote {path} in {payload['wall_s']:.0f} s")


def run(cases: dict, repeats: int) -> list[dict]:
    rows = []
    for name, (shape, dtype) in cases.items():
        x = (jax.random.normal(jax.random.key(1), shape) * 2.0 + 3.0).astype(dtype)
        variants = {
            "bnjax": _bn_fns(bnjax.BatchNorm(use_running_average=False), x),
            "flax (fast var)": _bn_fns(nn.BatchNorm(use_running_average=False), x),
            "flax (two-pass)": _bn_fns(nn.BatchNorm(use_running_average=False, use_fast_variance=False), x),
            "floor x*a+b": _floor_fns(x),
        }
        for mode in ("forward", "forward+backward"):
            fns = {v: _compiled(f, p, x)[mode] for v, (f, p) in variants.items()}
            t = time_interleaved(fns, repeats)
            rows.append(
                {
                    "case": name,
                    "mode": mode,
                    "median_s": t,
                    "bnjax / flax fast": t["bnjax"] / t["flax (fast var)"],
                    "bnjax / flax two-pass": t["bnjax"] / t["flax (two-pass)"],
                    "bnjax / floor": t["bnjax"] / t["floor x*a+b"],
                    "flax fast / floor": t["flax (fast var)"] / t["floor x*a+b"],
                }
            )
            print(_row_md(rows[-1]), flush=True)
    return rows


def _row_md(r: dict) -> str:
    return (
        f"| {r['case']} | {r['mode']} | {r['bnjax / flax fast']:.2f} | {r['bnjax / flax two-pass']:.2f} | "
        f"{r['bnjax / floor']:.2f} | {r['flax fast / floor']:.2f} | {1e3 * r['median_s']['bnjax']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_batchnorm.json"))
    args = parser.parse_args()
    check_out(parser, args.out)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, median of {repeats} interleaved repeats")
    print("| case | mode | bnjax / flax fast | bnjax / flax two-pass | bnjax / floor | flax fast / floor | bnjax ms |")
    print("|---|---|---|---|---|---|---|")
    rows = run(QUICK_CASES if args.quick else CASES, repeats)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "repeats": repeats}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
