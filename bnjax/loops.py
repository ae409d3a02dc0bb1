"""Loop placement: run an algorithm's outer loop inside one compiled program, or drive it from Python.

Every iterative algorithm in bnjax (the eigen-solvers, trace and density estimators, the edge-of-stability
tracker, the experiments' training loops) is written once against a :class:`Driver`, which supplies the only
two things that differ between placements:

* ``"device"``: the loop is a ``lax.while_loop`` / ``lax.fori_loop`` / ``lax.scan`` inside one ``jax.jit``
  program: no host round trip per iteration. Best wherever loop bodies compile as well as straight-line code
  (GPU, TPU, and CPU programs without convolutions).
* ``"host"``: the loop runs in Python and every piece of work is one call of a jitted function (each
  Hessian-vector product or training step one call; the solver's bookkeeping a second, small one). One
  device-to-host transfer of a flag per iteration. Best on XLA:CPU for convolutional models, whose *backward*
  convolutions run 15-20x slower inside any loop body (jax-ml/jax#12868).
* ``"auto"`` (the default everywhere): ``"host"`` when the default backend is CPU and the work done per
  iteration contains a convolution (``conv_general_dilated`` anywhere in its jaxpr), else ``"device"``.
  ``experiments/bench_curvature.py`` measures both placements on a BN conv net and an MLP to check this rule.
  Inside a trace (``jax.jit``, ``vmap``, ``grad`` of a solver) only ``"device"`` is possible and ``"auto"``
  picks it; an explicit ``"host"`` there is an error.

Both placements run the same jitted pieces on the same values, so their results agree to rounding (tests
compare them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

Placement = Literal["auto", "device", "host"]
PLACEMENTS = ("auto", "device", "host")
PyTree = Any


def check_placement(placement: Any) -> str:
    """``placement`` itself if it is one of :data:`PLACEMENTS`, else a ValueError naming it."""
    if placement not in PLACEMENTS:
        raise ValueError(f"`placement` must be one of {PLACEMENTS}; got {placement!r}.")
    return placement


def is_traced(*args: Any) -> bool:
    """Whether any leaf of ``args`` is a tracer (we are inside ``jit``, ``vmap``, ``grad``, ...)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def has_convolution(jaxpr: Any) -> bool:
    """Whether a (raw) jaxpr contains ``conv_general_dilated``, also inside sub-jaxprs (loops, conds, calls)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr) and has_convolution(sub.jaxpr):
                    return True
                if isinstance(sub, jex_core.Jaxpr) and has_convolution(sub):
                    return True
    return False


def avals(args: tuple) -> tuple:
    """A hashable key of the tree structure, shapes and dtypes of ``args`` (for caches keyed on shapes)."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves)


@functools.lru_cache(maxsize=256)
def _uses_convolution_cached(fn: Callable[..., Any], avals: tuple) -> bool:
    treedef, shapes = avals
    structs = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return has_convolution(jax.make_jaxpr(fn)(*jax.tree.unflatten(treedef, structs)).jaxpr)


