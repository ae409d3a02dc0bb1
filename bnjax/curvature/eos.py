"""Edge-of-stability tracking: sharpness vs the optimizer's stability threshold along any training loop.

Thresholds (Cohen et al. 2021, 2022; each rule's docstring derives its own from the optimizer's update on a
quadratic), for learning rate ``eta``:

* gradient descent: ``2 / eta``;
* heavy-ball momentum ``beta``: ``(2 + 2 beta) / eta``; Nesterov momentum: ``(2 + 2 beta) / ((1 + 2 beta) eta)``;
* RMSProp: the *preconditioned* sharpness, top eigenvalue of ``P^{-1/2} H P^{-1/2}`` with RMSProp's
  ``P = diag(sqrt(nu + eps))``, against ``2 / eta``;
* Adam (``beta1``): the preconditioned sharpness with ``P = diag(sqrt(v_hat) + eps)`` from Adam's state,
  against ``(2 + 2 beta1) / ((1 - beta1) eta)`` (``38 / eta`` for ``beta1 = 0.9``); AdamW with decoupled
  weight decay ``wd``: the same, lowered by ``wd (1 + beta1) / (1 - beta1)``.

``eta`` (and AdamW's ``wd``) may be optax schedules: each record's threshold is the one at its step
(:meth:`StabilityRule.threshold_at`).

Usage (any loop; ``loss_fn(params, *args) -> scalar`` is the *full-batch* training loss), here on a tiny
model with full-batch gradient descent:

>>> import pathlib, tempfile
>>> import jax, jax.numpy as jnp, optax
>>> from bnjax.curvature import EoSTracker, gd_rule, plot_records, save_records
>>> x, y = jax.random.normal(jax.random.key(0), (32, 4)), jnp.ones(32)
>>> def loss_fn(params, x, y):
...     return jnp.mean((jnp.tanh(x @ params["a"]) @ params["b"] - y) ** 2)
>>> params = {"a": jax.random.normal(jax.random.key(1), (4, 8)), "b": jnp.zeros(8)}
>>> lr, num_steps = 0.1, 30
>>> opt = optax.sgd(lr)
>>> opt_state = opt.init(params)
>>> @jax.jit
... def apply_gradients(params, opt_state, grads):
...     updates, opt_state = opt.update(grads, opt_state)
...     return optax.apply_updates(params, updates), opt_state
>>> @jax.jit
... def train_step(params, opt_state):
...     return apply_gradients(params, opt_state, jax.grad(loss_fn)(params, x, y))
>>> tracker = EoSTracker(loss_fn, gd_rule(lr), every=10)
>>> state = tracker.init(params, jax.random.key(0))
>>> records = []
>>> for step in range(num_steps):
...     params, opt_state = train_step(params, opt_state)
...     record, state = tracker.update(state, step, params, x, y, opt_state=opt_state)
...     if record is not None:
...         records.append(record)
>>> [r["step"] for r in records], all(r["converged"] for r in records)
([0, 10, 20], True)
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> save_records(records, out / "eos.json").name, plot_records(records, out / "eos.png").name
('eos.json', 'eos.png')

Each measurement is the loss and a warm-started :func:`~bnjax.curvature.lanczos_top` (default) or
:func:`~bnjax.curvature.power_iteration`, started from the previous eigenvector and eigenvalue, so a converged
warm start costs a single Hessian-vector product. With ``EoSTracker(..., k=k)`` it tracks the top ``k``
eigenvalues by block Lanczos started from the previous ``k`` Ritz vectors (records gain ``eigenvalues``,
``residuals`` and ``pairs_converged``). The training loss is linearized once per measurement
(``jax.linearize`` of its value and gradient, when the stored residuals fit ``linearize_budget``): the loss and
the gradient come out of that one pass, and every Hessian-vector product after it runs only the tangent pass.
With ``placement`` the solver loop runs inside one compiled program or is driven from Python (the default
picks the latter on CPU for conv nets; see :mod:`bnjax.loops`).

Cheaper, when the loop can take its gradient from the tracker at due steps: :meth:`EoSTracker.value_and_grad`
computes the loss, the gradient and the first Hessian-vector product in one forward-over-reverse pass
(continuing the example above):

>>> for step in range(num_steps):
...     if tracker.due(step):
...         (loss, grads), record, state = tracker.value_and_grad(state, step, params, x, y)
...         params, opt_state = apply_gradients(params, opt_state, grads)
...     else:
...         params, opt_state = train_step(params, opt_state)
>>> bool(record["sharpness"] > 0)
True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import loops
from bnjax._validate import check_bool, check_like, check_positive_int
from bnjax.curvature.eigen import (
    DEFAULT_LINEARIZE_BUDGET,
    _check_tolerance,
    _gradient_mix,
    _Layout,
    _Operator,
    _top_block,
    _top_pair,
    _TopBlock,
    _TopPair,
    _unit,
    check_linearize_budget,
    random_like,
    tree_bytes,
)
from bnjax.curvature.hvp import Matvec, hessian_matvec
from bnjax.curvature.operators import data_shards, dataset_hessian_matvec, dataset_value_and_grad

PyTree = Any


Schedule = Callable[[Any], Any]  # an optax schedule: step (int) -> learning rate (scalar)


@dataclasses.dataclass(frozen=True)
class StabilityRule:
    """Which sharpness to measure for an optimizer, and its stability threshold at each step.

    The threshold at step ``t`` is ``coefficient / lr(t) - decay_coefficient * weight_decay(t)``, where ``lr``
    and ``weight_decay`` are constants or optax schedules (``step -> value``). Build rules with
    :func:`gd_rule`, :func:`heavy_ball_rule`, :func:`nesterov_rule`, :func:`rmsprop_rule`, :func:`adam_rule`
    or :func:`adamw_rule`, whose docstrings derive each threshold; the tracker records
    :meth:`threshold_at` of every checkpoint's step.
    """

    name: str  # "gd" | "heavy_ball" | "nesterov" | "rmsprop" | "adam" | "adamw"
    learning_rate: float | Schedule  # constant, or an optax schedule step -> lr
    coefficient: float  # c in c / lr: the threshold at weight decay 0 times the learning rate
    preconditioner: str | None = None  # None (plain sharpness) | "adam" | "rms": whose P to read from opt_state
    b2: float = 0.999  # decay of the second moment (Adam's b2, RMSProp's decay): bias correction of nu
    eps: float = 1e-8  # Adam: added to sqrt(nu_hat); RMSProp: added inside or outside the root (eps_in_sqrt)
    eps_root: float = 0.0  # Adam only: added to nu_hat inside the square root
    eps_in_sqrt: bool = True  # RMSProp only: P = sqrt(nu_hat + eps) (True, optax's default) or sqrt(nu_hat) + eps
    weight_decay: float | Schedule = 0.0  # decoupled weight decay (AdamW), constant or schedule
    decay_coefficient: float = 0.0  # d: how much one unit of weight decay lowers the threshold
    momentum: float = 0.0  # the momentum the coefficient assumes: heavy ball's / Nesterov's beta, Adam's b1, RMSProp's

    def __post_init__(self) -> None:
        """A rule built directly is checked as the builders check their arguments."""
        if self.name not in _RULE_NAMES:
            raise ValueError(f"StabilityRule: `name` must be one of {_RULE_NAMES}; got {self.name!r}.")
        if self.preconditioner not in (None, "adam", "rms"):
            raise ValueError(
                f"StabilityRule: `preconditioner` must be None, 'adam' or 'rms'; got {self.preconditioner!r}."
            )
        coefficient = _number(self.coefficient)
        if (
            isinstance(coefficient, bool)
            or not isinstance(coefficient, (int, float, np.integer, np.floating))
            or (not (math.isfinite(coefficient) and coefficient > 0))
        ):
            raise ValueError(f"StabilityRule: `coefficient` must be a finite number > 0; got {self.coefficient!r}.")
        set_field = functools.partial(object.__setattr__, self)
        set_field("coefficient", float(coefficient))
        set_field("learning_rate", _check_lr(self.learning_rate, "learning_rate"))
        set_field("b2", _check_beta(self.b2, "b2"))
        set_field("momentum", _check_beta(self.momentum, "momentum"))
        for name in ("eps", "eps_root", "decay_coefficient"):
            set_field(name, _check_eps(getattr(self, name), name))
        if not callable(self.weight_decay):
            set_field("weight_decay", _check_eps(self.weight_decay, "weight_decay"))
        if not isinstance(self.eps_in_sqrt, bool):
            raise TypeError(f"`eps_in_sqrt` must be a bool; got {self.eps_in_sqrt!r}.")

    @property
    def preconditioned(self) -> bool:
        """Whether the rule measures the preconditioned sharpness ``P^{-1/2} H P^{-1/2}`` (needs ``opt_state``)."""
        return self.preconditioner is not None

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate or the weight decay is a schedule (then the threshold depends on the step)."""
        return callable(self.learning_rate) or callable(self.weight_decay)

    def threshold_at(self, step: int) -> float:
        """The stability threshold at ``step``, using that step's learning rate (and weight decay).

        ``step`` is the count the optax schedule is called with for the update being analysed: the loop index
        of the tracker's examples (``optax.sgd(schedule)`` uses ``schedule(step)`` in its ``step``-th update,
        counting from 0). A learning rate of 0 gives ``inf`` (every curvature is stable).
        """
        lr = _value_at(self.learning_rate, step, "learning_rate")
        wd = _value_at(self.weight_decay, step, "weight_decay")
        if lr == 0:
            return math.inf
        return self.coefficient / lr - self.decay_coefficient * wd

    @property
    def threshold(self) -> float:
        """The threshold of a constant learning rate and weight decay (for a schedule use :meth:`threshold_at`)."""
        if self.scheduled:
            raise TypeError(
                f"The {self.name!r} rule has a schedule, so its threshold depends on the step: call "
                "`rule.threshold_at(step)` instead of `rule.threshold`."
            )
        return self.threshold_at(0)


