"""Curvature speed where batch norm lives: bnjax against PyHessian on a BN conv net and an MLP (MNIST-1D).

Command: ``PYTHONPATH=. python experiments/bench_curvature.py [--quick] [--no-peer] [--default-malloc]``.
Writes ``experiments/results/bench_curvature.json`` and prints markdown tables. It calls
:func:`bnjax.retain_freed_memory` first (removes XLA:CPU's page faults; PyTorch in the same process gains
too), unless ``--default-malloc``; the payload records the allocator settings. The PyHessian side needs the optional
extra ``pip install -e '.[peer]'`` (torch + pyhessian); without it that part is skipped with a message.

Models (1000 MNIST-1D training examples, float32):

* ``cnn``: 3 x (Conv1d 32 channels, kernel 5, same padding, bias) - BatchNorm - relu, then flatten - Dense 10;
  23,498 parameters; cross-entropy. PyTorch twin with the same weights (logits agree to ~1e-6).
* ``mlp``: the flagship's tanh MLP 40-200-200-10 with square loss (no BN).

Modes: ``eval`` (BN with running statistics: a fixed function of the parameters; PyHessian always measures
this one, it calls ``model.eval()``) and ``train`` (BN with the batch's statistics; bnjax only).

Measured per model and mode, every timing a median of interleaved repeats in this run, compile excluded:

* gradient, HVP and linearized HVP (``jax.linearize`` once, tangent pass per product) as plain ``jax.jit``
  calls (21 interleaved repeats), and the time per HVP *inside* ``lanczos_top`` (a 5-product solve, so the
  average carries one linearization per 5 products) for each loop placement (``device``: one ``while_loop``
  program; ``host``: Python-driven) with and without linearization, plus the marginal cost of one more product
  in the default placement (a 15-product solve minus a 5-product one, over 10; both with their own gradient
  timed beside them, 21 interleaved repeats); the two target ratios also per round (paired with the gradient of
  the same round): geometric mean, 95% interval and the verdict on "at most 1.6"; for the BN CNN also the same
  model with ``flax.linen.BatchNorm`` (the peer for the BN layer; same variables) in the same rounds: its
  linearized HVP over its gradient, and bnjax's gradient and product over Flax's, per round;
* cold time to the top eigenvalue at 1e-3 relative to a tight reference (Lanczos to residual 1e-6): the
  fewest iterations that reach 1e-3 for each library (bnjax Lanczos: leading blocks of a decomposition;
  PyHessian power iteration: its Rayleigh quotient sequence from its own random start), then the time of a
  solve with exactly that many iterations (PyHessian: building its graph plus ``eigenvalues``); bnjax also
  from :func:`bnjax.curvature.gradient_start` (default placement, linearized; the gradient computed inside the
  timed call), with PyHessian's power iteration from the same kind of start counted beside it (its
  ``eigenvalues`` takes no start vector, so that count is not timed);
* cold-start study: HVPs to 1e-3 from a random start and from the gradient start over 16 model
  initialisations x 2 random vectors (quick: 2 x 1), the ratio per initialisation, its geometric mean with a
  95% interval and the verdict on "fewer products from the gradient"; with the peer (eval mode) also the cold
  time target at every initialisation (bnjax from each start and PyHessian, each with its fewest iterations
  to 1e-3 there, interleaved): the geometric mean of the per-initialisation ratios, a 95% interval and the
  verdict on "at most 0.5";
* tracking along 200 full-batch GD steps, a measurement every 10 steps (20 checkpoints): bnjax's
  ``EoSTracker`` (default settings, fused ``value_and_grad``) costs the tracked loop's time minus a plain
  loop's; PyHessian runs cold at each checkpoint with the fewest power iterations that reach 1e-3 there (equal
  accuracy, the target's comparison; an oracle count in PyHessian's favour) and with its own defaults
  (``maxIter=100, tol=1e-3``, which stop short of 1e-3 at most checkpoints); errors against the reference at
  every checkpoint; plain, tracked and both PyHessian runs interleaved, 3 times, medians;
* per product, both frameworks' own speed on the model: a gradient (JAX ``jit`` / PyTorch ``backward``) and an
  HVP (bnjax linearized / PyHessian's ``hessian_vector_product`` on its kept graph), interleaved;
* wherever bnjax and PyTorch are timed in the same rounds (cold solves, per product), each timed call comes
  right after an untimed call of the same function, never right after the other framework's (a JAX gradient
  of the CNN straight after a PyTorch call took 21-25 ms instead of 16-18 ms);
* training step time: a plain jitted step against ``experiments.train.full_batch_runner`` with each placement
  (per step, 20-step segments).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax
from bnjax import curvature as cv
from bnjax import loops
from experiments import stats as stats_lib
from experiments import train
from experiments.bench_batchnorm import check_out, time_interleaved, write_payload
from experiments.bench_warmstart import lanczos_steps_within, mnist1d_train

TARGETS = {
    "cold_time_vs_pyhessian": 0.5,
    "tracking_time_vs_pyhessian": 0.2,
    "linearized_hvp_over_grad": 1.6,
    "train_step_over_plain": 1.3,
}
SOLVER_VARIANTS = {  # name: (placement, linearize_budget)
    "device": ("device", 0),
    "device_linearized": ("device", None),
    "host": ("host", 0),
    "host_linearized": ("host", None),
}


@dataclasses.dataclass(frozen=True)
class Config:
    n_train: int = 1000
    repeats: int = 3  # timing repeats (median; the device-loop variants on the CNN take ~1.4 s per HVP)
    product_repeats: int = 21  # repeats of the plain jitted gradient and HVPs (cheap)
    tracking_repeats: int = 3  # interleaved repeats of plain GD, tracked GD and PyHessian per checkpoint
    solver_iters: int = 5  # HVPs per timed solve (per-HVP time inside the solver)
    gd_steps: int = 200
    every: int = 10
    lr: float = 0.1
    train_segment: int = 20
    rel_tol: float = 1e-3
    seed: int = 0
    start_seeds: tuple[int, ...] = tuple(range(16))  # model initialisations of the cold-start study
    start_keys: int = 2  # random start vectors per initialisation


PRESETS = {
    "quick": Config(
        repeats=3,
        product_repeats=7,
        tracking_repeats=1,
        solver_iters=5,
        gd_steps=60,
        train_segment=10,
        start_seeds=(0, 1),
        start_keys=1,
    )
}
COLD_VARIANTS = ("device", "host_linearized")  # the old default loop and the new default on CPU conv nets
OUT = "experiments/results/bench_curvature.json"
GRADIENT_VARIANT = "gradient_start"  # auto placement, linearized, from cv.gradient_start (its gradient timed too)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class BNCNN(nn.Module):
    norm: Any = bnjax.BatchNorm  # flax.linen.BatchNorm gives the peer twin (the same variables)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x[..., None]  # (B, 40) -> (B, 40, 1): NWC
        for i in range(3):
            x = nn.Conv(32, (5,), padding="SAME")(x)
            x = nn.relu(self.norm(use_running_average=not train, name=f"BatchNorm_{i}")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = jnp.tanh(nn.Dense(200)(x))
        x = jnp.tanh(nn.Dense(200)(x))
        return nn.Dense(10)(x)


def cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))


def square_loss(out: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(y, 10)) ** 2, axis=-1))


MODELS = {"cnn": (BNCNN(), cross_entropy, "cross_entropy"), "mlp": (MLP(), square_loss, "square")}
CASES = [("cnn", "eval"), ("cnn", "train"), ("mlp", "eval")]  # the MLP has no BN: one mode
DEFAULT_CASES = ",".join(f"{k}/{m}" for k, m in CASES)


# -- the PyTorch twin (optional peer) ------------------------------------------------------------------------


def peer_available() -> str | None:
    """None if torch and pyhessian import, else the reason."""
    try:
        import pyhessian  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"PyHessian comparison skipped: {err}. Install the optional extra: pip install -e '.[peer]'."
    return None


def torch_twin(kind: str, params: Any, stats: Any) -> tuple[Any, Callable]:
    """The PyTorch model with bnjax's weights (eval mode) and its criterion."""
    import torch

    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    if kind == "cnn":
        layers: list[Any] = []
        for i in range(3):
            conv = torch.nn.Conv1d(1 if i == 0 else 32, 32, 5, padding=2)
            conv.weight.data = t(np.transpose(params[f"Conv_{i}"]["kernel"], (2, 1, 0)))
            conv.bias.data = t(params[f"Conv_{i}"]["bias"])
            bn = torch.nn.BatchNorm1d(32, eps=1e-5)
            bn.weight.data, bn.bias.data = t(params[f"BatchNorm_{i}"]["scale"]), t(params[f"BatchNorm_{i}"]["bias"])
            bn.running_mean.data = t(stats[f"BatchNorm_{i}"]["mean"])
            bn.running_var.data = t(stats[f"BatchNorm_{i}"]["var"])
            layers += [conv, bn, torch.nn.ReLU()]
        dense = torch.nn.Linear(1280, 10)
        # Flax flattens (W, C) row-major (index w * 32 + c); torch flattens (C, W) (index c * 40 + w).
        kernel = np.asarray(params["Dense_0"]["kernel"]).reshape(40, 32, 10).transpose(1, 0, 2).reshape(1280, 10)
        dense.weight.data, dense.bias.data = t(kernel.T), t(params["Dense_0"]["bias"])

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body, self.head = torch.nn.Sequential(*layers), dense

            def forward(self, x):
                return self.head(self.body(x[:, None, :]).flatten(1))

        return Net(), torch.nn.CrossEntropyLoss()
    lin = []
    for i, (d_in, d_out) in enumerate([(40, 200), (200, 200), (200, 10)]):
        layer = torch.nn.Linear(d_in, d_out)
        layer.weight.data = t(np.asarray(params[f"Dense_{i}"]["kernel"]).T)
        layer.bias.data = t(params[f"Dense_{i}"]["bias"])
        lin.append(layer)
    net = torch.nn.Sequential(lin[0], torch.nn.Tanh(), lin[1], torch.nn.Tanh(), lin[2])
    criterion = lambda out, y: 0.5 * torch.mean(torch.sum((out - torch.nn.functional.one_hot(y, 10)) ** 2, dim=-1))  # noqa: E731
    return net, criterion


