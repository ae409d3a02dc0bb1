"""Data-set-level losses and curvature operators, evaluated in chunks; the Flax ``batch_stats`` helper.

One mechanism, :func:`chunked_mean`, evaluates "the mean of a per-chunk quantity over a data set": the
loss, the gradient, Hessian- and GGN-vector products are all built on it. Chunks have a fixed size
(``chunk_size``, bounded memory); the last chunk may be smaller; each chunk's result is a mean over the
chunk and is weighted by the chunk's size, so the result is the mean over all ``N`` examples whenever the
per-chunk quantity is a per-example mean.

Batch norm and chunks: with BN in *train* mode the loss of a chunk is computed with that chunk's own batch
statistics, so the data-set "loss" is the mean over chunks of those chunk losses (a ghost batch of size
``chunk_size``), and it depends on ``chunk_size`` and on the order of the examples. This is the function that
(minibatch) gradient descent with batch size ``chunk_size`` optimizes; Cohen et al. (2021) measure sharpness
this way. In *eval* mode the running statistics are constants and the loss is an ordinary per-example mean.
The two Hessians differ; :func:`flax_curvature_fns` makes the choice explicit and never switches silently.

The chunk loop (``chunk_loop``) is a ``lax.scan`` (``"scan"``) or straight-line code, one copy of the chunk
computation per chunk (``"unroll"``: compile time grows with the number of chunks). ``"auto"`` (default)
unrolls up to :data:`MAX_UNROLL` chunks on CPU when the chunk computation contains a convolution, because
XLA:CPU runs backward convolutions 15-20x slower inside loop bodies (see :mod:`bnjax.loops`); with more chunks
it scans, and you may prefer a larger ``chunk_size``. Both give the same result up to rounding.

Sharded data (``shards=D``, or read from the data by :func:`data_shards`): chunk ``c`` is the ``c``-th slice
of ``chunk_size / D`` rows of every one of the ``D`` shards, so under a sharded ``jax.jit`` each device reads
only its own rows and no data moves between devices (see :func:`chunked_mean`); in train mode these
``chunk_size`` examples share BN statistics. With ``D = 1`` the chunks are the consecutive ones. The
parameter-sized result of every chunk is then reduced across devices, unless ``per_example=True`` declares
that the chunk loss is a mean of per-example terms (BN in eval mode or no BN): each device then keeps its
partial sum through the chunk loop and the devices reduce once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax import loops
from bnjax._validate import check_bool, check_like, check_positive_int
from bnjax.curvature.hvp import Matvec, gnvp, hvp

PyTree = Any
BNMode = Literal["train", "eval"]
ChunkLoop = Literal["auto", "scan", "unroll"]
CHUNK_LOOPS = ("auto", "scan", "unroll")
MAX_UNROLL = 16  # "auto" unrolls at most this many chunks (each copy adds to the compile time)


def _check_chunk_loop(chunk_loop: Any) -> str:
    if chunk_loop not in CHUNK_LOOPS:
        raise ValueError(f"`chunk_loop` must be one of {CHUNK_LOOPS}; got {chunk_loop!r}.")
    return chunk_loop


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("`data` has no array leaves; pass arrays with a leading example axis.")
    sizes = {jnp.shape(x)[0] for x in leaves if jnp.ndim(x)}
    if len(sizes) != 1 or any(not jnp.ndim(x) for x in leaves):
        raise ValueError(
            "Every leaf of `data` must have the same leading (example) axis size; got leading sizes "
            f"{[jnp.shape(x)[:1] for x in leaves]}."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("`data` has zero examples.")
    return n


def data_shards(data: PyTree) -> int:
    """How many shards the example (leading) axis of ``data`` is split into; 1 if it is not sharded.

    Read from each leaf's sharding: ``x.sharding`` for a concrete ``jax.Array`` (``NamedSharding(mesh,
    P("batch"))``, also a multi-process array from ``jax.make_array_from_process_local_data``), or the type
    ``jax.typeof(x).sharding`` of a traced array on a mesh with ``Explicit`` axes. Inside ``jax.jit`` on an
    ``Auto`` mesh a traced array's sharding is not visible and this returns 1: pass ``shards=`` there (e.g.
    ``shards=data_shards(data)`` computed outside ``jit``). Leaves that are not sharded along the example
    axis (NumPy arrays, replicated arrays) count 1; sharded leaves must agree.
    """
    counts = set()
    for x in jax.tree.leaves(data):
        if not jnp.ndim(x):
            continue
        if isinstance(x, jax.core.Tracer):
            sharding = jax.typeof(x).sharding
            spec: Sequence[Any] = getattr(sharding, "spec", ())
            entry = spec[0] if len(spec) else None
            names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
            count = math.prod(sharding.mesh.shape[name] for name in names)
        elif isinstance(x, jax.Array):
            count = x.shape[0] // x.sharding.shard_shape(x.shape)[0]
        else:
            count = 1
        counts.add(count)
    counts.discard(1)
    if len(counts) > 1:
        raise ValueError(
            f"The leaves of `data` are sharded into different numbers of shards along the example axis "
            f"({sorted(counts)}); shard every leaf the same way, e.g. all with NamedSharding(mesh, P('batch'))."
        )
    return counts.pop() if counts else 1


def _resolve_shards(shards: int | None, data: PyTree, n: int, chunk_size: int) -> int:
    """The shard count ``D`` to lay chunks out with, validated against ``data``, ``N`` and ``chunk_size``."""
    seen = data_shards(data)
    if shards is None:
        shards = seen
    shards = check_positive_int(shards, "shards")
    if seen not in (1, shards):
        raise ValueError(
            f"`shards={shards}` but the example axis of `data` is sharded into {seen} shards; pass "
            f"shards={seen} (or shards=None to read it from the data) so that every device reads only its rows."
        )
    if n % shards:
        raise ValueError(
            f"The data set's {n} examples cannot be split into shards={shards} equal shards; JAX shards an axis "
            f"only evenly. Drop or evaluate separately the last {n % shards} examples."
        )
    if chunk_size % shards:
        raise ValueError(
            f"`chunk_size={chunk_size}` must be a multiple of shards={shards}: every chunk takes "
            f"chunk_size / shards examples from each shard. Use e.g. "
            f"chunk_size={chunk_size - chunk_size % shards or shards}."
        )
    return shards


def chunked_mean(
    fn: Callable[[PyTree], PyTree],
    data: PyTree,
    chunk_size: int,
    *,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> PyTree:
    """Size-weighted mean of ``fn(chunk)`` over chunks of ``data``; data-parallel when ``data`` is sharded.

    Chunks with ``D`` shards: the example axis ``N`` is viewed as ``(D, N/D)`` (shard ``d`` = rows
    ``d*N/D ... (d+1)*N/D - 1``, which is how ``NamedSharding(mesh, P("batch"))`` places them), each shard is
    cut into local slices of ``chunk_size/D`` consecutive rows, and chunk ``c`` is the ``c``-th local slice
    of every shard, concatenated in shard order (``chunk_size`` examples). With ``D = 1`` these are the
    consecutive chunks ``data[c*chunk_size : (c+1)*chunk_size]``. Splitting the sharded axis at its major
    factor and slicing inside each shard moves no data, so under a sharded ``jax.jit`` every device reads
    only its own rows (memory per device: its ``N/D`` rows plus one chunk's activations), computes its
    ``chunk_size/D`` rows of every chunk, and the sum over chunks needs one all-reduce of the size of the
    result (e.g. the parameters for a gradient or HVP). Batch-norm statistics in train mode are those of the
    whole chunk (XLA reduces them across devices), so the result equals the one-device computation on the
    rows permuted into the same chunks.

    Args:
      fn: ``fn(chunk) -> pytree of arrays``, where ``chunk`` is ``data`` restricted to the chunk's examples.
        ``fn`` should return a *mean* over the chunk's examples.
      data: pytree of arrays sharing a leading example axis of size ``N`` (``N`` divisible by ``D``).
      chunk_size: examples per chunk (static), a multiple of ``D``. Values ``>= N`` mean a single chunk.
      chunk_loop: ``"scan"``, ``"unroll"`` or ``"auto"`` (see the module docstring).
      shards: ``D`` (static); ``None`` reads it from the data's sharding with :func:`data_shards` (concrete
        arrays, or traced ones on ``Explicit`` mesh axes). Inside ``jax.jit`` on an ``Auto`` mesh pass it
        explicitly: the tracer does not show its sharding, and ``D = 1`` would make every device gather
        every chunk. Shards of unsharded data are allowed (the same chunk composition on one device).
      per_example: declare that ``fn(chunk)`` is a mean of independent per-example terms: nothing couples
        the examples of a chunk (BN in eval mode, or no BN; not BN in train mode, whose batch statistics
        do). With ``D > 1`` each shard's ``chunk_size/D`` rows are then evaluated on their own
        (``jax.vmap`` of ``fn`` over the shard axis), every device keeps its partial sum through the
        chunk loop, and the devices reduce once at the end: one all-reduce of the result's size per call
        instead of one per chunk. The value is the same (up to rounding) whenever the declaration holds
        (:func:`flax_curvature_fns` reports whether it does: ``per_example``). For a train-mode BN loss it
        gives a different function: every device's ``chunk_size/D`` rows form their own ghost batch (the
        one-device result with ``chunk_size/D``), as in data-parallel training without synchronized BN.

    Returns:
      ``sum_c n_c * fn(chunk_c) / N``: full chunks of ``chunk_size`` examples, and if ``N/D`` is not a
      multiple of ``chunk_size/D`` a last chunk of ``D * (N/D mod chunk_size/D)`` examples (the rest of every
      shard). Full chunks run in the chunk loop; the smaller last chunk is one extra call (its shape differs).
      Integer or bool leaves of ``fn``'s result are averaged in floating point (at least float32).
    """
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    _check_chunk_loop(chunk_loop)
    n = _num_examples(data)
    chunk_size = min(chunk_size, n)
    shards = _resolve_shards(shards, data, n, chunk_size)
    local_n, local_chunk = n // shards, chunk_size // shards
    num_full, rest = divmod(local_n, local_chunk)
    # (N, ...) -> (D, N/D, ...): each device keeps its rows; chunk i is [:, i*local_chunk:(i+1)*local_chunk].
    local = jax.tree.map(lambda x: x.reshape(shards, local_n, *x.shape[1:]), data)

    split = check_bool(per_example, "per_example") and shards > 1

    def evaluate(start: Any, size: int) -> PyTree:
        """``fn`` of the chunk's rows at ``start`` (``size`` per shard): the chunk's mean, or with ``split``
        a ``(D, ...)`` stack of the shards' means (each device computes its own row, no reduction)."""
        part = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=1), local)
        if split:
            return jax.vmap(fn)(part)
        return fn(jax.tree.map(lambda x: x.reshape(shards * size, *x.shape[2:]), part))

    weight = local_chunk if split else chunk_size  # examples behind each mean
    jaxpr, out_shape = jax.make_jaxpr(lambda: evaluate(0, local_chunk), return_shape=True)()
    # Integer or bool results (a count, an accuracy as a 0/1 mean) are averaged in floating point, not truncated.
    total = jax.tree.map(lambda s: jnp.zeros(s.shape, _mean_dtype(s.dtype)), out_shape)

    def body(total: PyTree, i: Any) -> tuple[PyTree, None]:
        chunk_mean = evaluate(i * local_chunk, local_chunk)
        return jax.tree.map(lambda t, y: t + weight * y.astype(t.dtype), total, chunk_mean), None

    if chunk_loop == "auto":
        unroll = num_full <= MAX_UNROLL and jax.default_backend() == "cpu" and loops.has_convolution(jaxpr.jaxpr)
        chunk_loop = "unroll" if unroll else "scan"
    if chunk_loop == "scan" and num_full > 1:
        total, _ = lax.scan(body, total, jnp.arange(num_full))
    else:
        for i in range(num_full):
            total, _ = body(total, i)
    if rest:
        tail = evaluate(num_full * local_chunk, rest)
        total = jax.tree.map(lambda t, y: t + (rest if split else shards * rest) * y.astype(t.dtype), total, tail)
    if split:  # the one reduction across devices
        total = jax.tree.map(lambda t: jnp.sum(t, axis=0), total)
    return jax.tree.map(lambda t: (t / n).astype(t.dtype), total)