_RULE_NAMES = ("gd", "heavy_ball", "nesterov", "rmsprop", "adam", "adamw")


def _value_at(value: float | Schedule, step: int, name: str) -> float:
    """A constant or a schedule's value at ``step``, checked to be a finite number >= 0."""
    out = value(step) if callable(value) else value
    try:
        out = float(np.asarray(out))
    except (TypeError, ValueError) as e:
        raise TypeError(f"The {name} schedule must return a scalar; at step {step} it returned {out!r}.") from e
    if not (math.isfinite(out) and out >= 0):
        raise ValueError(f"The {name} at step {step} must be a finite number >= 0; got {out!r}.")
    return out


def _number(value: Any) -> Any:
    """A concrete 0-d real NumPy/JAX array as a Python float (``jnp.array(0.1)`` is a valid rate); else as is."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or np.ndim(value) != 0 or isinstance(value, (np.generic, jax.core.Tracer)):
        return value
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        return value
    return float(value)


def _check_lr(lr: Any, name: str = "lr") -> float | Schedule:
    """A positive number as a float, or a schedule (callable ``step -> value``), checked at step 0."""
    if callable(lr):
        _value_at(lr, 0, name)
        return lr
    lr = _number(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) or not 0 < lr < math.inf:
        raise ValueError(
            f"The learning rate `{name}` must be a finite positive number or an optax schedule (a callable "
            f"step -> lr); got {lr!r}."
        )
    return float(lr)


def _check_beta(value: Any, name: str) -> float:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1); got {value!r}.")
    return float(value)


def _check_eps(value: Any, name: str) -> float:
    value = _number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0; got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    return float(value)


def _momentum_coefficient(momentum: float | None, nesterov: bool, name: str = "momentum") -> float:
    """``c`` of the threshold ``c / lr`` of (preconditioned) GD with optax's ``trace(momentum, nesterov)``."""
    if not isinstance(nesterov, bool):
        raise TypeError(f"`nesterov` must be a bool; got {nesterov!r}.")
    if momentum is None:
        if nesterov:
            raise ValueError("`nesterov=True` needs a `momentum` (as in optax).")
        return 2.0
    beta = _check_beta(momentum, name)
    return (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta) if nesterov else 2.0 + 2.0 * beta


def gd_rule(lr: float | Schedule) -> StabilityRule:
    """Full-batch gradient descent (``optax.sgd(lr)``): sharpness against ``2 / lr``.

    Derivation (Cohen et al. 2021, §2): on the quadratic model ``L(x) = x^T H x / 2`` gradient descent is
    ``x <- (I - lr H) x``; along an eigenvector of ``H`` with eigenvalue ``a`` the factor is ``1 - lr a``,
    whose modulus exceeds 1 (divergence) exactly when ``a > 2 / lr``. ``lr`` may be an optax schedule: the
    threshold at a step uses that step's learning rate (:meth:`StabilityRule.threshold_at`).
    """
    return StabilityRule("gd", _check_lr(lr), 2.0)


def heavy_ball_rule(lr: float | Schedule, beta: float) -> StabilityRule:
    """Heavy-ball momentum (``optax.sgd(lr, momentum=beta)``): sharpness against ``(2 + 2 beta) / lr``.

    Derivation (Cohen et al. 2021, Appendix on momentum): optax's update is ``m <- beta m + g``,
    ``x <- x - lr m``. With ``g = a x`` along an eigenvector of ``H`` the pair ``(x, m)`` follows a linear
    recurrence with characteristic polynomial ``p(z) = z^2 - (1 + beta - lr a) z + beta``. Its roots leave the
    unit disc through ``z = -1`` when ``p(-1) = 2 + 2 beta - lr a`` turns negative (the other Jury conditions,
    ``p(1) = lr a > 0`` and ``beta < 1``, hold), i.e. when ``a > (2 + 2 beta) / lr``.
    """
    beta = _check_beta(beta, "beta")
    return StabilityRule("heavy_ball", _check_lr(lr), _momentum_coefficient(beta, False, "beta"), momentum=beta)


def nesterov_rule(lr: float | Schedule, beta: float) -> StabilityRule:
    """Nesterov momentum (``optax.sgd(lr, momentum=beta, nesterov=True)``): ``(2 + 2 beta) / ((1 + 2 beta) lr)``.

    Derivation (the value Cohen et al. 2021 give for Nesterov momentum in their appendix on momentum): optax's
    update is ``m <- g + beta m``, ``x <- x - lr (g + beta m)`` (the new ``m``). With ``g = a x`` the pair
    ``(x, m)`` has the recurrence matrix ``[[1 - lr a (1 + beta), -lr beta^2], [a, beta]]`` and characteristic
    polynomial ``p(z) = z^2 - (1 + beta)(1 - lr a) z + beta (1 - lr a)``. ``p(1) = lr a > 0``, and the constant
    term ``beta (1 - lr a)`` has modulus below 1 up to ``lr a = 1 + 1 / beta``; the first condition to fail is
    ``p(-1) = 1 + (1 + 2 beta)(1 - lr a) > 0``, at ``a = (2 + 2 beta) / ((1 + 2 beta) lr)`` (``1.357 / lr`` for
    ``beta = 0.9``, against ``3.8 / lr`` for heavy ball: the look-ahead makes the method less tolerant of
    curvature). ``beta = 0`` gives gradient descent's ``2 / lr``.
    """
    beta = _check_beta(beta, "beta")
    return StabilityRule("nesterov", _check_lr(lr), _momentum_coefficient(beta, True, "beta"), momentum=beta)


def rmsprop_rule(
    lr: float | Schedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    *,
    eps_in_sqrt: bool = True,
    momentum: float | None = None,
    nesterov: bool = False,
) -> StabilityRule:
    """RMSProp (``optax.rmsprop``, same arguments): preconditioned sharpness against ``2 / lr`` (no momentum).

    The preconditioner is RMSProp's ``P = sqrt(nu_hat + eps)`` (``eps_in_sqrt=True``, optax's default) or
    ``sqrt(nu_hat) + eps``, with ``nu_hat = nu`` (optax.rmsprop does no bias correction by default) or
    ``nu / (1 - decay**count)`` with ``bias_correction=True`` (read from the state, which then has a count);
    ``centered=True`` uses ``nu_hat - mu_hat**2``. See :func:`adam_preconditioner`.

    Derivation (Cohen et al. 2022, §3, who treat RMSProp as Adam with ``b1 = 0``): over the few steps in which
    ``P`` barely changes, RMSProp on the quadratic model is ``x <- x - lr P^{-1} H x``, i.e. gradient descent
    on ``y = P^{1/2} x`` with the matrix ``P^{-1/2} H P^{-1/2}``; it is stable while that matrix's top
    eigenvalue (the preconditioned sharpness) is below ``2 / lr``. With ``momentum`` optax applies
    ``trace(momentum, nesterov)`` after the preconditioning and the learning rate, so the recurrence is heavy
    ball (``(2 + 2 momentum) / lr``) or Nesterov (``(2 + 2 momentum) / ((1 + 2 momentum) lr)``) on ``y``; see
    :func:`heavy_ball_rule` and :func:`nesterov_rule`.
    """
    if not isinstance(eps_in_sqrt, bool):
        raise TypeError(f"`eps_in_sqrt` must be a bool; got {eps_in_sqrt!r}.")
    coefficient = _momentum_coefficient(momentum, nesterov)
    return StabilityRule(
        "rmsprop", _check_lr(lr), coefficient, "rms", _check_beta(decay, "decay"), _check_eps(eps, "eps"),
        eps_in_sqrt=eps_in_sqrt, momentum=0.0 if momentum is None else momentum,
    )  # fmt: skip


