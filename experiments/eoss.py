"""Edge of stochastic stability (Andreyev & Beneventano 2024): batch sharpness, not lambda_max, settles at 2/eta.

Mini-batch SGD at a fixed step ``eta`` and several batch sizes (the largest = the full training set, i.e. GD),
with and without batch norm, over several seeds (vmapped: one compiled program trains and measures every seed).
Every ``track_every`` steps two curvatures are measured per seed:

- *batch sharpness* ``E_B[g_B^T H_B g_B / ||g_B||^2]`` (:func:`bnjax.curvature.batch_sharpness`, the paper's
  estimator: the mean over ``sharpness_batches`` random batches of the run's own batch size, BN in train mode
  on each batch, which is the function SGD steps on);
- the full-batch ``lambda_max`` (top eigenvalue of the Hessian of the training loss over all ``n_train``
  examples, BN in train mode with full-batch statistics) by :func:`bnjax.curvature.lanczos_top`,
  warm-started from the previous checkpoint's eigenvector.

The claim (arXiv 2412.20553): under SGD batch sharpness rises to ``2/eta`` and hovers there ("EoSS"), while
``lambda_max`` sits below ``2/eta``, the lower the smaller the batch; with the full batch both are at ``2/eta``
(GD's edge of stability). Verdicts over the seeds by 95% t-intervals (:func:`experiments.stats.interval`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import curvature
from experiments import data as data_lib
from experiments import models, progress, report, stats, train
from experiments.eos import legend_above_data


@dataclasses.dataclass(frozen=True)
class Config:
    """Edge of stochastic stability (Andreyev & Beneventano, arXiv 2412.20553).

    Command: ``python -m experiments eoss`` (full) or ``python -m experiments eoss --quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result (the paper's claim): batch sharpness of every run hovers at ``2/eta`` once training is at
    the edge, while the full-batch ``lambda_max`` is below ``2/eta`` for mini-batch runs and lower for smaller
    batches; the full-batch run (``batch_size = n_train``) is GD, at ``2/eta`` in both. Measured in the full run
    of 2026-12-04 (``experiments/results/claims-full/eoss-mlp/``): GD at ``2/eta`` in both curvatures; SGD's batch
    sharpness stayed below ``2/eta`` (0.45-0.88 of it) and below ``lambda_max`` ("not held" here);
    ``lambda_max`` lower for smaller batches in 3 of 4 pairs ("inconclusive"). The quick form is too short for
    the no-BN nets to reach the edge (GD still sharpening at step 1500).

    Setting: a tanh MLP (``hidden``) on the first ``n_train`` MNIST-1D training examples, ``loss`` (square loss
    ``0.5 ||f - onehot||^2`` as in the paper's main experiments), plain SGD at learning rate ``lr`` (no momentum,
    no weight decay, constant), ``steps`` steps with batches of ``batch_sizes`` distinct examples drawn uniformly
    at every step, ``norms`` (none / BN), ``seeds`` (initialization and batch order). Hidden kernels are drawn
    with ``init_scale`` times the LeCun normal std (the paper also starts from a scaled-down initialization).
    Curvature every ``track_every`` steps: batch sharpness over ``sharpness_batches`` batches; full-batch
    ``lambda_max`` by warm-started Lanczos (at most ``solver_iters`` HVPs, relative tolerance ``solver_tol``).

    Verdict: per run (setting x seed) the statistic is the mean ratio to ``2/eta`` over the last
    ``verdict_window`` of the checkpoints; over the seeds its 95% t-interval (mean ± t_{0.975, S-1} sd /
    sqrt(S)). A claim about one setting is *held* when the interval lies inside the claim's region, *not held*
    when it lies entirely outside, *inconclusive* when it straddles a boundary. Regions: batch sharpness /
    (2/eta) in [``band_low``, ``band_high``]; mini-batch ``lambda_max`` / (2/eta) below ``band_low``; "lower
    for smaller batches": the per-seed difference of ``lambda_max`` / (2/eta) between each batch size and the
    next larger one below 0. A claim over several settings is not held if any is, held if all are, else
    inconclusive. Diverged seeds are reported and left out.
    Differences from the paper: see the report's notes (CIFAR-10 subsets, CNNs and ResNets there; a small
    tanh MLP on MNIST-1D here, fewer steps, a fixed number of batches per batch-sharpness estimate).
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    n_train: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    init_scale: float = 0.577
    loss: str = "square"
    norms: tuple[str, ...] = ("none", "bn")
    lr: float = 0.05
    batch_sizes: tuple[int, ...] = (32, 128, 1000)
    steps: int = 16000
    track_every: int = 400
    sharpness_batches: int = 16
    solver_iters: int = 20
    solver_tol: float = 1e-3
    verdict_window: float = 0.25
    band_low: float = 0.85
    band_high: float = 1.15


