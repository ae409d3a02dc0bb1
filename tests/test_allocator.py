"""bnjax.retain_freed_memory: argument checks, and that it removes XLA:CPU's page faults (in a fresh process:
the setting is process-wide and must precede JAX's backend)."""

import json
import platform
import subprocess
import sys

import pytest

import bnjax

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Minor page faults per call of a jitted conv-net gradient (a ~20 MiB working set, freed after each call),
# measured after warm-up, with and without the setting; then a late second call, which must warn.
_SCRIPT = """
import json, resource, sys, warnings
import bnjax
applied = bnjax.retain_freed_memory() if sys.argv[1] == "on" else None
assert bnjax.allocator.retained() is (applied is True)
import jax, jax.numpy as jnp
def loss(w, x):
    for k in w:
        x = jax.nn.relu(jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")))
    return jnp.mean(x ** 2)
keys = jax.random.split(jax.random.key(0), 4)
w = [jax.random.normal(keys[0], (5, 1, 32)) * 0.3] + [jax.random.normal(k, (5, 32, 32)) * 0.1 for k in keys[1:3]]
x = jax.random.normal(keys[3], (1000, 40, 1))
grad = jax.jit(jax.grad(loss))
for _ in range(5):
    jax.block_until_ready(grad(w, x))
faults = []
for _ in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(grad(w, x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bnjax.retain_freed_memory()
late = [str(w.message) for w in caught]
print(json.dumps({"applied": applied, "faults": sorted(faults)[len(faults) // 2], "late_warnings": late}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bad", [0, -1, 1 << 31, 1.5, True, "256"])
def test_bad_pad_bytes_is_named(bad):
    with pytest.raises(ValueError, match="pad_bytes"):
        bnjax.retain_freed_memory(bad)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere retain_freed_memory does nothing")
def test_removes_page_faults_and_warns_when_late():
    off, on = _run("off"), _run("on")
    assert on["applied"] is True
    # With glibc's defaults every call faults its working set in afresh (8,790 faults of 4 KiB here, fewer where
    # the kernel gives huge pages to every process); with the setting the freed memory is reused. Median over 12
    # calls: robust to the odd call that grows the heap.
    assert on["faults"] <= max(100, off["faults"] / 10), (on, off)
    assert any("before the first JAX" in m for m in on["late_warnings"]), on


def test_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert bnjax.retain_freed_memory() is False


@pytest.mark.parametrize("flag, calls", [([], 1), (["--default-malloc"], 0)])
def test_experiments_cli_retains_unless_told_not_to(monkeypatch, tmp_path, flag, calls):
    from experiments import cli

    seen = []
    monkeypatch.setattr(cli.allocator, "backend_started", lambda: False)  # as in a fresh process
    monkeypatch.setattr(cli.allocator, "retain_freed_memory", lambda: seen.append(True))
    blocker = tmp_path / "file"
    blocker.write_text("")  # --out below a file: the run stops with a user error before any work
    assert cli.main(["eos", "--quick", "--out", str(blocker / "run"), *flag]) == 2
    assert len(seen) == calls