def adam_rule(
    lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0
) -> StabilityRule:
    """Adam (``optax.adam``): preconditioned sharpness against ``(2 + 2 b1) / ((1 - b1) lr)`` (``38 / lr`` at 0.9).

    Derivation (Cohen et al. 2022, §3): with the preconditioner ``P = sqrt(nu_hat + eps_root) + eps`` held
    fixed, Adam on the quadratic model is ``m <- b1 m + (1 - b1) H x``, ``x <- x - lr P^{-1} m_hat``; the bias
    correction ``m_hat = m / (1 - b1**t)`` tends to ``m``, so for large ``t`` this is heavy-ball momentum
    ``b1`` with learning rate ``(1 - b1) lr`` on ``y = P^{1/2} x`` and the matrix ``P^{-1/2} H P^{-1/2}``
    (rescale ``m``), whose threshold (:func:`heavy_ball_rule`) is ``(2 + 2 b1) / ((1 - b1) lr)``.

    Adam only: optax's ``nadam``, ``adamax``, ``radam``, ``yogi`` and ``lamb`` keep the same
    ``ScaleByAdamState`` (with another ``nu`` or another update), so the tracker cannot tell them from Adam
    and does not refuse them; neither this threshold nor the preconditioner describes them.
    """
    b1, b2 = _check_beta(b1, "b1"), _check_beta(b2, "b2")
    coefficient = (2.0 + 2.0 * b1) / (1.0 - b1)
    return StabilityRule(
        "adam", _check_lr(lr), coefficient, "adam", b2, _check_eps(eps, "eps"), _check_eps(eps_root, "eps_root"),
        momentum=b1,
    )  # fmt: skip


def adamw_rule(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float | Schedule = 1e-4,
    eps_root: float = 0.0,
) -> StabilityRule:
    """AdamW (``optax.adamw``, same arguments and defaults): against ``(1 + b1)(2 - lr wd) / ((1 - b1) lr)``.

    The measured quantity is Adam's preconditioned sharpness (the top eigenvalue of ``P^{-1/2} H P^{-1/2}``,
    the weight decay not included); the decay lowers the threshold by ``wd (1 + b1) / (1 - b1)``:
    ``threshold = (2 + 2 b1) / ((1 - b1) lr) - wd (1 + b1) / (1 - b1)`` (``38 / lr - 19 wd`` at ``b1 = 0.9``).

    Derivation (Adam's quadratic model of Cohen et al. 2022, §3, with Loshchilov & Hutter's decoupled decay):
    optax's AdamW update is ``x <- x - lr (m_hat / P + wd x)``: the decay acts on ``x`` at every step, outside
    the momentum average. With ``P`` fixed and ``y = P^{1/2} x``, along an eigenvector of
    ``P^{-1/2} H P^{-1/2}`` with eigenvalue ``a`` (the decay term ``wd y`` shares the eigenvectors):
    ``m <- b1 m + (1 - b1) a y``, ``y <- (1 - lr wd) y - lr m``. The characteristic polynomial is
    ``z^2 - (1 + b1 - lr wd - lr (1 - b1) a) z + b1 (1 - lr wd)``; ``p(1) = lr (1 - b1)(a + wd) > 0`` and the
    constant term is below 1, so stability ends at ``p(-1) = (1 + b1)(2 - lr wd) - lr (1 - b1) a = 0``. So it
    is *not* the effective operator ``P^{-1/2} H P^{-1/2} + wd I`` against Adam's threshold (true only for
    ``b1 = 0``): it is ``P^{-1/2} H P^{-1/2} + wd (1 + b1) / (1 - b1) I``, because the gradient enters each step
    with weight ``1 - b1`` and the decay with weight 1. ``lr wd >= 2`` is unstable at any curvature (threshold
    <= 0). The rule assumes the decay applies to every parameter. With ``optax.adamw(mask=...)`` the tracker
    warns: the dynamics no longer separate along eigenvectors, and the edge then lies between this threshold and
    the undecayed one ``(2 + 2 b1) / ((1 - b1) lr)`` (checked numerically on random quadratics, not proven), so
    the threshold reported is the lower end. ``weight_decay`` may be a schedule, like ``lr``.
    """
    b1, b2 = _check_beta(b1, "b1"), _check_beta(b2, "b2")
    wd = weight_decay if callable(weight_decay) else _check_eps(weight_decay, "weight_decay")
    if callable(wd):
        _value_at(wd, 0, "weight_decay")
    coefficient = (2.0 + 2.0 * b1) / (1.0 - b1)
    return StabilityRule(
        "adamw", _check_lr(lr), coefficient, "adam", b2, _check_eps(eps, "eps"), _check_eps(eps_root, "eps_root"),
        weight_decay=wd, decay_coefficient=(1.0 + b1) / (1.0 - b1), momentum=b1,
    )  # fmt: skip


# Second-moment states of optax, by class name (stable across optax releases; the *WithCount* variants are
# those of ``bias_correction=True``): which preconditioner each one defines.
_ADAM_STATES = ("ScaleByAdamState",)
_RMS_STATES = ("ScaleByRmsState", "ScaleByRmsWithCountState", "ScaleByRStdDevState", "ScaleByRStdDevWithCountState")


def _second_moment_states(opt_state: Any, kind: str | None = None) -> list[Any]:
    """The second-moment states inside ``opt_state``: of ``kind`` ("adam" or "rms"), or of both kinds."""
    names = {"adam": _ADAM_STATES, "rms": _RMS_STATES}.get(str(kind), _ADAM_STATES + _RMS_STATES)
    return _states_named(opt_state, *names)


def _states_named(opt_state: Any, *names: str) -> list[Any]:
    """The optax states inside ``opt_state`` whose class is named one of ``names``."""
    is_state = lambda x: type(x).__name__ in names
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def adam_preconditioner(
    opt_state: Any,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    eps_in_sqrt: bool = True,
    kind: str | None = None,
) -> PyTree:
    """The diagonal preconditioner ``P`` of the most recent update of Adam, AdamW or RMSProp, from an optax state.

    Finds the one second-moment state inside ``opt_state`` (``optax.adam``, ``optax.adamw``, ``optax.rmsprop``,
    ``optax.scale_by_rms`` / ``scale_by_stddev``, inside chains, ``inject_hyperparams`` and the like):

    * Adam (``ScaleByAdamState``): ``P = sqrt(nu / (1 - b2**count) + eps_root) + eps``.
    * RMSProp (``ScaleByRmsState``; optax.rmsprop does *no* bias correction by default, and its state then has
      no ``count``): ``P = sqrt(nu_hat + eps)`` with ``eps_in_sqrt=True`` (optax's default) or
      ``sqrt(nu_hat) + eps``, where ``nu_hat = nu``, or ``nu / (1 - b2**count)`` for the state of
      ``bias_correction=True`` (``ScaleByRmsWithCountState``); ``b2`` is RMSProp's ``decay``. The centered
      variant (``ScaleByRStdDevState``) uses ``nu_hat - mu_hat**2`` in place of ``nu_hat``.

    ``P`` is the one used by the most recent update. Before the first Adam update ``nu = 0`` and ``P = eps``:
    measure after at least one step. ``kind`` (``"adam"`` or ``"rms"``) requires that kind of state (the rules
    pass it). Returns a pytree like the parameters.
    """
    if kind not in (None, "adam", "rms"):
        raise ValueError(f"`kind` must be None, 'adam' or 'rms'; got {kind!r}.")
    found = _second_moment_states(opt_state, kind)
    wanted = {"adam": "Adam state (optax.adam / adamw)", "rms": "RMSProp state (optax.rmsprop / scale_by_rms)"}
    if len(found) != 1:
        what = wanted[kind] if kind else "Adam or RMSProp second-moment state"
        seen = sorted({type(x).__name__ for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "_fields"))})
        raise ValueError(
            f"Expected exactly one {what} in `opt_state`; found {len(found)}. The state holds {seen or 'no states'}. "
            "Pass the state of the optimizer that the rule describes (its `opt_state` after at least one update)."
        )
    state = found[0]
    count = state.count if "count" in state._fields else None  # (a NamedTuple's own `count` is tuple.count)

    def nu_hat(n: jax.Array) -> jax.Array:
        if count is None:
            return n
        correction = 1 - jnp.asarray(b2, n.dtype) ** jnp.maximum(count, 1).astype(n.dtype)
        return n / correction

    if type(state).__name__ in _ADAM_STATES:
        return jax.tree.map(lambda n: jnp.sqrt(nu_hat(n) + eps_root) + jnp.asarray(eps, n.dtype), state.nu)
    if "mu" in state._fields:  # centered RMSProp: the variance of the past gradients
        second = jax.tree.map(lambda m, n: nu_hat(n) - jnp.abs(nu_hat(m)) ** 2, state.mu, state.nu)
    else:
        second = jax.tree.map(nu_hat, state.nu)
    if eps_in_sqrt:
        return jax.tree.map(lambda v: jnp.sqrt(v + jnp.asarray(eps, v.dtype)), second)
    return jax.tree.map(lambda v: jnp.sqrt(v) + jnp.asarray(eps, v.dtype), second)