_QUICK = {"steps": 1500, "track_every": 50, "sharpness_batches": 8}
PRESETS = {
    "quick": dataclasses.replace(Config(), **_QUICK),
    "smoke": dataclasses.replace(
        Config(),
        n_train=64,
        seeds=(0, 1),
        hidden=(16,),
        norms=("bn",),
        batch_sizes=(16,),
        steps=20,
        track_every=10,
        sharpness_batches=3,
        solver_iters=5,
    ),
}
# The claims matrix (experiments.claims): this experiment's own tanh MLP, 3 seeds in both forms; quick = the
# quick preset cut to 1000 steps (the matrix's quick budget), full = the full defaults.
MATRIX = {"mlp": {"quick": {**_QUICK, "steps": 1000}, "full": {}}}
CHOICES = {"loss": train.LOSSES, "norms": ("none", "bn")}


class Setting(NamedTuple):
    """One training setting, run for every seed: batch size and normalization."""

    batch_size: int
    norm: str

    @property
    def label(self) -> str:
        return f"b={self.batch_size} {'BN' if self.norm == 'bn' else 'no BN'}"


class SettingRecord(NamedTuple):
    """What one setting produced over ``S`` seeds (host NumPy arrays).

    Fields:
      steps: int[C] step after which each checkpoint was measured.
      batch_sharpness: float[C, S] batch sharpness per checkpoint and seed.
      batch_sharpness_stderr: float[C, S] its Monte Carlo standard error over batches.
      lambda_max: float[C, S] full-batch top Hessian eigenvalue.
      lambda_converged: bool[C, S] whether each Lanczos solve met its stopping rule.
      hvps: int[C, S] HVPs of the Lanczos solve.
      losses: float[C, S] mean training (mini-batch) loss of the segment before each checkpoint.
      diverged: bool[S] the seed's loss became non-finite (left out of the verdicts).
    """

    steps: np.ndarray
    batch_sharpness: np.ndarray
    batch_sharpness_stderr: np.ndarray
    lambda_max: np.ndarray
    lambda_converged: np.ndarray
    hvps: np.ndarray
    losses: np.ndarray
    diverged: np.ndarray