def pyhessian_rayleigh_trace(
    net: Any,
    criterion: Any,
    x: Any,
    y: Any,
    iters: int,
    seed: int,
    ref: float | None = None,
    rel_tol: float = 0.0,
    from_gradient: bool = False,
) -> list[float]:
    """Rayleigh quotients of PyHessian's power iteration (its own code path, seeded) after each HVP; with
    ``ref``, stops at the first one within ``rel_tol`` of it. ``from_gradient``: start from the unit gradient
    plus the unit random vector, as :func:`bnjax.curvature.gradient_start` (PyHessian's ``eigenvalues`` takes
    no start vector; this counts what the same start would save it)."""
    import torch
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product, normalization

    comp = hessian(net, criterion, data=(x, y), cuda=False)
    torch.manual_seed(seed)
    v = normalization([torch.randn(p.size()) for p in comp.params])
    if from_gradient:
        g = normalization([q.detach().clone() for q in comp.gradsH])
        v = normalization([a + b for a, b in zip(g, v)])
    out = []
    for _ in range(iters):
        net.zero_grad()
        hv = hessian_vector_product(comp.gradsH, comp.params, v)
        out.append(group_product(hv, v).cpu().item())
        v = normalization(hv)
        if ref is not None and abs(out[-1] - ref) <= rel_tol * abs(ref):
            break
    return out