def _checked_loss(loss_fn: Callable, has_aux: bool) -> Callable:
    """``loss_fn`` with its output's structure checked against ``has_aux`` at trace time."""

    def loss(*args: Any) -> Any:
        out = loss_fn(*args)
        pair = isinstance(out, (tuple, list)) and len(out) == 2
        if has_aux and not pair:
            seen = f"an array of shape {out.shape}" if hasattr(out, "shape") else f"a {type(out).__name__}"
            raise TypeError(
                f"EoSTracker(has_aux=True) needs `loss_fn` to return a pair (loss, aux); it returned {seen}. "
                "Pass has_aux=False for a loss function that returns the loss alone."
            )
        if not has_aux and isinstance(out, (tuple, list)):
            raise TypeError(
                f"`loss_fn` returned a {type(out).__name__} of {len(out)} items, not a scalar loss; pass "
                "has_aux=True if it returns (loss, aux)."
            )
        return out

    return loss


def _check_step(step: Any) -> int:
    """``step`` as a Python int: a concrete integer (NumPy and 0-d integer arrays too)."""
    if isinstance(step, jax.core.Tracer):
        _check_eager(step)
    if isinstance(step, (bool, np.bool_)) or not (
        isinstance(step, (int, np.integer)) or (hasattr(step, "dtype") and jnp.issubdtype(step.dtype, jnp.integer))
    ):
        raise TypeError(f"`step` must be an integer (the training step); got {step!r}.")
    return int(step)


def _check_eager(*trees: Any) -> None:
    """The tracker runs in the Python training loop: it picks its solver per call and returns Python scalars."""
    if loops.is_traced(*trees):
        raise TypeError(
            "EoSTracker's measure/update/value_and_grad run in the Python training loop (they choose the solver "
            "per call and return records of Python scalars), so they cannot be called inside jax.jit, lax.scan "
            "or vmap. Jit the training step and call the tracker between steps with concrete values."
        )


def _before_first_update(rule: StabilityRule, opt_state: Any) -> bool:
    """Whether ``opt_state``'s second moment has seen no update yet (``count == 0``, or without a count every
    ``nu`` is zero): there is no preconditioner yet. False when traced (unknown at trace time)."""
    found = _second_moment_states(opt_state, rule.preconditioner)
    if len(found) != 1:
        return False  # rule_preconditioner reports it
    state = found[0]
    try:
        if "count" in state._fields:
            return bool(np.all(np.asarray(state.count) == 0))
        return all(not np.any(np.asarray(n)) for n in jax.tree.leaves(state.nu))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False


def rule_preconditioner(rule: StabilityRule, opt_state: Any) -> PyTree:
    """The preconditioner ``P`` that a preconditioned ``rule`` measures with, from ``opt_state``."""
    if not rule.preconditioned:
        raise ValueError(f"The {rule.name!r} rule measures plain sharpness; it has no preconditioner.")
    _check_rule_state(rule, opt_state)
    return adam_preconditioner(
        opt_state, rule.b2, rule.eps, eps_root=rule.eps_root, eps_in_sqrt=rule.eps_in_sqrt, kind=rule.preconditioner
    )


def _warn_masked_decay(rule: StabilityRule, opt_state: Any) -> None:
    """Warn when a decayed rule meets ``optax.masked`` state (``optax.adamw(mask=...)``): the threshold assumes
    the decay on every parameter."""
    if rule.decay_coefficient == 0.0 or (not callable(rule.weight_decay) and rule.weight_decay == 0.0):
        return
    if _states_named(opt_state, "MaskedState"):
        warnings.warn(
            f"The optimizer state holds an optax.masked state (e.g. optax.adamw(mask=...)), but the {rule.name!r} "
            "rule's threshold assumes the weight decay on every parameter. With the decay masked, the edge lies "
            f"between that threshold and the undecayed one, which is {rule.decay_coefficient:g} * weight_decay "
            "higher: the reported threshold is the lower (conservative) end.",
            stacklevel=3,
        )


def _check_rule_state(rule: StabilityRule, opt_state: Any) -> None:
    """Check that ``opt_state`` is the state of the optimizer ``rule`` describes, where the state can tell.

    * A plain-sharpness rule (GD, heavy ball, Nesterov) given an Adam or RMSProp second-moment state is an error
      (the threshold is for the preconditioned sharpness of those optimizers).
    * Momentum (``optax.trace``'s ``TraceState``) in a state of a rule without it, or missing from a state of a
      rule with it, is warned about (the threshold differs by ``(2 + 2 beta) / 2``); a ``TraceState`` does not
      hold its decay, so ``optax.sgd(lr, momentum=0.0)`` warns with ``gd_rule`` too.
    * ``optax.inject_hyperparams`` states hold the optimizer's learning rate (a constant one is compared),
      momentum or ``b1``, ``b2``/``decay``, ``eps``, ``eps_root`` and ``weight_decay``: each must be the rule's.
    * A masked weight decay warns (see :func:`adamw_rule`).
    """
    if opt_state is None:
        return
    second = _second_moment_states(opt_state)
    if not rule.preconditioned and second:
        raise ValueError(
            f"The {rule.name!r} rule measures plain sharpness, but `opt_state` holds {type(second[0]).__name__}, "
            "the second moment of Adam or RMSProp: build the tracker with adam_rule, adamw_rule or rmsprop_rule."
        )
    has_trace = bool(_states_named(opt_state, "TraceState"))
    wants_trace = rule.name in ("heavy_ball", "nesterov") or (rule.name == "rmsprop" and rule.momentum > 0)
    if rule.name in ("gd", "heavy_ball", "nesterov", "rmsprop") and has_trace != wants_trace:
        state = "holds" if has_trace else "has no"
        warnings.warn(
            f"`opt_state` {state} momentum (optax.trace's TraceState), but the {rule.name!r} rule assumes "
            f"momentum {rule.momentum:g}: the reported threshold is not this optimizer's. Use heavy_ball_rule or "
            "nesterov_rule (or rmsprop_rule(momentum=...)) for an optimizer with momentum, gd_rule without.",
            stacklevel=3,
        )
    _check_injected_hyperparams(rule, opt_state)
    _warn_masked_decay(rule, opt_state)


# Per rule: optimizer hyperparameter (the name optax.inject_hyperparams stores) -> the rule's field.
_MOMENTUM_FIELDS = {"learning_rate": "learning_rate", "momentum": "momentum"}
_ADAM_FIELDS = {
    "learning_rate": "learning_rate", "b1": "momentum", "b2": "b2", "eps": "eps", "eps_root": "eps_root",
    "weight_decay": "weight_decay",
}  # fmt: skip
_INJECTED_FIELDS = {
    "gd": _MOMENTUM_FIELDS,
    "heavy_ball": _MOMENTUM_FIELDS,
    "nesterov": _MOMENTUM_FIELDS,
    "rmsprop": {**_MOMENTUM_FIELDS, "decay": "b2", "eps": "eps"},
    "adam": _ADAM_FIELDS,
    "adamw": _ADAM_FIELDS,
}


def _check_injected_hyperparams(rule: StabilityRule, opt_state: Any) -> None:
    """``optax.inject_hyperparams`` states hold the optimizer's hyperparameters: they must be the rule's (a rule
    built with Adam's default ``b2`` for an optimizer run with ``b2=0.9`` misreads the preconditioner; one built
    with another learning rate or momentum reports another threshold). Schedules are not compared."""
    is_injected = lambda x: isinstance(getattr(x, "hyperparams", None), dict) and hasattr(x, "inner_state")
    names = _INJECTED_FIELDS[rule.name]
    for node in jax.tree.leaves(opt_state, is_leaf=is_injected):
        if not is_injected(node):
            continue
        for key, field in names.items():
            if key not in node.hyperparams or callable(getattr(rule, field)):
                continue
            try:
                have = float(node.hyperparams[key])
            except (TypeError, jax.errors.ConcretizationTypeError):
                continue
            want = float(getattr(rule, field))
            if not math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(
                    f"The optimizer state (optax.inject_hyperparams) has {key}={have:g} but the {rule.name!r} rule "
                    f"was built with {key}={want:g}; build the rule with the optimizer's value."
                )


