"""Conditioning: BN (standardized inputs) shrinks the Hessian's condition number of a linear model.

A one-layer linear model ``Dense(10)`` with square loss on MNIST-1D, with and without a BN layer in front
(no scale, no bias: it standardizes each input feature with the batch statistics), optionally with a
constant ``offset`` added to every input. The model is linear in its parameters and the loss quadratic, so
the Hessian depends on the data only: each seed draws a fresh data set (MNIST-1D generated from
``data_seed + seed``) and its own initialization. The full-batch Hessian is formed from Hessian-vector
products (:func:`bnjax.curvature.hvp`, one per basis vector) and diagonalized in float64; its top eigenvalue
is cross-checked with :func:`bnjax.curvature.lanczos`. Then GD with step ``1/lambda_max`` runs for
``steps`` steps, to show what the condition number does to convergence. Claims are judged on per-seed
ratios BN / none by :data:`experiments.stats.INTERVAL_RULE`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bnjax.curvature.eigen import lanczos, random_like
from bnjax.curvature.hvp import hessian_matvec
from experiments import data as data_lib
from experiments import models, progress, report, stats, train

NORMS = ("none", "bn")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hessian spectrum and condition number of a linear model with and without BN, over seeds.

    Command: ``python -m experiments conditioning`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: the condition number ``lambda_max / lambda_min`` is smaller with BN at every
    ``offset`` (95% interval of the per-seed ratio BN / none below 1x); without BN it grows with the offset
    (the bias direction couples to the input mean), with BN it does not change; GD at step ``1/lambda_max``
    ends closer to the optimum with BN.

    Model: ``Dense(10)`` on the 40 MNIST-1D inputs (``norm="bn"``: BN without scale and bias in front, i.e.
    the inputs standardized with the full batch's statistics), square loss, ``n_train`` training examples.
    The Hessian is ``E[[x, 1][x, 1]^T] (x) I_classes`` (``x`` standardized with BN): it does not depend on
    the parameters, so a seed is a fresh data draw (``data_seed + seed``; with an ``npz`` data set every
    seed sees the same data and differs only in the GD initialization) plus its own initialization.
    Full-batch GD at ``lr = 1/lambda_max`` of each seed and setting, for ``steps`` steps; its excess loss
    is the final loss minus the least-squares optimum (computed in float64; BN and no BN share it, as BN
    only re-parametrizes the same affine model). This is the textbook preconditioning argument (LeCun et
    al. 1998, "Efficient BackProp"), the setting in which BN's conditioning claim is exact.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    n_train: int = 4000
    seeds: tuple[int, ...] = (0, 1, 2)
    offsets: tuple[float, ...] = (0.0, 3.0)
    steps: int = 2000


PRESETS = {
    "quick": dataclasses.replace(Config(), n_train=1000, steps=500),
    "smoke": dataclasses.replace(Config(), n_train=200, offsets=(0.0, 3.0), steps=20),
}
CHOICES = {"dataset": ("mnist1d", "digits", "npz:PATH")}
# The claims matrix (python -m experiments claims): this experiment has its own model, the linear one.
# Measured 2026-12-04 (2 CPU cores, load ~1.5; experiments/results/claims-{quick,full}): quick 5 s, full 11 s.
MATRIX = {
    "linear": {
        "quick": {"n_train": 1000, "steps": 500, "seeds": (0, 1, 2)},
        "full": {"seeds": (0, 1, 2)},
    }
}


def check(config: Config) -> None:
    if len(config.seeds) < 1 or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name distinct seeds, at least one, got {config.seeds}.")
    if not config.offsets:
        raise ValueError("offsets must name at least one input offset, e.g. 0,3.")
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}.")
    if config.n_train < 2:
        raise ValueError(f"n_train must be >= 2 (BN needs two examples per feature), got {config.n_train}.")


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Form the Hessians of every (seed, offset, norm), diagonalize them, and run GD on each."""
    check(config)
    datasets = [
        data_lib.subset(data_lib.load(config.dataset, config.data_seed + s), config.n_train) for s in config.seeds
    ]
    num_classes = datasets[0].num_classes
    solvers = {norm: _Solver(models.Linear(num_classes=num_classes, norm=norm)) for norm in NORMS}
    runs = []
    total = len(config.offsets) * len(NORMS) * len(config.seeds) * config.steps
    with progress.StepBar(total, "conditioning") as bar:
        for offset in config.offsets:
            for norm in NORMS:
                per_seed = []
                for seed, ds in zip(config.seeds, datasets):
                    x, y = jnp.asarray(ds.x_train + offset), jnp.asarray(ds.y_train)
                    label = f"offset {offset:g} {norm} seed {seed}"
                    per_seed.append(solvers[norm].solve(x, y, seed, config.steps, bar, label))
                runs.append(_stack(norm, offset, per_seed))
    return _outcome(config, datasets[0], runs, out)