def pyhessian_top(net: Any, criterion: Any, x: Any, y: Any, max_iter: int, tol: float, seed: int) -> float:
    """A cold PyHessian solve: build the graph, then ``eigenvalues`` (seeded start)."""
    import torch
    from pyhessian import hessian

    comp = hessian(net, criterion, data=(x, y), cuda=False)
    torch.manual_seed(seed)
    return float(comp.eigenvalues(maxIter=max_iter, tol=tol)[0][0])


# -- bnjax side ----------------------------------------------------------------------------------------------


def first_within(values: np.ndarray, ref: float, rel_tol: float) -> int | None:
    """1-based index of the first value within ``rel_tol`` of ``ref`` (None if none)."""
    ok = np.abs(np.asarray(values) - ref) <= rel_tol * abs(ref)
    return int(np.argmax(ok)) + 1 if ok.any() else None


def init_model(kind: str, mode: str, x: jax.Array, seed: int) -> tuple[Any, Any, Any]:
    """``(params, batch_stats, fns)`` of model ``kind`` initialised with ``seed``; ``fns`` its curvature
    functions in BN mode ``mode`` (none for a model without BN)."""
    model, loss, _ = MODELS[kind]
    variables = model.init(jax.random.key(seed), x[:8])
    params, stats = variables["params"], variables.get("batch_stats")
    return params, stats, cv.flax_curvature_fns(model.apply, loss, bn_mode=mode if stats is not None else None)


def start_study(kind: str, mode: str, x: jax.Array, y: jax.Array, cfg: Config, peer: bool = False) -> dict[str, Any]:
    """Cold HVPs to ``rel_tol`` from a random start and from :func:`bnjax.curvature.gradient_start`, over model
    initialisations (``cfg.start_seeds``) and random vectors (``cfg.start_keys`` each, the same one in both
    starts), against a tight reference; per initialisation the ratio of the mean counts, their geometric mean
    with a 95% interval and the verdict on "the gradient start needs fewer products" (ratio below 1).

    With ``peer`` (eval mode, PyHessian installed) also the cold *time* target at every initialisation: bnjax
    from the first random vector and from its gradient start (the gradient inside the timed call), each with
    exactly the iterations that reach ``rel_tol`` there, against PyHessian (graph plus ``eigenvalues``) with the
    fewest power iterations that reach it from its own seeded start; interleaved, ``cfg.repeats`` times,
    medians; per start the geometric mean of the per-initialisation ratios bnjax / PyHessian with a 95%
    interval and the verdict on "at most the target"."""
    random_hvps, gradient_hvps = [], []
    seconds: dict[str, list[float]] = {"random": [], "gradient": [], "pyhessian": []}
    peer_hvps: list[int] = []
    for seed in cfg.start_seeds:
        params, stats, fns = init_model(kind, mode, x, seed)
        hess, batch = cv.hessian_matvec(fns.loss_fn), (x, y)
        grad = jax.jit(jax.grad(fns.loss_fn))
        g = grad(params, batch, stats)
        ref = cv.lanczos_top(hess, g, params, batch, stats, tol=1e-9, residual_tol=1e-6, max_iters=100)
        lam = float(ref.eigenvalue)
        counts: dict[str, list[int]] = {"random": [], "gradient": []}
        for k in range(cfg.start_keys):
            key = jax.random.key(100 + k)
            for name, v0 in (("random", cv.random_like(key, params)), ("gradient", cv.gradient_start(key, g))):
                dec = cv.lanczos_decomposition(hess, v0, params, batch, stats, num_iters=40)
                counts[name].append(lanczos_steps_within(dec, lam, cfg.rel_tol) or 41)
        random_hvps.append(counts["random"])
        gradient_hvps.append(counts["gradient"])
        if peer:
            timed, m_peer = _cold_times(kind, x, y, cfg, seed, (params, stats, hess, grad), lam, counts)
            peer_hvps.append(m_peer)
            for name, t in timed.items():
                seconds[name].append(t)
    ratio = stats_lib.ratio_interval(np.mean(gradient_hvps, axis=1), np.mean(random_hvps, axis=1))
    out = {
        "seeds": list(cfg.start_seeds),
        "random_hvps": random_hvps,
        "gradient_hvps": gradient_hvps,
        "gradient_over_random": ratio._asdict(),
        "verdict_fewer": stats_lib.interval_verdict(ratio, "below", 1.0),
    }
    if peer:
        out["time"] = cold_time_summary(seconds, peer_hvps)
    return out


def cold_time_summary(seconds: dict[str, list[float]], pyhessian_hvps: list[int]) -> dict[str, Any]:
    """Per-initialisation cold seconds (``random``, ``gradient``, ``pyhessian``; entry ``i`` of each from
    initialisation ``i``) to the stored summary: for each bnjax start the geometric mean of the ratios
    bnjax / PyHessian with a 95% interval and the verdict on "at most the cold-time target"."""
    out: dict[str, Any] = {"seconds": seconds, "pyhessian_hvps": pyhessian_hvps}
    for name in ("random", "gradient"):
        iv = stats_lib.ratio_interval(seconds[name], seconds["pyhessian"])
        out[f"{name}_over_pyhessian"] = {
            **iv._asdict(),
            "verdict_at_most_target": stats_lib.interval_verdict(iv, "below", TARGETS["cold_time_vs_pyhessian"]),
        }
    return out


