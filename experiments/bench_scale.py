"""Benchmark: what exact cross-device batch-norm statistics cost as the device count grows.

    PYTHONPATH=. python experiments/bench_scale.py                  # 1, 2, 4, 8, 32 devices, ~2 min on 2 cores
    PYTHONPATH=. python experiments/bench_scale.py --quick          # 1, 2, 8 devices, small cases, ~40 s
    PYTHONPATH=. python experiments/bench_scale.py --devices 4 8    # chosen device counts

Every device count ``D`` runs in its own subprocess, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` in its environment (read when JAX initializes). Per
device count and case (the shape is per device; the global batch is ``D`` times larger), one train step of
batch norm alone inside ``jax.shard_map`` (default ``check_vma=True``): forward and backward with respect to
the input, the running statistics returned through ``out_specs=P()``. Variants:

- ``local``: ``bnjax.batch_norm`` without ``axis_name`` (per-device statistics; the baseline);
- ``gather``, ``allreduce``: ``bnjax.batch_norm`` with ``axis_name`` and that ``sync``;
- ``flax pmean``: ``flax.linen.BatchNorm(axis_name=...)`` (a ``pmean`` of per-device moments, inexact with
  uneven counts).

Measured, one function each (a further part, e.g. HVPs, adds its own ``measure_*`` and an entry in
``PARTS``):

- :func:`collective_bytes`: bytes moved by collectives per step, read from the compiled HLO
  (``jax.jit(f).lower(...).compile().as_text()``): for every all-gather, all-reduce, reduce-scatter,
  collective-permute and all-to-all, the size of its operands plus the size of its result, summed;
- :func:`memory_per_device`: ``compiled.memory_analysis()`` of the per-device program (arguments, outputs,
  temporaries);
- :func:`time_ratios`: median time per step of each variant relative to ``local``, variants interleaved
  round by round in the same process.

Forced CPU devices share the host's cores and "communicate" by copying between threads, so the times say
how XLA:CPU runs these programs, not how an interconnect would: bytes and memory are the portable figures.
Results go to ``experiments/results/bench_scale.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from experiments.bench_batchnorm import time_interleaved

AXIS = "batch"
CASES = {  # per-device shapes; features last
    "dense (32,64)": (32, 64),
    "dense (32,2048)": (32, 2048),
    "conv (8,8,8,256)": (8, 8, 8, 256),
}
QUICK_CASES = {"dense (8,64)": (8, 64), "dense (8,512)": (8, 512)}
DEVICE_COUNTS = (1, 2, 4, 8, 32)
QUICK_DEVICE_COUNTS = (1, 2, 8)
VARIANTS = ("local", "gather", "allreduce", "flax pmean")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}


# ----------------------------------------------------------------------------- measurements


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type such as ``f32[8,2048]{1,0}`` or a tuple ``(f32[4], s32[])``."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", hlo_type):
        size = DTYPE_BYTES[dtype]
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def collective_bytes(hlo_text: str) -> dict:
    """Bytes of operands plus results of the collectives in compiled HLO text, per op kind and in total.

    XLA:CPU emits the synchronous forms; asynchronous ``*-start`` ops are counted the same way (their
    ``*-done`` halves are skipped), so the sum stays comparable on other backends.
    """
    shapes = {}  # instruction name -> result type
    ops = []
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*?)\)", re.M)
    for name, result_type, op, operands in pattern.findall(hlo_text):
        shapes[name] = result_type
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            ops.append((base, result_type, re.findall(r"%([\w.\-]+)", operands)))
    per_kind = {}
    for base, result_type, operands in ops:
        size = _type_bytes(result_type) + sum(_type_bytes(shapes[o]) for o in operands)
        per_kind[base] = per_kind.get(base, 0) + size
    return {"total": sum(per_kind.values()), "count": len(ops), **per_kind}


def memory_per_device(compiled) -> dict:
    """Per-device buffer sizes of a compiled SPMD program; ``peak`` = arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
    }
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return sizes


def time_ratios(fns: dict, repeats: int, baseline: str) -> dict:
    """Median seconds per call of each zero-argument function (interleaved) and its ratio to ``baseline``."""
    t = time_interleaved(fns, repeats)
    return {"median_s": t, "ratio": {k: t[k] / t[baseline] for k in t}}


# ----------------------------------------------------------------------------- the sync part


