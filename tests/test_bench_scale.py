"""The measuring helpers of experiments/bench_scale.py read what they claim to read."""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.bench_scale import collective_bytes, memory_per_device


def test_collective_bytes_of_a_compiled_program():
    """An all-gather of f32[3] over 8 devices (12 B in, 96 B out) and a psum of f32[5] (20 B in, 20 B out)."""
    mesh = jax.make_mesh((8,), ("d",))

    def local(a, b):
        return lax.all_gather(a, "d", tiled=True), lax.psum(b, "d")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=(P(), P()), check_vma=False))
    args = [jax.ShapeDtypeStruct((8 * n,), jnp.float32, sharding=NamedSharding(mesh, P("d"))) for n in (3, 5)]
    compiled = f.lower(*args).compile()
    got = collective_bytes(compiled.as_text())
    assert got == {"total": 148, "count": 2, "all-gather": 108, "all-reduce": 40}
    memory = memory_per_device(compiled)
    assert memory["arguments"] == 4 * (3 + 5)
    assert memory["peak"] >= memory["arguments"] + memory["outputs"] - memory["aliased"]


def test_collective_bytes_counts_async_starts_once_and_tuples():
    hlo = """
  %p = f32[16,4]{1,0} parameter(0)
  %q = bf16[8]{0} parameter(1)
  %ars = (f32[16,4]{1,0}, bf16[8]{0}) all-reduce-start(%p, %q), replica_groups={}
  %ard = (f32[16,4]{1,0}, bf16[8]{0}) all-reduce-done(%ars)
  ROOT %cp = f32[16,4]{1,0} collective-permute(%p), source_target_pairs={{0,1}}
"""
    got = collective_bytes(hlo)
    all_reduce = 2 * (256 + 16)  # operands f32[16,4] and bf16[8], and a result of the same two
    assert got == {"total": all_reduce + 512, "count": 2, "all-reduce": all_reduce, "collective-permute": 512}


def test_collective_bytes_counts_loop_bodies_once_per_iteration():
    """A scan of 5 steps whose body sums an array sharded over 8 devices: an all-reduce of f32[] per step."""
    mesh = jax.make_mesh((8,), ("d",))
    x = jax.ShapeDtypeStruct((5, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "d")))
    f = jax.jit(lambda x: lax.scan(lambda c, row: (c + jnp.sum(jnp.sin(row)), None), 0.0, x)[0])
    got = collective_bytes(f.lower(x).compile().as_text())
    assert got == {"total": 5 * 8, "count": 5, "all-reduce": 5 * 8}