def _cold_times(
    kind: str,
    x: jax.Array,
    y: jax.Array,
    cfg: Config,
    seed: int,
    model: tuple[Any, Any, Any, Callable],
    lam: float,
    counts: dict[str, list[int]],
) -> tuple[dict[str, float], int]:
    """One initialisation of :func:`start_study`'s time comparison: ``(seconds, m)``, the seconds of bnjax's cold
    solve from the first random vector and from its gradient start (``counts[...][0]`` iterations each) and of
    PyHessian's cold solve with its oracle count ``m``."""
    import torch

    params, stats, hess, grad = model
    batch, key = (x, y), jax.random.key(100)
    v0 = cv.random_like(key, params)
    start = jax.jit(lambda p: cv.gradient_start(key, grad(p, batch, stats)))
    net, criterion = torch_twin(kind, params, stats)
    tx, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)
    trace = pyhessian_rayleigh_trace(net, criterion, tx, ty, 100, seed, lam, cfg.rel_tol)
    m_peer = first_within(np.asarray(trace), lam, cfg.rel_tol) or 100
    m, m_g = counts["random"][0], counts["gradient"][0]
    t = time_interleaved(
        {
            "random": lambda: cv.lanczos_top(hess, v0, params, batch, stats, tol=0.0, residual_tol=0.0, max_iters=m),
            "gradient": lambda: cv.lanczos_top(
                hess, start(params), params, batch, stats, tol=0.0, residual_tol=0.0, max_iters=m_g
            ),
            "pyhessian": lambda: pyhessian_top(net, criterion, tx, ty, m_peer, 0.0, seed),
        },
        cfg.repeats,
        warmup=1,
        lead=1,  # two frameworks: no timed call right after the other's (see time_interleaved)
    )
    return t, m_peer


def linearize_at(hess: Callable, v: Any, params: Any, batch: Any, stats: Any) -> Callable:
    """The linear map ``u -> H u`` at ``params`` (one jitted ``jax.linearize``): applying it runs only the
    tangent pass, as the solvers' linearized products do."""
    return jax.jit(lambda p: jax.linearize(lambda u: hess(u, p, batch, stats), v)[1])(params)