def preconditioned_matvec(matvec: Matvec) -> Matvec:
    """``P^{-1/2} A P^{-1/2}`` as a matvec ``mv(vector, P, *params)`` for a diagonal ``P`` (pytree, > 0)."""

    def mv(vector: PyTree, precond: PyTree, *params: Any) -> PyTree:
        scale = jax.tree.map(lambda p: jax.lax.rsqrt(p), precond)
        out = matvec(jax.tree.map(jnp.multiply, scale, vector), *params)
        return jax.tree.map(jnp.multiply, scale, out)

    return mv


def _apply_linearized(vector: PyTree, lin: Callable[[PyTree], Any]) -> PyTree:
    """The Hessian-vector product from a linearization of ``params -> (value, gradient)``."""
    return lin(vector)[1]


_apply_linearized_preconditioned = preconditioned_matvec(_apply_linearized)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    """Whether every entry of every leaf is finite: one compiled call and one transfer per measurement."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


class TrackerState(NamedTuple):
    """Warm start carried between measurements (a pytree).

    A NamedTuple of arrays and nothing else, so it checkpoints with the parameters and optimizer state (e.g.
    one Orbax ``StandardCheckpointer`` save of ``{"params": ..., "opt_state": ..., "tracker": state}``); restore
    it against a like-structured target such as ``tracker.init(params, key)`` and a resumed run gives the same
    records as an uninterrupted one (``tests/test_checkpoint.py``).
    """

    vector: PyTree  # like params: the previous top eigenvector (or the random start); with k > 1 the previous
    # top-k Ritz vectors, stacked on a leading axis (leaves (k, *leaf_shape))
    eigenvalue: jax.Array  # () previous sharpness estimate ((k,) descending with k > 1); inf before the first
    # measurement


@dataclasses.dataclass(frozen=True)
class EoSTracker:
    """Records step, loss, sharpness and threshold every ``every`` steps of any training loop.

    Two ways to plug it in (both warm-start each solve from the previous eigenvector and eigenvalue):

    * :meth:`update` / :meth:`measure` after the training step: the tracker evaluates the loss and runs the
      solver at the given parameters. Nothing in the training loop changes.
    * :meth:`value_and_grad` *instead of* the gradient computation at due steps (cheaper): one compiled
      program computes the loss, the training gradient and the first Hessian-vector product in a single
      forward-over-reverse pass (``jax.jvp`` of the gradient: its primal output is the gradient itself), then
      continues the solver. The training step uses the returned gradient, so the measurement saves the
      gradient computation of that step and the separate loss evaluation.

    Attributes:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``), the training loss
        whose Hessian is measured. With ``chunk_size``, ``args[0]`` is the data set (arrays with a leading
        example axis) and ``loss_fn(params, chunk, *rest)`` is the mean loss of a chunk (see
        :func:`dataset_loss`). For Flax models with ``batch_stats`` use ``flax_curvature_fns(...,
        bn_mode=...).loss_fn`` and pass the stats.
      rule: :func:`gd_rule`, :func:`heavy_ball_rule`, :func:`nesterov_rule`, :func:`rmsprop_rule`,
        :func:`adam_rule` or :func:`adamw_rule`; with a learning-rate schedule each record's ``threshold`` is
        :meth:`StabilityRule.threshold_at` its step.
      every: measure when ``step % every == 0``.
      chunk_size: evaluate loss, gradient and HVPs over the data set in chunks of this size (``None``: one
        call).
      shards: with ``chunk_size``, the number of shards of the data set's example axis (static; see
        :func:`~bnjax.curvature.chunked_mean`): chunks are then laid out data-parallel, every device reading
        only its rows, and a chunk is the ``c``-th slice of ``chunk_size / shards`` rows of every shard.
        ``None`` means unsharded data. The tracker compiles its pieces with ``jax.jit``, where the data's
        sharding is not visible, so it checks the concrete data at every call and asks for ``shards`` when
        they are sharded.
      per_example: with ``shards``, declare the chunk loss a mean of per-example terms (BN in eval mode or
        no BN; ``flax_curvature_fns(...).per_example``): each device then sums its own rows' products over
        the chunks and the devices reduce once per product (see :func:`~bnjax.curvature.chunked_mean`).
      method: ``"lanczos"`` (default; robust when the top eigenvalues cluster, as they do at the edge of
        stability) or ``"power"``.
      tol, residual_tol, max_iters: stopping rule of the solver (see :func:`~bnjax.curvature.lanczos_top`);
        ``max_iters`` bounds the HVPs per measurement; the first (cold) measurement may use ``3 * max_iters``.
        The Ritz value approaches the sharpness from below, so ``tol`` is set well under the accuracy wanted
        (the defaults aim at 1e-3 relative). Looser tolerances save HVPs but hand a worse warm start to the
        next measurement, so errors grow along the run (``experiments/bench_warmstart.py`` measures both).
        Each record's ``residual`` bounds the error: ``|error| <= residual * sharpness``; its ``converged`` is
        False when ``max_iters`` ran out before the stopping rule held.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (e.g. updated ``batch_stats``); only the loss is
        differentiated. :meth:`value_and_grad` returns ``((loss, aux), grads)`` like
        ``jax.value_and_grad(..., has_aux=True)``; with ``chunk_size`` the aux is the chunk-size-weighted
        mean over chunks.
      placement: ``"auto"`` (default), ``"device"`` or ``"host"``: where the solver loop runs (see
        :mod:`bnjax.loops`; auto = host on CPU when the loss contains a convolution).
      linearize_budget: linearize the training loss once per measurement when the stored residuals take at
        most this many bytes (about the activations of one forward and backward pass over the data set);
        ``0`` never (every product recomputes the forward and backward pass), ``None`` always.
      stopping: ``"change"`` (default): the solver stops when the top Ritz value changed by at most ``tol``
        (relative) in the last step and its residual is at most ``residual_tol``; ``"gap"`` (Lanczos, ``k = 1``)
        also stops at a step whose error estimate ``residual**2 * sharpness / (theta_1 - theta_2)`` (relative,
        ``theta_2`` the second Ritz value; Kato-Temple) is at most ``tol``, without waiting for the value to
        settle. ``experiments/bench_warmstart.py`` measures both (HVPs against the oracle count, accuracy);
        ``experiments/bench_stopping.py`` replays them checkpoint by checkpoint. Neither rule can tell a warm
        vector that lost the top direction inside a cluster of top eigenvalues (its Ritz value then settles
        below ``lambda_max``); where every estimate must be accurate there, track ``k > 1``.
      k: number of top eigenvalues tracked (a positive int; ``1``, the default, tracks the sharpness alone).
        With ``k > 1`` each measurement runs block Lanczos (``method="lanczos"`` only) started from the
        previous ``k`` Ritz vectors, one Hessian-vector product per step (the first fused with the
        linearization, as for ``k = 1``; both placements): the start block and the residual of each
        product span the basis, and the top ``k`` Ritz pairs of the multiplied vectors are extracted at
        every step. It stops when *every* pair meets ``tol`` and ``residual_tol`` (so a converged warm start
        costs ``k`` products) or after ``max_iters`` products (which must be at least ``k``; the cold start
        ``3 * max_iters``). Records gain ``eigenvalues``, ``residuals`` and ``pairs_converged`` (lists,
        descending); ``sharpness`` and ``residual`` are the top pair's and ``converged`` says that all pairs
        converged. :class:`TrackerState` then stacks the ``k`` vectors on a leading axis. Why block Lanczos
        rather than ``jax.experimental.sparse.linalg.lobpcg_standard``: see the top-k section of the
        curvature guide (``experiments/bench_topk.py`` measures both).
      cold_start: the start of the first (cold) measurement, whose state holds no eigenvalue yet:
        ``"random"`` (default) the random vector of :meth:`init`; ``"gradient"`` the unit gradient at that
        step plus that unit random vector (:func:`~bnjax.curvature.gradient_start`; in the preconditioned
        coordinates for Adam-like rules). Where the gradient lies mostly in the top eigenspace (the BN CNN of
        ``experiments/bench_curvature.py``) the cold solve needs fewer products; where it loads the second
        eigenvector of a cluster it needs more (the MLP there): the benchmark counts both over seeds. With
        linearization the gradient is the linearization's own output, at no cost; without it the cold
        measurement computes one gradient more. With ``k > 1`` the first of the ``k`` start vectors is mixed.
        Later (warm) measurements start from the previous Ritz vectors either way.
    """

    loss_fn: Callable[..., Any]
    rule: StabilityRule
    every: int = 10
    chunk_size: int | None = None
    shards: int | None = None
    per_example: bool = False
    method: Literal["lanczos", "power"] = "lanczos"
    tol: float = 2e-4
    residual_tol: float = 1e-2
    max_iters: int = 20
    has_aux: bool = False
    placement: loops.Placement = "auto"
    linearize_budget: int | None = DEFAULT_LINEARIZE_BUDGET
    k: int = 1
    stopping: Literal["change", "gap"] = "change"
    cold_start: Literal["random", "gradient"] = "random"
    # Built in __post_init__ (set with object.__setattr__: the dataclass is frozen); not compared or shown.
    _loss: Callable[..., Any] = dataclasses.field(init=False, repr=False, compare=False)
    _scalar_loss: Callable[..., jax.Array] = dataclasses.field(init=False, repr=False, compare=False)
    _hessian: Matvec = dataclasses.field(init=False, repr=False, compare=False)
    _hessian_preconditioned: Matvec = dataclasses.field(init=False, repr=False, compare=False)
    _lin_bytes: dict[Any, int] = dataclasses.field(init=False, repr=False, compare=False)  # avals -> bytes
    _value_and_grad: Callable[[PyTree, tuple], tuple[Any, PyTree]] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_positive_int(self.every, "every")
        check_positive_int(self.max_iters, "max_iters")
        self._check_k()
        if self.stopping not in ("change", "gap"):
            raise ValueError(f"`stopping` must be 'change' or 'gap'; got {self.stopping!r}.")
        if self.cold_start not in ("gradient", "random"):
            raise ValueError(f"`cold_start` must be 'gradient' or 'random'; got {self.cold_start!r}.")
        if self.stopping == "gap" and (self.method != "lanczos" or self.k != 1):
            raise ValueError("stopping='gap' is a test on the top Lanczos pair: use method='lanczos' and k=1.")
        if self.chunk_size is not None:
            check_positive_int(self.chunk_size, "chunk_size")
        check_bool(self.per_example, "per_example")
        if self.shards is not None:
            check_positive_int(self.shards, "shards")
            if self.chunk_size is None:
                raise ValueError("`shards` lays out the chunks of a data set; pass `chunk_size` with it.")
        if self.method not in ("lanczos", "power"):
            raise ValueError(f"`method` must be 'lanczos' or 'power'; got {self.method!r}.")
        if not isinstance(self.rule, StabilityRule):
            raise TypeError(f"`rule` must be a StabilityRule (gd_rule, adam_rule, ...); got {self.rule!r}.")
        if not isinstance(self.has_aux, bool):
            raise TypeError(f"`has_aux` must be a bool; got {self.has_aux!r}.")
        _check_tolerance(self.tol, "tol")
        _check_tolerance(self.residual_tol, "residual_tol")
        loops.check_placement(self.placement)
        check_linearize_budget(self.linearize_budget)
        # Built once, so that the compiled pieces (keyed on these functions) are reused at every checkpoint.
        checked = _checked_loss(self.loss_fn, self.has_aux)
        object.__setattr__(self, "_loss", checked)
        scalar_loss = (lambda *a: checked(*a)[0]) if self.has_aux else checked
        if self.chunk_size is None:
            hessian = hessian_matvec(scalar_loss)
        else:
            hessian = dataset_hessian_matvec(
                scalar_loss, self.chunk_size, shards=self.shards, per_example=self.per_example
            )
        object.__setattr__(self, "_scalar_loss", scalar_loss)
        object.__setattr__(self, "_hessian", hessian)
        object.__setattr__(self, "_hessian_preconditioned", preconditioned_matvec(hessian))
        object.__setattr__(self, "_lin_bytes", {})
        object.__setattr__(self, "_value_and_grad", jax.jit(lambda params, args: self._value_and_grad_fn(args)(params)))

    def _check_k(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"`k` (the number of top eigenvalues tracked) must be a positive int; got {self.k!r}.")
        if self.k > 1 and self.method != "lanczos":
            raise ValueError(f"Tracking k={self.k} eigenvalues uses block Lanczos; pass method='lanczos'.")
        if self.k > self.max_iters:
            raise ValueError(
                f"`max_iters`={self.max_iters} must be at least `k`={self.k}: a warm start multiplies each of the "
                f"k previous vectors once. Use e.g. max_iters={max(20, 2 * self.k)}."
            )

    def init(self, params: PyTree, key: jax.Array) -> TrackerState:
        """Random start vector like ``params`` (``k`` of them stacked on a leading axis with ``k > 1``)."""
        if self.k == 1:
            vector = random_like(key, params)
            return TrackerState(vector, jnp.asarray(jnp.inf, jax.tree.leaves(vector)[0].dtype))
        vector = random_like(key, params, num=int(self.k))
        return TrackerState(vector, jnp.full(int(self.k), jnp.inf, jax.tree.leaves(vector)[0].dtype))

    def due(self, step: int) -> bool:
        """Whether :meth:`update` and :meth:`value_and_grad` measure at ``step``."""
        return _check_step(step) % self.every == 0

    # -- the functions of the parameters that a measurement needs ------------------------------------------

    def _split_data(self, args: tuple) -> tuple[Any, tuple]:
        if not args:
            raise ValueError("With `chunk_size`, pass the data set as the first argument after `params`.")
        return args[0], args[1:]

    def _check_shards(self, args: tuple) -> None:
        """Raise if the concrete data set is sharded differently from ``shards`` (called outside ``jit``)."""
        if self.chunk_size is None:
            return
        seen = data_shards(self._split_data(args)[0])
        if seen != (self.shards or 1) and seen > 1:
            raise ValueError(
                f"The data set is sharded into {seen} shards along its example axis but the tracker has "
                f"shards={self.shards}; build it with EoSTracker(..., shards={seen}) so that every device "
                "reads only its own rows (with shards=None every device would gather the whole data set)."
            )

    def _value_and_grad_fn(self, args: tuple) -> Callable[[PyTree], tuple[Any, PyTree]]:
        """``params -> (value, grads)`` of the training loss (``value`` is ``(loss, aux)`` with ``has_aux``)."""
        chunk_size = self.chunk_size
        if chunk_size is None:
            return lambda params: jax.value_and_grad(self._loss, has_aux=self.has_aux)(params, *args)
        data, rest = self._split_data(args)
        return lambda params: dataset_value_and_grad(
            self._loss,
            params,
            data,
            *rest,
            chunk_size=chunk_size,
            has_aux=self.has_aux,
            shards=self.shards,
            per_example=self.per_example,
        )

    def _linearizes(self, params: PyTree, args: tuple) -> bool:
        """Whether the residuals of ``jax.linearize`` of (value, gradient) fit ``linearize_budget``."""
        if self.linearize_budget == 0:
            return False
        if self.linearize_budget is None:
            return True
        key = loops.avals((params, args))
        if key not in self._lin_bytes:
            lin = jax.eval_shape(lambda p, a: jax.linearize(self._value_and_grad_fn(a), p)[1], params, args)
            self._lin_bytes[key] = tree_bytes(lin)
        return self._lin_bytes[key] <= self.linearize_budget

    def _operator(self, params: PyTree, linearized: bool, preconditioned: bool) -> _Operator:
        if linearized:
            matvec = _apply_linearized_preconditioned if preconditioned else _apply_linearized
        else:
            matvec = self._hessian_preconditioned if preconditioned else self._hessian
        # The linear map is an operand of `matvec` here (not the operator itself), so the flag stays False.
        return _Operator(matvec, _Layout.of(params, "params"), False)

    def _measurement(self, state: TrackerState, params: PyTree, args: tuple, precond: PyTree | None) -> tuple:
        """``(driver, plan)`` of one measurement at ``params`` from a checked ``state``: the plan's call returns
        ``(value, grads, pair)``."""
        self._check_shards(args)
        driver = loops.driver_for(self.placement, self._scalar_loss, params, *args)
        cold = not bool(jnp.all(jnp.isfinite(state.eigenvalue)))
        max_iters = 3 * self.max_iters if cold else self.max_iters
        if self.method == "lanczos":
            # A Krylov basis has at most n vectors; the block one holds k start vectors besides the products.
            max_iters = min(max_iters, sum(int(np.size(x)) for x in jax.tree.leaves(params)) - int(self.k) + 1)
        linearized = self._linearizes(params, args)
        op = self._operator(params, linearized, precond is not None)
        from_gradient = cold and self.cold_start == "gradient"
        return driver, _Measurement(self, driver, op, linearized, max_iters, from_gradient)

    def _check_state(self, state: TrackerState, params: PyTree) -> TrackerState:
        """``state`` checked against ``params`` and ``k``, its eigenvalue as an array (a Python float or list
        is accepted). A restored state with non-finite vectors is an error (the tracker never stores one)."""
        try:
            eigenvalue = jnp.asarray(state.eigenvalue)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`state.eigenvalue` must be a number or an array; got {type(state.eigenvalue).__name__}. Build the "
                "state with `tracker.init(params, key)`."
            ) from err
        if not (jnp.issubdtype(eigenvalue.dtype, jnp.floating) or jnp.issubdtype(eigenvalue.dtype, jnp.integer)):
            raise TypeError(f"`state.eigenvalue` must be real; got dtype {eigenvalue.dtype}.")
        state = state._replace(eigenvalue=eigenvalue)
        leaves = jax.tree.leaves(state.vector)
        if leaves and not loops.is_traced(*leaves) and not bool(_all_finite(leaves)):
            raise ValueError(
                "`state.vector` has non-finite entries (the tracker keeps the last finite state, so this one was "
                "built or restored elsewhere); start again from `tracker.init(params, key)`."
            )
        if self.k == 1:
            if eigenvalue.shape != ():
                raise ValueError(
                    f"With k=1, `state.eigenvalue` is a scalar; got shape {eigenvalue.shape}. Build the state with "
                    "`tracker.init(params, key)`."
                )
            check_like(state.vector, params, name="state.vector")
            return state
        k, n = int(self.k), sum(int(np.size(x)) for x in jax.tree.leaves(params))
        if 2 * k > n + 1:
            raise ValueError(
                f"`k`={k} is too large for {n} parameters: block tracking keeps k start vectors and at least k "
                f"products in a basis of at most n vectors, so it needs k <= {(n + 1) // 2}."
            )
        leading = {jnp.shape(x)[:1] for x in jax.tree.leaves(state.vector)}
        if leading != {(k,)} or jnp.shape(state.eigenvalue) != (k,):
            raise ValueError(
                f"With k={k}, `state.vector` stacks k vectors like `params` on a leading axis and "
                f"`state.eigenvalue` has shape ({k},); got leading axes {sorted(leading)} and eigenvalue shape "
                f"{jnp.shape(state.eigenvalue)}. Build the state with `tracker.init(params, key)`."
            )
        check_like(jax.tree.map(lambda x: x[0], state.vector), params, name="state.vector[i]")
        return state

    def _measure(self, state: TrackerState, params: PyTree, args: tuple, precond: PyTree | None) -> tuple:
        state = self._check_state(state, params)
        driver, plan = self._measurement(state, params, args, precond)
        return driver.run(plan, state, params, args, precond)

    # -- public entry points ---------------------------------------------------------------------------

    def _preconditioner(self, opt_state: Any, params: PyTree) -> PyTree | None:
        if not self.rule.preconditioned:
            _check_rule_state(self.rule, opt_state)
            return None
        if opt_state is None:
            raise ValueError(f"The {self.rule.name!r} rule measures preconditioned sharpness: pass `opt_state=`.")
        precond = rule_preconditioner(self.rule, opt_state)
        check_like(precond, params, name="the preconditioner (the optimizer state's second moment)", same_dtype=False)
        return precond

    def _record(self, step: int, loss: jax.Array, pair: _TopPair) -> dict[str, Any]:
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"Non-finite loss {float(loss)} at step {step}: training diverged.")
        return {
            "step": int(step),
            "loss": float(loss),
            "sharpness": float(pair.eigenvalue),
            "threshold": float(self.rule.threshold_at(step)),
            "hvps": int(pair.iterations),
            "residual": float(pair.residual),
            "converged": bool(pair.converged),
            "preconditioned": bool(self.rule.preconditioned),
        }

    def measure(
        self, state: TrackerState, step: int, params: PyTree, *args: Any, opt_state: Any = None
    ) -> tuple[dict[str, Any], TrackerState]:
        """Measure now (regardless of ``every``); returns ``(record, new_state)``.

        ``record`` is a dict of Python scalars: ``step``, ``loss``, ``sharpness`` (preconditioned for Adam,
        AdamW, RMSProp), ``threshold`` (the rule's :meth:`~StabilityRule.threshold_at` ``step``), ``hvps``
        (Hessian-vector products used), ``residual`` (relative, of the reported eigenpair), ``converged`` (the
        stopping rule held within ``max_iters``) and ``preconditioned``. With a preconditioned rule and an
        ``opt_state`` from before the optimizer's first update (Adam's ``count`` 0, or an RMSProp ``nu`` of
        zeros) there is no preconditioner yet: the record has ``sharpness`` NaN, ``hvps`` 0 and ``converged``
        False, and the state is returned unchanged. A checkpoint whose products are not finite (a NaN
        gradient at a finite loss) records ``converged`` False and also leaves the state unchanged, so the
        next checkpoint starts from the last finite vector.
        """
        _check_step(step)
        _check_eager(state, params)
        precond = self._preconditioner(opt_state, params)
        if self._unpreconditioned(opt_state):
            value, _ = self._value_and_grad(params, args)
            return self._unmeasured(step, value[0] if self.has_aux else value), state
        value, _, pair = self._measure(state, params, args, precond)
        loss = value[0] if self.has_aux else value
        return self._record_all(step, loss, pair), self._next_state(state, params, pair)

    def _unpreconditioned(self, opt_state: Any) -> bool:
        """A preconditioned rule given an optimizer state from before its first update (no preconditioner)."""
        return self.rule.preconditioned and _before_first_update(self.rule, opt_state)

    def _unmeasured(self, step: int, loss: jax.Array) -> dict[str, Any]:
        """The record of a checkpoint whose preconditioner does not exist yet: NaN sharpness, no HVPs."""
        nan = _TopPair(*(jnp.asarray(x) for x in (np.nan, np.nan, 0, np.nan, False, np.nan)))
        record = self._record(step, loss, nan)
        if self.k > 1:
            k = int(self.k)
            record.update(eigenvalues=[np.nan] * k, residuals=[np.nan] * k, pairs_converged=[False] * k)
        return record

    def _record_all(self, step: int, loss: jax.Array, pair: _TopPair | _TopBlock) -> dict[str, Any]:
        """:meth:`_record` of the top pair, plus with ``k > 1`` every pair's value, residual and convergence."""
        record = self._record(step, loss, pair)  # type: ignore[arg-type]  # _TopBlock reads like a _TopPair
        if isinstance(pair, _TopBlock):
            record["eigenvalues"] = [float(x) for x in np.asarray(pair.eigenvalues)]
            record["residuals"] = [float(x) for x in np.asarray(pair.residuals)]
            record["pairs_converged"] = [bool(x) for x in np.asarray(pair.pairs_converged)]
        return record

    def _next_state(self, state: TrackerState, params: PyTree, pair: _TopPair | _TopBlock) -> TrackerState:
        """The warm start for the next measurement; ``state`` itself when this one was not finite (a NaN
        gradient or Hessian-vector product at one checkpoint must not leave every later one NaN)."""
        layout = _Layout.of(params, "params")
        if isinstance(pair, _TopBlock):
            vectors, values = pair.vectors, pair.eigenvalues
        else:
            vectors, values = pair.warm, pair.eigenvalue
        if not (bool(jnp.all(jnp.isfinite(vectors))) and bool(jnp.all(jnp.isfinite(values)))):
            return state
        if isinstance(pair, _TopBlock):
            return TrackerState(jax.vmap(layout.unravel)(vectors), values)
        return TrackerState(layout.unravel(vectors), values)

    def update(
        self, state: TrackerState, step: int, params: PyTree, *args: Any, opt_state: Any = None
    ) -> tuple[dict[str, Any] | None, TrackerState]:
        """:meth:`measure` if :meth:`due` (``step % every == 0``), else ``(None, state)`` at no cost."""
        if not self.due(step):
            return None, state
        return self.measure(state, step, params, *args, opt_state=opt_state)

    def value_and_grad(
        self, state: TrackerState, step: int, params: PyTree, *args: Any, opt_state: Any = None
    ) -> tuple[tuple[Any, PyTree], dict[str, Any] | None, TrackerState]:
        """The training loss and gradient at ``params``, fused with a measurement at due steps.

        Returns ``((value, grads), record, new_state)``: ``(value, grads)`` as from
        ``jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)`` (chunked like the loss with
        ``chunk_size``), and ``record`` as from :meth:`measure` at ``params`` (``None`` when not :meth:`due`;
        then this is just the jitted gradient). A measurement computes the loss and the gradient anyway (they
        are the primal outputs of its linearization, whose tangent is the solve's first Hessian-vector
        product), so handing the gradient to the training step saves that step's gradient. Typical use: call
        it at due steps and keep your own fused train step at the others, as in the example of
        :mod:`bnjax.curvature.eos` (which runs as a doctest).

        For the preconditioned rules pass ``opt_state`` as it is *before* this step's update: the preconditioner
        is the one its most recent update used (as with :meth:`update` after the step, one step earlier).
        """
        if not self.due(step):
            self._check_shards(args)
            return self._value_and_grad(params, args), None, state
        _check_eager(state, params)
        precond = self._preconditioner(opt_state, params)
        if self._unpreconditioned(opt_state):
            self._check_shards(args)
            value, grads = self._value_and_grad(params, args)
            return (value, grads), self._unmeasured(step, value[0] if self.has_aux else value), state
        value, grads, pair = self._measure(state, params, args, precond)
        loss = value[0] if self.has_aux else value
        return (value, grads), self._record_all(step, loss, pair), self._next_state(state, params, pair)


