"""Keep freed memory in the process on Linux CPUs, so that XLA:CPU's buffers stop costing page faults.

XLA:CPU allocates the intermediate buffers of a compiled program with the C library's ``malloc`` and frees
them when the program ends. With glibc's defaults most of that memory goes back to the operating system at
once (the worker threads' arenas shrink, large blocks are unmapped), so the next call touches fresh pages: one
minor page fault per 4 KiB. On the BN conv net of ``experiments/bench_curvature.py`` (1000 examples) a
gradient takes ~12,500 page faults (about 50 MiB of fresh pages) and ~30 ms, a Hessian-vector product ~16,400
faults and ~43 ms. After :func:`retain_freed_memory` the same calls take (almost) no faults, ~17 ms and ~26 ms
(2 AMD EPYC cores, glibc 2.36, 2026-12-07, three processes); PyTorch in the same process gains too. An MLP
with small buffers barely changes.

It sets four ``mallopt`` parameters: one arena for all threads (``M_ARENA_MAX=1``: the main heap, which grows
and shrinks predictably, instead of per-thread heaps of at most 64 MiB), blocks up to 32 MiB from that heap
instead of their own mappings (``M_MMAP_THRESHOLD``), and freed memory kept at its top: up to ``pad_bytes``
always (``M_TOP_PAD``) and everything below 1 GiB (``M_TRIM_THRESHOLD``). The padding alone removed the faults
in one process of three; the four together in all three. The call must come **before JAX starts its CPU
backend** (before the first computation or ``jax.devices()``; importing ``jax`` and ``bnjax`` is fine): made
after it, the padding removed none of the faults (JAX's threads already hold their arenas), so a late call
warns. Costs: the process keeps memory it has freed (up to 1 GiB above ``pad_bytes``) instead of returning it,
memory it used before and not new memory (the CNN script above peaked at 630-690 MiB resident against
640-670 MiB without); and one arena serialises ``malloc`` between threads, which costs nothing measurable on 2
cores but is untested on many.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages for ``malloc``, glibc >= 2.35, set before
Python starts) has a similar effect by making each fault cover 2 MiB; the same four settings can also be given
there (``GLIBC_TUNABLES=glibc.malloc.arena_max=1:...``; the function's warning spells them out).

bnjax never calls this on import, because it changes the whole process. ``python -m experiments`` and
``experiments/bench_curvature.py`` call it first thing (``--default-malloc`` skips it) and record it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings

__all__ = ["DEFAULT_PAD_BYTES", "backend_started", "retain_freed_memory", "retained"]

DEFAULT_PAD_BYTES = 256 << 20  # 256 MiB: four times the smallest pad that stopped the CNN's faults
_M_TOP_PAD = -2  # glibc <malloc.h>; its value is retain_freed_memory's pad_bytes
# The fixed settings: (mallopt parameter from <malloc.h>, GLIBC_TUNABLES name, value).
_SETTINGS = ((-8, "arena_max", 1), (-3, "mmap_threshold", 32 << 20), (-1, "trim_threshold", 1 << 30))
_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for _, name, value in _SETTINGS)
_STATE = {"retained": False}


def backend_started() -> bool:
    """Whether JAX has started a backend in this process (after which the setting comes too late)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the module: assume the worst
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else bool(getattr(xla_bridge, "_backends", True))


def retain_freed_memory(pad_bytes: int = DEFAULT_PAD_BYTES) -> bool:
    """Have glibc's ``malloc`` serve XLA:CPU's buffers from one heap that keeps its freed memory.

    Call it at the start of the program, before JAX runs anything (see the module docstring for why and what
    it costs). Results do not change: only where buffers come from.

    Args:
      pad_bytes: positive int below 2 GiB: freed bytes the heap always keeps (``M_TOP_PAD``, default 256 MiB;
        as the only setting, 16 MiB left the CNN's faults and 64 MiB removed them in the process tried).

    Returns:
      ``True`` when glibc accepted every setting (Linux with glibc); ``False`` elsewhere, where nothing is
      done.

    Warns:
      ``RuntimeWarning`` when JAX's backend has already started: the threads that allocate XLA's buffers
      then keep their old setting, so the call is made but may have no effect.
    """
    if isinstance(pad_bytes, bool) or not isinstance(pad_bytes, int) or not 0 < pad_bytes < 1 << 31:
        raise ValueError(
            f"`pad_bytes` must be a Python int in [1, 2**31) (bytes; mallopt takes a C int); got {pad_bytes!r}."
        )
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if backend_started():
        warnings.warn(
            "retain_freed_memory() was called after JAX started its backend: XLA's worker threads keep the "
            "allocator setting they started with, so page faults may remain. Call it before the first JAX "
            f"computation, or start Python with GLIBC_TUNABLES={_TUNABLES}:glibc.malloc.top_pad=<bytes>.",
            RuntimeWarning,
            stacklevel=2,
        )
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = [(param, value) for param, _, value in _SETTINGS] + [(_M_TOP_PAD, pad_bytes)]
    ok = all([bool(libc.mallopt(param, value)) for param, value in settings])  # a list: every call is made
    _STATE["retained"] = _STATE["retained"] or ok
    return ok


def retained() -> bool:
    """Whether :func:`retain_freed_memory` has made its settings in this process (recorded by the experiments)."""
    return _STATE["retained"]
