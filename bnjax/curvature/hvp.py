"""Hessian- and Gauss–Newton-vector products on arbitrary pytrees, and the matvec convention.

Matvec convention (as in matfree): a *matvec* is a function ``matvec(vector, *params) -> vector`` whose
parameters are explicit arguments rather than closed over, so that one compiled solver serves every
parameter value (no retracing when the parameters change) and the parameters stay differentiable.
Vectors are pytrees with the structure and shapes of the model parameters. Every solver in
:mod:`bnjax.curvature` takes such a matvec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from bnjax._validate import check_like

PyTree = Any
Matvec = Callable[..., PyTree]


def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, vector: PyTree, *args: Any) -> PyTree:
    """Hessian-vector product ``H v`` of a scalar loss, by forward-over-reverse differentiation.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``; differentiated with respect to ``params`` only.
      params: the point at which the Hessian is taken (any pytree of float arrays).
      vector: a pytree with the same structure, shapes and float dtypes as ``params``.
      *args: extra arguments for ``loss_fn`` (a batch, ...), held fixed.

    Returns:
      ``H @ vector`` as a pytree like ``params``. Costs about 2–3 gradients; ``H`` is never formed.
    """
    check_like(vector, params)
    return jax.jvp(jax.grad(lambda p: loss_fn(p, *args)), (params,), (vector,))[1]


def gnvp(
    output_fn: Callable[..., jax.Array],
    output_loss: Callable[..., jax.Array],
    params: PyTree,
    vector: PyTree,
    *args: Any,
) -> PyTree:
    """Generalized Gauss–Newton-vector product ``J^T H_out J v``.

    The loss is ``output_loss(output_fn(params, *args), *args)``; ``J`` is the Jacobian of ``output_fn``
    with respect to ``params`` and ``H_out`` the Hessian of ``output_loss`` with respect to its first
    argument (the model outputs). The GGN is positive semi-definite when ``output_loss`` is convex in the
    outputs (square loss, softmax cross-entropy).

    Args:
      output_fn: ``output_fn(params, *args) -> outputs`` (e.g. logits of shape ``(batch, classes)``).
      output_loss: ``output_loss(outputs, *args) -> scalar`` (e.g. mean cross-entropy against targets in
        ``args``).
      params, vector: as in :func:`hvp`.
      *args: passed to both functions unchanged.

    Returns:
      ``G @ vector`` as a pytree like ``params``: one JVP, one output-space HVP, one VJP.
    """
    check_like(vector, params)
    # One forward pass: linearize, then transpose the linear map for J^T (no second forward as with vjp).
    outputs, jvp_fn = jax.linearize(lambda p: output_fn(p, *args), params)
    hjv = jax.jvp(jax.grad(lambda z: output_loss(z, *args)), (outputs,), (jvp_fn(vector),))[1]
    return jax.linear_transpose(jvp_fn, params)(hjv)[0]


def hessian_matvec(loss_fn: Callable[..., jax.Array]) -> Matvec:
    """The Hessian of ``loss_fn`` as a matvec: ``matvec(vector, params, *args)`` is
    ``hvp(loss_fn, params, vector, *args)``."""

    def matvec(vector: PyTree, params: PyTree, *args: Any) -> PyTree:
        return hvp(loss_fn, params, vector, *args)

    return matvec


def ggn_matvec(output_fn: Callable[..., jax.Array], output_loss: Callable[..., jax.Array]) -> Matvec:
    """The GGN of ``output_loss ∘ output_fn`` as a matvec ``matvec(vector, params, *args)`` (see :func:`gnvp`)."""

    def matvec(vector: PyTree, params: PyTree, *args: Any) -> PyTree:
        return gnvp(output_fn, output_loss, params, vector, *args)

    return matvec
