"""Benchmark: what exact cross-device batch-norm statistics cost as the device count grows.

    PYTHONPATH=. python experiments/bench_scale.py                  # 1, 2, 4, 8, 32 devices, ~2 min on 2 cores
    PYTHONPATH=. python experiments/bench_scale.py --quick          # 1, 2, 8 devices, small cases, ~40 s
    PYTHONPATH=. python experiments/bench_scale.py --devices 4 8    # chosen device counts
    PYTHONPATH=. python experiments/bench_scale.py --parts hvp --devices 1 2 4 8   # data-set HVPs

Every device count ``D`` runs in its own subprocess, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` in its environment (read when JAX initializes). Per
device count and case (the shape is per device; the global batch is ``D`` times larger), one train step of
batch norm alone inside ``jax.shard_map`` (default ``check_vma=True``): forward and backward with respect to
the input, the running statistics returned through ``out_specs=P()``. Variants:

- ``local``: ``bnjax.batch_norm`` without ``axis_name`` (per-device statistics; the baseline);
- ``gather``, ``allreduce``: ``bnjax.batch_norm`` with ``axis_name`` and that ``sync``;
- ``flax pmean``: ``flax.linen.BatchNorm(axis_name=...)`` (a ``pmean`` of per-device moments, inexact with
  uneven counts).

Part ``hvp`` (:func:`measure_hvp`): one Hessian-vector product of a data set with
``bnjax.curvature.dataset_hessian_matvec`` under plain ``jax.jit`` on data sharded with
``NamedSharding(mesh, P("batch"))``: a fixed global data set (``HVP_CASE``: 4096 examples of 32 features,
chunks of 512, a 32 -> 64 -> BN (train mode) -> tanh -> 1 MLP, square loss), so the rows per device shrink
as ``1/D``. Variants: ``parallel`` (``shards=D``: the data-parallel chunk layout) and ``gathered``
(``shards=1``, the layout before it: every chunk is contiguous, so the devices fetch rows of other devices).
The chunk loop is a ``lax.scan`` (``chunk_loop="scan"``: bounded memory); its body's collectives count once
per chunk (:func:`collective_bytes` reads the loop's trip count).

Measured, one function each (a further part adds its own ``measure_*`` and an entry in ``PARTS``):

- :func:`collective_bytes`: bytes moved by collectives per step, read from the compiled HLO
  (``jax.jit(f).lower(...).compile().as_text()``): for every all-gather, all-reduce, reduce-scatter,
  collective-permute and all-to-all, the size of its operands plus the size of its result, summed (times
  the trip count inside a loop body);
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
from bnjax import curvature
from experiments.bench_batchnorm import check_out, positive_int, time_interleaved

AXIS = "batch"
CASES = {  # per-device shapes; features last
    "dense (32,64)": (32, 64),
    "dense (32,2048)": (32, 2048),
    "conv (8,8,8,256)": (8, 8, 8, 256),
}
QUICK_CASES = {"dense (8,64)": (8, 64), "dense (8,512)": (8, 512)}
DEVICE_COUNTS = (1, 2, 4, 8, 32)
QUICK_DEVICE_COUNTS = (1, 2, 8)
HVP_CASE = {"n": 4096, "features": 32, "hidden": 64, "chunk_size": 512}
QUICK_HVP_CASE = {"n": 512, "features": 32, "hidden": 64, "chunk_size": 64}
HVP_VARIANTS = ("parallel", "gathered")
VARIANTS = ("local", "gather", "allreduce", "flax pmean")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}


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


def _loop_multiplicities(hlo_text: str) -> dict:
    """Computation name -> how often it runs per call: a ``while`` body with a ``known_trip_count`` of ``K``
    runs ``K`` times per run of the computation that holds the ``while``; every other computation once."""
    header = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
    loop = re.compile(r"\swhile\(.*?body=%([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")
    loops, current = {}, None
    for line in hlo_text.splitlines():
        m = header.match(line)
        if m:
            current = m.group(1)
        for body, trips in loop.findall(line):
            loops[body] = (current, int(trips))

    def times(name):
        if name not in loops:
            return 1
        parent, trips = loops[name]
        return trips * times(parent)

    return {name: times(name) for name in loops}


def collective_bytes(hlo_text: str) -> dict:
    """Bytes of operands plus results of the collectives in compiled HLO text, per op kind and in total.

    XLA:CPU emits the synchronous forms; asynchronous ``*-start`` ops are counted the same way (their
    ``*-done`` halves are skipped), so the sum stays comparable on other backends. A collective inside a
    loop body with a known trip count (a ``lax.scan``) counts once per iteration; ``count`` is per call too.
    """
    shapes = {}  # instruction name -> result type
    ops = []
    header = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*?)\)")
    times, current = _loop_multiplicities(hlo_text), None
    for line in hlo_text.splitlines():
        m = header.match(line)
        if m:
            current = m.group(1)
            continue
        m = pattern.match(line)
        if not m:
            continue
        name, result_type, op, operands = m.groups()
        shapes[name] = result_type
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            ops.append((base, result_type, re.findall(r"%([\w.\-]+)", operands), times.get(current, 1)))
    per_kind, count = {}, 0
    for base, result_type, operands, n in ops:
        size = _type_bytes(result_type) + sum(_type_bytes(shapes[o]) for o in operands)
        per_kind[base] = per_kind.get(base, 0) + n * size
        count += n
    return {"total": sum(per_kind.values()), "count": count, **per_kind}


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


def measure_sync(devices: int, quick: bool, repeats: int) -> list[dict]:
    """Collective bytes, memory and time ratios of a BN train step, per case, on ``devices`` devices."""
    cases = QUICK_CASES if quick else CASES
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


# ----------------------------------------------------------------------------- the hvp part


class _HVPNet(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x, train=True):
        h = bnjax.BatchNorm(use_running_average=not train)(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(jnp.tanh(h))[:, 0]


def measure_hvp(devices: int, quick: bool, repeats: int) -> list[dict]:
    """Collective bytes, memory and time of one data-set HVP, data-parallel layout against gathered rows."""
    case = QUICK_HVP_CASE if quick else HVP_CASE
    mesh = jax.make_mesh((devices,), (AXIS,), axis_types=(AxisType.Auto,))
    kx, ky, kp, kv = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (case["n"], case["features"]))
    y = jax.random.normal(ky, (case["n"],))
    model = _HVPNet(case["hidden"])
    variables = model.init(kp, x[:2])
    loss = lambda out, t: 0.5 * jnp.mean((out - t) ** 2)  # noqa: E731
    fns = {mode: curvature.flax_curvature_fns(model.apply, loss, bn_mode=mode) for mode in ("train", "eval")}
    data = jax.device_put((x, y), NamedSharding(mesh, P(AXIS)))
    params, stats = variables["params"], variables["batch_stats"]
    vector = curvature.random_like(kv, params)
    row = {"devices": devices, "case": f"hvp N={case['n']} chunk={case['chunk_size']}", "bytes": {}, "memory": {}}
    fns_timed = {}
    t0 = time.perf_counter()
    variants = {  # name: (bn_mode, shards, per_example)
        "parallel": ("train", devices, False),
        "gathered": ("train", 1, False),
        "eval parallel": ("eval", devices, False),
        "eval per-example": ("eval", devices, True),
    }
    for name, (mode, shards, per_example) in variants.items():
        mv = curvature.dataset_hessian_matvec(
            fns[mode].loss_fn, case["chunk_size"], chunk_loop="scan", shards=shards, per_example=per_example
        )
        compiled = jax.jit(mv).lower(vector, params, data, stats).compile()
        row["bytes"][name] = collective_bytes(compiled.as_text())
        row["memory"][name] = memory_per_device(compiled)
        fns_timed[name] = lambda compiled=compiled: compiled(vector, params, data, stats)
    row["compile_s"] = time.perf_counter() - t0
    row.update(time_ratios(fns_timed, repeats, baseline="gathered"))
    print(_hvp_row_md(row), flush=True)
    return [row]


PARTS = {"sync": measure_sync, "hvp": measure_hvp}


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


def _hvp_row_md(r: dict) -> str:
    b, mem = r["bytes"], r["memory"]
    return (
        f"| {r['devices']} | {r['case']} | {b['parallel']['total']} | {b['parallel'].get('all-gather', 0)} | "
        f"{b['gathered']['total']} | {b['gathered'].get('all-gather', 0)} | {mem['parallel']['peak']} | "
        f"{mem['gathered']['peak']} | {r['median_s']['parallel'] * 1e3:.2f} | {r['ratio']['parallel']:.2f} | "
        f"{b['eval parallel']['total']} | {b['eval per-example']['total']} | {b['eval per-example']['count']} | "
        f"{r['median_s']['eval per-example'] / r['median_s']['eval parallel']:.2f} |"
    )


HVP_HEADER = (
    "| devices | case | bytes parallel | of which all-gather | bytes gathered | of which all-gather | "
    "peak mem parallel | peak mem gathered | ms parallel | time parallel / gathered | "
    "bytes eval parallel | bytes eval per-example | collectives eval per-example | "
    "time eval per-example / eval parallel |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
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
    out = {part: PARTS[part](args.worker, args.quick, args.repeats) for part in args.parts}
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few device counts, small cases, few repeats")
    parser.add_argument("--devices", type=positive_int, nargs="+", default=None, help="device counts to run")
    parser.add_argument("--parts", nargs="+", default=["sync"], choices=sorted(PARTS))
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_scale.json"))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    if args.worker is not None:
        _worker(args)
        return
    check_out(parser, args.out)

    counts = args.devices or (QUICK_DEVICE_COUNTS if args.quick else DEVICE_COUNTS)
    root = pathlib.Path(__file__).resolve().parent.parent
    print(f"forced CPU devices {counts} on {os.cpu_count()} cores, median of {args.repeats}; bytes per step")
    print("\n".join(HVP_HEADER if part == "hvp" else HEADER for part in args.parts))
    results, start = {}, time.perf_counter()
    for d in counts:
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}".strip(),
        }
        cmd = [
            sys.executable,
            "-m",
            "experiments.bench_scale",
            "--worker",
            str(d),
            "--repeats",
            str(args.repeats),
            "--parts",
            *args.parts,
        ] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{d} devices failed:\n{proc.stderr[-3000:]}")
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if line.startswith("|")), flush=True)
        results[str(d)] = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])
    meta = {
        "jax": jax.__version__,
        "device_counts": list(counts),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "quick": args.quick,
        "wall_s": time.perf_counter() - start,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out} ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
