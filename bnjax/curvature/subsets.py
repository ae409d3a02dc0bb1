"""Curvature of a parameter subset: a layer, the BN scales and biases, everything but BN.

A :class:`ParamSubset` is a filter on the parameter pytree (a predicate on each leaf's key path). Its vectors
are pytrees like the parameters with ``None`` in place of the leaves outside the subset, and
:func:`subset_matvec` turns a matvec on the full parameters into one on those vectors: embed the vector with
zeros elsewhere, multiply, keep the subset's entries. For a Hessian that is the diagonal block ``H_SS`` of the
subset ``S``, the Hessian of the loss as a function of the subset's parameters with the others held fixed.
Every solver and estimator of :mod:`bnjax.curvature` then gives the top eigenvalue, trace, diagonal or
spectral density of that block, with no change to the solvers:

>>> import jax, jax.numpy as jnp
>>> from bnjax import curvature as cv
>>> params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "BatchNorm_0": {"scale": jnp.ones(4),
...           "bias": jnp.zeros(4)}, "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
>>> x = jax.random.normal(jax.random.key(0), (8, 3))
>>> def loss_fn(p, x):
...     h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None]
...     h = jnp.tanh(h * p["BatchNorm_0"]["scale"][None] + p["BatchNorm_0"]["bias"][None])
...     return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None]) ** 2)
>>> bn = cv.param_subset(params, cv.batchnorm_params())
>>> bn.size, bn.paths
(8, ('BatchNorm_0/bias', 'BatchNorm_0/scale'))
>>> mv = cv.subset_matvec(cv.hessian_matvec(loss_fn), bn)
>>> v0 = bn.restrict(cv.random_like(jax.random.key(1), params))
>>> top = cv.lanczos_top(mv, v0, params, x, max_iters=bn.size, tol=1e-6, residual_tol=1e-4)
>>> bool(top.converged), sorted(top.eigenvector["BatchNorm_0"]), top.eigenvector["Dense_0"]
(True, ['bias', 'scale'], {'bias': None, 'kernel': None})

The same ``mv`` and ``v0`` go to :func:`~bnjax.curvature.hutchinson_trace`,
:func:`~bnjax.curvature.hutchpp_trace` (with ``rank = bn.size`` it is exact), and
:func:`~bnjax.curvature.hutchinson_diagonal`.

Predicates take the path as a tuple of strings (dict keys, attribute names and sequence indices, as
``jax.tree_util`` sees them): ``("Dense_0", "kernel")``. :func:`layer`, :func:`batchnorm_params` and
:func:`everything_but` build the common ones; any ``Callable[[tuple[str, ...]], bool]`` works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.curvature.hvp import Matvec

PyTree = Any
Predicate = Callable[[tuple[str, ...]], bool]


def _key_name(key: Any) -> str:
    """The name of one entry of a ``jax.tree_util`` key path (dict key, attribute, index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: Iterable[Any]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as a tuple of strings, e.g. ``("Dense_0", "kernel")``."""
    return tuple(_key_name(k) for k in path)


def layer(name: str) -> Predicate:
    """Select the leaves under ``name``: a path containing it as consecutive entries (``"block/Dense_0"``
    matches ``("block", "Dense_0", "kernel")``; ``"kernel"`` alone selects every kernel)."""
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"`name` must be a nonempty string such as 'Dense_0' or 'block/Dense_0'; got {name!r}.")
    parts = tuple(name.strip("/").split("/"))

    def predicate(path: tuple[str, ...]) -> bool:
        k = len(parts)
        return any(path[i : i + k] == parts for i in range(len(path) - k + 1))

    return predicate


def batchnorm_params(batch_stats: PyTree = None, prefixes: tuple[str, ...] = ("BatchNorm",)) -> Predicate:
    """Select the BN scales and biases.

    With ``batch_stats`` (the Flax collection of the same model): the parameters of the modules that own
    running statistics, whatever their names (a parameter whose module path, its path without the leaf name,
    is the module path of a ``batch_stats`` entry). Without: the ``scale`` and ``bias`` leaves of modules
    whose name starts with one of ``prefixes`` (Flax names ``bnjax.BatchNorm`` and ``flax.linen.BatchNorm``
    ``BatchNorm_0``, ``BatchNorm_1``, ...; pass e.g. ``prefixes=("bn",)`` for modules named ``bn1``).
    """
    if batch_stats is not None:
        if isinstance(batch_stats, Mapping) and ({"params", "batch_stats"} & set(batch_stats)):
            raise ValueError(
                "`batch_stats` holds a 'params' or 'batch_stats' collection: pass `variables['batch_stats']`, not "
                "the whole variables."
            )
        leaf_paths = [path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(batch_stats)]
        looks_like_params = sorted({p[-1] for p in leaf_paths if p and p[-1] in _PARAM_NAMES})
        if looks_like_params:
            raise ValueError(
                f"`batch_stats` has leaves named {looks_like_params}, which are parameters, not running statistics: "
                "pass the model's batch_stats collection (leaves such as 'mean' and 'var')."
            )
        owners = {p[:-1] for p in leaf_paths}
        if not owners:
            raise ValueError("`batch_stats` has no leaves: it names no BN module. Pass the model's batch_stats.")
        return lambda path: path[:-1] in owners
    if isinstance(prefixes, str) or not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"`prefixes` must be a nonempty tuple of nonempty strings; got {prefixes!r}.")
    return lambda path: len(path) >= 2 and path[-1] in _BN_PARAM_NAMES and any(path[-2].startswith(p) for p in prefixes)


_BN_PARAM_NAMES = ("scale", "bias", "weight")  # Flax's scale and bias; Equinox's weight and bias
_PARAM_NAMES = ("kernel", "scale", "bias", "weight", "embedding")  # never the name of a running statistic


@dataclasses.dataclass(frozen=True)
class _Complement:
    predicate: Predicate

    def __call__(self, path: tuple[str, ...]) -> bool:
        return not _selects(self.predicate, path)


def everything_but(predicate: Predicate) -> Predicate:
    """The complement of ``predicate`` (e.g. ``everything_but(batchnorm_params())``). :func:`param_subset` refuses
    it when ``predicate`` itself selects nothing (a misspelt layer name would otherwise select everything)."""
    if not callable(predicate):
        raise TypeError(f"`predicate` must be callable (a path -> bool); got {predicate!r}.")
    return _Complement(predicate)


def _selects(predicate: Predicate, path: tuple[str, ...]) -> bool:
    out = predicate(path)
    if not isinstance(out, (bool, np.bool_)):
        raise TypeError(f"The predicate must return a bool; for the path {'/'.join(path)} it returned {out!r}.")
    return bool(out)


@dataclasses.dataclass(frozen=True)
class ParamSubset:
    """A subset of the leaves of a parameter pytree (static and hashable; build with :func:`param_subset`).

    Vectors of the subset are pytrees like the parameters with ``None`` at the leaves outside it.
    """

    treedef: Any  # the full parameters' tree structure
    selected: tuple[bool, ...]  # per leaf (flatten order): in the subset
    shapes: tuple[tuple[int, ...], ...]  # per leaf
    dtypes: tuple[str, ...]  # per leaf
    leaf_paths: tuple[str, ...]  # per leaf: its path, "/"-joined

    @property
    def paths(self) -> tuple[str, ...]:
        """The selected leaves' paths, "/"-joined (e.g. ``"Dense_0/kernel"``), in flatten order."""
        return tuple(p for p, keep in zip(self.leaf_paths, self.selected) if keep)

    @property
    def size(self) -> int:
        """Number of scalar parameters in the subset (the dimension of its operators)."""
        return sum(math.prod(s) for s, keep in zip(self.shapes, self.selected) if keep)

    def restrict(self, tree: PyTree) -> PyTree:
        """``tree`` (like the parameters) with ``None`` at the leaves outside the subset: a subset vector."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                "`tree` must have the structure of the parameters the subset was built from; got\n"
                f"  tree: {treedef}\n  params: {self.treedef}"
            )
        for leaf, shape, path in zip(leaves, self.shapes, self.leaf_paths):
            if tuple(jnp.shape(leaf)) != shape:
                raise ValueError(f"`tree` leaf {path} has shape {jnp.shape(leaf)}; the parameter has {shape}.")
        return jax.tree.unflatten(self.treedef, [x if keep else None for x, keep in zip(leaves, self.selected)])

    def embed(self, vector: PyTree) -> PyTree:
        """A subset vector as a full pytree like the parameters, zeros outside the subset."""
        expected = jax.tree.structure(jax.tree.unflatten(self.treedef, [0 if k else None for k in self.selected]))
        leaves, treedef = jax.tree.flatten(vector)
        if treedef != expected:  # type: ignore[operator]  # mypy cannot resolve jaxlib's PyTreeDef stub
            raise ValueError(
                "`vector` must be a subset vector: a pytree like the parameters with None outside the subset "
                f"(build it with `subset.restrict(...)`); got\n  vector: {treedef}\n  expected: {expected}"
            )
        it, out = iter(leaves), []
        for keep, shape, dtype, path in zip(self.selected, self.shapes, self.dtypes, self.leaf_paths):
            if not keep:
                out.append(jnp.zeros(shape, dtype))
                continue
            leaf = next(it)
            if tuple(jnp.shape(leaf)) != shape:
                raise ValueError(f"`vector` leaf {path} has shape {jnp.shape(leaf)}; the parameter has {shape}.")
            out.append(leaf)
        return jax.tree.unflatten(self.treedef, out)


def param_subset(params: PyTree, predicate: Predicate) -> ParamSubset:
    """The subset of ``params``' leaves whose key path satisfies ``predicate`` (see :mod:`bnjax.curvature.subsets`).

    Args:
      params: the parameter pytree (arrays or ``ShapeDtypeStruct`` leaves; only shapes and dtypes are kept).
      predicate: ``predicate(path) -> bool`` on the path as a tuple of strings, e.g. :func:`layer` ``("Dense_0")``.

    Raises:
      ValueError: when the predicate selects nothing (the message lists the paths there are).
    """
    if not callable(predicate):
        raise TypeError(f"`predicate` must be callable (a path -> bool), e.g. layer('Dense_0'); got {predicate!r}.")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not with_path:
        raise ValueError("`params` has no array leaves.")
    names = [path_names(p) for p, _ in with_path]
    selected = tuple(_selects(predicate, n) for n in names)
    joined = tuple("/".join(n) for n in names)
    if not any(selected):
        raise ValueError(f"The predicate selects no parameter. The parameters' paths are: {', '.join(joined)}.")
    if isinstance(predicate, _Complement) and all(selected):
        raise ValueError(
            "everything_but(...) selects every parameter: its predicate selects none (a misspelt name?). The "
            f"parameters' paths are: {', '.join(joined)}."
        )
    shapes = tuple(tuple(jnp.shape(x)) for _, x in with_path)
    dtypes = tuple(str(jnp.result_type(x)) for _, x in with_path)
    return ParamSubset(treedef, selected, shapes, dtypes, joined)


@dataclasses.dataclass(frozen=True)
class _SubsetMatvec:
    matvec: Matvec
    subset: ParamSubset

    def __call__(self, vector: PyTree, *params: Any) -> PyTree:
        out = self.matvec(self.subset.embed(vector), *params)
        try:
            return self.subset.restrict(out)
        except ValueError as err:
            message = f"subset_matvec: the inner `matvec` must return a vector like the parameters. {err}"
            raise ValueError(message) from err


def subset_matvec(matvec: Matvec, subset: ParamSubset) -> Matvec:
    """``matvec`` restricted to ``subset``: ``v_S -> (A [v_S, 0])_S``, the block ``A_SS`` (same ``*params``).

    For a Hessian matvec this is the Hessian of the loss in the subset's parameters with the others held
    fixed. The result is static and compares by value (``matvec`` and ``subset``), so rebuilding it hits the
    solvers' compilation caches; each product costs one product of ``matvec``.
    """
    if not callable(matvec):
        raise TypeError(f"`matvec` must be callable (vector, *params) -> vector; got {matvec!r}.")
    if not isinstance(subset, ParamSubset):
        raise TypeError(f"`subset` must be a ParamSubset (from param_subset); got {subset!r}.")
    return _SubsetMatvec(matvec, subset)