# -- the verdict rule (pure, tested on synthetic inputs) ----------------------------------------------------


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)``: :func:`experiments.stats.interval` of ``values`` (NaNs dropped), the two-sided 95%
    t-interval of their mean; a single value (or none) gives an infinitely wide interval (one seed cannot decide
    a claim)."""
    iv = stats.interval(values)
    return iv.mean, iv.low, iv.high


def interval_verdict(low: float, high: float, region_low: float = -math.inf, region_high: float = math.inf) -> str:
    """``"held"`` if ``[low, high]`` lies inside ``[region_low, region_high]``, ``"not held"`` if it lies
    entirely outside, ``"inconclusive"`` if it straddles a boundary of the region."""
    if not low <= high:
        raise ValueError(f"need low <= high, got [{low}, {high}].")
    if region_low <= low and high <= region_high:
        return "held"
    if high < region_low or low > region_high:
        return "not held"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """A claim over several settings: not held if any is, held if all are (and there is one), else inconclusive."""
    if "not held" in verdicts:
        return "not held"
    return "held" if verdicts and all(v == "held" for v in verdicts) else "inconclusive"


def tail_mean(ratios: np.ndarray, window: float) -> np.ndarray:
    """Per seed, the mean of ``ratios[C, S]`` over the last ``ceil(window * C)`` checkpoints; float[S]."""
    ratios = np.asarray(ratios, np.float64)
    count = max(1, math.ceil(window * ratios.shape[0]))
    return ratios[-count:].mean(axis=0)


def tail_slope(steps: np.ndarray, ratios: np.ndarray, window: float) -> np.ndarray:
    """Per seed, the least-squares slope of ``ratios[C, S]`` against the step (per 1000 steps) over the last
    ``ceil(window * C)`` checkpoints (at least 2); float[S]. Reported to show whether a curvature still drifts."""
    ratios = np.asarray(ratios, np.float64)
    count = min(ratios.shape[0], max(2, math.ceil(window * ratios.shape[0])))
    t = np.asarray(steps[-count:], np.float64) / 1000
    if count < 2:
        return np.full(ratios.shape[1], np.nan)
    t = t - t.mean()
    tail = ratios[-count:]
    return (t @ (tail - tail.mean(axis=0))) / (t @ t)


VERDICT_RULE = (
    "per run the statistic is the mean of (curvature / (2/eta)) over the last {window:.0%} of the "
    "checkpoints; over the {seeds} seeds it has a 95% t-interval, mean ± t(0.975, S-1) sd / sqrt(S). A setting "
    "is 'held' if the interval lies inside the claim's region, 'not held' if it lies entirely outside it, "
    "'inconclusive' if it straddles a boundary. Regions: batch sharpness / (2/eta) in [{low}, {high}]; "
    "mini-batch lambda_max / (2/eta) < {low}; lambda_max / (2/eta) at a batch size minus at the next larger one "
    "(paired by seed) < 0. A claim over several settings: 'not held' if any setting is, 'held' if all are, "
    "else 'inconclusive'. Diverged seeds are left out"
)


# -- training and measurement --------------------------------------------------------------------------------


def check(config: Config) -> None:
    train.check_loss_and_norms(config.loss, config.norms)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct and nonempty, got {config.seeds}.")
    for b in config.batch_sizes:
        if not 1 < b <= config.n_train:
            raise ValueError(f"batch_sizes must lie in (1, n_train={config.n_train}], got {b}.")
    if list(config.batch_sizes) != sorted(set(config.batch_sizes)):
        raise ValueError(f"batch_sizes must be distinct and increasing, got {config.batch_sizes}.")
    if config.track_every < 1 or config.steps < config.track_every or config.steps % config.track_every:
        raise ValueError(f"steps ({config.steps}) must be a positive multiple of track_every ({config.track_every}).")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}.")
    if config.sharpness_batches < 2:
        raise ValueError(f"sharpness_batches must be >= 2 (a standard error), got {config.sharpness_batches}.")
    if not 0 < config.band_low < 1 < config.band_high:
        raise ValueError(f"need 0 < band_low < 1 < band_high, got {config.band_low}, {config.band_high}.")
    if not 0 < config.verdict_window <= 1:
        raise ValueError(f"verdict_window must be in (0, 1], got {config.verdict_window}.")


def _train_setting(
    setting: Setting, config: Config, x: jax.Array, y: jax.Array, num_classes: int, bar: progress.StepBar | None
) -> SettingRecord:
    model = models.MLP(
        features=config.hidden,
        num_classes=num_classes,
        activation=config.activation,
        norm=setting.norm,
        init_scale=config.init_scale,
    )
    optimizer = optax.sgd(config.lr)
    states = train.init_seed_states(model, x[:2], optimizer, config.seeds)
    run_steps = train.minibatch_runner(train.make_train_step(model, config.loss, optimizer), setting.batch_size)
    bn = setting.norm == "bn"
    fns = curvature.flax_curvature_fns(model.apply, train.output_loss(config.loss), bn_mode="train" if bn else None)
    full_hessian = curvature.dataset_hessian_matvec(fns.loss_fn, config.n_train, per_example=fns.per_example)
    every = config.track_every

    def segment(state, x, y):
        state, metrics = run_steps(state, x, y, every)
        return state, jnp.mean(metrics.loss)

    def measure(params, batch_stats, key, v, lam0, x, y):
        stats_arg = batch_stats if bn else None
        bs = curvature.batch_sharpness(
            fns.loss_fn, params, (x, y), stats_arg, batch_size=setting.batch_size,
            num_batches=config.sharpness_batches, key=key,
        )  # fmt: skip
        top = curvature.lanczos_top(
            full_hessian, v, params, (x, y), stats_arg, tol=config.solver_tol, max_iters=config.solver_iters,
            eigenvalue0=lam0,
        )  # fmt: skip
        return bs.estimate, bs.stderr, top.eigenvalue, top.eigenvector, top.iterations, top.converged

    segment_v = jax.jit(jax.vmap(segment, in_axes=(0, None, None)))
    measure_v = jax.jit(jax.vmap(measure, in_axes=(0, 0, 0, 0, 0, None, None)))
    seeds = len(config.seeds)
    vectors = jax.vmap(lambda k, p: curvature.random_like(k, p))(
        jax.random.split(jax.random.key(12345), seeds), states.params
    )
    lam = jnp.full(seeds, jnp.inf, jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 7) for s in config.seeds])
    out: dict[str, list] = {k: [] for k in ("steps", "bs", "bs_se", "lam", "conv", "hvps", "loss")}
    diverged = np.zeros(seeds, bool)
    if bar is not None:
        bar.start_run()
        bar.set_label(setting.label)
    for i in range(config.steps // every):
        states, loss = segment_v(states, x, y)
        loss = np.asarray(loss)
        diverged |= ~np.isfinite(loss)
        sub = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
        bs, bs_se, lam, vectors, hvps, conv = measure_v(states.params, states.batch_stats, sub, vectors, lam, x, y)
        # A diverged seed restarts its warm start (its vector and eigenvalue are NaN).
        lam = jnp.where(jnp.isfinite(lam), lam, jnp.inf)
        out["steps"].append((i + 1) * every)
        for name, value in (("bs", bs), ("bs_se", bs_se), ("lam", lam), ("conv", conv), ("hvps", hvps)):
            out[name].append(np.asarray(value))
        out["loss"].append(loss)
        if bar is not None:  # the first segment compiles the training and measuring programs
            bar.advance(every, warm=i > 0)
    arr = {k: np.asarray(v) for k, v in out.items()}
    lam_arr = np.where(np.isfinite(arr["lam"]), arr["lam"], np.nan)
    return SettingRecord(
        arr["steps"], arr["bs"], arr["bs_se"], lam_arr, arr["conv"], arr["hvps"], arr["loss"], diverged
    )


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every setting over the seeds, measure both curvatures, write the report; see :class:`Config`."""
    check(config)
    ds = data_lib.subset(data_lib.load(config.dataset, config.data_seed), config.n_train)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    settings = [Setting(b, norm) for norm in config.norms for b in config.batch_sizes]
    print(f"Verdict rule: {_rule(config)}.")
    records: dict[Setting, SettingRecord] = {}
    seconds: dict[Setting, float] = {}
    with progress.StepBar(len(settings) * config.steps, "eoss") as bar:
        for setting in settings:
            start = time.perf_counter()
            records[setting] = _train_setting(setting, config, x, y, ds.num_classes, bar)
            seconds[setting] = time.perf_counter() - start
    return _outcome(config, records, seconds, out, ds.name)