@dataclasses.dataclass(frozen=True)
class _Measurement:
    """One measurement (static: the tracker, placement, operator and basis size), one implementation for both
    placements: prepare the operator at ``params`` (linearize (value, gradient) once, or a plain
    forward-over-reverse pass), whose tangent along the warm vector is the solver's first product, then run the
    warm-started solver."""

    tracker: EoSTracker
    driver: loops.Driver
    op: _Operator
    linearized: bool
    max_iters: int
    from_gradient: bool  # a cold start: the start vector is the unit gradient plus the (random) state vector

    def prepare(self, vector: PyTree, params: PyTree, args: tuple, precond: PyTree | None) -> tuple:
        """``(value, grads, operands, x0, H unit(x0))``: the start ``x0`` (flat) and the first product along it.

        In the preconditioned coordinates ``z = P^(1/2) theta`` the operator is ``S H S`` (``S = P^(-1/2)``),
        its gradient ``S g``; the product along ``x0`` is the Hessian's along the tangent ``S x0``."""
        layout = self.op.layout
        scale = None if precond is None else jax.tree.map(jax.lax.rsqrt, precond)
        value_and_grad = self.tracker._value_and_grad_fn(args)

        def start(grads: PyTree | None) -> tuple[jax.Array, PyTree]:
            x0 = layout.ravel(vector)
            if grads is not None:
                z_grads = grads if scale is None else jax.tree.map(jnp.multiply, scale, grads)
                x0 = _gradient_mix(layout.ravel(z_grads), x0)
            tangent = layout.unravel(_unit(x0))
            return x0, tangent if scale is None else jax.tree.map(jnp.multiply, scale, tangent)

        if self.linearized:
            (value, grads), lin = jax.linearize(value_and_grad, params)
            x0, tangent = start(grads if self.from_gradient else None)
            h_tangent = lin(tangent)[1]
            operands: tuple = (lin,)
        elif self.from_gradient:
            # The start needs the gradient first: one extra gradient, at the cold measurement only.
            value, grads = value_and_grad(params)
            x0, tangent = start(grads)
            h_tangent = jax.jvp(value_and_grad, (params,), (tangent,))[1][1]
            operands = (params, *args)
        else:
            # Forward-over-reverse: the primal output is (value, gradient), the tangent of the gradient is H t.
            x0, tangent = start(None)
            (value, grads), (_, h_tangent) = jax.jvp(value_and_grad, (params,), (tangent,))
            operands = (params, *args)
        if scale is not None:
            h_tangent = jax.tree.map(jnp.multiply, scale, h_tangent)
            operands = (precond, *operands)
        return value, grads, operands, x0, layout.ravel(h_tangent)

    def __call__(self, state: TrackerState, params: PyTree, args: tuple, precond: PyTree | None) -> tuple:
        d, t = self.driver, self.tracker
        if t.k > 1:  # block Lanczos from the previous k Ritz vectors; the fused product is along the first
            first_vector = jax.tree.map(lambda x: x[0], state.vector)
            value, grads, operands, x_first, first = d.call(_Prepare(self), first_vector, params, args, precond)
            x0 = jax.vmap(self.op.layout.ravel)(state.vector).at[0].set(x_first)
            eigenvalues0 = state.eigenvalue.astype(x0.dtype)
            block = _top_block(
                d, self.op, x0, eigenvalues0, t.tol, t.residual_tol, self.max_iters, operands=operands, first=first
            )
            return value, grads, block
        value, grads, operands, x0, first = d.call(_Prepare(self), state.vector, params, args, precond)
        eigenvalue0 = state.eigenvalue.astype(x0.dtype)
        pair = _top_pair(
            d,
            t.method,
            self.op,
            x0,
            eigenvalue0,
            t.tol,
            t.residual_tol,
            self.max_iters,
            operands=operands,
            first=first,
            gap_test=t.stopping == "gap",
        )
        return value, grads, pair