class _Solver:
    """The jitted pieces for one model, compiled once and reused over seeds and offsets (same shapes)."""

    def __init__(self, model: models.Linear) -> None:
        self.model = model
        loss = train.landscape_loss(model, "square")
        self.matvec = hessian_matvec(loss)
        # The learning rate lives in the optimizer state, so every seed's 1/lambda_max reuses one compiled step.
        self.optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
        self.runner = train.full_batch_runner(train.make_train_step(model, "square", self.optimizer))

        def dense_hessian(params, batch_stats, x, y):
            flat, unravel = ravel_pytree(params)
            batch = (x, y, jax.random.PRNGKey(0))
            column = lambda e: ravel_pytree(self.matvec(unravel(e), params, batch, batch_stats))[0]
            return jax.lax.map(column, jnp.eye(flat.size, dtype=flat.dtype))

        self.dense_hessian = jax.jit(dense_hessian)

        def top_eigenvalue(params, batch_stats, x, y, key):
            size = ravel_pytree(params)[0].size
            v0 = random_like(key, params)
            batch = (x, y, jax.random.PRNGKey(0))
            return lanczos(self.matvec, v0, params, batch, batch_stats, k=1, num_iters=min(60, size)).eigenvalue[0]

        self.top_eigenvalue = jax.jit(top_eigenvalue)
        self.compiled = False  # whether a GD run has compiled the step (later runs reuse it)

    def solve(self, x, y, seed: int, steps: int, bar: progress.StepBar, label: str) -> dict:
        state = train.init_train_state(self.model, x[:2], self.optimizer, seed)
        hessian = np.asarray(self.dense_hessian(state.params, state.batch_stats, x, y), np.float64)
        eigenvalues = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))
        top = self.top_eigenvalue(state.params, state.batch_stats, x, y, jax.random.PRNGKey(seed))
        lambda_max, lambda_min = float(eigenvalues[-1]), float(eigenvalues[0])
        lr = 1.0 / lambda_max
        opt_state = state.opt_state._replace(
            hyperparams={**state.opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}
        )
        bar.start_run()
        bar.set_label(label)
        log = train.train_in_segments(
            self.runner, state._replace(opt_state=opt_state), x, y, num_steps=steps, every=steps
        )
        bar.advance(steps, warm=self.compiled)
        self.compiled = True
        optimum = _least_squares_optimum(np.asarray(x), np.asarray(y), int(self.model.num_classes))
        return {
            "eigenvalues": eigenvalues[::-1],
            "lambda_max": lambda_max,
            "lambda_min": lambda_min,
            "condition_number": lambda_max / lambda_min if lambda_min > 0 else np.inf,
            "lanczos_lambda_max": float(top),
            "gd_lr": lr,
            "gd_excess": np.asarray(log.losses, np.float64) - optimum,
            "optimum": optimum,
        }


def _least_squares_optimum(x: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """``min_{W, b} 0.5 mean_i ||x_i W + b - onehot(y_i)||^2`` in float64 (the same for BN's standardized
    inputs, an affine re-parametrization of the same model)."""
    a = np.concatenate([x.reshape(x.shape[0], -1).astype(np.float64), np.ones((x.shape[0], 1))], axis=1)
    targets = np.eye(num_classes)[y]
    w, *_ = np.linalg.lstsq(a, targets, rcond=None)
    return float(0.5 * np.mean(np.sum((a @ w - targets) ** 2, axis=1)))


def _stack(norm: str, offset: float, per_seed: list[dict]) -> dict:
    """One run entry: each per-seed value stacked on a leading seed axis."""
    entry: dict = {"norm": norm, "offset": offset}
    for key in per_seed[0]:
        entry[key] = np.stack([np.asarray(p[key], np.float64) for p in per_seed])
    entry["final_excess"] = entry["gd_excess"][:, -1]
    return entry


CLAIM_RULE = (
    stats.INTERVAL_RULE + ", the claimed side being BN / none < 1 (for the offset claim, no-BN at the largest "
    "offset / no-BN at the smallest > 1); over offsets a claim is held when held at every offset, not held when "
    "not held at one or more, inconclusive otherwise"
)


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "held" for v in verdicts):
        return "held"
    return "not held" if "not held" in verdicts else "inconclusive"


