"""Eigen-solvers for symmetric operators given as matvecs: power iteration, deflation, spectral shift, Lanczos.

Every solver takes a matvec ``matvec(vector, *params) -> vector`` (see :mod:`bnjax.curvature.hvp`) on pytree
vectors, a start vector ``v0`` (a pytree like the vectors; it need not be normalized but must be nonzero) and
the matvec's ``*params``. Internally vectors are flattened to one 1-D array of size ``n`` (the parameter
count); eigenvectors come back as pytrees. Each solve is a single ``jax.jit``-compiled program whose loop is a
``lax.while_loop`` / ``lax.fori_loop``: no host round trip per iteration. ``matvec`` is a static argument, so
build it once (e.g. ``mv = hessian_matvec(loss_fn)``) and reuse it to hit the compilation cache.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from bnjax._validate import check_positive_int
from bnjax.curvature.hvp import Matvec

PyTree = Any


class EigenResult(NamedTuple):
    """Result of an eigen-solve (a NamedTuple, hence a pytree that passes through ``jit``).

    For a single eigenpair the fields are scalars and one pytree; for ``k`` pairs they gain a leading axis
    ``k`` (the eigenvector pytree's leaves get shape ``(k, *leaf_shape)``).
    """

    eigenvalue: jax.Array  # () or (k,), dtype of the vectors
    eigenvector: PyTree  # like v0, unit 2-norm; leaves (k, ...) for k pairs
    iterations: jax.Array  # () or (k,) int32: matvecs (HVPs) used
    residual: jax.Array  # () or (k,): ||A v - lambda v|| / |lambda|


def _flatten(matvec: Matvec, v0: PyTree, params: tuple) -> tuple[jax.Array, Callable, Callable]:
    """Flat start vector, flat matvec ``R^n -> R^n`` and the inverse of the flattening."""
    flat0, unravel = ravel_pytree(v0)
    if flat0.ndim != 1 or flat0.size == 0:
        raise ValueError("`v0` must be a nonempty pytree of arrays (a vector like the parameters).")
    if not jnp.issubdtype(flat0.dtype, jnp.inexact):
        raise TypeError(f"`v0` must be floating point; got dtype {flat0.dtype}.")

    def mv(x: jax.Array) -> jax.Array:
        out = matvec(unravel(x), *params)
        flat, _ = ravel_pytree(out)
        if flat.shape != x.shape:
            raise ValueError(
                f"`matvec` returned a vector with {flat.size} entries for an input with {x.size}; it must map "
                "a pytree like `v0` to a pytree like `v0`. Check that `v0` is shaped like the parameters."
            )
        return flat.astype(x.dtype)

    return flat0, mv, unravel


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    return a / jnp.where(b == 0, 1, b)


def _with_first_product(
    mv: Callable[[jax.Array], jax.Array], x0: jax.Array, first_product: jax.Array | None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``mv_i(i, x)``: the matvec of iteration ``i``, where iteration 0 (applied to ``x0 / ||x0||``) returns
    ``first_product / ||x0||`` instead of calling ``mv`` (``first_product = A @ x0`` was computed elsewhere)."""
    if first_product is None:
        return lambda i, x: mv(x)
    if first_product.shape != x0.shape:
        raise ValueError(f"`first_product` must have the start vector's shape {x0.shape}; got {first_product.shape}.")
    w0 = _safe_div(first_product.astype(x0.dtype), jnp.linalg.norm(x0))
    return lambda i, x: lax.cond(i == 0, lambda y: w0, mv, x)


def _power_loop(
    mv: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    eigenvalue0: jax.Array,
    tol: jax.Array,
    residual_tol: jax.Array,
    max_iters: jax.Array,
    first_product: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Power iteration on flat vectors.

    ``first_product``, if given, is ``A @ x0`` computed by the caller (e.g. fused with a gradient); it replaces
    the first matvec, which is still counted as an iteration.

    Returns (eigenvalue, unit eigenvector, iterations, residual, next iterate ``A v / ||A v||``); the next
    iterate is a free extra power step, the best warm start for a later solve.
    """
    dtype = x0.dtype
    mv = _with_first_product(mv, x0, first_product)
    x0 = _safe_div(x0, jnp.linalg.norm(x0))
    inf = jnp.asarray(jnp.inf, dtype)
    # state: iteration count, current unit vector, its Rayleigh quotient, residual, relative change, next vector
    init = (jnp.int32(0), x0, jnp.asarray(eigenvalue0, dtype), inf, inf, x0)

    def cond(state):
        i, _, _, res, change, _ = state
        return (i < max_iters) & ~((change <= tol) & (res <= residual_tol))

    def body(state):
        i, _, lam_prev, _, _, x = state
        w = mv(i, x)
        lam = jnp.vdot(x, w)
        res = _safe_div(jnp.linalg.norm(w - lam * x), jnp.abs(lam))
        res = jnp.where(lam == 0, inf, res)
        change = jnp.where(jnp.isfinite(lam_prev), _safe_div(jnp.abs(lam - lam_prev), jnp.abs(lam)), inf)
        return i + 1, x, lam, res, change, _safe_div(w, jnp.linalg.norm(w))

    i, x, lam, res, _, x_next = lax.while_loop(cond, body, init)
    return lam, x, i, res, x_next


@functools.partial(jax.jit, static_argnums=0)
def power_iteration(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 100,
    eigenvalue0: float | jax.Array = jnp.inf,
) -> EigenResult:
    """Eigenvalue of largest *magnitude* (a large negative one can win) and its eigenvector.

    Iterates ``v <- A v / ||A v||`` with ``lambda = v . A v``; one matvec per iteration. Stops when both the
    relative change ``|lambda_i - lambda_{i-1}| / |lambda_i| <= tol`` and the relative residual
    ``||A v - lambda v|| / |lambda| <= residual_tol``, or after ``max_iters`` matvecs. For symmetric ``A`` the
    eigenvalue error is at most ``residual * |lambda|`` and about ``residual**2 * |lambda|**2 / gap``.

    Args:
      matvec: ``matvec(vector, *params) -> vector`` of a symmetric operator.
      v0: start vector (pytree like the vectors; a previous eigenvector for a warm start).
      *params: the matvec's parameters.
      tol: relative eigenvalue-change tolerance.
      residual_tol: relative residual tolerance.
      max_iters: maximum number of matvecs.
      eigenvalue0: previous eigenvalue estimate for a warm start: the first iteration's change is measured
        against it, so a converged warm start stops after one matvec. ``inf`` (default) means none.

    Returns:
      :class:`EigenResult` with scalar fields; ``eigenvector`` is the vector whose Rayleigh quotient and
      residual are reported.
    """
    x0, mv, unravel = _flatten(matvec, v0, params)
    lam, x, i, res, _ = _power_loop(mv, x0, eigenvalue0, tol, residual_tol, max_iters)
    return EigenResult(lam, unravel(x), i, res)


def _project_out(basis: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` minus its projection on the rows of ``basis`` (orthonormal or zero rows), done twice for stability."""
    x = x - basis.T @ (basis @ x)
    return x - basis.T @ (basis @ x)


@functools.partial(jax.jit, static_argnums=0, static_argnames="k")
def power_iteration_topk(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    k: int,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 100,
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude by power iteration with deflation (orthogonalization).

    Eigenpair ``j`` is found by power iteration restricted to the orthogonal complement of the eigenvectors
    already found (every iterate is projected). Errors compound along the sequence, so later pairs are less
    accurate; prefer :func:`lanczos` when ``k`` is more than a few.

    Args:
      matvec, *params, tol, residual_tol, max_iters: as in :func:`power_iteration` (``max_iters`` per pair).
      v0: ``k`` start vectors stacked on a new leading axis (each leaf has shape ``(k, *leaf_shape)``), e.g.
        ``random_like(key, params, num=k)``.
      k: number of eigenpairs (static).

    Returns:
      :class:`EigenResult` with leading axis ``k``, in the order found (decreasing magnitude up to accuracy).
    """
    k = check_positive_int(k, "k")
    leading = {jnp.shape(x)[:1] for x in jax.tree.leaves(v0)}
    if leading != {(k,)}:
        raise ValueError(
            f"`v0` must stack k={k} start vectors on a leading axis; got leading axes {sorted(leading)}. "
            "Use `random_like(key, params, num=k)`."
        )
    x0s, mv, unravel = _flatten(matvec, jax.tree.map(lambda x: x[0], v0), params)
    starts = jax.vmap(lambda v: ravel_pytree(v)[0])(v0)
    if k > x0s.size:
        raise ValueError(f"`k`={k} exceeds the dimension {x0s.size} of the operator.")

    def solve_one(j, carry):
        basis, lams, iters, ress = carry
        project = functools.partial(_project_out, basis)
        lam, x, i, res, _ = _power_loop(
            lambda y: project(mv(project(y))), project(starts[j]), jnp.inf, tol, residual_tol, max_iters
        )
        return basis.at[j].set(x), lams.at[j].set(lam), iters.at[j].set(i), ress.at[j].set(res)

    dtype = x0s.dtype
    init = (jnp.zeros((k, x0s.size), dtype), jnp.zeros(k, dtype), jnp.zeros(k, jnp.int32), jnp.zeros(k, dtype))
    basis, lams, iters, ress = lax.fori_loop(0, k, solve_one, init)
    return EigenResult(lams, jax.vmap(unravel)(basis), iters, ress)


@functools.partial(jax.jit, static_argnums=0)
def smallest_eigenvalue(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    shift: float | jax.Array | None = None,
    tol: float = 1e-6,
    residual_tol: float = 1e-3,
    max_iters: int = 1000,
) -> EigenResult:
    """The smallest (most negative) eigenvalue by power iteration on the shifted operator ``A - shift I``.

    With ``shift >= lambda_max`` the spectrum of ``A - shift I`` lies in ``[lambda_min - shift, 0]`` and its
    largest-magnitude eigenvalue is ``lambda_min - shift``. By default ``shift = |lambda|`` of the largest-
    magnitude eigenvalue, found first by :func:`power_iteration` (its matvecs are counted in ``iterations``).
    Convergence is slow when ``lambda_min`` is close to the next eigenvalues relative to ``shift``; for an
    accurate bottom of the spectrum prefer ``lanczos(..., which="smallest")``.

    Returns:
      :class:`EigenResult`; ``residual`` is relative to the shifted eigenvalue ``|lambda_min - shift|`` (the
      quantity the iteration controls), since ``lambda_min`` itself may be near zero.
    """
    x0, mv, unravel = _flatten(matvec, v0, params)
    used = jnp.int32(0)
    if shift is None:
        top, _, used, _, _ = _power_loop(mv, x0, jnp.inf, tol, residual_tol, max_iters)
        shift = jnp.abs(top)
    shift = jnp.asarray(shift, x0.dtype)
    mu, x, i, res, _ = _power_loop(lambda y: mv(y) - shift * y, x0, jnp.inf, tol, residual_tol, max_iters)
    return EigenResult(mu + shift, unravel(x), i + used, res)


class LanczosDecomposition(NamedTuple):
    """``m`` steps of Lanczos: ``Q A Q^T = T`` with ``T = tridiag(betas[:-1], alphas, betas[:-1])``."""

    alphas: jax.Array  # (m,) diagonal of T
    betas: jax.Array  # (m,) off-diagonal of T; betas[-1] is the norm of the next residual (Ritz error bound)
    basis: jax.Array  # (m, n) orthonormal rows: the flattened Krylov basis, basis[0] = v0 / ||v0||


def _lanczos_step(
    mv: Callable[[jax.Array, jax.Array], jax.Array],
    j: jax.Array,
    basis: jax.Array,
    alphas: jax.Array,
    betas: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos step ``j`` (0-based): one matvec ``mv(j, basis[j])``; fills ``alphas[j]``, ``betas[j]``,
    ``basis[j+1]``."""
    m, n = basis.shape
    dtype = basis.dtype
    q = basis[j]
    w = mv(j, q)
    alpha = jnp.vdot(q, w)
    # Full reorthogonalization against every basis vector so far (rows > j are still zero). Two BLAS passes
    # over the whole (m, n) basis are faster on CPU than a loop over the j live rows.
    w = _project_out(basis, w)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(jnp.abs(alpha) + betas[jnp.maximum(j - 1, 0)], jnp.finfo(dtype).tiny)
    breakdown = beta <= 100 * jnp.finfo(dtype).eps * scale

    def fresh(_: None) -> jax.Array:
        # Invariant subspace found: continue with a fresh direction orthogonal to the basis (T splits into
        # blocks, every Ritz value stays an eigenvalue) instead of dividing by ~0.
        r = _project_out(basis, jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (n,), dtype))
        return r / jnp.linalg.norm(r)

    nxt = lax.cond(breakdown, fresh, lambda _: w / jnp.where(breakdown, 1, beta), None)
    beta = jnp.where(breakdown, 0, beta)
    # The last step only records beta (the residual norm); there is no row m to fill (row m-1 is rewritten).
    row = jnp.minimum(j + 1, m - 1)
    basis = basis.at[row].set(jnp.where(j + 1 < m, nxt, basis[row]))
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)


def _start_basis(x0: jax.Array, m: int) -> jax.Array:
    return jnp.zeros((m, x0.size), x0.dtype).at[0].set(_safe_div(x0, jnp.linalg.norm(x0)))


def _lanczos_flat(mv: Callable[[jax.Array], jax.Array], x0: jax.Array, num_iters: int) -> LanczosDecomposition:
    zeros = jnp.zeros(num_iters, x0.dtype)
    step_mv = _with_first_product(mv, x0, None)
    basis, alphas, betas = lax.fori_loop(
        0, num_iters, lambda j, c: _lanczos_step(step_mv, j, *c), (_start_basis(x0, num_iters), zeros, zeros)
    )
    return LanczosDecomposition(alphas, betas, basis)


def _lanczos_top_loop(
    mv: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    eigenvalue0: jax.Array,
    tol: jax.Array,
    residual_tol: jax.Array,
    max_iters: int,
    first_product: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Lanczos for the top eigenpair that stops as soon as the tolerances hold (see :func:`lanczos_top`).

    ``first_product``: optional ``A @ x0`` computed by the caller; it replaces the first matvec (still counted).
    """
    m, dtype = max_iters, x0.dtype
    mv = _with_first_product(mv, x0, first_product)
    inf = jnp.asarray(jnp.inf, dtype)

    def ritz(j, alphas, betas):
        # Leading (j+1)x(j+1) block of T; the padding rows are decoupled and set below every Ritz value of the
        # block (which is >= max(alphas[:j+1])), so the top eigenpair of the padded matrix is the block's.
        live = jnp.arange(m) <= j
        floor = jnp.min(jnp.where(live, alphas, inf))
        diag = jnp.where(live, alphas, floor - 1 - jnp.abs(floor))
        off = jnp.where(jnp.arange(m - 1) < j, betas[:-1], 0)
        theta, s = jnp.linalg.eigh(jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1))
        return theta[-1], s[:, -1]

    def cond(state):
        j, _, _, _, _, res, change = state
        return (j < m) & ~((change <= tol) & (res <= residual_tol))

    def body(state):
        j, basis, alphas, betas, theta_prev, _, _ = state
        basis, alphas, betas = _lanczos_step(mv, j, basis, alphas, betas)
        theta, s = ritz(j, alphas, betas)
        res = jnp.where(theta == 0, inf, _safe_div(jnp.abs(betas[j] * s[j]), jnp.abs(theta)))
        change = jnp.where(jnp.isfinite(theta_prev), _safe_div(jnp.abs(theta - theta_prev), jnp.abs(theta)), inf)
        return j + 1, basis, alphas, betas, theta, res, change

    zeros = jnp.zeros(m, dtype)
    init = (jnp.int32(0), _start_basis(x0, m), zeros, zeros, jnp.asarray(eigenvalue0, dtype), inf, inf)
    j, basis, alphas, betas, theta, res, _ = lax.while_loop(cond, body, init)
    _, s = ritz(j - 1, alphas, betas)
    vector = s @ basis  # padding components of s are zero, and rows >= j of basis are unused
    return theta, vector / jnp.linalg.norm(vector), j, res


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_iters")
def lanczos_top(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    tol: float = 1e-4,
    residual_tol: float = 1e-2,
    max_iters: int = 30,
    eigenvalue0: float | jax.Array = jnp.inf,
) -> EigenResult:
    """The algebraically largest eigenpair by Lanczos, stopping as soon as it has converged.

    Same stopping rule and warm-start arguments as :func:`power_iteration` (relative change of the top Ritz
    value ``<= tol`` and Ritz residual ``||A v - theta v|| / |theta| <= residual_tol``), one matvec per step, but
    Krylov acceleration: with clustered top eigenvalues (as at the edge of stability) it needs far fewer
    matvecs than power iteration. ``max_iters`` is static (it sizes the ``(max_iters, n)`` basis). The first
    step from ``v0`` gives exactly the Rayleigh quotient and residual of ``v0``, so a converged warm start
    with ``eigenvalue0`` costs one matvec.
    """
    x0, mv, unravel = _flatten(matvec, v0, params)
    max_iters = _check_iters(max_iters, x0.size)
    theta, x, j, res = _lanczos_top_loop(mv, x0, eigenvalue0, tol, residual_tol, max_iters)
    return EigenResult(theta, unravel(x), j, res)


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The ``(m, m)`` symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas[:-1]``."""
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def _check_iters(num_iters: int, n: int) -> int:
    num_iters = check_positive_int(num_iters, "num_iters")
    if num_iters > n:
        raise ValueError(
            f"`num_iters`={num_iters} exceeds the operator dimension {n}: a Krylov basis has at most n vectors. "
            f"Use num_iters <= {n}."
        )
    return num_iters


@functools.partial(jax.jit, static_argnums=0, static_argnames="num_iters")
def lanczos_decomposition(matvec: Matvec, v0: PyTree, *params: Any, num_iters: int) -> LanczosDecomposition:
    """``num_iters`` Lanczos steps with full reorthogonalization (``num_iters`` matvecs, ``O(num_iters * n)``
    memory for the basis).

    The Ritz values after ``m <= num_iters`` steps are the eigenvalues of the leading ``m x m`` block of ``T``.
    """
    x0, mv, _ = _flatten(matvec, v0, params)
    return _lanczos_flat(mv, x0, _check_iters(num_iters, x0.size))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("k", "num_iters", "which"))
def lanczos(
    matvec: Matvec,
    v0: PyTree,
    *params: Any,
    k: int,
    num_iters: int,
    which: Literal["largest", "smallest"] = "largest",
) -> EigenResult:
    """The ``k`` algebraically largest (or smallest) eigenpairs by Lanczos with full reorthogonalization.

    Args:
      matvec, v0, *params: as in :func:`power_iteration`.
      k: number of eigenpairs (static), ``k <= num_iters``.
      num_iters: Krylov dimension = number of matvecs (static), ``<= n``. Extreme eigenvalues converge much
        faster than with power iteration for the same number of matvecs; ``num_iters`` of 2k–4k + 10 is typical.
      which: ``"largest"`` (descending order) or ``"smallest"`` (ascending order).

    Returns:
      :class:`EigenResult` with leading axis ``k``; ``residual`` is the Ritz estimate
      ``|betas[-1] * s_last| / |theta|`` (exact ``||A v - theta v|| / |theta|`` in exact arithmetic);
      ``iterations`` is ``num_iters`` for every pair.
    """
    k = check_positive_int(k, "k")
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest'; got {which!r}.")
    x0, mv, unravel = _flatten(matvec, v0, params)
    num_iters = _check_iters(num_iters, x0.size)
    if k > num_iters:
        raise ValueError(f"`k`={k} must not exceed `num_iters`={num_iters}.")
    dec = _lanczos_flat(mv, x0, num_iters)
    theta, s = jnp.linalg.eigh(_tridiagonal(dec.alphas, dec.betas))
    order = jnp.arange(num_iters - 1, num_iters - 1 - k, -1) if which == "largest" else jnp.arange(k)
    theta, s = theta[order], s[:, order]
    vectors = s.T @ dec.basis
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    residual = _safe_div(jnp.abs(dec.betas[-1] * s[-1]), jnp.abs(theta))
    iterations = jnp.full(k, num_iters, jnp.int32)
    return EigenResult(theta, jax.vmap(unravel)(vectors), iterations, residual)


def random_like(key: jax.Array, params: PyTree, num: int | None = None) -> PyTree:
    """Standard-normal pytree like ``params`` (float leaves), or ``num`` of them stacked on a leading axis."""
    flat, unravel = ravel_pytree(params)
    if num is None:
        return unravel(jax.random.normal(key, flat.shape, flat.dtype))
    num = check_positive_int(num, "num")
    return jax.vmap(unravel)(jax.random.normal(key, (num, *flat.shape), flat.dtype))
