"""Smoothness of the loss landscape along training (Santurkar, Tsipras, Ilyas, Madry 2018, Fig. 4).

Minibatch SGD on MNIST-1D with no normalization, BN and noisy BN, at two learning rates. Every
``measure_every`` steps, on the current minibatch, :func:`bnjax.landscape.smoothness` measures along
``-grad L``: loss-landscape variation, gradient predictiveness and effective beta-smoothness over step sizes
``linspace(0.5, 4, num_step_sizes) x lr``. STIM18: the BN network has smaller values of all three.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from bnjax import landscape
from experiments import data as data_lib
from experiments import models, report, train

MEASURES = ("loss_variation", "gradient_predictiveness", "beta_smoothness")


@dataclasses.dataclass(frozen=True)
class Config:
    """Smoothness measures along training, BN vs no BN vs noisy BN (STIM18 §3.1, Fig. 4).

    Command: ``python -m experiments smoothness`` (full) or ``--quick``.
    Expected runtime on 2 shared CPU cores (2026-11-25): quick 1.9 min (measured), full ~8 min (estimated).
    Expected result: averaged over the checkpoints, the BN network's loss variation, gradient predictiveness
    and beta-smoothness are smaller than the unnormalized network's at both learning rates.

    Model: ``model`` (``mlp`` with ``hidden`` and ``activation``, ``cnn1d``, or ``vgg`` for image data such
    as ``--dataset digits``, closest to STIM18's VGG) on ``dataset``, SGD with batch
    ``batch_size`` for ``steps`` steps per run; measures every ``measure_every`` steps on the minibatch of
    the next step, over ``num_step_sizes`` step sizes from 0.5 to 4 times the learning rate (the paper's
    range; it gives no grid size). BN in train mode (batch statistics of that minibatch); noisy BN with
    one fixed noise draw per measurement, so the measured loss is a deterministic function.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seed: int = 0
    model: str = "mlp"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "relu"
    norms: tuple[str, ...] = ("none", "bn", "noisy")
    lrs: tuple[float, ...] = (0.05, 0.2)
    batch_size: int = 128
    steps: int = 3000
    measure_every: int = 100
    num_step_sizes: int = 8
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), steps=600, measure_every=50),
    "smoke": dataclasses.replace(
        Config(),
        hidden=(16,),
        norms=("none", "bn"),
        lrs=(0.1,),
        batch_size=32,
        steps=20,
        measure_every=10,
        num_step_sizes=3,
    ),
}