def _sync_steps(mesh, n_features):
    """Variant -> jitted ``step(x, ct) -> (dx, new_mean, new_var)`` of one BN layer inside ``shard_map``."""
    state = bnjax.init_state((n_features,))
    scale, bias = jnp.ones(n_features), jnp.zeros(n_features)

    def bnjax_norm(axis_name, sync):
        return lambda x: bnjax.batch_norm(x, scale, bias, state, train=True, axis_name=axis_name, sync=sync)

    def flax_norm(x):
        bn = nn.BatchNorm(use_running_average=False, axis_name=AXIS)
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": state.mean, "var": state.var}}
        y, upd = bn.apply(variables, x, mutable=["batch_stats"])
        return y, bnjax.BatchNormState(upd["batch_stats"]["mean"], upd["batch_stats"]["var"])

    norms = {
        "local": bnjax_norm(None, "auto"),
        "gather": bnjax_norm(AXIS, "gather"),
        "allreduce": bnjax_norm(AXIS, "allreduce"),
        "flax pmean": flax_norm,
    }

    def step(norm, stats_spec):
        def local(x, ct):
            _, vjp, new = jax.vjp(norm, x, has_aux=True)
            (dx,) = vjp(ct)
            return dx, new.mean, new.var

        return jax.jit(
            jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=(P(AXIS), stats_spec, stats_spec))
        )

    # Per-device statistics differ between devices, so they leave stacked; every synchronized variant's
    # statistics are replicated and leave through P() as they are (no pmean).
    return {name: step(norm, P(AXIS) if name == "local" else P()) for name, norm in norms.items()}


def measure_sync(devices: int, cases: dict, repeats: int) -> list[dict]:
    """Collective bytes, memory and time ratios of a BN train step, per case, on ``devices`` devices."""
    mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(AxisType.Auto,))
    rows = []
    for case, shape in cases.items():
        global_shape = (devices * shape[0],) + shape[1:]
        sharding = NamedSharding(mesh, P(AXIS))
        x = jax.device_put(jax.random.normal(jax.random.key(1), global_shape) * 2.0 + 3.0, sharding)
        ct = jax.device_put(jax.random.normal(jax.random.key(2), global_shape), sharding)
        row = {"devices": devices, "case": case, "features": shape[-1], "bytes": {}, "memory": {}}
        fns = {}
        t0 = time.perf_counter()
        for name, step in _sync_steps(mesh, shape[-1]).items():
            compiled = step.lower(x, ct).compile()
            row["bytes"][name] = collective_bytes(compiled.as_text())
            row["memory"][name] = memory_per_device(compiled)
            fns[name] = lambda compiled=compiled: compiled(x, ct)
        row["compile_s"] = time.perf_counter() - t0
        row.update(time_ratios(fns, repeats, baseline="local"))
        rows.append(row)
        print(_row_md(row), flush=True)
    return rows


PARTS = {"sync": measure_sync}


# ----------------------------------------------------------------------------- driver


def _row_md(r: dict) -> str:
    b = {k: v["total"] for k, v in r["bytes"].items()}
    mem = {k: v["peak"] for k, v in r["memory"].items()}
    ratio = r["ratio"]
    return (
        f"| {r['devices']} | {r['case']} | {b['gather']} | {b['allreduce']} | {b['flax pmean']} | "
        f"{mem['local']} | {mem['gather']} | {mem['allreduce']} | "
        f"{ratio['gather']:.2f} | {ratio['allreduce']:.2f} | {ratio['flax pmean']:.2f} |"
    )


HEADER = (
    "| devices | case (per device) | bytes gather | bytes allreduce | bytes flax pmean | peak mem local | "
    "peak mem gather | peak mem allreduce | time gather / local | time allreduce / local | "
    "time flax / local |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _worker(args) -> None:
    """Runs in the subprocess for one device count: measure the requested parts, print JSON last."""
    if jax.device_count() != args.worker:
        raise SystemExit(f"expected {args.worker} devices, JAX sees {jax.device_count()}: check XLA_FLAGS")
    cases = QUICK_CASES if args.quick else CASES
    out = {part: PARTS[part](args.worker, cases, args.repeats) for part in args.parts}
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few device counts, small cases, few repeats")
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts to run")
    parser.add_argument("--parts", nargs="+", default=["sync"], choices=sorted(PARTS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_scale.json"))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (5 if args.quick else 21)
    if args.worker is not None:
        _worker(args)
        return

    counts = args.devices or (QUICK_DEVICE_COUNTS if args.quick else DEVICE_COUNTS)
    root = pathlib.Path(__file__).resolve().parent.parent
    print(f"forced CPU devices {counts} on {os.cpu_count()} cores, median of {args.repeats}; bytes per step")
    print(HEADER)
    results, start = {}, time.perf_counter()
    for d in counts:
        env = {**os.environ, "PYTHONPATH": str(root),
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}".strip()}
        cmd = [sys.executable, "-m", "experiments.bench_scale", "--worker", str(d), "--repeats", str(args.repeats),
               "--parts", *args.parts] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{d} devices failed:\n{proc.stderr[-3000:]}")
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if line.startswith("|")), flush=True)
        results[str(d)] = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    meta = {"jax": jax.__version__, "device_counts": list(counts), "cpu_count": os.cpu_count(),
            "repeats": args.repeats, "quick": args.quick, "wall_s": time.perf_counter() - start,
            "date": time.strftime("%Y-%m-%d")}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