# -- report ----------------------------------------------------------------------------------------------------


def _summaries(config: Config, records: dict[Setting, SettingRecord]) -> list[dict]:
    threshold = 2.0 / config.lr
    rows = []
    for setting, rec in records.items():
        keep = ~rec.diverged
        # Per seed (NaN for a diverged one, so that seeds stay paired across settings; intervals drop NaNs).
        bs_stat = np.where(keep, tail_mean(rec.batch_sharpness / threshold, config.verdict_window), np.nan)
        lam_stat = np.where(keep, tail_mean(rec.lambda_max / threshold, config.verdict_window), np.nan)
        bs_mean, bs_lo, bs_hi = t_interval(bs_stat)
        lam_mean, lam_lo, lam_hi = t_interval(lam_stat)
        trend = np.where(keep, tail_slope(rec.steps, rec.batch_sharpness / threshold, config.verdict_window), np.nan)
        rows.append(
            {
                "batch_size": setting.batch_size,
                "norm": setting.norm,
                "full_batch": setting.batch_size == config.n_train,
                "batch_sharpness_ratio_per_seed": bs_stat,
                "lambda_max_ratio_per_seed": lam_stat,
                "batch_sharpness_ratio": [bs_mean, bs_lo, bs_hi],
                "lambda_max_ratio": [lam_mean, lam_lo, lam_hi],
                "batch_sharpness_trend_per_1000_steps": list(t_interval(trend)),
                "batch_sharpness_verdict": interval_verdict(bs_lo, bs_hi, config.band_low, config.band_high)
                if np.isfinite(bs_mean)
                else "inconclusive",
                "diverged_seeds": [s for s, d in zip(config.seeds, rec.diverged) if d],
                "lambda_converged_fraction": float(np.mean(rec.lambda_converged)),
                "mean_lanczos_hvps": float(np.mean(rec.hvps[1:])) if rec.hvps.shape[0] > 1 else float("nan"),
                "max_batch_sharpness_rel_stderr": float(
                    np.nanmax(rec.batch_sharpness_stderr / np.abs(rec.batch_sharpness))
                ),
                "final_loss": float(np.nanmean(rec.losses[-1][keep])) if keep.any() else float("nan"),
                "steps": rec.steps,
                "batch_sharpness": rec.batch_sharpness,
                "batch_sharpness_stderr": rec.batch_sharpness_stderr,
                "lambda_max": rec.lambda_max,
                "losses": rec.losses,
            }
        )
    return rows


