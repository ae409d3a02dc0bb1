"""Smoothness of the loss landscape along training (Santurkar, Tsipras, Ilyas, Madry 2018, Fig. 4).

Minibatch SGD of a conv net on MNIST-1D with and without BN (noisy BN as an option), at two learning rates,
over seeds run as one vmapped batch. Every ``measure_every`` steps, on the current minibatch,
:func:`bnjax.landscape.smoothness` measures along ``-grad L``: loss-landscape variation, gradient
predictiveness and effective beta-smoothness over step sizes ``linspace(0.5, 4, num_step_sizes) x lr``.
STIM18: the BN network has smaller values of all three. Each claim is judged on the per-seed ratio BN / none
of the measure's mean over checkpoints, by :data:`experiments.stats.INTERVAL_RULE`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax import landscape
from experiments import data as data_lib
from experiments import models, progress, report, stats, train

MEASURES = ("loss_variation", "gradient_predictiveness", "beta_smoothness")


@dataclasses.dataclass(frozen=True)
class Config:
    """Smoothness measures along training, BN vs no BN, over seeds (STIM18 §3.1, Fig. 4).

    Command: ``python -m experiments smoothness`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``RUNTIMES`` (``--help`` prints them).
    Expected result: averaged over the checkpoints, the BN network's loss variation, gradient predictiveness
    and beta-smoothness are smaller than the unnormalized network's at both learning rates, with the 95%
    interval over seeds below 1x.

    Model: ``model`` (``cnn1d``, the default: a conv net as STIM18's VGG, on MNIST-1D; ``vgg`` for image data
    such as ``--dataset digits``; ``mlp`` with ``hidden``) with ``activation``, SGD with batch ``batch_size``
    for ``steps`` steps per run, one run per seed in ``seeds`` (vmapped). Measures every ``measure_every``
    steps on the minibatch of the next step, over ``num_step_sizes`` step sizes from 0.5 to 4 times the
    learning rate (the paper's range; it gives no grid size). BN in train mode (batch statistics of that
    minibatch); noisy BN (``--norms none,bn,noisy``) with one fixed noise draw per measurement.
    Differences from STIM18: MNIST-1D (or 8x8 digits) instead of CIFAR-10, a 3-layer CNN instead of VGG,
    no data augmentation, fewer steps.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "cnn1d"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "relu"
    norms: tuple[str, ...] = ("none", "bn")
    lrs: tuple[float, ...] = (0.05, 0.2)
    batch_size: int = 128
    steps: int = 1500
    measure_every: int = 100
    num_step_sizes: int = 8
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), steps=500, measure_every=50),
    "smoke": dataclasses.replace(
        Config(),
        model="mlp",
        hidden=(16,),
        seeds=(0, 1),
        lrs=(0.1,),
        batch_size=32,
        steps=20,
        measure_every=10,
        num_step_sizes=3,
    ),
}
_QUICK = {"steps": 500, "measure_every": 50}
# The claims matrix (experiments.claims): the families this experiment applies to and its forms there.
MATRIX = {
    "mlp": {"quick": {"model": "mlp", **_QUICK}, "full": {"model": "mlp"}},
    "cnn1d": {"quick": {"model": "cnn1d", **_QUICK}, "full": {"model": "cnn1d"}},
    # The VGG's quick entry is shorter: 500 steps took 160 s (2026-12-04, 2 CPU cores, load ~1.5).
    "vgg": {
        "quick": {"model": "vgg", "dataset": "digits", "steps": 300, "measure_every": 100},
        "full": {"model": "vgg", "dataset": "digits"},
    },
}
CHOICES = {"model": models.FAMILIES, "norms": ("none", "bn", "noisy"), "loss": train.LOSSES}


def check(config: Config) -> None:
    if config.model not in models.FAMILIES:
        raise ValueError(f"model must be one of {models.FAMILIES} for this experiment, got {config.model!r}.")
    if "none" not in config.norms or len(config.norms) < 2:
        raise ValueError(f"norms must include 'none' and at least one normalization, got {config.norms}.")
    for norm in config.norms:
        if norm not in models.NORMS:
            raise ValueError(f"norms must be among {models.NORMS}, got {norm!r}.")
    if config.loss not in train.LOSSES:
        raise ValueError(f"loss must be one of {train.LOSSES}, got {config.loss!r}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name distinct seeds, at least one, got {config.seeds}.")
    if not config.lrs or not all(lr > 0 for lr in config.lrs) or len(set(config.lrs)) != len(config.lrs):
        raise ValueError(f"lrs must be one or more distinct positive learning rates, got {config.lrs!r}.")
    if config.measure_every < 1 or config.steps < config.measure_every or config.steps % config.measure_every:
        raise ValueError(
            f"steps ({config.steps}) must be a positive multiple of measure_every ({config.measure_every})."
        )


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train each (learning rate, normalization) pair over the seeds and measure smoothness along the way."""
    check(config)
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    runs = []
    with progress.StepBar(len(config.lrs) * len(config.norms) * config.steps, "smoothness") as bar:
        for lr in config.lrs:
            for norm in config.norms:
                runs.append(_one_run(config, lr, norm, ds.num_classes, x, y, bar))
    return _outcome(config, ds, runs, out)


def _one_run(config, lr, norm, num_classes, x, y, bar) -> dict:
    model = models.family_model(config.model, norm, num_classes, hidden=config.hidden, activation=config.activation)
    optimizer = optax.sgd(lr)
    state = train.init_seed_states(model, x[:2], optimizer, config.seeds)
    runner = train.minibatch_runner(
        train.make_train_step(model, config.loss, optimizer), config.batch_size, over_seeds=True
    )
    loss_fn = train.landscape_loss(model, config.loss)
    grid = landscape.step_size_grid(lr, num=config.num_step_sizes)

    def measure_one(state):
        # The minibatch and noise the next training step would use (same draw as minibatch_runner's).
        _, perm_key = jax.random.split(state.key)
        idx = jax.random.permutation(perm_key, x.shape[0])[: config.batch_size]
        batch = (x[idx], y[idx], jax.random.fold_in(state.key, 1))
        return landscape.smoothness(loss_fn, state.params, batch, state.batch_stats, step_sizes=grid)

    label = f"lr={lr:g} {norm}"
    try:
        log = train.train_in_segments(
            runner,
            state,
            x,
            y,
            num_steps=config.steps,
            every=config.measure_every,
            measure=jax.jit(jax.vmap(measure_one)),
            bar=bar,
            label=label,
        )
    except train.Diverged as err:
        return {"lr": lr, "norm": norm, "diverged": str(err), "diverged_at": [0] * len(config.seeds)}
    entry: dict = {"lr": lr, "norm": norm, "steps": log.steps, "diverged_at": log.diverged_at.tolist()}
    for name in MEASURES:
        values = np.stack([np.asarray(getattr(m, name), np.float64) for m in log.measurements])  # [checkpoints, S]
        entry[name] = values.T  # [seeds, checkpoints]
        entry[f"mean_{name}"] = np.mean(values, axis=0)  # per seed (NaN for a seed that diverged)
    entry["final_train_loss"] = np.mean(log.losses[:, -config.measure_every :], axis=1)
    entry["losses"] = log.losses
    return entry


CLAIM_RULE = (
    stats.INTERVAL_RULE + ", the claimed side being BN / none < 1; over learning rates the claim is held when "
    "held at every one, not held when not held at one or more, inconclusive otherwise; a learning rate at which "
    "every no-BN seed diverged and BN did not counts as held"
)


def _claims(config: Config, runs: list[dict]) -> tuple[list[report.Claim], dict]:
    claims, effects = [], {}
    for name in MEASURES:
        measured, verdicts, short = [], [], []
        for lr in config.lrs:
            bn = next(e for e in runs if e["lr"] == lr and e["norm"] == "bn")
            plain = next(e for e in runs if e["lr"] == lr and e["norm"] == "none")
            if "diverged" in bn:
                measured.append(f"lr={lr:g}: BN diverged at every seed")
                short.append(f"lr {lr:g}: BN diverged")
                verdicts.append("inconclusive")
                continue
            if "diverged" in plain:
                measured.append(f"lr={lr:g}: no-BN diverged at every seed")
                short.append(f"lr {lr:g}: no-BN diverged")
                verdicts.append("held")
                continue
            iv = stats.ratio_interval(bn[f"mean_{name}"], plain[f"mean_{name}"])
            effects[f"{name} lr={lr:g}"] = iv._asdict()
            verdict = stats.interval_verdict(iv, "below")
            measured.append(f"lr={lr:g}: BN / none {stats.format_ratio(iv)}")
            short.append(f"lr {lr:g}: {stats.format_effect(iv)}")
            verdicts.append(verdict)
        verdict = (
            "held" if all(v == "held" for v in verdicts) else "not held" if "not held" in verdicts else "inconclusive"
        )
        claims.append(
            report.Claim(
                f"STIM18: BN makes the {name.replace('_', ' ')} smaller",
                "; ".join(measured),
                verdict,
                effect="; ".join(short),
            )
        )
    return claims, effects


def _outcome(config: Config, ds, runs: list[dict], out: pathlib.Path) -> report.Outcome:
    ncols = len(MEASURES) + 1
    fig, axes = report.figure(ncols=ncols, nrows=len(config.lrs))
    for r, lr in enumerate(config.lrs):
        for i, entry in enumerate(e for e in runs if e["lr"] == lr):
            color = f"C{i}"
            ax_loss = axes[r * ncols + len(MEASURES)]
            if "diverged" in entry:
                ax_loss.plot([], [], marker="x", linestyle="none", color=color, label=f"{entry['norm']}: diverged")
                continue
            for c, name in enumerate(MEASURES):
                report.seed_band(axes[r * ncols + c], entry["steps"], entry[name], label=entry["norm"], color=color)
            report.seed_band(
                ax_loss,
                np.arange(1, config.steps + 1),
                report.moving_average(entry["losses"], 20),
                label=entry["norm"],
                color=color,
                linewidth=0.8,
            )
        for c, name in enumerate(MEASURES):
            axes[r * ncols + c].set(title=f"{name.replace('_', ' ')} (lr={lr:g})", xlabel="step", yscale="log")
        axes[r * ncols + len(MEASURES)].set(title=f"train loss (lr={lr:g})", xlabel="step", yscale="log")
        for c in range(ncols):
            report.legend(axes[r * ncols + c])
    figures = [report.save_figure(fig, out, "smoothness.png")]

    rows = []
    for entry in runs:
        diverged = sum(d >= 0 for d in entry["diverged_at"])
        if "diverged" in entry:
            rows.append([f"{entry['lr']:g}", entry["norm"], "diverged", "diverged", "diverged", "diverged", "all"])
            continue
        cells = [stats.format_mean(entry[f"mean_{m}"]) for m in MEASURES]
        rows.append(
            [
                f"{entry['lr']:g}",
                entry["norm"],
                *cells,
                stats.format_mean(entry["final_train_loss"]),
                f"{diverged} of {len(config.seeds)}",
            ]
        )
    table = report.markdown_table(
        ["lr", "norm", *(f"mean {m.replace('_', ' ')}" for m in MEASURES), "final train loss", "seeds diverged"],
        rows,
    )
    claims, effects = _claims(config, runs)
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        f"STIM18 argue that batch norm helps because it makes the loss landscape smoother: along the gradient, "
        f"the loss changes less (loss variation), the gradient changes less (gradient predictiveness) and the "
        f"gradient is Lipschitz with a smaller constant (beta). Here {held} of {len(claims)} of these claims "
        f"held for the {config.model} over {len(config.seeds)} seeds: the 'measured' column gives BN's value as "
        f"a multiple of the unnormalized network's, with its 95% interval; an interval wholly below 1x is a "
        f"reproducible smoothing effect, one that contains 1x cannot be told from seed noise."
    )
    setting = report.setting(
        model=models.describe_family(config.model, hidden=config.hidden, activation=config.activation),
        data=f"{ds.name}, {ds.x_train.shape[0]} training examples (minibatches of {config.batch_size})",
        loss=config.loss.replace("_", "-"),
        optimizer=f"SGD, lr {', '.join(f'{lr:g}' for lr in config.lrs)}",
        steps=config.steps,
        seeds=config.seeds,
        norms=", ".join(config.norms),
        measured=f"every {config.measure_every} steps, {config.num_step_sizes} step sizes in [0.5, 4] x lr",
    )
    notes = [
        f"Step sizes: {config.num_step_sizes} points, linspace(0.5, 4) x lr along -grad L on the current "
        f"minibatch of {config.batch_size}; BN in train mode; measured every {config.measure_every} steps.",
        "Each cell of the table is the mean over seeds [95% interval] of the per-seed mean over checkpoints.",
        "Differences from STIM18: MNIST-1D (or digits) instead of CIFAR-10, a small conv net instead of VGG, "
        "no augmentation, fewer steps.",
    ]
    if "noisy" in config.norms:
        notes.append("Noisy BN (STIM18 Algorithm 1) is reported for reference; STIM18 make no smoothness claim for it.")
    results = {"runs": runs, "effects": effects}
    return report.Outcome(results, claims, [table], figures, notes, setting, reading, CLAIM_RULE)