def _ratio_claim(config: Config, runs: list[dict], key: str, claim: str, what: str) -> tuple[report.Claim, dict]:
    """A claim that BN / none of ``key`` (one value per seed) is below 1 at every offset."""
    measured, short, verdicts, effects = [], [], [], {}
    for offset in config.offsets:
        bn = _find(runs, "bn", offset)
        plain = _find(runs, "none", offset)
        iv = stats.ratio_interval(bn[key], plain[key])
        effects[f"offset={offset:g}"] = iv._asdict()
        verdicts.append(stats.interval_verdict(iv, "below"))
        measured.append(f"offset {offset:g}: {what} BN / none {stats.format_ratio(iv)}")
        short.append(f"offset {offset:g}: {stats.format_effect(iv)}")
    return report.Claim(claim, "; ".join(measured), _combine(verdicts), effect="; ".join(short)), effects


def _claims(config: Config, runs: list[dict]) -> tuple[list[report.Claim], dict]:
    condition, cond_effects = _ratio_claim(
        config,
        runs,
        "condition_number",
        "BN (standardized inputs) gives a linear model a better-conditioned Hessian (lambda_max / lambda_min shrinks)",
        "condition number",
    )
    gd, gd_effects = _ratio_claim(
        config,
        runs,
        "final_excess",
        f"Consequence: GD at its largest safe step (1/lambda_max) ends closer to the optimum with BN (excess loss "
        f"after {config.steps} steps)",
        "excess loss",
    )
    low, high = min(config.offsets), max(config.offsets)
    offset_claim = "Without BN the condition number grows with the input offset (the bias couples to the mean)"
    if low == high:
        grows = report.Claim(offset_claim, "needs two different offsets", "inconclusive", effect="–")
        offset_effect = None
    else:
        iv = stats.ratio_interval(
            _find(runs, "none", high)["condition_number"], _find(runs, "none", low)["condition_number"]
        )
        grows = report.Claim(
            offset_claim,
            f"no-BN condition number at offset {high:g} / at offset {low:g}: {stats.format_ratio(iv)}",
            stats.interval_verdict(iv, "above"),
            effect=stats.format_effect(iv),
        )
        offset_effect = iv._asdict()
    effects = {"condition_number": cond_effects, "gd_excess_loss": gd_effects, "offset": offset_effect}
    return [condition, gd, grows], effects


def _find(runs: list[dict], norm: str, offset: float) -> dict:
    return next(r for r in runs if r["norm"] == norm and r["offset"] == offset)


def _cell(values: np.ndarray) -> str:
    """Mean over seeds [95% interval], 3 significant digits (``inf`` for a singular Hessian)."""
    if stats.interval(values).n < len(np.ravel(values)):
        return "inf (singular Hessian at a seed)"
    return stats.format_mean(values)