@dataclasses.dataclass(frozen=True)
class _Prepare:
    measurement: _Measurement

    def __call__(self, *args: Any) -> tuple:
        return self.measurement.prepare(*args)


def records_to_arrays(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack a list of records into a dict of 1-D NumPy arrays (one entry per field)."""
    if not records:
        raise ValueError("No records to convert: was the tracker ever due (step % every == 0)?")
    fields = set(records[0])
    for i, r in enumerate(records):
        if set(r) != fields:
            raise ValueError(
                f"Record {i} has fields {sorted(r)} but record 0 has {sorted(fields)}: records of trackers with "
                "different `k` (or edited records) cannot be stacked; convert or save them separately."
            )
    lengths = {len(r["eigenvalues"]) for r in records} if "eigenvalues" in fields else set()
    if len(lengths) > 1:
        raise ValueError(f"The records hold {sorted(lengths)} eigenvalues each (trackers of different `k`).")
    return {k: np.asarray([r[k] for r in records]) for k in records[0]}


def save_records(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Save records as JSON (a list of dicts) or NPZ (one array per field), chosen by the file suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif path.suffix == ".npz":
        np.savez(path, **records_to_arrays(records))  # type: ignore[arg-type]  # numpy's stub: **kwds vs allow_pickle
    else:
        raise ValueError(f"Unsupported suffix {path.suffix!r}: use .json or .npz.")
    return path


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Inverse of :func:`save_records`: a list of dicts of Python scalars."""
    path = Path(path)
    if path.suffix not in (".json", ".npz"):
        raise ValueError(f"Unsupported suffix {path.suffix!r} of {path}: records are saved as .json or .npz.")
    try:
        if path.suffix == ".json":
            records = json.loads(path.read_text())
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("expected a JSON list of records (dicts)")
            return records
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        sizes = {len(v) for v in arrays.values() if v.ndim}
        if not arrays or len(sizes) != 1 or any(v.ndim == 0 for v in arrays.values()):
            raise ValueError("expected one array per field, all with one entry per record")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} does not hold records saved by save_records: {err}") from err
    # tolist(): a Python scalar from a scalar field, a list from a per-pair field (k > 1)
    return [{k: v[i].tolist() for k, v in arrays.items()} for i in range(sizes.pop())]


def plot_records(records: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Plot loss (log scale) and sharpness vs step with the stability threshold; writes a PNG at ``path``.

    Records of a top-k tracker (``EoSTracker(..., k=k)``, an ``eigenvalues`` field) also show the other
    ``k - 1`` eigenvalues as thinner lines.
    """
    import matplotlib  # lazily: plotting is optional

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = records_to_arrays(records)
    fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(a["step"], a["loss"])
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log")
    label = "preconditioned sharpness" if bool(a["preconditioned"][0]) else "sharpness"
    ax_sharp.plot(a["step"], a["sharpness"], label=label)
    if "eigenvalues" in a:
        for i in range(1, a["eigenvalues"].shape[1]):
            ax_sharp.plot(
                a["step"],
                a["eigenvalues"][:, i],
                linewidth=0.8,
                color="C0",
                alpha=1 - 0.6 * i / len(a["eigenvalues"][0]),
                label=f"eigenvalue {i + 1}",
            )
    ax_sharp.plot(a["step"], a["threshold"], "--", color="k", label="stability threshold")
    ax_sharp.set(xlabel="step", ylabel=label)
    ax_sharp.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
