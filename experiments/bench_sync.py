"""Benchmark: cost of synchronized batch norm (``axis_name``) vs per-device statistics on 8 CPU devices.

    PYTHONPATH=. python experiments/bench_sync.py            # ~1 min on 2 CPU cores
    PYTHONPATH=. python experiments/bench_sync.py --quick    # small shapes, seconds

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself when no device count is given. For each
case (the shape is per device; the global batch is 8 times larger), train-mode batch norm alone is timed
under ``jit`` in forward and forward+backward (VJP w.r.t. input, scale and bias), variants interleaved round
by round, median per variant:

- ``local``: ``shard_map``, ``bnjax.batch_norm`` without ``axis_name`` (per-device statistics);
- ``sync``: the same with ``axis_name`` and the default ``sync="auto"`` merge (see ``bench_scale.py``
  for the two merges side by side);
- ``flax sync``: ``flax.linen.BatchNorm(axis_name=...)`` in the same ``shard_map`` (a ``pmean`` of moments);
- ``sharded jit``: ``jit`` over the batch-sharded array, no ``axis_name`` (XLA inserts the all-reduces).

The 8 "devices" share the host's cores, so absolute times mean little; the ratios to ``local`` are the
result. Results go to ``experiments/results/bench_sync.json`` and a Markdown table is printed.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnjax  # noqa: E402
from experiments.bench_batchnorm import check_out, positive_int, time_interleaved  # noqa: E402

AXIS = "batch"
DEVICES = 8
CASES = {  # per-device shapes
    "conv (16,16,16,32)": (16, 16, 16, 32),
    "dense (256,1024)": (256, 1024),
    "dense (16,64)": (16, 64),
}
QUICK_CASES = {
    "conv (4,8,8,16)": (4, 8, 8, 16),
    "dense (16,64)": (16, 64),
}


def _variants(mesh, n_features):
    """name -> f(x, scale, bias) -> y, each a global function of the batch-sharded x."""
    state = bnjax.init_state((n_features,))

    def bnjax_fn(axis_name):
        return lambda x, s, b: bnjax.batch_norm(x, s, b, state, train=True, axis_name=axis_name)[0]

    def flax_fn(x, s, b):
        variables = {"params": {"scale": s, "bias": b}, "batch_stats": {"mean": state.mean, "var": state.var}}
        bn = nn.BatchNorm(use_running_average=False, axis_name=AXIS)
        return bn.apply(variables, x, mutable=["batch_stats"])[0]

    def sharded(local):
        spec = P(AXIS)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec)

    return {
        "local": sharded(bnjax_fn(None)),
        "sync": sharded(bnjax_fn(AXIS)),
        "flax sync": sharded(flax_fn),
        "sharded jit": bnjax_fn(None),
    }


def run(cases: dict, repeats: int) -> list[dict]:
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
    rows = []
    for name, shape in cases.items():
        global_shape = (DEVICES * shape[0],) + shape[1:]
        x = jax.device_put(jax.random.normal(jax.random.key(1), global_shape) * 2.0 + 3.0, NamedSharding(mesh, P(AXIS)))
        scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
        ct = jnp.ones_like(x)
        for mode in ("forward", "forward+backward"):
            fns = {}
            for variant, f in _variants(mesh, shape[-1]).items():
                if mode == "forward":
                    g = jax.jit(f)
                else:
                    g = jax.jit(lambda x, s, b, f=f: jax.vjp(f, x, s, b)[1](ct))
                fns[variant] = lambda g=g: g(x, scale, bias)
            t = time_interleaved(fns, repeats)
            rows.append({"case": name, "mode": mode, "median_s": t, **{f"{k} / local": t[k] / t["local"] for k in t}})
            print(_row_md(rows[-1]), flush=True)
    return rows


def _row_md(r: dict) -> str:
    t = r["median_s"]
    return (
        f"| {r['case']} | {r['mode']} | {r['sync / local']:.2f} | {r['flax sync / local']:.2f} | "
        f"{r['sharded jit / local']:.2f} | {1e3 * t['local']:.3f} | {1e3 * t['sync']:.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_sync.json"))
    args = parser.parse_args()
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, JAX sees {jax.device_count()}: check XLA_FLAGS")
    check_out(parser, args.out)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 31)
    print(f"jax {jax.__version__}, {DEVICES} forced CPU devices on {os.cpu_count()} cores, median of {repeats}")
    print("| case (per device) | mode | sync / local | flax sync / local | sharded jit / local | local ms | sync ms |")
    print("|---|---|---|---|---|---|---|")
    rows = run(QUICK_CASES if args.quick else CASES, repeats)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "devices": DEVICES, "cpu_count": os.cpu_count(), "repeats": repeats}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