def _model(config: Config, norm: str, num_classes: int):
    if config.model == "mlp":
        return models.MLP(features=config.hidden, num_classes=num_classes, activation=config.activation, norm=norm)
    if config.model == "cnn1d":
        return models.CNN1D(num_classes=num_classes, activation=config.activation, norm=norm)
    if config.model == "vgg":
        return models.VGG(num_classes=num_classes, activation=config.activation, norm=norm)
    raise ValueError(f"model must be 'mlp', 'cnn1d' or 'vgg' for this experiment, got {config.model!r}.")


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train each (learning rate, normalization) pair and measure smoothness along the way."""
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    runs, curves = [], {}
    segments = config.steps // config.measure_every
    with tqdm(total=len(config.lrs) * len(config.norms) * segments, desc="smoothness", unit="segment") as bar:
        for lr in config.lrs:
            for norm in config.norms:
                runs.append(_one_run(config, lr, norm, ds.num_classes, x, y, bar, curves))
    return _outcome(config, runs, curves, out)


def _one_run(config, lr, norm, num_classes, x, y, bar, curves) -> dict:
    model = _model(config, norm, num_classes)
    optimizer = optax.sgd(lr)
    state = train.init_train_state(model, x[:2], optimizer, config.seed)
    runner = train.minibatch_runner(train.make_train_step(model, config.loss, optimizer), config.batch_size)
    loss_fn = train.landscape_loss(model, config.loss)
    grid = landscape.step_size_grid(lr, num=config.num_step_sizes)

    @jax.jit
    def measure(state):
        # The minibatch and noise the next training step would use (same draw as minibatch_runner's).
        _, perm_key = jax.random.split(state.key)
        idx = jax.random.permutation(perm_key, x.shape[0])[: config.batch_size]
        batch = (x[idx], y[idx], jax.random.fold_in(state.key, 1))
        return landscape.smoothness(loss_fn, state.params, batch, state.batch_stats, step_sizes=grid)

    label = f"lr={lr:g} {norm}"
    bar.set_postfix_str(label)
    entry = {"lr": lr, "norm": norm}
    try:
        log = train.train_in_segments(
            runner,
            state,
            x,
            y,
            num_steps=config.steps,
            every=config.measure_every,
            measure=measure,
            bar=bar,
            label=label,
        )
    except train.Diverged as err:
        entry["diverged"] = str(err)
        return entry
    for name in MEASURES:
        values = np.array([float(getattr(m, name)) for m in log.measurements])
        entry[name] = values
        entry[f"mean_{name}"] = float(np.mean(values))
    entry["steps"] = log.steps
    entry["final_train_loss"] = float(np.mean(log.losses[-config.measure_every :]))
    curves[(lr, norm)] = log.losses
    return entry


def _outcome(config: Config, runs: list[dict], curves: dict, out: pathlib.Path) -> report.Outcome:
    fig, axes = report.figure(ncols=len(MEASURES) + 1, nrows=len(config.lrs))
    ncols = len(MEASURES) + 1
    for r, lr in enumerate(config.lrs):
        for entry in (e for e in runs if e["lr"] == lr and "diverged" not in e):
            for c, name in enumerate(MEASURES):
                ax = axes[r * ncols + c]
                ax.plot(entry["steps"], entry[name], marker=".", label=entry["norm"])
                ax.set(title=f"{name.replace('_', ' ')} (lr={lr:g})", xlabel="step", yscale="log")
                ax.legend(fontsize=7)
            ax = axes[r * ncols + len(MEASURES)]
            ax.plot(_smooth(curves[(lr, entry["norm"])]), label=entry["norm"], linewidth=0.8)
            ax.set(title=f"train loss (lr={lr:g})", xlabel="step", yscale="log")
            ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out, "smoothness.png")]

    rows, claims = [], []
    for entry in runs:
        if "diverged" in entry:
            rows.append([entry["lr"], entry["norm"], "diverged", "", "", ""])
        else:
            means = [entry[f"mean_{m}"] for m in MEASURES]
            rows.append([entry["lr"], entry["norm"], *means, entry["final_train_loss"]])
    table = report.markdown_table(
        ["lr", "norm", *(f"mean {m.replace('_', ' ')}" for m in MEASURES), "final train loss"], rows
    )
    for name in MEASURES:
        measured, verdicts = [], []
        for lr in config.lrs:
            bn = next((e for e in runs if e["lr"] == lr and e["norm"] == "bn"), None)
            plain = next((e for e in runs if e["lr"] == lr and e["norm"] == "none"), None)
            if bn is None or plain is None or "diverged" in bn:
                continue
            if "diverged" in plain:
                measured.append(f"lr={lr:g}: no-BN run diverged")
                verdicts.append(True)
                continue
            a, b = bn[f"mean_{name}"], plain[f"mean_{name}"]
            measured.append(f"lr={lr:g}: BN {a:.3g} vs none {b:.3g} ({a / b:.2f}x)")
            verdicts.append(a < b)
        verdict = "inconclusive" if not verdicts else ("held" if all(verdicts) else "not held")
        claims.append(
            report.Claim(
                f"STIM18: BN makes the {name.replace('_', ' ')} smaller", "; ".join(measured) or "n/a", verdict
            )
        )
    notes = [
        f"Step sizes: {config.num_step_sizes} points, linspace(0.5, 4) x lr along -grad L on the current "
        f"minibatch of {config.batch_size}; BN in train mode; measured every {config.measure_every} steps.",
        "Noisy BN (STIM18 Algorithm 1) is reported for reference; STIM18 make no smoothness claim for it.",
    ]
    return report.Outcome({"runs": runs}, claims, [table], figures, notes)


def _smooth(values: np.ndarray, window: int = 20) -> np.ndarray:
    """Moving average of a per-step loss curve (for plotting)."""
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")