def _fmt_interval(triple: Sequence[float], signed: bool = False) -> str:
    """``1.012 [0.981, 1.043]`` (three decimals; ``+`` signs with ``signed``); the mean alone from one seed, an
    en dash when no seed finished."""
    mean, lo, hi = triple
    fmt = "+.3f" if signed else ".3f"
    if not math.isfinite(mean):
        return "–"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:{fmt}} (1 seed)"
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _range_effect(triples: list[Sequence[float]], unit: str, signed: bool = False) -> str:
    """A claim's effect for the claims matrix: the range its settings span (the ends of their 95% intervals;
    their means with one seed)."""
    finite = [t for t in triples if math.isfinite(t[0])]
    if not finite:
        return "no seed finished"
    fmt = "+.2f" if signed else ".2f"
    with_ci = all(math.isfinite(t[1]) and math.isfinite(t[2]) for t in finite)
    low = min(t[1] if with_ci else t[0] for t in finite)
    high = max(t[2] if with_ci else t[0] for t in finite)
    what = "95% CIs" if with_ci else "no CI"
    noun = ("pair" if signed else "setting") + ("s" if len(finite) != 1 else "")
    return f"{low:{fmt}} to {high:{fmt}}{unit} ({len(finite)} {noun}, {what})"


def _claims(config: Config, rows: list[dict]) -> list[report.Claim]:
    claims = []
    # 1. Batch sharpness hovers at 2/eta.
    bs_text = "; ".join(
        f"{_name(r)}: {_fmt_interval(r['batch_sharpness_ratio'])} {r['batch_sharpness_verdict']}" for r in rows
    )
    claims.append(
        report.Claim(
            "Andreyev & Beneventano: under SGD the batch sharpness hovers at 2/eta (ratio to 2/eta in "
            f"[{config.band_low}, {config.band_high}]), every batch size, with and without BN",
            bs_text,
            combine([r["batch_sharpness_verdict"] for r in rows]),
            effect=_range_effect([r["batch_sharpness_ratio"] for r in rows], "x 2/eta"),
        )
    )
    # 2. lambda_max below 2/eta for mini-batches.
    mini = [r for r in rows if not r["full_batch"]]
    lam_verdicts: list[str] = []
    for r in mini:
        _, lo, hi = r["lambda_max_ratio"]
        r["lambda_below_verdict"] = interval_verdict(lo, hi, -math.inf, config.band_low) if lo <= hi else "inconclusive"
        lam_verdicts.append(r["lambda_below_verdict"])
    claims.append(
        report.Claim(
            f"Andreyev & Beneventano: with mini-batches the full-batch lambda_max sits below 2/eta (ratio < "
            f"{config.band_low})",
            "; ".join(f"{_name(r)}: {_fmt_interval(r['lambda_max_ratio'])} {r['lambda_below_verdict']}" for r in mini)
            or "no mini-batch setting",
            combine(lam_verdicts),
            effect=_range_effect([r["lambda_max_ratio"] for r in mini], "x 2/eta") if mini else "no mini-batch setting",
        )
    )
    # 3. lambda_max lower for smaller batches (paired by seed).
    order_verdicts: list[str] = []
    order_text: list[str] = []
    order_triples: list[tuple[float, float, float]] = []
    for norm in config.norms:
        mine = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["batch_size"])
        for small, large in zip(mine, mine[1:]):
            diff = np.asarray(small["lambda_max_ratio_per_seed"]) - np.asarray(large["lambda_max_ratio_per_seed"])
            if not np.isfinite(diff).any():  # every seed of one of the two diverged
                order_verdicts.append("inconclusive")
                continue
            triple = t_interval(diff)
            verdict = interval_verdict(triple[1], triple[2], -math.inf, 0.0)
            order_verdicts.append(verdict)
            order_triples.append(triple)
            order_text.append(
                f"{'BN' if norm == 'bn' else 'no BN'} b={small['batch_size']} minus b={large['batch_size']}: "
                f"{_fmt_interval(triple, signed=True)} {verdict}"
            )
    claims.append(
        report.Claim(
            "Andreyev & Beneventano: lambda_max is lower for smaller batches",
            "; ".join(order_text) or "fewer than two batch sizes",
            combine(order_verdicts),
            effect=_range_effect(order_triples, " in lambda_max / (2/eta)", signed=True)
            if order_triples
            else "fewer than two batch sizes",
        )
    )
    return claims