def uses_convolution(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` (traced abstractly, nothing runs) contains a convolution, its own or in any
    sub-computation (derivatives included). Cached per ``fn`` and argument shapes."""
    try:
        return _uses_convolution_cached(fn, avals(args))
    except TypeError:  # an unhashable fn: trace without the cache
        return has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def resolve_placement(
    placement: Placement, fn: Callable[..., Any] | None = None, *args: Any
) -> Literal["device", "host"]:
    """Turn ``"auto"`` into ``"device"`` or ``"host"`` for the work ``fn(*args)`` done once per iteration.

    Rule: inside a trace, ``"device"`` (``"host"`` is then an error); otherwise ``"auto"`` is ``"host"`` when
    the default backend is CPU and ``fn(*args)`` contains a convolution, else ``"device"``.
    """
    check_placement(placement)
    if is_traced(*args):
        if placement == "host":
            raise ValueError(
                "placement='host' drives the loop from Python and cannot run inside jax.jit, vmap or grad "
                "(its arguments are tracers here). Call it outside the transformation, or use "
                "placement='device' (or 'auto', which picks it under a trace)."
            )
        return "device"
    if placement != "auto":
        return placement
    if jax.default_backend() != "cpu" or fn is None:
        return "device"
    return "host" if uses_convolution(fn, *args) else "device"


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# One jit for every static piece of work: ``fn`` is a static argument, so each distinct (hashable) ``fn``
# compiles once per argument shapes and is reused across solves, checkpoints and training segments.
_jit_call = jax.jit(_call, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Driver:
    """Runs an algorithm's pieces and loops with a fixed placement (``"device"`` or ``"host"``).

    Algorithms pass their work to :meth:`call` as *static* callables (hashable, compared by value: module
    functions or frozen dataclasses), so under ``"host"`` each piece is compiled once and reused; under
    ``"device"`` the whole algorithm runs inside the caller's ``jax.jit`` and :meth:`call` just calls.
    """

    placement: Literal["device", "host"]

    def __post_init__(self) -> None:
        if self.placement not in ("device", "host"):
            raise ValueError(f"A Driver runs 'device' or 'host' loops; got {self.placement!r}.")

    @property
    def on_host(self) -> bool:
        return self.placement == "host"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``: inline under ``"device"``, one jitted call under ``"host"``."""
        return _jit_call(fn, *args) if self.on_host else fn(*args)

    def run(self, algorithm: Callable[..., Any], *args: Any) -> Any:
        """A whole algorithm ``algorithm(*args)`` (static, written against this driver): one compiled program
        under ``"device"`` (inlined into an enclosing ``jit``), plain Python under ``"host"``."""
        return algorithm(*args) if self.on_host else _jit_call(algorithm, *args)

    def iterate(
        self, absorb: Callable[[Any, Any], Any], product: Callable[[Any, Any], Any], state: Any, operands: Any
    ) -> Any:
        """``while not state.done: state = absorb(state, product(operands, state.query))``.

        The loop of every matvec-driven solver: ``product`` is the operator (one Hessian-vector product),
        ``absorb`` the solver's bookkeeping; ``state`` is a NamedTuple with fields ``done`` (bool[]) and
        ``query`` (the next vector to multiply).
        """
        if not (hasattr(state, "done") and hasattr(state, "query")):
            raise TypeError(
                f"Driver.iterate: `state` must be a NamedTuple with fields `done` and `query`; got "
                f"{type(state).__name__}."
            )
        if not self.on_host:
            return lax.while_loop(lambda s: ~s.done, lambda s: absorb(s, product(operands, s.query)), state)
        while not bool(state.done):
            state = _jit_call(absorb, state, _jit_call(product, operands, state.query))
        return state

    def fori_loop(self, num: int, body: Callable[[int, Any], Any], carry: Any) -> Any:
        """``for i in range(num): carry = body(i, carry)``; ``body`` may itself use this driver (nested loops).

        Under ``"host"`` ``body`` runs in Python with a Python ``int`` index (it must do its array work through
        :meth:`call`); under ``"device"`` it is a ``lax.fori_loop`` body with a traced index.
        """
        if not self.on_host:
            return lax.fori_loop(0, num, body, carry)
        for i in range(num):
            carry = body(i, carry)
        return carry

    def scan(self, step: Callable[..., tuple[Any, Any]], carry: Any, length: int, *operands: Any) -> tuple[Any, Any]:
        """``length`` applications of ``step(carry, *operands) -> (carry, out)``; outputs stacked on a new
        leading axis.

        Under ``"host"`` each step is one jitted call (``step`` must be static); the outputs stay on the
        device until stacked.
        """
        if not self.on_host:
            return lax.scan(lambda c, _: step(c, *operands), carry, None, length=length)
        outs = []
        for i in range(length):
            new_carry, out = _jit_call(step, carry, *operands)
            if i == 0:  # lax.scan refuses a step that changes its carry; so does this loop, on the first step
                _check_same_carry(carry, new_carry)
            carry = new_carry
            outs.append(out)
        return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _carry_types(carry: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(carry)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def _check_same_carry(carry: Any, new_carry: Any) -> None:
    before, after = _carry_types(carry), _carry_types(new_carry)
    if before != after:
        raise TypeError(
            "scan: `step` must return a carry with the structure, shapes and dtypes of its input carry (as "
            f"lax.scan requires), so that both placements run it; got {after} from {before}."
        )


def driver_for(placement: Placement, fn: Callable[..., Any] | None = None, *args: Any) -> Driver:
    """The :class:`Driver` for ``placement`` (``"auto"`` resolved by :func:`resolve_placement`)."""
    return Driver(resolve_placement(placement, fn, *args))


@dataclasses.dataclass(frozen=True)
class _DeviceScan:
    step: Callable[..., tuple[Any, Any]]
    length: int

    def __call__(self, carry: Any, *operands: Any) -> tuple[Any, Any]:
        return Driver("device").scan(self.step, carry, self.length, *operands)


def scan_steps(
    step: Callable[..., tuple[Any, Any]], carry: Any, length: int, *operands: Any, placement: Placement = "auto"
) -> tuple[Any, Any]:
    """``length`` steps ``carry, out = step(carry, *operands)``, outputs stacked: a training loop with a placement.

    ``"device"``: one jitted ``lax.scan`` (one host round trip for all ``length`` steps); ``"host"``: one jitted
    call per step; ``"auto"``: host on CPU when ``step`` contains a convolution (see :func:`resolve_placement`).
    ``step`` is static (hashed by identity): build it once and reuse it, so that both placements compile once.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"`length` (the number of steps) must be a positive int; got {length!r}.")
    driver = driver_for(placement, step, carry, *operands)
    if driver.on_host:
        return driver.scan(step, carry, length, *operands)
    return _jit_call(_DeviceScan(step, length), carry, *operands)
