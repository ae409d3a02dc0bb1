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
(GD's edge of stability).
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
from scipy import stats
from tqdm.auto import tqdm

from bnjax import curvature
from experiments import data as data_lib
from experiments import models, report, train


@dataclasses.dataclass(frozen=True)
class Config:
    """Edge of stochastic stability (Andreyev & Beneventano, arXiv 2412.20553).

    Command: ``python -m experiments eoss`` (full) or ``python -m experiments eoss --quick``.
    Expected runtime on 2 CPU cores shared with other jobs (2026-12-04, load average 7-11): quick 195 s, full
    753 s (both measured on this code).
    Expected result (the paper's claim): batch sharpness of every run hovers at ``2/eta`` once training is at
    the edge, while the full-batch ``lambda_max`` is below ``2/eta`` for mini-batch runs and lower for smaller
    batches; the full-batch run (``batch_size = n_train``) is GD, at ``2/eta`` in both. Measured in the full run
    of 2026-12-04 (``experiments/results/eoss-full/``): GD at ``2/eta`` in both curvatures; SGD's batch
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


PRESETS = {
    "quick": dataclasses.replace(Config(), steps=1500, track_every=50, sharpness_batches=8),
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


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the two-sided t-interval of the mean of ``values`` (NaNs dropped); a single value
    (or none) gives an infinitely wide interval (one seed cannot decide a claim)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), -math.inf, math.inf
    mean = float(v.mean())
    if v.size < 2:
        return mean, -math.inf, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, df=v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


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
    "Verdict rule: per run the statistic is the mean of (curvature / (2/eta)) over the last {window:.0%} of the "
    "checkpoints; over the {seeds} seeds it has a 95% t-interval, mean ± t(0.975, S-1) sd / sqrt(S). A setting "
    "is 'held' if the interval lies inside the claim's region, 'not held' if it lies entirely outside it, "
    "'inconclusive' if it straddles a boundary. Regions: batch sharpness / (2/eta) in [{low}, {high}]; "
    "mini-batch lambda_max / (2/eta) < {low}; lambda_max / (2/eta) at a batch size minus at the next larger one "
    "(paired by seed) < 0. A claim over several settings: 'not held' if any setting is, 'held' if all are, "
    "else 'inconclusive'. Diverged seeds are left out."
)


# -- training and measurement --------------------------------------------------------------------------------


def _check(config: Config) -> None:
    train.check_loss_and_norms(config.loss, config.norms)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct and nonempty, got {config.seeds}.")
    for b in config.batch_sizes:
        if not 1 < b <= config.n_train:
            raise ValueError(f"batch_sizes must lie in (1, n_train={config.n_train}], got {b}.")
    if list(config.batch_sizes) != sorted(set(config.batch_sizes)):
        raise ValueError(f"batch_sizes must be distinct and increasing, got {config.batch_sizes}.")
    if config.track_every < 1 or config.steps % config.track_every:
        raise ValueError(f"steps ({config.steps}) must be a positive multiple of track_every ({config.track_every}).")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}.")
    if config.sharpness_batches < 2:
        raise ValueError(f"sharpness_batches must be >= 2 (a standard error), got {config.sharpness_batches}.")
    if not 0 < config.band_low < 1 < config.band_high:
        raise ValueError(f"need 0 < band_low < 1 < band_high, got {config.band_low}, {config.band_high}.")
    if not 0 < config.verdict_window <= 1:
        raise ValueError(f"verdict_window must be in (0, 1], got {config.verdict_window}.")


def _stack(trees: list) -> object:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _train_setting(
    setting: Setting, config: Config, x: jax.Array, y: jax.Array, num_classes: int, bar: tqdm
) -> SettingRecord:
    model = models.MLP(
        features=config.hidden,
        num_classes=num_classes,
        activation=config.activation,
        norm=setting.norm,
        init_scale=config.init_scale,
    )
    optimizer = optax.sgd(config.lr)
    states = _stack([train.init_train_state(model, x[:2], optimizer, seed) for seed in config.seeds])
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
    bar.set_postfix_str(setting.label)
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
        bar.update(1)
    arr = {k: np.asarray(v) for k, v in out.items()}
    lam_arr = np.where(np.isfinite(arr["lam"]), arr["lam"], np.nan)
    return SettingRecord(
        arr["steps"], arr["bs"], arr["bs_se"], lam_arr, arr["conv"], arr["hvps"], arr["loss"], diverged
    )


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every setting over the seeds, measure both curvatures, write the report; see :class:`Config`."""
    _check(config)
    ds = data_lib.subset(data_lib.load(config.dataset, config.data_seed), config.n_train)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    settings = [Setting(b, norm) for norm in config.norms for b in config.batch_sizes]
    print(VERDICT_RULE.format(window=config.verdict_window, seeds=len(config.seeds), low=config.band_low,
                              high=config.band_high))  # fmt: skip
    records: dict[Setting, SettingRecord] = {}
    seconds: dict[Setting, float] = {}
    with tqdm(total=len(settings) * (config.steps // config.track_every), desc="eoss", unit="segment") as bar:
        for setting in settings:
            start = time.perf_counter()
            records[setting] = _train_setting(setting, config, x, y, ds.num_classes, bar)
            seconds[setting] = time.perf_counter() - start
    return _outcome(config, records, seconds, out)


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


def _fmt_interval(triple: Sequence[float]) -> str:
    mean, lo, hi = triple
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _claims(config: Config, rows: list[dict]) -> list[report.Claim]:
    claims = []
    # 1. Batch sharpness hovers at 2/eta.
    bs_text = "; ".join(
        f"b={r['batch_size']} {'BN' if r['norm'] == 'bn' else 'no BN'}: {_fmt_interval(r['batch_sharpness_ratio'])}"
        f" {r['batch_sharpness_verdict']}"
        for r in rows
    )
    claims.append(
        report.Claim(
            "Andreyev & Beneventano: under SGD the batch sharpness hovers at 2/eta (ratio to 2/eta in "
            f"[{config.band_low}, {config.band_high}]), every batch size, with and without BN",
            bs_text,
            combine([r["batch_sharpness_verdict"] for r in rows]),
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
            "; ".join(
                f"b={r['batch_size']} {'BN' if r['norm'] == 'bn' else 'no BN'}: {_fmt_interval(r['lambda_max_ratio'])}"
                f" {r['lambda_below_verdict']}"
                for r in mini
            )
            or "no mini-batch setting",
            combine(lam_verdicts),
        )
    )
    # 3. lambda_max lower for smaller batches (paired by seed).
    order_verdicts: list[str] = []
    order_text: list[str] = []
    for norm in config.norms:
        mine = sorted((r for r in rows if r["norm"] == norm), key=lambda r: r["batch_size"])
        for small, large in zip(mine, mine[1:]):
            diff = np.asarray(small["lambda_max_ratio_per_seed"]) - np.asarray(large["lambda_max_ratio_per_seed"])
            if not np.isfinite(diff).any():  # every seed of one of the two diverged
                order_verdicts.append("inconclusive")
                continue
            mean, lo, hi = t_interval(diff)
            verdict = interval_verdict(lo, hi, -math.inf, 0.0)
            order_verdicts.append(verdict)
            order_text.append(
                f"{'BN' if norm == 'bn' else 'no BN'} b={small['batch_size']} minus b={large['batch_size']}: "
                f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}"
            )
    claims.append(
        report.Claim(
            "Andreyev & Beneventano: lambda_max is lower for smaller batches",
            "; ".join(order_text) or "fewer than two batch sizes",
            combine(order_verdicts),
        )
    )
    return claims


def _name(r: dict) -> str:
    return f"b={r['batch_size']} {'BN' if r['norm'] == 'bn' else 'no BN'}"


def _reading(config: Config, rows: list[dict], claims: list[report.Claim]) -> str:
    """The one-paragraph reading of the run, written from its numbers and verdicts."""
    full = [r for r in rows if r["full_batch"]]
    mini = [r for r in rows if not r["full_batch"]]
    parts = ["Reading:"]
    if full:
        parts.append(
            "with the full batch (GD) batch sharpness and lambda_max end at "
            + ", ".join(
                f"{r['batch_sharpness_ratio'][0]:.2f} and {r['lambda_max_ratio'][0]:.2f} x 2/eta ({_name(r)})"
                for r in full
            )
            + ", GD's edge of stability."
        )
    if mini:
        parts.append(
            "With mini-batches, batch sharpness / (2/eta) over the last "
            f"{config.verdict_window:.0%} of {config.steps} steps is "
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


def _outcome(
    config: Config, records: dict[Setting, SettingRecord], seconds: dict[Setting, float], out: pathlib.Path
) -> report.Outcome:
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
                _fmt_interval(r["batch_sharpness_trend_per_1000_steps"]),
                r["final_loss"],
                ",".join(map(str, r["diverged_seeds"])) or "-",
                r["mean_lanczos_hvps"],
                seconds[Setting(r["batch_size"], r["norm"])],
            ]
            for r in rows
        ],
    )
    rule = VERDICT_RULE.format(
        window=config.verdict_window, seeds=len(config.seeds), low=config.band_low, high=config.band_high
    )
    notes = [
        _reading(config, rows, claims),
        f"Setting: tanh MLP {'-'.join(map(str, config.hidden))} (init scale {config.init_scale} x LeCun), "
        f"{config.dataset} (first {config.n_train} training examples), {config.loss} loss, plain SGD at lr "
        f"{config.lr:g} (2/eta = {threshold:g}), {config.steps} steps, batch sizes {list(config.batch_sizes)} "
        f"(distinct examples, drawn uniformly at every step; {config.n_train} = full-batch GD), "
        f"norms {list(config.norms)}, seeds {list(config.seeds)} (vmapped).",
        f"Batch sharpness: bnjax.curvature.batch_sharpness, the paper's estimator E_B[g^T H g / ||g||^2] over "
        f"{config.sharpness_batches} random batches of the run's batch size every {config.track_every} steps "
        f"(BN in train mode on each batch); largest relative Monte Carlo standard error at a checkpoint: "
        + ", ".join(f"{r['max_batch_sharpness_rel_stderr']:.2f}" for r in rows)
        + ". lambda_max: Hessian of the full-batch training loss (BN in train mode with full-batch statistics, "
        f"the function GD optimizes), bnjax.curvature.lanczos_top warm-started, at most {config.solver_iters} HVPs, "
        f"tolerance {config.solver_tol:g}; converged fraction per setting: "
        + ", ".join(f"{r['lambda_converged_fraction']:.2f}" for r in rows)
        + ".",
        rule,
        "Differences from the paper: they train MLPs, CNNs and ResNets on CIFAR-10 subsets (8k examples and more), "
        "mostly with square loss, from a scaled-down initialization, for up to 1e5+ steps, and estimate batch "
        "sharpness adaptively (20 to 1000 batches, 0.5% relative error); here a small tanh MLP on "
        f"{config.n_train} {config.dataset} examples, {config.steps} steps, a fixed number of batches per "
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
    return report.Outcome(results, claims, [table], figures, notes)


def _band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per checkpoint over seeds (columns): mean and its 95% t-interval; ``values`` float[C, S]."""
    triples = np.array([t_interval(row) for row in values])
    return triples[:, 0], triples[:, 1], triples[:, 2]


def _plot(config: Config, records: dict[Setting, SettingRecord], out: pathlib.Path) -> str:
    threshold = 2.0 / config.lr
    fig, axes = report.figure(ncols=len(config.norms), nrows=3)
    for col, norm in enumerate(config.norms):
        ax_bs, ax_lam, ax_loss = (axes[row * len(config.norms) + col] for row in range(3))
        for i, b in enumerate(config.batch_sizes):
            rec = records[Setting(b, norm)]
            keep = ~rec.diverged
            label = f"b={b}" + (" (full batch)" if b == config.n_train else "")
            for ax, values in ((ax_bs, rec.batch_sharpness), (ax_lam, rec.lambda_max), (ax_loss, rec.losses)):
                mean, lo, hi = _band(values[:, keep])
                ax.plot(rec.steps, mean, color=f"C{i}", label=label)
                if keep.sum() > 1:
                    ax.fill_between(rec.steps, lo, hi, color=f"C{i}", alpha=0.25, linewidth=0)
        name = "BN" if norm == "bn" else "no BN"
        for ax, what in ((ax_bs, "batch sharpness"), (ax_lam, "full-batch lambda_max")):
            ax.axhline(threshold, color="black", linewidth=1.2, label=f"2/eta = {threshold:g}")
            ax.set(title=f"{what}, {name}", xlabel="step", ylabel=what)
            ax.legend(fontsize=7)
        ax_loss.set(title=f"train loss, {name}", xlabel="step", ylabel=f"mini-batch {config.loss} loss", yscale="log")
        ax_loss.legend(fontsize=7)
    fig.suptitle(f"seed means, shaded: 95% t-interval over {len(config.seeds)} seeds", fontsize=9)
    return report.save_figure(fig, out, "eoss.png")