def _name(r: dict) -> str:
    return f"b={r['batch_size']} {'BN' if r['norm'] == 'bn' else 'no BN'}"


def _rule(config: Config) -> str:
    return VERDICT_RULE.format(
        window=config.verdict_window, seeds=len(config.seeds), low=config.band_low, high=config.band_high
    )


def _reading(config: Config, rows: list[dict], claims: list[report.Claim]) -> str:
    """The one-paragraph reading of the run for a newcomer, written from its numbers and verdicts."""
    full = [r for r in rows if r["full_batch"]]
    mini = [r for r in rows if not r["full_batch"]]
    parts = [
        "Full-batch gradient descent trains at the edge of stability: the sharpness lambda_max (the top "
        "eigenvalue of the training loss's Hessian) rises to 2/eta, eta the learning rate, and hovers there. "
        "With mini-batches (SGD), Andreyev & Beneventano find that what hovers at 2/eta is the batch sharpness "
        "(the curvature of each mini-batch's loss along its own gradient), while lambda_max of the full loss "
        f"stays below it, the lower the smaller the batch. Here each setting ran {len(config.seeds)} "
        f"seed{'s' if len(config.seeds) != 1 else ''} for {config.steps} steps; the numbers are curvature / "
        f"(2/eta) averaged over the last {config.verdict_window:.0%} of each run, seed means (1.00 = at 2/eta)."
    ]
    if full:
        parts.append(
            "With the full batch (GD) batch sharpness and lambda_max end at "
            + ", ".join(
                f"{r['batch_sharpness_ratio'][0]:.2f} and {r['lambda_max_ratio'][0]:.2f} x 2/eta ({_name(r)})"
                for r in full
            )
            + ", GD's edge of stability."
        )
    if mini:
        parts.append(
            "With mini-batches, batch sharpness / (2/eta) is "
            + ", ".join(f"{r['batch_sharpness_ratio'][0]:.2f} ({_name(r)})" for r in mini)
            + " and lambda_max / (2/eta) "
            + ", ".join(f"{r['lambda_max_ratio'][0]:.2f}" for r in mini)
            + " in the same order."
        )
        below = [r for r in mini if r["batch_sharpness_ratio"][0] < r["lambda_max_ratio"][0]]
        if below:
            parts.append(
                f"In {len(below)} of {len(mini)} mini-batch settings batch sharpness is below lambda_max, the "
                "opposite of the paper's ordering (lambda_max below batch sharpness)."
            )
        rising = [_name(r) for r in mini if r["batch_sharpness_trend_per_1000_steps"][1] > 0]
        falling = [_name(r) for r in mini if r["batch_sharpness_trend_per_1000_steps"][2] < 0]
        if rising:
            parts.append(
                f"Batch sharpness was still rising at the end in {', '.join(rising)}: longer runs may get closer."
            )
        if falling:
            parts.append(f"It was falling at the end in {', '.join(falling)}.")
    verdicts = {c.claim.split(": ", 1)[1].split(" (")[0]: c.verdict for c in claims}
    parts.append("Verdicts: " + "; ".join(f"{k}: {v}" for k, v in verdicts.items()) + ".")
    return " ".join(parts)