def _mean_dtype(dtype: Any) -> Any:
    """The dtype a mean of ``dtype`` values is accumulated and returned in: ``dtype`` when it is inexact."""
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.promote_types(dtype, jnp.float32)


def dataset_loss(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: PyTree,
    *args: Any,
    chunk_size: int,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> jax.Array:
    """Mean loss over ``data`` in chunks: ``chunked_mean(lambda c: loss_fn(params, c, *args), data, chunk_size)``.

    ``loss_fn(params, chunk, *args) -> scalar`` is the mean loss of a chunk; ``args`` are not chunked.
    ``shards``, ``per_example``: see :func:`chunked_mean` (data-parallel chunks of sharded data).
    """
    return chunked_mean(
        lambda c: loss_fn(params, c, *args),
        data,
        chunk_size,
        chunk_loop=chunk_loop,
        shards=shards,
        per_example=per_example,
    )


def dataset_value_and_grad(
    loss_fn: Callable[..., Any],
    params: PyTree,
    data: PyTree,
    *args: Any,
    chunk_size: int,
    has_aux: bool = False,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> tuple[Any, PyTree]:
    """``(mean loss, its gradient)`` over ``data`` in chunks; the gradient is a pytree like ``params``.

    With ``has_aux``, ``loss_fn`` returns ``(loss, aux)`` and the value is ``(mean loss, mean aux)`` (aux
    weighted by chunk size like the loss), as ``jax.value_and_grad(..., has_aux=True)`` would nest it.
    """
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
    return chunked_mean(
        lambda c: vg(params, c, *args), data, chunk_size, chunk_loop=chunk_loop, shards=shards, per_example=per_example
    )


def dataset_hvp(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    vector: PyTree,
    data: PyTree,
    *args: Any,
    chunk_size: int,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> PyTree:
    """Hessian of the chunked mean loss (see :func:`dataset_loss`) times ``vector``; a pytree like ``params``."""
    check_like(vector, params)
    return chunked_mean(
        lambda c: hvp(loss_fn, params, vector, c, *args),
        data,
        chunk_size,
        chunk_loop=chunk_loop,
        shards=shards,
        per_example=per_example,
    )


def dataset_gnvp(
    output_fn: Callable[..., jax.Array],
    output_loss: Callable[..., jax.Array],
    params: PyTree,
    vector: PyTree,
    data: PyTree,
    *args: Any,
    chunk_size: int,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> PyTree:
    """GGN of the chunked mean loss times ``vector``: ``output_fn(params, chunk, *args)``,
    ``output_loss(outputs, chunk, *args)`` (see :func:`bnjax.curvature.gnvp`)."""
    check_like(vector, params)
    return chunked_mean(
        lambda c: gnvp(output_fn, output_loss, params, vector, c, *args),
        data,
        chunk_size,
        chunk_loop=chunk_loop,
        shards=shards,
        per_example=per_example,
    )


def _chunk_options(chunk_size: Any, chunk_loop: Any, shards: Any, per_example: Any) -> dict[str, Any]:
    """The chunking keywords of the data-set operators, validated once when a matvec is built."""
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return {
        "chunk_size": chunk_size,
        "chunk_loop": _check_chunk_loop(chunk_loop),
        "shards": None if shards is None else check_positive_int(shards, "shards"),
        "per_example": check_bool(per_example, "per_example"),
    }


def dataset_hessian_matvec(
    loss_fn: Callable[..., jax.Array],
    chunk_size: int,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> Matvec:
    """Data-set Hessian as a matvec ``matvec(vector, params, data, *args)`` (see :func:`dataset_hvp`).

    The solvers call the matvec inside ``jax.jit``, where an ``Auto`` mesh hides the data's sharding: for
    sharded data pass ``shards`` (e.g. ``shards=data_shards(data)``), and ``per_example`` when the loss is a
    mean of per-example terms (one all-reduce per product instead of one per chunk), see :func:`chunked_mean`.
    """
    options = _chunk_options(chunk_size, chunk_loop, shards, per_example)

    def matvec(vector: PyTree, params: PyTree, data: PyTree, *args: Any) -> PyTree:
        return dataset_hvp(loss_fn, params, vector, data, *args, **options)

    return matvec


def dataset_ggn_matvec(
    output_fn: Callable[..., jax.Array],
    output_loss: Callable[..., jax.Array],
    chunk_size: int,
    chunk_loop: ChunkLoop = "auto",
    shards: int | None = None,
    per_example: bool = False,
) -> Matvec:
    """Data-set GGN as a matvec ``matvec(vector, params, data, *args)`` (see :func:`dataset_gnvp`; ``shards``
    and ``per_example`` as in :func:`dataset_hessian_matvec`)."""
    options = _chunk_options(chunk_size, chunk_loop, shards, per_example)

    def matvec(vector: PyTree, params: PyTree, data: PyTree, *args: Any) -> PyTree:
        return dataset_gnvp(output_fn, output_loss, params, vector, data, *args, **options)

    return matvec


class FlaxCurvatureFns(NamedTuple):
    """Plain functions of ``(params, batch, batch_stats)`` built from a Flax ``apply_fn``.

    ``batch`` is ``(inputs, targets)``; ``batch_stats`` is the model's ``batch_stats`` collection (or
    ``None`` for a model without batch norm), passed explicitly so one compiled solver serves every value.
    """

    output_fn: Callable[..., jax.Array]  # (params, batch, batch_stats) -> outputs
    output_loss: Callable[..., jax.Array]  # (outputs, batch, batch_stats) -> scalar
    loss_fn: Callable[..., jax.Array]  # (params, batch, batch_stats) -> scalar
    # True unless bn_mode="train": the loss of a chunk is then a mean of per-example terms (with a per-example
    # mean `loss` and no other layer that couples examples); pass it as the data-set operators' `per_example`.
    per_example: bool = True


def _pair(batch: Any) -> tuple[Any, Any]:
    """``batch`` as the ``(inputs, targets)`` pair of :func:`flax_curvature_fns`, or a ValueError naming it."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    shown = f"an array of shape {jnp.shape(batch)}" if hasattr(batch, "shape") else f"a {type(batch).__name__}"
    raise ValueError(
        f"`batch` must be an (inputs, targets) pair, e.g. `(x, y)` with leading axes of the same size; got {shown}."
    )


def flax_curvature_fns(
    apply_fn: Callable[..., Any],
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    bn_mode: BNMode | None,
    train_kwarg: str = "train",
) -> FlaxCurvatureFns:
    """Wrap a Flax model as plain functions for the curvature tools, with an explicit batch-norm mode.

    Args:
      apply_fn: the model's ``apply``; called as ``apply_fn(variables, inputs, **{train_kwarg: bool},
        mutable=...)``. A model whose flag means the opposite (``use_running_average``) can be wrapped:
        ``lambda v, x, train, **kw: model.apply(v, x, use_running_average=not train, **kw)``.
      loss: ``loss(outputs, targets) -> scalar``, a mean over the batch.
      bn_mode: ``"train"``: every batch (chunk) is normalized with its own batch statistics; the running
        statistics are read by nobody, the updated ones Flax returns are discarded, so ``batch_stats`` is
        neither modified nor returned. ``"eval"``: the running statistics in ``batch_stats`` normalize. It is
        required (no default) whenever ``batch_stats`` is passed, because the two give different Hessians.
        ``None`` is allowed only for models without ``batch_stats``; the flag is then not passed at all.
      train_kwarg: name of the model's train-mode keyword argument.

    Returns:
      :class:`FlaxCurvatureFns` whose functions take ``(params, batch, batch_stats)``. Use ``loss_fn`` with
      :func:`hvp` / :func:`dataset_hvp` and ``output_fn`` + ``output_loss`` with the GGN products, and its
      ``per_example`` (False only for ``bn_mode="train"``) as the data-set operators' ``per_example``.
    """
    if bn_mode not in ("train", "eval", None):
        raise ValueError(f"`bn_mode` must be 'train', 'eval' or None (model without batch_stats); got {bn_mode!r}.")

    def output_fn(params: PyTree, batch: tuple[Any, Any], batch_stats: PyTree | None) -> jax.Array:
        inputs = _pair(batch)[0]
        if batch_stats is None:
            flag = {} if bn_mode is None else {train_kwarg: bn_mode == "train"}
            return apply_fn({"params": params}, inputs, **flag)
        if bn_mode is None:
            raise ValueError(
                "The model has `batch_stats` but `bn_mode` is None. Pass bn_mode='train' (normalize each "
                "chunk with its own batch statistics: the function training optimizes) or bn_mode='eval' "
                "(normalize with the running statistics); the two have different Hessians."
            )
        variables = {"params": params, "batch_stats": batch_stats}
        if bn_mode == "eval":
            return apply_fn(variables, inputs, **{train_kwarg: False})
        outputs, _discarded_stats = apply_fn(variables, inputs, **{train_kwarg: True}, mutable=["batch_stats"])
        return outputs

    def output_loss(outputs: jax.Array, batch: tuple[Any, Any], batch_stats: PyTree | None) -> jax.Array:
        del batch_stats
        return loss(outputs, _pair(batch)[1])

    def loss_fn(params: PyTree, batch: tuple[Any, Any], batch_stats: PyTree | None) -> jax.Array:
        return output_loss(output_fn(params, batch, batch_stats), batch, batch_stats)

    return FlaxCurvatureFns(output_fn, output_loss, loss_fn, per_example=bn_mode != "train")
