"""Jitted training loops for the experiments: full-batch and minibatch, any optax optimizer.

The model is a Flax module from :mod:`experiments.models` called as ``model.apply(variables, x, train=...)``.
A loss function here has the signature ``loss_fn(params, batch_stats, x, y, key) -> (loss, aux)`` with
``aux = (new_batch_stats, logits)``: train mode (batch statistics; running statistics updated and returned),
noise drawn from ``key`` for noisy BN. Steps run in segments with :func:`bnjax.loops.scan_steps`: by default
one jitted ``lax.scan`` per segment (one host round trip per segment), but one jitted call per step for conv
nets on CPU, whose backward convolutions XLA:CPU runs 15-20x slower inside a loop body (``placement``); after
each segment the losses are checked and a non-finite one stops the run with :class:`Diverged`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from bnjax import loops

PyTree = Any
LOSSES = ("square", "cross_entropy")


class Diverged(FloatingPointError):
    """Training produced a non-finite loss."""


class TrainState(NamedTuple):
    """Everything a training run carries from step to step.

    Fields:
      params: the model's ``params`` collection.
      batch_stats: the model's ``batch_stats`` collection (an empty dict for models without BN).
      opt_state: the optax optimizer state.
      step: int32[] number of steps taken.
      key: PRNG key for the noise of noisy BN and for minibatch shuffling.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: jax.Array
    key: jax.Array


class StepMetrics(NamedTuple):
    """Per-step training metrics (each float32[] or float32[steps] when stacked by ``scan``).

    Fields:
      loss: training loss of the batch, before the update.
      accuracy: training accuracy of the batch, before the update.
    """

    loss: jax.Array
    accuracy: jax.Array


def check_loss_and_norms(loss: str, norms: tuple[str, ...]) -> None:
    """A ValueError unless ``loss`` is one of :data:`LOSSES` and every norm is ``"none"`` or ``"bn"`` (the
    options of the experiments that compare a net with and without batch norm)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
    if not norms:
        raise ValueError("norms is empty: name at least one of 'none' and 'bn'.")
    for norm in norms:
        if norm not in ("none", "bn"):
            raise ValueError(f"norms must be 'none' or 'bn' for this experiment, got {norm!r}.")


def square_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``mean_i 0.5 * ||logits_i - onehot(y_i)||^2`` (Cohen et al. 2021's square loss); logits ``[n, classes]``."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return 0.5 * jnp.mean(jnp.sum((logits - targets) ** 2, axis=-1))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; logits ``[n, classes]``, integer labels ``[n]``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def output_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The loss on model outputs by name: ``"square"`` or ``"cross_entropy"``."""
    if name == "square":
        return square_loss
    if name == "cross_entropy":
        return cross_entropy_loss
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}.")


def make_loss_fn(model: nn.Module, loss: str) -> Callable[..., tuple[jax.Array, tuple[PyTree, jax.Array]]]:
    """``loss_fn(params, batch_stats, x, y, key) -> (loss, (new_batch_stats, logits))`` in train mode."""
    out_loss = output_loss(loss)

    def loss_fn(params, batch_stats, x, y, key):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"noise": key},
        )
        return out_loss(logits, y), (updates.get("batch_stats", {}), logits)

    return loss_fn