def _setting(config: Config, dataset: str) -> tuple[tuple[str, str], ...]:
    threshold = 2.0 / config.lr
    return report.setting(
        model=models.describe_family("mlp", hidden=config.hidden, activation=config.activation)
        + f"; hidden kernels {config.init_scale:g} x LeCun normal std",
        data=f"{dataset}, first {config.n_train} training examples",
        loss="square (0.5 ||f - onehot||^2)" if config.loss == "square" else "cross-entropy",
        optimizer=(
            f"SGD, lr {config.lr:g} (2/eta = {threshold:g}), constant, no momentum; batches of "
            f"{', '.join(map(str, config.batch_sizes))} distinct examples drawn uniformly at every step "
            f"({config.n_train} = full-batch GD)"
        ),
        steps=config.steps,
        seeds=config.seeds,
        norms=", ".join("BN" if n == "bn" else "none" for n in config.norms),
        curvature=(
            f"every {config.track_every} steps: batch sharpness over {config.sharpness_batches} batches; "
            f"full-batch lambda_max by warm-started Lanczos (at most {config.solver_iters} HVPs, tolerance "
            f"{config.solver_tol:g})"
        ),
        verdict_window=f"last {config.verdict_window:.0%} of the checkpoints",
    )


def _outcome(
    config: Config,
    records: dict[Setting, SettingRecord],
    seconds: dict[Setting, float],
    out: pathlib.Path,
    dataset: str | None = None,
) -> report.Outcome:
    dataset = dataset or config.dataset
    rows = _summaries(config, records)
    claims = _claims(config, rows)
    threshold = 2.0 / config.lr
    table = report.markdown_table(
        [
            "norm",
            "batch size",
            "batch sharpness / (2/eta), seed mean [95% CI]",
            "lambda_max / (2/eta), seed mean [95% CI]",
            f"batch sharpness / (2/eta) trend per 1000 steps, last {config.verdict_window:.0%} [95% CI]",
            "final train loss",
            "diverged seeds",
            "Lanczos HVPs / checkpoint",
            "runtime (s)",
        ],
        [
            [
                "BN" if r["norm"] == "bn" else "none",
                r["batch_size"],
                _fmt_interval(r["batch_sharpness_ratio"]),
                _fmt_interval(r["lambda_max_ratio"]),
                _fmt_interval(r["batch_sharpness_trend_per_1000_steps"], signed=True),
                f"{r['final_loss']:.2e}" if math.isfinite(r["final_loss"]) else "–",
                ", ".join(map(str, r["diverged_seeds"])) or "none",
                f"{r['mean_lanczos_hvps']:.1f}" if math.isfinite(r["mean_lanczos_hvps"]) else "–",
                f"{seconds[Setting(r['batch_size'], r['norm'])]:.0f}",
            ]
            for r in rows
        ],
    )
    rule = _rule(config)
    notes = [
        f"Batch sharpness: bnjax.curvature.batch_sharpness, the paper's estimator E_B[g^T H g / ||g||^2] over "
        f"{config.sharpness_batches} random batches of the run's batch size every {config.track_every} steps "
        f"(BN in train mode on each batch); largest relative Monte Carlo standard error at a checkpoint, per "
        "setting: "
        + ", ".join(f"{r['max_batch_sharpness_rel_stderr']:.0%}" for r in rows)
        + ". lambda_max: Hessian of the full-batch training loss (BN in train mode with full-batch statistics, "
        f"the function GD optimizes), bnjax.curvature.lanczos_top warm-started, at most {config.solver_iters} HVPs, "
        f"tolerance {config.solver_tol:g}; solves converged, per setting: "
        + ", ".join(f"{r['lambda_converged_fraction']:.0%}" for r in rows)
        + ".",
        f"Table: seed means over the {len(config.seeds)} seeds (vmapped: one program trains and measures every "
        "seed) with 95% t-intervals; a seed that diverged is left out.",
        "Differences from the paper: they train MLPs, CNNs and ResNets on CIFAR-10 subsets (8k examples and more), "
        "mostly with square loss, from a scaled-down initialization, for up to 1e5+ steps, and estimate batch "
        "sharpness adaptively (20 to 1000 batches, 0.5% relative error); here a small tanh MLP on "
        f"{config.n_train} {dataset} examples, {config.steps} steps, a fixed number of batches per "
        f"checkpoint and {len(config.seeds)} seeds. With BN, 'the "
        "full-batch Hessian' is ambiguous (E_B L_B is not L with full-batch statistics); the paper's nets have "
        "no BN in their main figures.",
    ]
    results = {
        "settings": rows,
        "threshold": threshold,
        "verdict_rule": rule,
        "n_train": config.n_train,
        "dataset": config.dataset,
    }
    figures = [_plot(config, records, out)]
    return report.Outcome(
        results, claims, [table], figures, notes, _setting(config, dataset), _reading(config, rows, claims), rule
    )