def _outcome(config: Config, ds, runs: list[dict], out: pathlib.Path) -> report.Outcome:
    claims, effects = _claims(config, runs)
    fig, axes = report.figure(ncols=3)
    for r in runs:
        label = f"{'BN' if r['norm'] == 'bn' else 'no BN'}, offset {r['offset']:g}"
        style = "-" if r["norm"] == "bn" else "--"
        color = f"C{config.offsets.index(r['offset'])}"
        report.seed_band(
            axes[0],
            np.arange(1, r["eigenvalues"].shape[1] + 1),
            r["eigenvalues"],
            label=label,
            color=color,
            linestyle=style,
        )
        excess = np.maximum(r["gd_excess"], np.finfo(np.float32).tiny)
        report.seed_band(axes[1], np.arange(1, config.steps + 1), excess, label=label, color=color, linestyle=style)
    axes[0].set(title="Hessian eigenvalues (descending)", xlabel="index", yscale="log")
    axes[1].set(title="GD at lr = 1/lambda_max: loss - optimum", xlabel="step", ylabel="excess square loss")
    axes[1].set(xscale="log", yscale="log")
    pos = np.arange(len(config.offsets))
    for k, (name, key) in enumerate((("condition number", "condition_number"), ("GD excess loss", "gd_excess_loss"))):
        ivs = [effects[key][f"offset={o:g}"] for o in config.offsets]
        mean = np.array([iv["mean"] for iv in ivs])
        err = np.array([[iv["mean"] - iv["low"], iv["high"] - iv["mean"]] for iv in ivs]).T
        err = np.where(np.isfinite(err), err, 0.0)
        axes[2].errorbar(pos + 0.1 * (2 * k - 1), mean, yerr=err, fmt="o", capsize=4, label=f"{name} (95% interval)")
    report.threshold_line(axes[2], 1.0, "no effect")
    axes[2].set(title="BN / none, mean over seeds", xticks=pos, xlabel="input offset", yscale="log")
    axes[2].set_xticklabels([f"{o:g}" for o in config.offsets])
    for ax in axes:
        report.legend(ax)
    figures = [report.save_figure(fig, out, "conditioning.png")]
    rows = [
        [
            f"{r['offset']:g}",
            r["norm"],
            _cell(r["lambda_max"]),
            _cell(r["lanczos_lambda_max"]),
            _cell(r["lambda_min"]),
            _cell(r["condition_number"]),
            _cell(r["final_excess"]),
        ]
        for r in runs
    ]
    table = report.markdown_table(
        [
            "offset",
            "norm",
            "lambda_max",
            "lambda_max (Lanczos)",
            "lambda_min",
            "condition number",
            f"GD excess loss after {config.steps} steps",
        ],
        rows,
    )
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        "For a linear model with square loss the Hessian is the second-moment matrix of the inputs (with a "
        "constant 1 for the bias), so its condition number lambda_max / lambda_min sets how fast gradient descent "
        "can converge: the step must stay below 2/lambda_max, and the flattest direction then moves by a factor "
        "of only about 1 - lambda_min/lambda_max per step. Standardizing the inputs, which is what BN does to a "
        "linear model, removes the input mean and equalizes the feature scales, so the condition number should "
        f"shrink and GD should converge faster. Here {held} of {len(claims)} claims held over {len(config.seeds)} "
        "seeds (fresh data draws): the 'measured' column gives BN's value as a multiple of the unnormalized "
        "model's, with its 95% interval; an interval wholly below 1x is a reproducible improvement."
    )
    same_data = config.dataset.startswith("npz:")
    setting = report.setting(
        model="linear: Dense(10) on the flattened inputs; BN = BatchNorm without scale and bias in front",
        data=f"{ds.name}, {config.n_train} training examples per seed"
        + (
            " (the same data at every seed)"
            if same_data
            else f", a fresh draw per seed (data seed {config.data_seed} + seed)"
        ),
        loss="square",
        optimizer="full-batch GD at lr = 1/lambda_max (of each seed and setting)",
        steps=config.steps,
        seeds=config.seeds,
        offsets=", ".join(f"{o:g}" for o in config.offsets),
        hessian="dense, one Hessian-vector product per parameter, float64 eigvalsh; Lanczos (60 steps) cross-check",
    )
    notes = [
        "Hessian: dense from one HVP per basis vector (BN in train mode over the full batch), float64 eigvalsh. "
        "It does not depend on the parameters, so seeds differ in the data (and in GD's initialization).",
        "Excess loss: the final GD loss minus the float64 least-squares optimum of the same data; BN's standardized "
        "inputs span the same affine model, so both share the optimum.",
        "GD at 1/lambda_max on a quadratic cannot diverge (the step is half the stability limit 2/lambda_max).",
        "Each table cell is the mean over seeds [95% interval].",
    ]
    results = {"runs": runs, "effects": effects}
    return report.Outcome(results, claims, [table], figures, notes, setting, reading, CLAIM_RULE)