def run_case(kind: str, mode: str, x: jax.Array, y: jax.Array, cfg: Config, peer: bool) -> dict[str, Any]:
    model, _, loss_name = MODELS[kind]
    params, stats, fns = init_model(kind, mode, x, cfg.seed)
    batch = (x, y)
    loss_fn = fns.loss_fn
    hess = cv.hessian_matvec(loss_fn)
    v = cv.random_like(jax.random.key(1), params)
    n_params = int(sum(p.size for p in jax.tree.leaves(params)))
    log(
        f"[{kind}/{mode}] {n_params} parameters; auto placement: "
        f"{loops.resolve_placement('auto', hess, v, params, batch, stats)}"
    )

    # 1. Products as plain jitted calls, and inside the solver for every placement and linearization.
    grad = jax.jit(jax.grad(loss_fn))
    hvp = jax.jit(lambda p, u: hess(u, p, batch, stats))
    lin = linearize_at(hess, v, params, batch, stats)
    apply_lin = jax.jit(lambda f, u: f(u))
    auto = loops.resolve_placement("auto", hess, v, params, batch, stats)
    auto_variant = f"{auto}_linearized"
    # The peer for the BN layer: the same model and variables with flax.linen.BatchNorm, its gradient and
    # linearized product timed in the same rounds, so the BN layer's share of the ratios shows.
    twin: dict[str, Callable[[], Any]] = {}
    if stats is not None:
        flax_fns = cv.flax_curvature_fns(model.clone(norm=nn.BatchNorm).apply, MODELS[kind][1], bn_mode=mode)
        flax_hess = cv.hessian_matvec(flax_fns.loss_fn)
        flax_grad = jax.jit(jax.grad(flax_fns.loss_fn))
        flax_lin = linearize_at(flax_hess, v, params, batch, stats)
        flax_loss_gap = abs(float(flax_fns.loss_fn(params, batch, stats)) - float(loss_fn(params, batch, stats)))
        twin = {
            "flax_grad": lambda: flax_grad(params, batch, stats),
            "flax_hvp_linearized": lambda: apply_lin(flax_lin, v),
        }

    def solve(placement: str, budget: int | None, iters: int) -> Callable[[], Any]:
        return lambda: cv.lanczos_top(
            hess,
            v,
            params,
            batch,
            stats,
            tol=0.0,
            residual_tol=0.0,
            max_iters=iters,
            placement=placement,
            linearize_budget=budget,
        )

    # Plain products are cheap: many interleaved repeats, so their ratios are not one noisy sample.
    t_rounds = time_interleaved(
        {"grad": lambda: grad(params, batch, stats), "hvp": lambda: hvp(params, v),
         "hvp_linearized": lambda: apply_lin(lin, v), **twin},
        cfg.product_repeats,
        warmup=2,
        samples=True,
    )  # fmt: skip
    t = {k: float(np.median(val)) for k, val in t_rounds.items()}
    # Inside the solver: every variant at solver_iters HVPs (the average includes the one linearization per
    # solve); the default (auto) variant also at 3x as many, whose difference is the marginal cost of one more
    # product at a fixed point.
    solves = {f"solve_{k}": solve(pl, b, cfg.solver_iters) for k, (pl, b) in SOLVER_VARIANTS.items()}
    ts = time_interleaved({"grad": lambda: grad(params, batch, stats), **solves}, cfg.repeats, warmup=1)
    # The default variant's marginal cost (the target figure) is a difference of two solves, so it gets as many
    # interleaved repeats as the plain products: with 3 it was one noisy sample on a loaded machine.
    short, long = solves[f"solve_{auto_variant}"], solve(*SOLVER_VARIANTS[auto_variant], 3 * cfg.solver_iters)
    tm_rounds = time_interleaved(
        {"grad": lambda: grad(params, batch, stats), "short": short, "long": long},
        cfg.product_repeats,
        warmup=1,
        samples=True,
    )
    tm = {k: float(np.median(val)) for k, val in tm_rounds.items()}
    # The two target ratios also per round (each pair timed side by side): geometric mean, 95% interval and the
    # verdict on "at most the target", so a noisy median is not read as met or missed. A round whose 15-product
    # solve was not slower than its 5-product one (load spike) has no marginal and is left out (n counts fewer rounds).
    marginal_rounds = (np.asarray(tm_rounds["long"]) - np.asarray(tm_rounds["short"])) / (2 * cfg.solver_iters)
    target = TARGETS["linearized_hvp_over_grad"]
    intervals = {
        "linearized_hvp_over_grad": stats_lib.ratio_interval(t_rounds["hvp_linearized"], t_rounds["grad"]),
        "in_solver_marginal_hvp_over_grad": stats_lib.ratio_interval(marginal_rounds, tm_rounds["grad"]),
    }
    log("products timed")
    t_grad, ts_grad = t["grad"], ts["grad"]
    products = {
        "grad_ms": 1e3 * t_grad,
        "hvp_over_grad": t["hvp"] / t_grad,
        "linearized_hvp_over_grad": t["hvp_linearized"] / t_grad,
        "in_solver_hvp_over_grad": {k: ts[f"solve_{k}"] / cfg.solver_iters / ts_grad for k in SOLVER_VARIANTS},
        "auto_variant": auto_variant,
        "in_solver_marginal_hvp_over_grad": (tm["long"] - tm["short"]) / (2 * cfg.solver_iters) / tm["grad"],
        "linearization_mb": cv.linearization_bytes(hess, v, params, batch, stats) / 2**20,
        "per_round": {
            k: {**iv._asdict(), "verdict_at_most_target": stats_lib.interval_verdict(iv, "below", target)}
            for k, iv in intervals.items()
        },
    }
    if twin:
        products["flax_batchnorm"] = {
            "loss_gap": flax_loss_gap,
            "grad_ms": 1e3 * t["flax_grad"],
            "linearized_hvp_over_grad": t["flax_hvp_linearized"] / t["flax_grad"],
            "per_round": {
                k: stats_lib.ratio_interval(t_rounds[a], t_rounds[b])._asdict()
                for k, (a, b) in {
                    "linearized_hvp_over_grad": ("flax_hvp_linearized", "flax_grad"),
                    "bnjax_over_flax_grad": ("grad", "flax_grad"),
                    "bnjax_over_flax_hvp": ("hvp_linearized", "flax_hvp_linearized"),
                }.items()
            },
        }

    # 2. Cold time to the top eigenvalue at rel_tol of a tight reference.
    ref = cv.lanczos_top(hess, v, params, batch, stats, tol=1e-9, residual_tol=1e-6, max_iters=100)
    lam = float(ref.eigenvalue)
    dec = cv.lanczos_decomposition(hess, v, params, batch, stats, num_iters=40)
    m = lanczos_steps_within(dec, lam, cfg.rel_tol) or 40
    cold_solves = {
        name: (
            lambda pl=pl, b=b: cv.lanczos_top(
                hess, v, params, batch, stats, tol=0.0, residual_tol=0.0, max_iters=m, placement=pl, linearize_budget=b
            )
        )
        for name, (pl, b) in SOLVER_VARIANTS.items()
        if name in COLD_VARIANTS
    }
    # From the gradient (cv.gradient_start with v's random vector): the gradient is computed inside the timed call.
    start = jax.jit(lambda p: cv.gradient_start(jax.random.key(1), grad(p, batch, stats)))
    dec_g = cv.lanczos_decomposition(hess, start(params), params, batch, stats, num_iters=40)
    m_g = lanczos_steps_within(dec_g, lam, cfg.rel_tol) or 40
    cold_solves[GRADIENT_VARIANT] = lambda: cv.lanczos_top(
        hess, start(params), params, batch, stats, tol=0.0, residual_tol=0.0, max_iters=m_g
    )
    cold_fns: dict[str, Callable[[], Any]] = dict(cold_solves)
    cold: dict[str, Any] = {
        "reference": lam,
        "bnjax_hvps": m,
        "bnjax_hvps_gradient_start": m_g,
        "bnjax_rel_error": abs(float(cold_solves["host_linearized"]().eigenvalue) - lam) / abs(lam),
        "bnjax_rel_error_gradient_start": abs(float(cold_solves[GRADIENT_VARIANT]().eigenvalue) - lam) / abs(lam),
    }
    if peer:
        import torch

        torch.set_num_threads(2)
        net, criterion = torch_twin(kind, params, stats)
        tx, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)
        with torch.no_grad():
            logits_gap = float(
                np.max(
                    np.abs(
                        net.eval()(tx).numpy()
                        - np.asarray(
                            model.apply(
                                {"params": params, **({"batch_stats": stats} if stats is not None else {})},
                                x,
                                train=False,
                            )
                        )
                    )
                )
            )
        trace = pyhessian_rayleigh_trace(net, criterion, tx, ty, 100, cfg.seed)
        m_peer = first_within(np.asarray(trace), lam, cfg.rel_tol) or 100
        trace_g = pyhessian_rayleigh_trace(net, criterion, tx, ty, 100, cfg.seed, lam, cfg.rel_tol, from_gradient=True)
        cold["pyhessian_hvps_gradient_start"] = first_within(np.asarray(trace_g), lam, cfg.rel_tol) or 100
        cold_fns["pyhessian"] = lambda: pyhessian_top(net, criterion, tx, ty, m_peer, 0.0, cfg.seed)
        own = pyhessian_top(net, criterion, tx, ty, 100, 1e-3, cfg.seed)  # its own default stopping rule
        cold.update(
            pyhessian_hvps=m_peer, logits_max_gap=logits_gap, pyhessian_own_rule_rel_error=abs(own - lam) / abs(lam)
        )
        # The frameworks' own speed on this model: a gradient and an HVP as each runs them, interleaved.
        from pyhessian import hessian as peer_hessian
        from pyhessian.utils import hessian_vector_product

        comp = peer_hessian(net, criterion, data=(tx, ty), cuda=False)
        tv = [torch.randn(q.size()) for q in comp.params]

        def torch_grad() -> None:
            net.zero_grad()
            criterion(net(tx), ty).backward()

        tp = time_interleaved(
            {
                "jax_grad": lambda: grad(params, batch, stats),
                "torch_grad": torch_grad,
                "jax_hvp_linearized": lambda: apply_lin(lin, v),
                "pyhessian_hvp": lambda: hessian_vector_product(comp.gradsH, comp.params, tv) and None,
            },
            cfg.product_repeats,
            warmup=2,
            lead=1,
        )
        cold["per_product_ms"] = {k: 1e3 * t for k, t in tp.items()}
    tc = time_interleaved(cold_fns, cfg.repeats, warmup=1, lead=int(peer))
    log("cold solves timed")
    cold["seconds"] = tc
    if peer:
        cold["bnjax_over_pyhessian"] = {k: tc[k] / tc["pyhessian"] for k in (*COLD_VARIANTS, GRADIENT_VARIANT)}
    cold["starts_over_seeds"] = start_study(kind, mode, x, y, cfg, peer)
    log("cold-start study done")

    # 3. Tracking along GD (bnjax fused tracker vs a plain loop; PyHessian cold per checkpoint).
    step = jax.jit(lambda p, g: jax.tree.map(lambda a, d: a - cfg.lr * d, p, g))
    tracker = cv.EoSTracker(loss_fn, cv.gd_rule(cfg.lr), every=cfg.every)

    # Not under jax.jit: "auto" placement then keeps conv nets out of a device loop (see bnjax.loops).
    def reference(p):
        return cv.lanczos_top(hess, v, p, batch, stats, tol=1e-9, residual_tol=1e-6, max_iters=100).eigenvalue

    def plain_loop() -> float:
        q, t0 = params, time.perf_counter()
        for _ in range(cfg.gd_steps):
            q = step(q, grad(q, batch, stats))
        jax.block_until_ready(q)
        return time.perf_counter() - t0

    def tracked_loop() -> tuple[float, list[dict[str, Any]], list[Any]]:
        q, st, records, points = params, tracker.init(params, jax.random.key(2)), [], []
        t0 = time.perf_counter()
        for s in range(cfg.gd_steps):
            if tracker.due(s):
                (_, g), record, st = tracker.value_and_grad(st, s, q, batch, stats)
                records.append(record)
                points.append(q)
            else:
                g = grad(q, batch, stats)
            q = step(q, g)
        jax.block_until_ready(q)
        return time.perf_counter() - t0, records, points

    def peer_tracking(points: list[Any], iters: list[int] | None = None) -> tuple[float, list[float]]:
        """PyHessian cold at each checkpoint: its own rule (``iters`` None) or exactly ``iters[i]`` products."""
        t0, values = time.perf_counter(), []
        for i, p in enumerate(points):
            net, criterion = torch_twin(kind, p, stats)
            if iters is None:
                values.append(pyhessian_top(net, criterion, tx, ty, 100, 1e-3, cfg.seed))
            else:
                values.append(pyhessian_top(net, criterion, tx, ty, iters[i], 0.0, cfg.seed))
        return time.perf_counter() - t0, values

    _, records, points = tracked_loop()  # compile (cold and warm solves); GD is deterministic: same points
    plain_loop()
    refs = np.asarray([float(reference(p)) for p in points])
    peer_iters: list[int] = []
    if peer:  # equal accuracy: the fewest power iterations that reach rel_tol at each checkpoint (an oracle)
        for p, r in zip(points, refs):
            net, criterion = torch_twin(kind, p, stats)
            trace = pyhessian_rayleigh_trace(net, criterion, tx, ty, 100, cfg.seed, float(r), cfg.rel_tol)
            peer_iters.append(first_within(np.asarray(trace), float(r), cfg.rel_tol) or 100)
    plains, tracks, peers, peers_equal = [], [], [], []
    for _ in range(cfg.tracking_repeats):  # interleaved, so load changes hit all four alike
        plains.append(plain_loop())
        elapsed, records, points = tracked_loop()
        tracks.append(elapsed)
        if peer:
            elapsed, peer_values = peer_tracking(points)
            peers.append(elapsed)
            peers_equal.append(peer_tracking(points, peer_iters)[0])
    log("tracking timed")
    errors = np.abs(np.asarray([r["sharpness"] for r in records]) - refs) / np.abs(refs)
    tracking: dict[str, Any] = {
        "checkpoints": len(records),
        "bnjax_seconds": float(np.median(tracks) - np.median(plains)),
        "plain_gd_seconds": float(np.median(plains)),
        "bnjax_hvps": int(sum(r["hvps"] for r in records)),
        "bnjax_hvps_per_checkpoint": [int(r["hvps"]) for r in records],
        "bnjax_within_1e-3": float(np.mean(errors <= 1e-3)),
        "bnjax_median_rel_error": float(np.median(errors)),
        "final_sharpness": float(refs[-1]),
    }
    if peer:
        peer_errors = np.abs(np.asarray(peer_values) - refs) / np.abs(refs)
        tracking.update(
            {
                "pyhessian_own_rule_seconds": float(np.median(peers)),
                "pyhessian_own_rule_within_1e-3": float(np.mean(peer_errors <= 1e-3)),
                "pyhessian_own_rule_median_rel_error": float(np.median(peer_errors)),
                "pyhessian_seconds": float(np.median(peers_equal)),
                "pyhessian_hvps": int(sum(peer_iters)),
                "pyhessian_hvps_per_checkpoint": peer_iters,
            }
        )
        # The target compares at equal accuracy (PyHessian with the fewest iterations that reach 1e-3).
        tracking["bnjax_over_pyhessian"] = tracking["bnjax_seconds"] / tracking["pyhessian_seconds"]
        tracking["bnjax_over_pyhessian_own_rule"] = tracking["bnjax_seconds"] / tracking["pyhessian_own_rule_seconds"]
    log("references and PyHessian tracking done")

    # 4. Training steps: a plain jitted step against the experiments' runner with each placement.
    out: dict[str, Any] = {
        "model": kind,
        "mode": mode,
        "params": n_params,
        "products": products,
        "cold": cold,
        "tracking": tracking,
    }
    if mode == "train" or stats is None:
        opt = optax.sgd(cfg.lr)
        tstep = train.make_train_step(model, loss_name, opt)
        state = train.init_train_state(model, x[:8], opt, cfg.seed)
        plain_step = jax.jit(tstep)
        runners = {pl: train.full_batch_runner(tstep, placement=pl) for pl in ("device", "host", "auto")}

        def plain_segment() -> Any:
            s = state
            for _ in range(cfg.train_segment):
                s, _ = plain_step(s, x, y)
            return s

        tt = time_interleaved(
            {
                "plain": plain_segment,
                **{pl: (lambda r=r: r(state, x, y, cfg.train_segment)) for pl, r in runners.items()},
            },
            max(3, cfg.repeats // 2),
            warmup=1,
        )
        out["training"] = {
            "plain_step_ms": 1e3 * tt["plain"] / cfg.train_segment,
            "step_over_plain": {pl: tt[pl] / tt["plain"] for pl in runners},
        }
    print(json.dumps(out, indent=1), flush=True)
    return out


def interval_cell(d: dict[str, Any], unit: str = "seed") -> str:
    """``0.46x [0.31, 0.68], 8 seeds`` from a stored ratio interval (its other keys, such as a verdict, ignored)."""
    return stats_lib.format_ratio(stats_lib.Interval(d["mean"], d["low"], d["high"], d["n"]), unit=unit)


def per_round_cell(d: dict[str, Any]) -> str:
    """``1.52x [1.48, 1.57], 21 rounds`` from a stored per-round ratio interval."""
    return interval_cell(d, unit="round")


def tables(results: list[dict[str, Any]], peer_note: str | None) -> str:
    cols = [f"{r['model']} {r['mode']}" for r in results]
    head = ["| measure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        def safe(r: dict[str, Any]) -> str:
            try:
                return cell(r)
            except (KeyError, TypeError):
                return "–"

        return f"| {label} | " + " | ".join(safe(r) for r in results) + " |"

    p = lambda r: r["products"]  # noqa: E731
    lines = head + [
        row("parameters", lambda r: f"{r['params']:,}"),
        row("gradient, plain jit (ms)", lambda r: f"{p(r)['grad_ms']:.1f}"),
        row("HVP / gradient, plain jit", lambda r: f"{p(r)['hvp_over_grad']:.2f}"),
        row("linearized HVP / gradient, plain jit (target ≤ 1.6)", lambda r: f"{p(r)['linearized_hvp_over_grad']:.2f}"),
        row(
            "HVP / gradient inside `lanczos_top`, marginal (auto placement, linearized; target ≤ 1.6)",
            lambda r: f"{p(r)['in_solver_marginal_hvp_over_grad']:.2f} ({p(r)['auto_variant'].split('_')[0]})",
        ),
        *[
            row(
                f"{label}, per-round ratios [95%], verdict on ≤ 1.6",
                lambda r, k=k: "{} ({})".format(
                    per_round_cell(p(r)["per_round"][k]), p(r)["per_round"][k]["verdict_at_most_target"]
                ),
            )
            for k, label in (
                ("linearized_hvp_over_grad", "linearized HVP / gradient, plain jit"),
                ("in_solver_marginal_hvp_over_grad", "one more HVP inside `lanczos_top` / gradient"),
            )
        ],
        row(
            "same model with `flax.linen.BatchNorm`: linearized HVP / gradient, plain jit, per round [95%]",
            lambda r: per_round_cell(p(r)["flax_batchnorm"]["per_round"]["linearized_hvp_over_grad"]),
        ),
        row(
            "bnjax ÷ `flax.linen.BatchNorm` in that model, per round [95%]: gradient; linearized HVP",
            lambda r: "; ".join(
                per_round_cell(p(r)["flax_batchnorm"]["per_round"][k])
                for k in ("bnjax_over_flax_grad", "bnjax_over_flax_hvp")
            ),
        ),
        row("linearization memory (MiB)", lambda r: f"{p(r)['linearization_mb']:.0f}"),
        *[
            row(
                f"HVP / gradient inside `lanczos_top`, {k.replace('_', ' + ')}",
                lambda r, k=k: f"{p(r)['in_solver_hvp_over_grad'][k]:.2f}",
            )
            for k in SOLVER_VARIANTS
        ],
        row(
            "HVPs to 1e-3, cold: bnjax Lanczos / PyHessian power",
            lambda r: "{} / {}".format(r["cold"]["bnjax_hvps"], r["cold"].get("pyhessian_hvps", "–")),
        ),
        row(
            "HVPs to 1e-3 from the gradient start: bnjax Lanczos / PyHessian power (counted, not its API)",
            lambda r: "{} / {}".format(
                r["cold"]["bnjax_hvps_gradient_start"], r["cold"].get("pyhessian_hvps_gradient_start", "–")
            ),
        ),
        row(
            "cold HVPs over initialisations, gradient start ÷ random start [95%], verdict on fewer",
            lambda r: "{} ({})".format(
                interval_cell(r["cold"]["starts_over_seeds"]["gradient_over_random"]),
                r["cold"]["starts_over_seeds"]["verdict_fewer"],
            ),
        ),
        row(
            "cold time to 1e-3 (s): bnjax device loop / host + linearized / gradient start / PyHessian",
            lambda r: "{:.2f} / {:.2f} / {:.2f} / {}".format(
                r["cold"]["seconds"]["device"],
                r["cold"]["seconds"]["host_linearized"],
                r["cold"]["seconds"][GRADIENT_VARIANT],
                f"{r['cold']['seconds']['pyhessian']:.2f}" if "pyhessian" in r["cold"]["seconds"] else "–",
            ),
        ),
        row(
            "cold time, bnjax / PyHessian (target ≤ 0.5): device loop, host + linearized, gradient start",
            lambda r: ", ".join(
                f"{r['cold']['bnjax_over_pyhessian'][k]:.2f}" for k in (*COLD_VARIANTS, GRADIENT_VARIANT)
            ),
        ),
        row(
            "cold time over initialisations, bnjax / PyHessian [95%], verdict on ≤ 0.5: random start; gradient start",
            lambda r: "; ".join(
                "{} ({})".format(interval_cell(d), d["verdict_at_most_target"])
                for d in (
                    r["cold"]["starts_over_seeds"]["time"]["random_over_pyhessian"],
                    r["cold"]["starts_over_seeds"]["time"]["gradient_over_pyhessian"],
                )
            ),
        ),
        row(
            "PyHessian's own stopping rule (tol 1e-3): relative error",
            lambda r: f"{r['cold']['pyhessian_own_rule_rel_error']:.1e}",
        ),
        row(
            "per product (ms): gradient JAX / PyTorch; HVP bnjax linearized / PyHessian",
            lambda r: "{jax_grad:.1f} / {torch_grad:.1f}; {jax_hvp_linearized:.1f} / {pyhessian_hvp:.1f}".format(
                **r["cold"]["per_product_ms"]
            ),
        ),
        row(
            "tracking 20 checkpoints / 200 GD steps (s): bnjax / PyHessian at 1e-3 / PyHessian own rule",
            lambda r: "{:.1f} / {:.1f} / {:.1f}".format(
                r["tracking"]["bnjax_seconds"],
                r["tracking"]["pyhessian_seconds"],
                r["tracking"]["pyhessian_own_rule_seconds"],
            ),
        ),
        row(
            "tracking time, bnjax / PyHessian at 1e-3 (target ≤ 0.2); against its own rule",
            lambda r: "{:.2f}; {:.2f}".format(
                r["tracking"]["bnjax_over_pyhessian"], r["tracking"]["bnjax_over_pyhessian_own_rule"]
            ),
        ),
        row(
            "tracking HVPs: bnjax / PyHessian at 1e-3",
            lambda r: "{} / {}".format(r["tracking"]["bnjax_hvps"], r["tracking"].get("pyhessian_hvps", "–")),
        ),
        row(
            "tracking estimates within 1e-3: bnjax / PyHessian own rule",
            lambda r: "{:.0%} / {}".format(
                r["tracking"]["bnjax_within_1e-3"],
                f"{r['tracking']['pyhessian_own_rule_within_1e-3']:.0%}"
                if "pyhessian_own_rule_within_1e-3" in r["tracking"]
                else "–",
            ),
        ),
        row("plain GD, 200 steps (s)", lambda r: f"{r['tracking']['plain_gd_seconds']:.1f}"),
        row(
            "training step / plain jitted step (target ≤ 1.3): device scan, host, auto",
            lambda r: ", ".join(f"{r['training']['step_over_plain'][k]:.2f}" for k in ("device", "host", "auto")),
        ),
    ]
    if peer_note:
        lines.append(f"\n{peer_note}")
    return "\n".join(lines)


def memory_environment() -> dict[str, Any]:
    """The allocator settings that change every conv-net timing here: whether
    :func:`bnjax.retain_freed_memory` ran (``retain_freed_memory``), ``GLIBC_TUNABLES`` (with
    ``glibc.malloc.hugetlb=1`` glibc >= 2.35 asks for transparent huge pages on its large allocations) and the
    kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``; None off Linux)."""
    try:
        text = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        thp = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        thp = None
    return {
        "retain_freed_memory": bnjax.allocator.retained(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "transparent_hugepage": thp,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter GD run")
    parser.add_argument("--no-peer", action="store_true", help="skip the PyHessian comparison")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="e.g. cnn/eval,mlp/eval")
    parser.add_argument("--out", default=OUT)
    parser.add_argument(
        "--default-malloc", action="store_true", help="skip bnjax.retain_freed_memory() (glibc's default settings)"
    )
    args = parser.parse_args()
    check_out(parser, args.out)
    cases = [tuple(c.strip().split("/")) for c in args.cases.split(",")]
    if not cases or any(c not in CASES for c in cases):
        parser.error(f"--cases {args.cases}: each case must be one of {DEFAULT_CASES}.")
    if not args.default_malloc:
        bnjax.retain_freed_memory()  # first: it must precede JAX's backend
    cfg = PRESETS["quick"] if args.quick else Config()
    note = "PyHessian comparison skipped (--no-peer)." if args.no_peer else peer_available()
    if note:
        print(note)
    memory = memory_environment()
    log(f"allocator: {memory}")
    x, y = mnist1d_train(cfg.n_train)
    t0 = time.perf_counter()
    # PyHessian measures eval mode only (it calls model.eval()), so it is compared on the eval-mode cases.
    results = [run_case(kind, mode, x, y, cfg, note is None and mode == "eval") for kind, mode in cases]
    payload = {
        "command": (f"GLIBC_TUNABLES={memory['GLIBC_TUNABLES']} " if memory["GLIBC_TUNABLES"] else "")
        + "PYTHONPATH=. python experiments/bench_curvature.py"
        + (" --quick" if args.quick else "")
        + (" --no-peer" if args.no_peer else "")
        + (" --default-malloc" if args.default_malloc else "")
        + (f" --cases {args.cases}" if args.cases != DEFAULT_CASES else "")
        + (f" --out {args.out}" if args.out != OUT else ""),
        "date": datetime.date.today().isoformat(),
        "config": dataclasses.asdict(cfg),
        "targets": TARGETS,
        "device": f"{jax.devices()[0].platform}, {jax.device_count()} devices",
        "memory_environment": memory,
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "table": tables(results, note),
    }
    write_payload(payload, args.out)


if __name__ == "__main__":
    main()