def _mark_diverged_seeds(ax, config: Config, rec: SettingRecord, values: np.ndarray, label: str, color: str) -> None:
    """An x at the last finite point of each diverged seed of ``values[C, S]`` (at the panel's bottom without one)."""
    bottom = ax.get_ylim()[0]
    for s in np.flatnonzero(rec.diverged):
        finite = np.flatnonzero(np.isfinite(values[:, s]))
        x, y = (rec.steps[finite[-1]], values[finite[-1], s]) if finite.size else (rec.steps[0], bottom)
        report.mark_diverged(ax, x, y, f"{label} seed {config.seeds[s]}", color=color)


def _plot(config: Config, records: dict[Setting, SettingRecord], out: pathlib.Path) -> str:
    """Per norm (columns): batch sharpness, full-batch lambda_max and the loss over steps (rows); seed means with
    95% bands, one black line at 2/eta, the claim's region shaded, the verdict window marked."""
    threshold = 2.0 / config.lr
    fig, axes = report.figure(ncols=len(config.norms), nrows=3)
    checkpoints = config.steps // config.track_every
    first = checkpoints - max(1, math.ceil(config.verdict_window * checkpoints))
    window = (first + 0.5) * config.track_every  # half a segment before the window's first checkpoint
    for col, norm in enumerate(config.norms):
        ax_bs, ax_lam, ax_loss = (axes[row * len(config.norms) + col] for row in range(3))
        report.acceptance_band(ax_bs, config.band_low * threshold, config.band_high * threshold)
        report.acceptance_band(ax_lam, 0.0, config.band_low * threshold, "mini-batch claim")
        for ax in (ax_bs, ax_lam):
            report.threshold_line(ax, threshold, "2/eta")
            report.verdict_window(ax, window, config.steps)
        for i, b in enumerate(config.batch_sizes):
            rec = records[Setting(b, norm)]
            keep = ~rec.diverged
            label = f"b={b}" + (" (full batch)" if b == config.n_train else "")
            for ax, values in ((ax_bs, rec.batch_sharpness), (ax_lam, rec.lambda_max), (ax_loss, rec.losses)):
                if keep.any():
                    report.seed_band(ax, rec.steps, values[:, keep].T, label=label, color=f"C{i}")
        for i, b in enumerate(config.batch_sizes):  # after the data, so that the panels' limits are known
            rec = records[Setting(b, norm)]
            for ax, values in ((ax_bs, rec.batch_sharpness), (ax_lam, rec.lambda_max), (ax_loss, rec.losses)):
                _mark_diverged_seeds(ax, config, rec, values, f"b={b}", f"C{i}")
        name = "BN" if norm == "bn" else "no BN"
        for ax, what in ((ax_bs, "batch sharpness"), (ax_lam, "full-batch lambda_max")):
            ax.set(title=f"{what}, {name}", xlabel="step", ylabel=what)
        ax_loss.set(title=f"train loss, {name}", xlabel="step", ylabel=f"mini-batch {config.loss} loss", yscale="log")
        for ax in (ax_bs, ax_lam, ax_loss):
            legend_above_data(ax)
    if len(config.seeds) > 1:
        fig.suptitle(f"lines: means over {len(config.seeds)} seeds; shaded: 95% t-intervals over seeds", fontsize=9)
    return report.save_figure(fig, out, "eoss.png")
