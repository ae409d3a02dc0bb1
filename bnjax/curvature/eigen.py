"""Eigen-solvers for symmetric operators given as matvecs: power iteration, deflation, spectral shift, Lanczos.

Every solver takes a matvec ``matvec(vector, *params) -> vector`` (see :mod:`bnjax.curvature.hvp`) on pytree
vectors, a start vector ``v0`` (a pytree like the vectors; it need not be normalized but must be nonzero and
finite) and the matvec's ``*params``. Internally vectors are flattened to one 1-D array of size ``n`` (the
parameter count); eigenvectors come back as pytrees. ``matvec`` is static (hashed by identity), so build it
once (e.g. ``mv = hessian_matvec(loss_fn)``) and reuse it to hit the compilation caches.

Two choices shared by every solver (one implementation each; only the loop driver differs):

* ``placement``: ``"device"`` runs the whole solve as one compiled program (a ``lax.while_loop``);
  ``"host"`` drives the loop from Python, one jitted call per matvec plus one small jitted bookkeeping call;
  ``"auto"`` (default) picks ``"host"`` on CPU when the matvec contains a convolution, where XLA:CPU runs
  backward convolutions 15-20x slower inside loop bodies (see :mod:`bnjax.loops`). Results agree between
  placements to rounding.
* ``linearize_budget`` (bytes, default :data:`DEFAULT_LINEARIZE_BUDGET` = 1 GiB): the operator is linearized
  once per solve, ``jax.linearize(lambda v: matvec(v, *params), v0)``, when the residuals that linearization
  stores fit in the budget (:func:`linearization_bytes` says how many; for a Hessian they are the forward and
  backward activations of the whole data set, about what one gradient computation holds at its peak). Each
  further product then runs only the tangent pass (about 1.5 gradients instead of 2 for a Hessian-vector
  product). Over the budget, or with ``0``, every product is recomputed from scratch; ``None`` means no limit.

Lanczos and its basis. The Lanczos solvers keep the Krylov basis *semi-orthogonal* (every ``|q_i . q_k| <=
sqrt(eps)``), which is what makes the tridiagonal matrix's eigenvalues accurate to working precision with no
spurious copies (Simon 1984; full orthogonality buys nothing more). They get it by partial reorthogonalization:
Simon's recurrence estimates the loss of orthogonality of each new vector from the Lanczos coefficients in
``O(m)`` work, and only a step whose estimate exceeds ``sqrt(eps)`` (and the step after it) is
reorthogonalized against the rows computed so far. Orthogonality is lost only along converged Ritz vectors, so
a solve that stops when its top pair converges (``lanczos_top``, the tracker) rarely pays for it; full
reorthogonalization at every step would read the whole basis twice per product, a visible part of a product's
cost for models whose gradient is cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from bnjax import loops
from bnjax._validate import check_float_tree, check_key, check_positive_int
from bnjax.curvature.hvp import Matvec

PyTree = Any


DEFAULT_LINEARIZE_BUDGET = 2**30  # bytes of stored residuals up to which operators are linearized once per solve


class EigenResult(NamedTuple):
    """Result of an eigen-solve (a NamedTuple, hence a pytree that passes through ``jit``).

    For a single eigenpair the fields are scalars and one pytree; for ``k`` pairs they gain a leading axis
    ``k`` (the eigenvector pytree's leaves get shape ``(k, *leaf_shape)``).
    """

    eigenvalue: jax.Array  # () or (k,), dtype of the vectors
    eigenvector: PyTree  # like v0, unit 2-norm; leaves (k, ...) for k pairs
    iterations: jax.Array  # () or (k,) int32: matvecs (HVPs) used
    residual: jax.Array  # () or (k,): ||A v - lambda v|| / |lambda|
    converged: jax.Array  # () or (k,) bool: the stopping rule held and the values are finite; read it before
    # trusting `eigenvalue` (a zero or non-finite start under jit, or max_iters reached, gives False)


# -- flat vectors and the operator ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a pytree vector maps to one flat 1-D array; static and hashable (``ravel_pytree``'s unravel is a
    fresh closure per call, which would defeat the compilation caches of the host loop driver)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    dtype: str

    @staticmethod
    def of(tree: PyTree, name: str = "v0") -> _Layout:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
        if not leaves or sum(math.prod(s) for s in shapes) == 0:
            raise ValueError(f"`{name}` must be a nonempty pytree of arrays (a vector like the parameters).")
        dtypes = tuple(str(jnp.result_type(x)) for x in leaves)
        if any(d not in ("float32", "float64") for d in dtypes):
            raise TypeError(
                f"`{name}` must have float32 or float64 leaves; got dtypes {sorted(set(dtypes))}. The solvers and "
                "estimators work in the vectors' dtype: bfloat16/float16 cannot resolve their tolerances and "
                "complex vectors are not supported. Cast the parameters and the vector, e.g. "
                "`jax.tree.map(lambda x: x.astype(jnp.float32), params)`."
            )
        return _Layout(treedef, shapes, dtypes, str(jnp.result_type(*dtypes)))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def ravel(self, tree: PyTree) -> jax.Array:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
        if treedef != self.treedef or shapes != self.shapes:
            size = sum(math.prod(s) for s in shapes)
            raise ValueError(
                f"`matvec` returned a vector with structure {treedef} and leaf shapes {list(shapes)} ({size} "
                f"entries) for an input with structure {self.treedef} and leaf shapes {list(self.shapes)}; it "
                "must map a pytree like `v0` to a pytree like `v0`. Check that `v0` is shaped like the parameters."
            )
        wrong = [str(jnp.result_type(x)) for x in leaves if not jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        if wrong and jnp.issubdtype(self.dtype, jnp.floating):
            raise TypeError(
                f"`matvec` returned leaves of dtype {sorted(set(wrong))} for a {self.dtype} vector; it must return "
                "real floats (an integer product would be truncated)."
            )
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def unravel(self, flat: jax.Array) -> PyTree:
        parts, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            size = math.prod(shape)
            parts.append(flat[start : start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree.unflatten(self.treedef, parts)


@dataclasses.dataclass(frozen=True)
class _Operator:
    """``x -> A x`` on flat vectors. ``operands`` are the matvec's ``params``, or (``linearized``) the linear
    map that ``jax.linearize`` returned for them."""

    matvec: Matvec
    layout: _Layout
    linearized: bool

    def __call__(self, operands: Any, x: jax.Array) -> jax.Array:
        v = self.layout.unravel(x)
        out = operands(v) if self.linearized else self.matvec(v, *operands)
        return self.layout.ravel(out).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """Once per parameter point: ``(operands, A x or None)``. Linearizing evaluates ``A x`` on the way, so the
    first product comes free; without linearization nothing is computed here."""

    op: _Operator

    def __call__(self, x: jax.Array, params: tuple) -> tuple[Any, jax.Array | None]:
        if not self.op.linearized:
            return params, None
        w, lin = jax.linearize(lambda v: self.op.matvec(v, *params), self.op.layout.unravel(x))
        return lin, self.op.layout.ravel(w).astype(x.dtype)


@functools.lru_cache(maxsize=256)
def _linearization_bytes(matvec: Matvec, avals: tuple) -> int:
    treedef, shapes = avals
    vector, *params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    return tree_bytes(jax.eval_shape(lambda v, p: jax.linearize(lambda u: matvec(u, *p), v)[1], vector, tuple(params)))


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of the array leaves (or ``ShapeDtypeStruct`` leaves) of ``tree``."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def linearization_bytes(matvec: Matvec, vector: PyTree, *params: Any) -> int:
    """Bytes that ``jax.linearize(lambda v: matvec(v, *params), vector)`` stores (its residuals, per device).

    This is the memory a solver holds for the whole solve when it linearizes the operator (see
    ``linearize_budget``). For a Hessian of a loss over ``N`` examples it is about the forward and backward
    activations of all ``N`` examples, plus the parameters. Nothing runs: shapes only.
    """
    try:
        return _linearization_bytes(matvec, loops.avals((vector, *params)))
    except TypeError:  # unhashable matvec
        return _linearization_bytes.__wrapped__(matvec, loops.avals((vector, *params)))


def check_linearize_budget(budget: Any) -> int | None:
    """``budget`` if it is ``None`` or a non-negative int (bytes), else a ValueError naming it."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
        raise ValueError(
            f"`linearize_budget` must be a number of bytes >= 0 (0 disables linearization) or None (no limit); "
            f"got {budget!r}."
        )
    return None if budget is None else int(budget)


def _linearizes(matvec: Matvec, v0: PyTree, params: tuple, budget: int | None) -> bool:
    budget = check_linearize_budget(budget)
    if budget == 0:
        return False
    return budget is None or linearization_bytes(matvec, v0, *params) <= budget


def _check_start(x0: jax.Array, name: str = "v0") -> None:
    """A concrete start vector must be finite and nonzero (under ``jit`` the result's ``converged`` says it)."""
    if loops.is_traced(x0):
        return
    flat = np.asarray(x0)
    if not np.all(np.isfinite(flat)):
        bad = int(np.sum(~np.isfinite(flat)))
        raise ValueError(f"`{name}` has {bad} non-finite entries; start from a finite vector.")
    if not np.any(flat):
        raise ValueError(
            f"`{name}` is the zero vector, which spans no Krylov space; start from a random vector, e.g. "
            "`random_like(jax.random.key(0), params)`."
        )


def _check_scalar_shape(value: Any, name: str) -> None:
    """A solver's scalar argument must be a real number or a scalar array (it may be traced)."""
    dtype = getattr(value, "dtype", None)
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if dtype is not None:
        real = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    if not real or np.ndim(value) != 0:
        shown = f"an array of shape {np.shape(value)} and dtype {dtype}" if dtype is not None else repr(value)
        raise TypeError(f"`{name}` must be a real scalar (a number or a 0-d array); got {shown}.")


def _check_tolerance(value: Any, name: str) -> None:
    _check_scalar_shape(value, name)
    if loops.is_traced(value):
        return
    if not np.all(np.asarray(value, dtype=np.float64) >= 0):  # also rejects NaN
        raise ValueError(f"`{name}` must be >= 0 (a relative tolerance); got {value!r}.")


def _check_eigenvalue0(value: Any) -> Any:
    """``eigenvalue0`` as given, ``inf`` (no warm start) for None; a real scalar, not NaN."""
    if value is None:
        return jnp.inf
    _check_scalar_shape(value, "eigenvalue0")
    if not loops.is_traced(value) and np.isnan(np.asarray(value, np.float64)):
        raise ValueError("`eigenvalue0` is NaN; pass the previous estimate, or inf (or None) for no warm start.")
    return value


def _driver_and_operator(
    matvec: Matvec,
    like: PyTree,
    params: tuple,
    placement: loops.Placement,
    linearize_budget: int | None,
    name: str = "v0",
) -> tuple[loops.Driver, _Operator]:
    """The loop driver and the flat operator for vectors shaped like ``like`` (placement and linearization
    resolved here, once per call)."""
    layout = _Layout.of(like, name)
    driver = loops.driver_for(placement, matvec, like, *params)
    return driver, _Operator(matvec, layout, _linearizes(matvec, like, params, linearize_budget))


def _setup(
    matvec: Matvec, v0: PyTree, params: tuple, placement: loops.Placement, linearize_budget: int | None
) -> tuple[loops.Driver, _Operator, jax.Array]:
    driver, op = _driver_and_operator(matvec, v0, params, placement, linearize_budget)
    x0 = op.layout.ravel(v0)
    _check_start(x0)
    return driver, op, _rescaled(x0)


def _rescaled(x: jax.Array) -> jax.Array:
    """``x`` divided by its largest magnitude when that is outside ``[2**-30, 2**30]`` (else ``x`` itself, bit for
    bit), so that its 2-norm neither underflows nor overflows (a raw gradient of 1e-22 is a valid start)."""
    peak = jnp.max(jnp.abs(x))
    fix = (peak > 0) & jnp.isfinite(peak) & ((peak < 2.0**-30) | (peak > 2.0**30))
    return x / jnp.where(fix, peak, 1).astype(x.dtype)


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    return a / jnp.where(b == 0, 1, b)


def _unit(x: jax.Array) -> jax.Array:
    return _safe_div(x, jnp.linalg.norm(x))


def _project_out(basis: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` minus its projection on the rows of ``basis`` (orthonormal or zero rows), done twice for stability.

    Written ``(basis @ x) @ basis``, not ``basis.T @ (basis @ x)``: XLA:CPU materializes the transpose."""
    x = x - (basis @ x) @ basis
    return x - (basis @ x) @ basis


_REORTH_BLOCK = 8  # basis rows per block of the reorthogonalization (one BLAS-2 pass over b x n per block)


def _reorthogonalize(basis: jax.Array, live: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` minus its projection on rows ``0..live`` of ``basis`` (orthonormal rows), for full
    reorthogonalization in Lanczos at a cost proportional to the live rows, not to the basis size.

    Block-wise Gram-Schmidt over blocks of :data:`_REORTH_BLOCK` rows (a loop over the live blocks only; the last
    block may overlap earlier rows or reach zero rows, both harmless), and a second pass only when the first
    removed most of ``x`` (the Daniel-Gragg-Kaufman-Stewart criterion ``||x_after|| < ||x_before|| / sqrt(2)``:
    otherwise one pass leaves ``x`` orthogonal to working precision). After the three-term recurrence the
    components removed here are rounding errors, so the second pass is rare.
    """
    m = basis.shape[0]
    b = min(_REORTH_BLOCK, m)

    def one_pass(x: jax.Array) -> jax.Array:
        def block(k: jax.Array, x: jax.Array) -> jax.Array:
            rows = lax.dynamic_slice_in_dim(basis, jnp.minimum(k * b, m - b), b)
            return x - (rows @ x) @ rows  # not rows.T @ (...): see _project_out

        return lax.fori_loop(0, (live + b) // b, block, x)

    before = jnp.linalg.norm(x)
    x = one_pass(x)
    return lax.cond(jnp.linalg.norm(x) < before * np.sqrt(0.5), one_pass, lambda x: x, x)


def _converged(
    change: jax.Array, res: jax.Array, tol: jax.Array, residual_tol: jax.Array, value: jax.Array
) -> jax.Array:
    return (change <= tol) & (res <= residual_tol) & jnp.isfinite(value)


# -- power iteration: one bookkeeping step per matvec ---------------------------------------------------------


class _PowerState(NamedTuple):
    i: jax.Array  # int32[]: matvecs absorbed
    x: jax.Array  # (n,) unit vector whose Rayleigh quotient is `lam`
    lam: jax.Array  # () Rayleigh quotient of x (before the first product: the warm-start eigenvalue)
    res: jax.Array  # () ||A x - lam x|| / |lam|
    change: jax.Array  # () |lam - previous lam| / |lam|
    query: jax.Array  # (n,) the next vector to multiply: A x / ||A x|| (projected); the free next iterate
    done: jax.Array  # bool[]
    tol: jax.Array  # () relative-change tolerance
    residual_tol: jax.Array  # () relative-residual tolerance
    max_iters: jax.Array  # int32[]
    shift: jax.Array  # () the iteration runs on A - shift I
    basis: jax.Array  # (k, n) orthonormal or zero rows projected out of every iterate (deflation)


def _power_init(
    x0: jax.Array, eigenvalue0: Any, tol: Any, residual_tol: Any, max_iters: Any, shift: Any, basis: jax.Array
) -> _PowerState:
    dtype = x0.dtype
    q = _unit(_project_out(basis, x0))
    inf = jnp.asarray(jnp.inf, dtype)
    scalar = functools.partial(jnp.asarray, dtype=dtype)
    return _PowerState(
        jnp.int32(0), q, scalar(eigenvalue0), inf, inf, q, jnp.asarray(False),
        scalar(tol), scalar(residual_tol), jnp.asarray(max_iters, jnp.int32), scalar(shift), basis,
    )  # fmt: skip


def _power_absorb(s: _PowerState, w: jax.Array) -> _PowerState:
    """Absorb ``w = A @ s.query``: Rayleigh quotient, residual, stopping rule, next iterate."""
    q = s.query
    w = _project_out(s.basis, w - s.shift * q)
    lam = jnp.vdot(q, w)
    inf = jnp.asarray(jnp.inf, q.dtype)
    res = jnp.where(lam == 0, inf, _safe_div(jnp.linalg.norm(w - lam * q), jnp.abs(lam)))
    change = jnp.where(jnp.isfinite(s.lam), _safe_div(jnp.abs(lam - s.lam), jnp.abs(lam)), inf)
    i = s.i + 1
    done = (i >= s.max_iters) | _converged(change, res, s.tol, s.residual_tol, lam) | ~jnp.isfinite(lam)
    nxt = _project_out(s.basis, _unit(w))
    return s._replace(i=i, x=q, lam=lam, res=res, change=change, query=nxt, done=done)


def _iterate_from(
    d: loops.Driver,
    absorb: Callable[[Any, jax.Array], Any],
    op: _Operator,
    operands: Any,
    state: Any,
    first: jax.Array | None,
) -> Any:
    """Run a matvec-driven loop from ``state``; ``first`` (if given) is ``A @ state.query``, computed elsewhere
    (e.g. by the linearization), so the first step does not multiply again."""
    w = d.call(op, operands, state.query) if first is None else first
    return d.iterate(absorb, op, d.call(absorb, state, w), operands)


def _power_solve(
    d: loops.Driver, op: _Operator, operands: Any, state: _PowerState, first: jax.Array | None = None
) -> _PowerState:
    """Run power iteration from ``state``."""
    return _iterate_from(d, _power_absorb, op, operands, state, first)


def _power_converged(s: _PowerState) -> jax.Array:
    return _converged(s.change, s.res, s.tol, s.residual_tol, s.lam)


# -- Lanczos: one bookkeeping step per matvec -----------------------------------------------------------------


class LanczosDecomposition(NamedTuple):
    """``m`` steps of Lanczos: ``Q A Q^T = T`` with ``T = tridiag(betas[:-1], alphas, betas[:-1])``."""

    alphas: jax.Array  # (m,) diagonal of T
    betas: jax.Array  # (m,) off-diagonal of T; betas[-1] is the norm of the next residual (Ritz error bound)
    basis: jax.Array  # (m, n) unit rows, orthogonal to |q_i . q_k| <= sqrt(eps): the flattened Krylov basis,
    # basis[0] = v0 / ||v0|| (see the module docstring, "Lanczos and its basis")


class _LanczosState(NamedTuple):
    j: jax.Array  # int32[]: steps (matvecs) absorbed
    basis: jax.Array  # (m, n) Krylov basis; rows > j are zero
    alphas: jax.Array  # (m,)
    betas: jax.Array  # (m,)
    theta: jax.Array  # () top Ritz value (before the first step: the warm-start eigenvalue)
    res: jax.Array  # () Ritz residual of the top pair, relative
    change: jax.Array  # () relative change of theta in the last step
    query: jax.Array  # (n,) basis[j], the next vector to multiply
    done: jax.Array  # bool[]
    tol: jax.Array  # ()
    residual_tol: jax.Array  # ()
    omega: jax.Array  # (m,) estimated q_j . q_k of the query basis[j] against every row (Simon's recurrence)
    omega_prev: jax.Array  # (m,) the same for basis[j-1]
    reorth_next: jax.Array  # bool[]: reorthogonalize at the next step too (Simon: always two in a row)
    reorths: jax.Array  # int32[]: steps that reorthogonalized (for tests and diagnostics)


@dataclasses.dataclass(frozen=True)
class _LanczosInit:
    num_iters: int  # m: rows of the basis

    def __call__(self, x0: jax.Array, eigenvalue0: Any, tol: Any, residual_tol: Any) -> _LanczosState:
        m, dtype = self.num_iters, x0.dtype
        basis = jnp.zeros((m, x0.size), dtype).at[0].set(_unit(x0))
        zeros, inf = jnp.zeros(m, dtype), jnp.asarray(jnp.inf, dtype)
        scalar = functools.partial(jnp.asarray, dtype=dtype)
        return _LanczosState(
            jnp.int32(0), basis, zeros, zeros, scalar(eigenvalue0), inf, inf, basis[0], jnp.asarray(False),
            scalar(tol), scalar(residual_tol), zeros.at[0].set(1), zeros, jnp.asarray(False), jnp.int32(0),
        )  # fmt: skip


def _ritz(j: jax.Array, alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigen-decomposition (ascending) of the leading ``(j+1) x (j+1)`` block of ``T``, padded to ``(m, m)``: the
    padding rows are decoupled and set below the top Ritz value of the block (which is ``>= max(alphas[:j+1])``),
    so ``[-1]`` is the top Ritz pair; ``theta[-2]`` (``j >= 1``) is the second Ritz value or a padding value
    above it."""
    m = alphas.shape[0]
    live = jnp.arange(m) <= j
    floor = jnp.min(jnp.where(live, alphas, jnp.inf))
    diag = jnp.where(live, alphas, floor - 1 - jnp.abs(floor))
    off = jnp.where(jnp.arange(m - 1) < j, betas[:-1], 0)
    return jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))