def init_train_state(
    model: nn.Module, example_x: jax.Array, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """Initialize parameters (from ``seed``), running statistics and the optimizer state."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init({"params": init_key, "noise": init_key}, example_x, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(params, batch_stats, optimizer.init(params), jnp.zeros((), jnp.int32), run_key)


def init_seed_states(
    model: nn.Module, example_x: jax.Array, optimizer: optax.GradientTransformation, seeds: tuple[int, ...]
) -> TrainState:
    """:func:`init_train_state` for each seed, stacked on a leading seed axis: runs over seeds as one batch.

    Drive it with a runner built with ``over_seeds=True`` (:func:`full_batch_runner`, :func:`minibatch_runner`),
    which vmaps the step over that axis: every seed has its own initialization, minibatches and noise.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed, got ().")
    states = [init_train_state(model, example_x, optimizer, s) for s in seeds]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def make_train_step(
    model: nn.Module, loss: str, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepMetrics]]:
    """One optimizer step on a batch ``(x, y)``: ``step(state, x, y) -> (new_state, metrics)`` (not jitted)."""
    loss_fn = make_loss_fn(model, loss)

    def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, StepMetrics]:
        key, noise_key = jax.random.split(state.key)
        (value, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, y, noise_key
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return TrainState(params, batch_stats, opt_state, state.step + 1, key), StepMetrics(value, accuracy)

    return step


def _seeded(step: Callable, over_seeds: bool) -> Callable:
    """``step`` vmapped over the leading seed axis of the state (data shared), or ``step`` itself."""
    return jax.vmap(step, in_axes=(0, None, None)) if over_seeds else step


def full_batch_runner(
    step: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepMetrics]],
    placement: loops.Placement = "auto",
    *,
    over_seeds: bool = False,
) -> Callable[[TrainState, jax.Array, jax.Array, int], tuple[TrainState, StepMetrics]]:
    """``run(state, x, y, num_steps) -> (state, metrics stacked over steps)``: full-batch GD steps, placed by
    :func:`bnjax.loops.scan_steps` (one jitted scan, or one jitted call per step). With ``over_seeds`` the
    state has a leading seed axis (:func:`init_seed_states`) and the metrics are ``[steps, seeds]``."""
    body = _seeded(step, over_seeds)

    def run(state, x, y, num_steps):
        return loops.scan_steps(body, state, num_steps, x, y, placement=placement)

    return run


def minibatch_runner(
    step: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepMetrics]],
    batch_size: int,
    placement: loops.Placement = "auto",
    *,
    over_seeds: bool = False,
) -> Callable[[TrainState, jax.Array, jax.Array, int], tuple[TrainState, StepMetrics]]:
    """``run(state, x, y, num_steps) -> (state, metrics per step)``: minibatch steps, placed (and vmapped over
    seeds) like :func:`full_batch_runner`.

    Each step draws ``batch_size`` distinct examples uniformly at random (from ``state.key``), so a run can
    be cut into segments of any length without epoch bookkeeping; every batch has exactly ``batch_size``
    examples (BN statistics depend on the batch size).
    """

    def body(s, x, y):
        key, perm_key = jax.random.split(s.key)
        idx = jax.random.permutation(perm_key, x.shape[0])[:batch_size]
        return step(s._replace(key=key), x[idx], y[idx])

    seeded = _seeded(body, over_seeds)

    def run(state, x, y, num_steps):
        n = x.shape[0]
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in (0, {n}] for {n} training examples, got {batch_size}.")
        return loops.scan_steps(seeded, state, num_steps, x, y, placement=placement)

    return run