def _top_ritz(j: jax.Array, alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top eigenpair of the leading ``(j+1) x (j+1)`` block of ``T`` (see :func:`_ritz`)."""
    theta, s = _ritz(j, alphas, betas)
    return theta[-1], s[:, -1]


def _omega_next(s: _LanczosState, alpha: jax.Array, beta: jax.Array, n: int) -> jax.Array:
    """Estimated ``q_{j+1} . q_k`` for ``k < j`` (zero elsewhere) after the three-term step ``j`` (``alpha``,
    ``beta`` its new coefficients), by Simon's recurrence (H. D. Simon, "The Lanczos algorithm with partial
    reorthogonalization", Math. Comp. 42 (1984) 115-142), which follows the loss of orthogonality from the
    coefficients alone, in O(m) work instead of the O(m n) of measuring it:

        beta_j w_{j+1,k} = beta_k w_{j,k+1} + (alpha_k - alpha_j) w_{j,k} + beta_{k-1} w_{j,k-1} - beta_{j-1} w_{j-1,k}

    plus the rounding term, taken at its typical size ``0.3 eps (beta_k + beta_j)`` with the sign that makes
    ``|w|`` grow (a deterministic, slightly pessimistic form of Simon's random model).
    """
    m, j = s.alphas.shape[0], s.j
    k = jnp.arange(m)
    shift_up = jnp.concatenate([s.omega[1:], jnp.zeros(1, s.omega.dtype)])  # w_{j,k+1}
    shift_down = jnp.concatenate([jnp.zeros(1, s.omega.dtype), s.omega[:-1]])  # w_{j,k-1}
    betas_down = jnp.concatenate([jnp.zeros(1, s.betas.dtype), s.betas[:-1]])  # beta_{k-1}
    beta_prev = jnp.where(j > 0, s.betas[jnp.maximum(j - 1, 0)], 0)
    num = s.betas * shift_up + (s.alphas - alpha) * s.omega + betas_down * shift_down - beta_prev * s.omega_prev
    num = num + jnp.where(num < 0, -1, 1) * 0.3 * jnp.finfo(s.omega.dtype).eps * (s.betas + beta)
    return jnp.where(k < j, _safe_div(num, beta), 0)


@dataclasses.dataclass(frozen=True)
class _LanczosAbsorb:
    """Lanczos step ``j`` given ``w = A @ basis[j]``: fills ``alphas[j]``, ``betas[j]``, ``basis[j+1]``; with
    ``track_top`` also the top Ritz pair and the stopping rule (else it stops after ``m`` steps).

    ``gap_test``: the stopping rule also accepts a step whose *error estimate* ``res**2 |theta| / (theta -
    theta_2)`` (relative; ``theta_2`` the second Ritz value) is at most ``tol``, in place of the change test:
    for a Ritz pair with residual norm ``rho`` separated by ``delta`` from the rest of the spectrum the error is
    at most ``rho**2 / delta`` (Kato-Temple; Parlett, *The Symmetric Eigenvalue Problem*, 1998, Sec. 11.7),
    with the Ritz gap standing in for ``delta``. ``change`` then holds the smaller of the two.
    """

    track_top: bool
    gap_test: bool = False

    def __call__(self, s: _LanczosState, w: jax.Array) -> _LanczosState:
        m, n = s.basis.shape
        dtype, j = s.basis.dtype, s.j
        # The three-term recurrence (modified form: the previous direction out before alpha is taken) ...
        beta_prev = jnp.where(j > 0, s.betas[jnp.maximum(j - 1, 0)], 0)
        w = w - beta_prev * s.basis[jnp.maximum(j - 1, 0)]
        alpha = jnp.vdot(s.query, w)
        w = w - alpha * s.query
        # ... then partial reorthogonalization: only when the estimated loss of orthogonality of the new vector
        # exceeds sqrt(eps), and at the step after (see _omega_next and _reorthogonalize).
        beta = jnp.linalg.norm(w)
        omega = _omega_next(s, alpha, beta, n)
        reorth = s.reorth_next | (jnp.max(jnp.abs(omega)) > jnp.sqrt(jnp.finfo(dtype).eps))
        w = lax.cond(reorth, lambda x: _reorthogonalize(s.basis, j, x), lambda x: x, w)
        beta = jnp.where(reorth, jnp.linalg.norm(w), beta)
        scale = jnp.maximum(jnp.abs(alpha) + s.betas[jnp.maximum(j - 1, 0)], jnp.finfo(dtype).tiny)
        breakdown = beta <= 100 * jnp.finfo(dtype).eps * scale

        def fresh(_: None) -> jax.Array:
            # Invariant subspace found: continue with a fresh direction orthogonal to the basis (T splits into
            # blocks, every Ritz value stays an eigenvalue) instead of dividing by ~0.
            r = _project_out(s.basis, jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (n,), dtype))
            return r / jnp.linalg.norm(r)

        nxt = lax.cond(breakdown, fresh, lambda _: w / jnp.where(breakdown, 1, beta), None)
        beta = jnp.where(breakdown, 0, beta)
        # The last step only records beta (the residual norm); there is no row m to fill (row m-1 is rewritten).
        row = jnp.minimum(j + 1, m - 1)
        basis = s.basis.at[row].set(jnp.where(j + 1 < m, nxt, s.basis[row]))
        alphas, betas = s.alphas.at[j].set(alpha), s.betas.at[j].set(beta)
        done = (j + 1 >= m) | ~jnp.isfinite(alpha)
        theta, res, change = s.theta, s.res, s.change
        if self.track_top:
            inf = jnp.asarray(jnp.inf, dtype)
            thetas, vecs = _ritz(j, alphas, betas)
            theta, vec = thetas[-1], vecs[:, -1]
            res = jnp.where(theta == 0, inf, _safe_div(jnp.abs(betas[j] * vec[j]), jnp.abs(theta)))
            change = jnp.where(jnp.isfinite(s.theta), _safe_div(jnp.abs(theta - s.theta), jnp.abs(theta)), inf)
            # An invariant Krylov subspace (beta = 0, e.g. the basis is complete) makes the Ritz values exact.
            change = jnp.where(breakdown & jnp.isfinite(theta), 0, change)
            if self.gap_test:
                gap = theta - thetas[-2]
                estimate = jnp.where((j >= 1) & (gap > 0), _safe_div(res**2 * jnp.abs(theta), gap), inf)
                change = jnp.minimum(change, estimate)
            done = done | _converged(change, res, s.tol, s.residual_tol, theta)
        # After a reorthogonalization (or a fresh direction) the new vector is orthogonal to rounding level.
        eps = jnp.finfo(dtype).eps
        k = jnp.arange(m)
        omega = jnp.where(reorth | breakdown, jnp.where(k < j, 1.5 * eps, 0), omega)
        omega = jnp.where(k == j, eps * np.sqrt(n), omega)
        omega = jnp.where(k == j + 1, 1, omega)
        return _LanczosState(
            j + 1, basis, alphas, betas, theta, res, change, basis[row], done, s.tol, s.residual_tol, omega, s.omega,
            reorth & ~s.reorth_next, s.reorths + reorth.astype(jnp.int32),
        )  # fmt: skip


def _lanczos_solve(
    d: loops.Driver,
    op: _Operator,
    operands: Any,
    state: _LanczosState,
    track_top: bool,
    first: jax.Array | None = None,
    gap_test: bool = False,
) -> _LanczosState:
    return _iterate_from(d, _LanczosAbsorb(track_top, gap_test), op, operands, state, first)


def _lanczos_top_vector(s: _LanczosState) -> jax.Array:
    _, vec = _top_ritz(s.j - 1, s.alphas, s.betas)
    vector = vec @ s.basis  # padding components of vec are zero, and rows >= j of the basis are unused
    return _unit(vector)


def _lanczos_converged(s: _LanczosState) -> jax.Array:
    # A zero (or non-finite) start leaves basis[0] zero: the breakdown restart then finds true eigenpairs, but
    # the zero row adds a spurious Ritz value 0, so such a run never counts as converged.
    return _converged(s.change, s.res, s.tol, s.residual_tol, s.theta) & _started(s.basis)


def _started(basis: jax.Array) -> jax.Array:
    return jnp.linalg.norm(basis[0]) > 0


# -- the top eigenpair (power iteration or Lanczos), shared with the edge-of-stability tracker --------------


class _TopPair(NamedTuple):
    eigenvalue: jax.Array
    vector: jax.Array  # flat, unit
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    warm: jax.Array  # flat: the best start for the next solve (power: the free next iterate; Lanczos: vector)


def _top_pair_power(s: _PowerState) -> _TopPair:
    return _TopPair(s.lam, s.x, s.i, s.res, _power_converged(s), s.query)


def _top_pair_lanczos(s: _LanczosState) -> _TopPair:
    vector = _lanczos_top_vector(s)
    return _TopPair(s.theta, vector, s.j, s.res, _lanczos_converged(s), vector)


def _top_pair(
    d: loops.Driver,
    method: str,
    op: _Operator,
    x0: jax.Array,
    eigenvalue0: Any,
    tol: Any,
    residual_tol: Any,
    max_iters: int,
    *,
    params: tuple = (),
    operands: Any = None,
    first: jax.Array | None = None,
    gap_test: bool = False,
) -> _TopPair:
    """The top eigenpair from ``x0`` by ``method`` ("power": largest magnitude; "lanczos": largest).

    Either ``params`` (the operator is prepared here, at the unit start vector) or ``operands`` already prepared
    by the caller with optional ``first = A @ unit(x0)``. ``gap_test``: Lanczos only, see :class:`_LanczosAbsorb`.
    """
    if method == "lanczos":
        state = d.call(_LanczosInit(max_iters), x0, eigenvalue0, tol, residual_tol)
    else:
        empty = jnp.zeros((0, x0.size), x0.dtype)
        state = d.call(_power_init, x0, eigenvalue0, tol, residual_tol, max_iters, 0, empty)
    if operands is None:
        operands, first = d.call(_Prepare(op), state.query, params)
    if method == "lanczos":
        return d.call(_top_pair_lanczos, _lanczos_solve(d, op, operands, state, True, first, gap_test))
    return d.call(_top_pair_power, _power_solve(d, op, operands, state, first))


@dataclasses.dataclass(frozen=True)
class _TopSolve:
    """The whole solve of :func:`power_iteration` / :func:`lanczos_top` (static: the operator and placement)."""

    method: str
    op: _Operator
    driver: loops.Driver
    max_iters: int | None  # Lanczos: static basis size; power: None (max_iters is a dynamic argument)

    def __call__(self, x0, params, eigenvalue0, tol, residual_tol, max_iters) -> EigenResult:
        m = max_iters if self.max_iters is None else self.max_iters
        r = _top_pair(self.driver, self.method, self.op, x0, eigenvalue0, tol, residual_tol, m, params=params)
        return EigenResult(r.eigenvalue, self.op.layout.unravel(r.vector), r.iterations, r.residual, r.converged)


# -- block Lanczos for the top k pairs, one product per step (warm-started from a block) ---------------------


class _BlockState(NamedTuple):
    j: jax.Array  # int32[]: products absorbed (= columns of `coef` filled)
    basis: jax.Array  # (m + k, n) orthonormal rows: the k start vectors, then row k + i from A @ basis[i]
    coef: jax.Array  # (m + k, m): column i holds the coefficients of A @ basis[i] on the basis (rows <= k + i)
    values: jax.Array  # (k,) top Ritz values, descending (before the block is full: the warm-start values)
    res: jax.Array  # (k,) Ritz residuals ||A y - theta y|| / |theta|
    change: jax.Array  # (k,) relative change of each Ritz value in the last step
    query: jax.Array  # (n,) basis[j], the next vector to multiply
    done: jax.Array  # bool[]
    tol: jax.Array  # ()
    residual_tol: jax.Array  # ()


@dataclasses.dataclass(frozen=True)
class _BlockInit:
    """The start block (``(k, n)``, rows nonzero) orthonormalized by Gram-Schmidt, so that row 0 stays
    ``unit(x0[0])``: the vector the caller's fused first product multiplies."""

    num_iters: int  # m: the product budget (columns of `coef`)

    def __call__(self, x0: jax.Array, eigenvalues0: Any, tol: Any, residual_tol: Any) -> _BlockState:
        (k, n), m, dtype = x0.shape, self.num_iters, x0.dtype
        basis = jnp.zeros((m + k, n), dtype)
        for i in range(k):  # k is small and static
            basis = basis.at[i].set(_unit(_project_out(basis, x0[i])))
        inf = jnp.full(k, jnp.inf, dtype)
        scalar = functools.partial(jnp.asarray, dtype=dtype)
        return _BlockState(
            jnp.int32(0), basis, jnp.zeros((m + k, m), dtype), jnp.broadcast_to(scalar(eigenvalues0), (k,)), inf,
            inf, basis[0], jnp.asarray(False), scalar(tol), scalar(residual_tol),
        )  # fmt: skip


def _block_ritz(j: jax.Array, coef: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top ``k`` Ritz pairs (descending) of the leading ``(j+1) x (j+1)`` block of the projected matrix
    ``coef[:m, :m]`` (symmetrized), padded to ``(m, m)`` as in :func:`_top_ritz`; vectors as ``(m, k)``."""
    m = coef.shape[1]
    live = jnp.arange(m) <= j
    block = jnp.where(live[:, None] & live[None, :], 0.5 * (coef[:m] + coef[:m].T), 0)
    diag = jnp.diagonal(block)
    floor = jnp.min(jnp.where(live, diag, jnp.inf)) - jnp.sum(jnp.abs(block))
    block = block + jnp.diag(jnp.where(live, 0, floor - 1))
    theta, s = jnp.linalg.eigh(block)
    return theta[::-1][:k], s[:, ::-1][:, :k]


def _block_absorb(s: _BlockState, w: jax.Array) -> _BlockState:
    """Step ``j`` given ``w = A @ basis[j]``: the new basis row ``k + j``, the coefficients of ``w``, the top
    ``k`` Ritz pairs of the multiplied columns and the stopping rule (every pair: change <= tol and
    residual <= residual_tol, as for the single pair)."""
    (rows, n), m = s.basis.shape, s.coef.shape[1]
    k, dtype, j = rows - m, s.basis.dtype, s.j
    c = s.basis @ w  # exact coefficients on the rows so far (later rows are zero)
    w = _project_out(s.basis, w)
    beta = jnp.linalg.norm(w)
    breakdown = beta <= 100 * jnp.finfo(dtype).eps * jnp.maximum(jnp.linalg.norm(c), jnp.finfo(dtype).tiny)

    def fresh(_: None) -> jax.Array:
        # Invariant subspace found: continue with a fresh direction orthogonal to the basis (see Lanczos).
        r = _project_out(s.basis, jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (n,), dtype))
        return r / jnp.linalg.norm(r)

    nxt = lax.cond(breakdown, fresh, lambda _: w / jnp.where(breakdown, 1, beta), None)
    beta = jnp.where(breakdown, 0, beta)
    row = k + j
    last = j + 1 >= m  # the last step only records the coefficients; no further row is multiplied
    basis = s.basis.at[row].set(jnp.where(last, s.basis[row], nxt))
    coef = s.coef.at[:, j].set(c.at[row].set(beta))
    theta, vec = _block_ritz(j, coef, k)
    # A y - theta y in the orthonormal basis: coef @ s - theta [s; 0] (exact in exact arithmetic).
    padded = jnp.concatenate([vec, jnp.zeros((k, k), dtype)])
    inf = jnp.asarray(jnp.inf, dtype)
    res = jnp.where(
        theta == 0, inf, _safe_div(jnp.linalg.norm(coef @ vec - theta[None, :] * padded, axis=0), jnp.abs(theta))
    )
    change = jnp.where(jnp.isfinite(s.values), _safe_div(jnp.abs(theta - s.values), jnp.abs(theta)), inf)
    full = j + 1 >= k  # every pair has a Ritz value only once the whole start block has been multiplied
    theta, res, change = (
        jnp.where(full, new, old) for new, old in ((theta, s.values), (res, s.res), (change, s.change))
    )
    finite = jnp.all(jnp.isfinite(c))
    theta = jnp.where(finite, theta, jnp.nan)  # a non-finite product measures nothing (not the previous values)
    done = last | ~finite | (full & jnp.all(_converged(change, res, s.tol, s.residual_tol, theta)))
    return _BlockState(j + 1, basis, coef, theta, res, change, basis[jnp.minimum(j + 1, rows - 1)], done, s.tol,
                       s.residual_tol)  # fmt: skip


class _TopBlock(NamedTuple):
    """The top ``k`` pairs; its properties read like :class:`_TopPair`'s fields for the top pair."""

    eigenvalues: jax.Array  # (k,) descending
    vectors: jax.Array  # (k, n) unit Ritz vectors (the warm start of the next solve)
    iterations: jax.Array  # () products used
    residuals: jax.Array  # (k,)
    pairs_converged: jax.Array  # (k,) bool: each pair's stopping rule held

    @property
    def eigenvalue(self) -> jax.Array:
        return self.eigenvalues[0]

    @property
    def residual(self) -> jax.Array:
        return self.residuals[0]

    @property
    def converged(self) -> jax.Array:
        return jnp.all(self.pairs_converged)


def _top_block_result(s: _BlockState) -> _TopBlock:
    m = s.coef.shape[1]
    k = s.basis.shape[0] - m
    _, vec = _block_ritz(s.j - 1, s.coef, k)
    vectors = vec.T @ s.basis[:m]  # padding components of vec are zero, and rows >= j are unused
    vectors = _safe_div(vectors, jnp.linalg.norm(vectors, axis=1, keepdims=True))
    ok = _converged(s.change, s.res, s.tol, s.residual_tol, s.values) & (s.j >= k) & _started(s.basis)
    return _TopBlock(s.values, vectors, s.j, s.res, ok)


def _top_block(
    d: loops.Driver,
    op: _Operator,
    x0: jax.Array,
    eigenvalues0: Any,
    tol: Any,
    residual_tol: Any,
    max_iters: int,
    *,
    operands: Any,
    first: jax.Array | None = None,
) -> _TopBlock:
    """The top ``k = x0.shape[0]`` eigenpairs by block Lanczos from the block ``x0`` (``(k, n)``; e.g. the
    previous Ritz vectors), at most ``max_iters`` products; ``operands`` prepared by the caller with optional
    ``first = A @ unit(x0[0])``. Warm-started from converged vectors with ``eigenvalues0`` it stops after ``k``
    products."""
    state = d.call(_BlockInit(max_iters), x0, eigenvalues0, tol, residual_tol)
    return d.call(_top_block_result, _iterate_from(d, _block_absorb, op, operands, state, first))


# -- public solvers -----------------------------------------------------------------------------------------

_PLACEMENT_DOC = """placement: ``"auto"`` (default), ``"device"`` or ``"host"``: where the solver's loop runs (see
        the module docstring and :mod:`bnjax.loops`). Inside ``jax.jit`` only ``"device"`` is possible.
      linearize_budget: linearize the operator once when its stored residuals take at most this many bytes
        (:func:`linearization_bytes`); ``0`` never, ``None`` always."""


def power_iteration(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 100,
    eigenvalue0: float | jax.Array = jnp.inf,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> EigenResult:
    """Eigenvalue of largest *magnitude* (a large negative one can win) and its eigenvector.

    Iterates ``v <- A v / ||A v||`` with ``lambda = v . A v``; one matvec per iteration. Stops when both the
    relative change ``|lambda_i - lambda_{i-1}| / |lambda_i| <= tol`` and the relative residual
    ``||A v - lambda v|| / |lambda| <= residual_tol``, or after ``max_iters`` matvecs. For symmetric ``A`` the
    eigenvalue error is at most ``residual * |lambda|`` and about ``residual**2 * |lambda|**2 / gap``.

    Args:
      matvec: ``matvec(vector, *params) -> vector`` of a symmetric operator.
      v0: start vector (pytree like the vectors; a previous eigenvector for a warm start); nonzero and finite.
      *params: the matvec's parameters.
      tol: relative eigenvalue-change tolerance (``>= 0``).
      residual_tol: relative residual tolerance (``>= 0``).
      max_iters: maximum number of matvecs (positive int).
      eigenvalue0: previous eigenvalue estimate for a warm start: the first iteration's change is measured
        against it, so a converged warm start stops after one matvec. ``inf`` (default) or None means none.
      {placement}

    Returns:
      :class:`EigenResult` with scalar fields; ``eigenvector`` is the vector whose Rayleigh quotient and
      residual are reported; ``converged`` is False when ``max_iters`` ran out first.
    """
    _check_tolerance(tol, "tol")
    _check_tolerance(residual_tol, "residual_tol")
    max_iters = check_positive_int(max_iters, "max_iters")
    eigenvalue0 = _check_eigenvalue0(eigenvalue0)
    driver, op, x0 = _setup(matvec, v0, params, placement, linearize_budget)
    return driver.run(_TopSolve("power", op, driver, None), x0, params, eigenvalue0, tol, residual_tol, max_iters)


@dataclasses.dataclass(frozen=True)
class _PowerTopK:
    op: _Operator
    driver: loops.Driver
    k: int

    def __call__(self, starts, params, tol, residual_tol, max_iters) -> EigenResult:
        d, n, dtype = self.driver, starts.shape[1], starts.dtype
        operands, _ = d.call(_Prepare(self.op), starts[0], params)

        def solve_one(j: Any, carry: tuple) -> tuple:
            state = d.call(_power_init, starts[j], jnp.inf, tol, residual_tol, max_iters, 0, carry[0])
            return d.call(_store_pair, carry, j, _power_solve(d, self.op, operands, state))

        init = (
            jnp.zeros((self.k, n), dtype), jnp.zeros(self.k, dtype), jnp.zeros(self.k, jnp.int32),
            jnp.zeros(self.k, dtype), jnp.zeros(self.k, bool),
        )  # fmt: skip
        basis, lams, iters, ress, conv = d.fori_loop(self.k, solve_one, init)
        return EigenResult(lams, jax.vmap(self.op.layout.unravel)(basis), iters, ress, conv)


def _store_pair(carry: tuple, j: Any, s: _PowerState) -> tuple:
    basis, lams, iters, ress, conv = carry
    return (
        basis.at[j].set(s.x), lams.at[j].set(s.lam), iters.at[j].set(s.i), ress.at[j].set(s.res),
        conv.at[j].set(_power_converged(s)),
    )  # fmt: skip


def power_iteration_topk(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    k: int,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 100,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude by power iteration with deflation (orthogonalization).

    Eigenpair ``j`` is found by power iteration restricted to the orthogonal complement of the eigenvectors
    already found (every iterate is projected). Errors compound along the sequence, so later pairs are less
    accurate; prefer :func:`lanczos` when ``k`` is more than a few.

    Args:
      matvec, tol, residual_tol, max_iters: as in :func:`power_iteration` (``max_iters`` per pair).
      *params: as in :func:`power_iteration`.
      v0: ``k`` start vectors stacked on a new leading axis (each leaf has shape ``(k, *leaf_shape)``), e.g.
        ``random_like(key, params, num=k)``; each nonzero and finite.
      k: number of eigenpairs (static).
      {placement}

    Returns:
      :class:`EigenResult` with leading axis ``k``, in the order found (decreasing magnitude up to accuracy).
    """
    k = check_positive_int(k, "k")
    _check_tolerance(tol, "tol")
    _check_tolerance(residual_tol, "residual_tol")
    max_iters = check_positive_int(max_iters, "max_iters")
    leading = {jnp.shape(x)[:1] for x in jax.tree.leaves(v0)}
    if leading != {(k,)}:
        raise ValueError(
            f"`v0` must stack k={k} start vectors on a leading axis; got leading axes {sorted(leading)}. "
            "Use `random_like(key, params, num=k)`."
        )
    first = jax.tree.map(lambda x: x[0], v0)
    driver, op, _ = _setup(matvec, first, params, placement, linearize_budget)
    if k > op.layout.size:
        raise ValueError(f"`k`={k} exceeds the dimension {op.layout.size} of the operator.")
    starts = jax.vmap(op.layout.ravel)(v0)
    for j in range(k):
        _check_start(starts[j], f"v0[{j}]")
    return driver.run(_PowerTopK(op, driver, k), starts, params, tol, residual_tol, max_iters)


@dataclasses.dataclass(frozen=True)
class _Smallest:
    op: _Operator
    driver: loops.Driver
    auto_shift: bool

    def __call__(self, x0, params, shift, tol, residual_tol, max_iters) -> EigenResult:
        d = self.driver
        empty = jnp.zeros((0, x0.size), x0.dtype)
        state = d.call(_power_init, x0, jnp.inf, tol, residual_tol, max_iters, 0, empty)
        operands, first = d.call(_Prepare(self.op), state.query, params)
        used = jnp.int32(0)
        if self.auto_shift:
            top = _power_solve(d, self.op, operands, state, first)
            shift, used, first = jnp.abs(top.lam), top.i, None
        state = d.call(_power_init, x0, jnp.inf, tol, residual_tol, max_iters, shift, empty)
        s = _power_solve(d, self.op, operands, state, first)
        return EigenResult(
            s.lam + s.shift, self.op.layout.unravel(s.x), s.i + used, s.res, d.call(_shifted_converged, s)
        )


def _shifted_converged(s: _PowerState) -> jax.Array:
    # A positive eigenvalue of A - shift I proves shift < lambda_max: the iteration may then have found the top
    # of the spectrum instead of the bottom, so the result cannot count as the smallest eigenvalue.
    return _power_converged(s) & (s.lam <= 0)


def smallest_eigenvalue(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    shift: float | jax.Array | None = None,
    tol: float = 1e-6,
    residual_tol: float = 1e-3,
    max_iters: int = 1000,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> EigenResult:
    """The smallest (most negative) eigenvalue by power iteration on the shifted operator ``A - shift I``.

    With ``shift >= lambda_max`` the spectrum of ``A - shift I`` lies in ``[lambda_min - shift, 0]`` and its
    largest-magnitude eigenvalue is ``lambda_min - shift``. By default ``shift = |lambda|`` of the largest-
    magnitude eigenvalue, found first by :func:`power_iteration` (its matvecs are counted in ``iterations``).
    Convergence is slow when ``lambda_min`` is close to the next eigenvalues relative to ``shift``; for an
    accurate bottom of the spectrum prefer ``lanczos(..., which="smallest")``. An explicit ``shift`` below
    ``lambda_max`` can make the iteration find the top of the spectrum instead; a positive eigenvalue of
    ``A - shift I`` proves that, and ``converged`` is then False.

    Args:
      {placement}

    Returns:
      :class:`EigenResult`; ``residual`` is relative to the shifted eigenvalue ``|lambda_min - shift|`` (the
      quantity the iteration controls), since ``lambda_min`` itself may be near zero.
    """
    _check_tolerance(tol, "tol")
    _check_tolerance(residual_tol, "residual_tol")
    max_iters = check_positive_int(max_iters, "max_iters")
    if shift is not None:
        _check_scalar_shape(shift, "shift")
    if shift is not None and not loops.is_traced(shift) and not np.isfinite(np.asarray(shift, np.float64)):
        raise ValueError(f"`shift` must be finite; got {shift!r}.")
    driver, op, x0 = _setup(matvec, v0, params, placement, linearize_budget)
    plan = _Smallest(op, driver, shift is None)
    return driver.run(plan, x0, params, 0.0 if shift is None else shift, tol, residual_tol, max_iters)


def lanczos_top(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 30,
    eigenvalue0: float | jax.Array = jnp.inf,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> EigenResult:
    """The algebraically largest eigenpair by Lanczos, stopping as soon as it has converged.

    Same stopping rule and warm-start arguments as :func:`power_iteration` (relative change of the top Ritz
    value ``<= tol`` and Ritz residual ``||A v - theta v|| / |theta| <= residual_tol``), one matvec per step, but
    Krylov acceleration: with clustered top eigenvalues (as at the edge of stability) it needs far fewer
    matvecs than power iteration. ``max_iters`` is static (it sizes the ``(max_iters, n)`` basis). The first
    step from ``v0`` gives exactly the Rayleigh quotient and residual of ``v0``, so a converged warm start
    with ``eigenvalue0`` costs one matvec.

    Args:
      {placement}
    """
    _check_tolerance(tol, "tol")
    _check_tolerance(residual_tol, "residual_tol")
    eigenvalue0 = _check_eigenvalue0(eigenvalue0)
    driver, op, x0 = _setup(matvec, v0, params, placement, linearize_budget)
    max_iters = _check_iters(max_iters, op.layout.size, "max_iters")
    plan = _TopSolve("lanczos", op, driver, max_iters)
    return driver.run(plan, x0, params, eigenvalue0, tol, residual_tol, max_iters)


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The ``(m, m)`` symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas[:-1]``."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _check_iters(num_iters: int, n: int, name: str = "num_iters") -> int:
    num_iters = check_positive_int(num_iters, name)
    if num_iters > n:
        raise ValueError(
            f"`{name}`={num_iters} exceeds the operator dimension {n}: a Krylov basis has at most n vectors. "
            f"Use {name} <= {n}."
        )
    return num_iters


def _decomposition(d: loops.Driver, op: _Operator, operands: Any, x0: jax.Array, num_iters: int, first=None):
    state = d.call(_LanczosInit(num_iters), x0, jnp.inf, 0, 0)
    s = _lanczos_solve(d, op, operands, state, False, first)
    return LanczosDecomposition(s.alphas, s.betas, s.basis)


@dataclasses.dataclass(frozen=True)
class _Decompose:
    op: _Operator
    driver: loops.Driver
    num_iters: int

    def __call__(self, x0: jax.Array, params: tuple) -> LanczosDecomposition:
        operands, first = self.driver.call(_Prepare(self.op), _unit(x0), params)
        return _decomposition(self.driver, self.op, operands, x0, self.num_iters, first)


def lanczos_decomposition(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    num_iters: int,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> LanczosDecomposition:
    """``num_iters`` Lanczos steps with partial reorthogonalization (``num_iters`` matvecs, ``O(num_iters * n)``
    memory for the basis).

    The Ritz values after ``m <= num_iters`` steps are the eigenvalues of the leading ``m x m`` block of ``T``.
    ``placement`` and ``linearize_budget`` as in :func:`power_iteration`.
    """
    driver, op, x0 = _setup(matvec, v0, params, placement, linearize_budget)
    return driver.run(_Decompose(op, driver, _check_iters(num_iters, op.layout.size)), x0, params)


@dataclasses.dataclass(frozen=True)
class _Lanczos:
    op: _Operator
    driver: loops.Driver
    k: int
    num_iters: int
    which: str

    def __call__(self, x0: jax.Array, params: tuple, residual_tol: Any) -> EigenResult:
        dec = _Decompose(self.op, self.driver, self.num_iters)(x0, params)
        return self.driver.call(_LanczosPairs(self.op.layout, self.k, self.which), dec, residual_tol)


@dataclasses.dataclass(frozen=True)
class _LanczosPairs:
    layout: _Layout
    k: int
    which: str

    def __call__(self, dec: LanczosDecomposition, residual_tol: Any) -> EigenResult:
        m = dec.alphas.shape[0]
        # A NaN/Inf product (a bad batch) stops the decomposition with non-finite coefficients; eigh would then
        # sort them anywhere and the padding zeros could pass as converged pairs. Such a solve reports NaN.
        finite = jnp.all(jnp.isfinite(dec.alphas)) & jnp.all(jnp.isfinite(dec.betas))
        theta, s = jnp.linalg.eigh(_tridiagonal(jnp.where(finite, dec.alphas, 0), jnp.where(finite, dec.betas, 0)))
        theta = jnp.where(finite, theta, jnp.nan)
        order = jnp.arange(m - 1, m - 1 - self.k, -1) if self.which == "largest" else jnp.arange(self.k)
        theta, s = theta[order], s[:, order]
        vectors = s.T @ dec.basis
        vectors = _safe_div(vectors, jnp.linalg.norm(vectors, axis=1, keepdims=True))
        residual = _safe_div(jnp.abs(dec.betas[-1] * s[-1]), jnp.abs(theta))
        converged = (residual <= residual_tol) & jnp.isfinite(theta) & jnp.isfinite(residual) & _started(dec.basis)
        iterations = jnp.full(self.k, m, jnp.int32)
        return EigenResult(theta, jax.vmap(self.layout.unravel)(vectors), iterations, residual, converged)


def lanczos(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    k: int,
    num_iters: int,
    which: Literal["largest", "smallest"] = "largest",
    residual_tol: float = 1e-2,
    placement: loops.Placement = "auto",
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET,
) -> EigenResult:
    """The ``k`` algebraically largest (or smallest) eigenpairs by Lanczos with partial reorthogonalization.

    Args:
      matvec, v0: as in :func:`power_iteration`.
      *params: as in :func:`power_iteration`.
      k: number of eigenpairs (static), ``k <= num_iters``.
      num_iters: Krylov dimension = number of matvecs (static), ``<= n``. Extreme eigenvalues converge much
        faster than with power iteration for the same number of matvecs; ``num_iters`` of 2k–4k + 10 is typical.
      which: ``"largest"`` (descending order) or ``"smallest"`` (ascending order).
      residual_tol: a pair counts as ``converged`` when its relative residual is at most this.
      {placement}

    Returns:
      :class:`EigenResult` with leading axis ``k``; ``residual`` is the Ritz estimate
      ``|betas[-1] * s_last| / |theta|`` (exact ``||A v - theta v|| / |theta|`` in exact arithmetic);
      ``iterations`` is ``num_iters`` for every pair.
    """
    k = check_positive_int(k, "k")
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest'; got {which!r}.")
    _check_tolerance(residual_tol, "residual_tol")
    driver, op, x0 = _setup(matvec, v0, params, placement, linearize_budget)
    num_iters = _check_iters(num_iters, op.layout.size)
    if k > num_iters:
        raise ValueError(f"`k`={k} must not exceed `num_iters`={num_iters}.")
    return driver.run(_Lanczos(op, driver, k, num_iters, which), x0, params, residual_tol)


for _solver in (power_iteration, power_iteration_topk, smallest_eigenvalue, lanczos_top, lanczos):
    _solver.__doc__ = (_solver.__doc__ or "").replace("{placement}", _PLACEMENT_DOC)


def random_like(key: jax.Array, params: PyTree, num: int | None = None) -> PyTree:
    """Standard-normal pytree like ``params`` (float leaves), or ``num`` of them stacked on a leading axis."""
    check_key(key)
    check_float_tree(params, "params")
    flat, unravel = ravel_pytree(params)
    if num is None:
        return unravel(jax.random.normal(key, flat.shape, flat.dtype))
    num = check_positive_int(num, "num")
    return jax.vmap(unravel)(jax.random.normal(key, (num, *flat.shape), flat.dtype))


def gradient_start(key: jax.Array, gradient: PyTree) -> PyTree:
    """Start vector for a cold top-eigenvalue solve: the unit gradient plus a unit standard-normal vector.

    The gradient of a training loss lies mostly in the span of the Hessian's top eigenvectors (Gur-Ari,
    Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace"), so a Krylov solver started along it
    needs fewer products than from a random vector where that holds. It does not always: where the gradient
    loads a second eigenvector close to the top one more than the top one itself, the start's top component is
    relatively smaller than a random vector's and the solve needs more products (both are counted over seeds
    on a BN CNN and an MLP in ``experiments/bench_curvature.py``). The random half keeps every eigendirection
    in the start (with probability one), so a gradient orthogonal to the top eigenvector cannot stall the
    solve. A zero or non-finite gradient gives the random unit vector alone. Pass the result as ``v0`` of any
    solver; :class:`~bnjax.curvature.EoSTracker` starts its first measurement this way with
    ``cold_start="gradient"``.
    """
    check_key(key)
    check_float_tree(gradient, "gradient")
    flat, unravel = ravel_pytree(gradient)
    return unravel(_gradient_mix(flat, jax.random.normal(key, flat.shape, flat.dtype)))


def _gradient_mix(gradient: jax.Array, vector: jax.Array) -> jax.Array:
    """``unit(gradient) + unit(vector)`` (flat); a zero or non-finite gradient contributes nothing."""
    norm = jnp.linalg.norm(gradient)
    ok = jnp.isfinite(norm) & (norm > 0)
    return jnp.where(ok, gradient / jnp.where(ok, norm, 1), 0) + _unit(vector)