def check_finite(losses: jax.Array | np.ndarray, first_step: int, what: str = "") -> np.ndarray:
    """Host-side check of a chunk of losses; raises :class:`Diverged` naming the first bad step."""
    losses = np.asarray(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise Diverged(
            f"non-finite training loss ({losses[bad[0]]}) at step {first_step + int(bad[0])}{what}: the run "
            "diverged; lower the learning rate or raise the number of steps between checks to find where."
        )
    return losses


class TrainLog(NamedTuple):
    """What :func:`train_in_segments` returns.

    Fields:
      state: the final :class:`TrainState`.
      losses: float32[steps] training loss of each step's batch (before the update); ``[seeds, steps]`` for a
        run over seeds.
      accuracies: float32[steps] (or ``[seeds, steps]``) training accuracy of each step's batch.
      steps: int[checkpoints] step count after each segment.
      measurements: the ``measure`` results after each segment (host NumPy pytrees), or empty.
      diverged_at: for a run over seeds, int[seeds]: the first step whose loss was non-finite, -1 for a seed
        that finished (its losses and measurements after that step are NaN); None for a single run.
    """

    state: TrainState
    losses: np.ndarray
    accuracies: np.ndarray
    steps: np.ndarray
    measurements: list
    diverged_at: np.ndarray | None = None


def train_in_segments(
    run: Callable[[TrainState, jax.Array, jax.Array, int], tuple[TrainState, StepMetrics]],
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    *,
    num_steps: int,
    every: int,
    measure: Callable[[TrainState], PyTree] | None = None,
    bar: Any = None,
    label: str = "",
) -> TrainLog:
    """Drive ``run`` (from :func:`full_batch_runner` or :func:`minibatch_runner`) for ``num_steps`` steps.

    Every ``every`` steps (one jitted segment) the losses are checked (a non-finite one raises
    :class:`Diverged`), ``measure(state)`` is taken if given (jit it yourself) and ``bar`` (a
    :class:`experiments.progress.StepBar`, or a tqdm bar counting steps) advances by ``every``.
    ``num_steps`` must be a multiple of ``every``.

    A run over seeds (a runner with ``over_seeds=True``) records the step at which each seed diverged in
    ``diverged_at`` and goes on with the others (seeds are independent under ``vmap``); it raises
    :class:`Diverged` only when every seed has.
    """
    if every < 1 or num_steps % every:
        raise ValueError(f"num_steps ({num_steps}) must be a positive multiple of every ({every}).")
    losses, accuracies, steps, measurements = [], [], [], []
    diverged_at = None
    if bar is not None and hasattr(bar, "start_run"):
        bar.start_run()
        if label:
            bar.set_label(label)
    for i in range(num_steps // every):
        state, metrics = run(state, x, y, every)
        chunk = np.asarray(metrics.loss)
        if chunk.ndim == 2:  # [every, seeds]
            if diverged_at is None:
                diverged_at = np.full(chunk.shape[1], -1)
            for s in np.flatnonzero(diverged_at < 0):
                bad = np.flatnonzero(~np.isfinite(chunk[:, s]))
                if bad.size:
                    diverged_at[s] = i * every + int(bad[0])
            if np.all(diverged_at >= 0):
                check_finite(chunk[:, int(np.argmax(diverged_at))], i * every, f" ({label}, every seed)")
            losses.append(chunk.T)
            accuracies.append(np.asarray(metrics.accuracy).T)
        else:
            losses.append(check_finite(chunk, i * every, f" ({label})" if label else ""))
            accuracies.append(np.asarray(metrics.accuracy))
        steps.append(int(np.max(state.step)))
        if measure is not None:
            measurements.append(jax.tree.map(np.asarray, measure(state)))
        if bar is not None:  # a progress.StepBar (the first segment compiles), or any tqdm bar
            bar.advance(every, warm=i > 0) if hasattr(bar, "advance") else bar.update(every)
    axis = -1
    return TrainLog(
        state,
        np.concatenate(losses, axis),
        np.concatenate(accuracies, axis),
        np.asarray(steps),
        measurements,
        diverged_at,
    )


def landscape_loss(model: nn.Module, loss: str) -> Callable[[PyTree, tuple, PyTree], jax.Array]:
    """The train-mode loss in :mod:`bnjax.landscape`'s convention: ``loss_fn(params, (x, y, key), batch_stats)``.

    The noise key travels in the batch, so a noisy-BN loss is a deterministic function of its arguments.
    """
    loss_fn = make_loss_fn(model, loss)
    return lambda params, batch, batch_stats: loss_fn(params, batch_stats, *batch)[0]


def eval_metrics(
    model: nn.Module, loss: str, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, *, train: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``(loss, accuracy)`` as float32[] arrays (jittable, vmappable); see :func:`evaluate`."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        noise = {"noise": jax.random.PRNGKey(0)}
        logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=noise)
    else:
        logits = model.apply(variables, x, train=False)
    return output_loss(loss)(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def evaluate(
    model: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array, y: jax.Array, loss: str, *, train: bool = False
) -> tuple[float, float]:
    """``(loss, accuracy)`` of the whole ``(x, y)`` in eval mode (running statistics) or, with ``train=True``,
    normalized with the statistics of ``x`` itself (running statistics left unchanged)."""
    value, accuracy = _evaluate(model, loss, train, params, batch_stats, x, y)
    return float(value), float(accuracy)


_evaluate = jax.jit(
    lambda model, loss, train, params, batch_stats, x, y: eval_metrics(
        model, loss, params, batch_stats, x, y, train=train
    ),
    static_argnums=(0, 1, 2),
)
