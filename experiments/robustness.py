"""Learning-rate and initialization robustness: BN trains over a wider grid of learning rates and init scales.

For each normalization (none, BN), every (learning rate, init scale) pair of the grid is trained with
minibatch SGD for the same number of steps, on the same minibatch sequence, from the same initialization up
to the scale. All grid points of one normalization train at once (``jax.vmap`` over the grid inside one
jitted ``lax.scan``; the learning rate is a hyperparameter in the optimizer state). A grid point whose loss
becomes non-finite is recorded as diverged rather than stopping the sweep: divergence is the measured
outcome here.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments import models, report, train


@dataclasses.dataclass(frozen=True)
class Config:
    """Final loss/accuracy over a grid of learning rates and init scales, BN vs no BN.

    Command: ``python -m experiments robustness`` (full) or ``--quick``; ``--model deep_linear`` for the deep
    linear chain ``y = x W1 ... Wd W_out`` (``depth`` layers of ``width``), where a step on one weight
    rescales the output through all the others.
    Expected runtime on 2 shared CPU cores (2026-11-25): quick 2 min (measured), full ~8 min (estimated).
    Expected result: more grid points train well (not diverged and test accuracy at least
    ``good_fraction`` of the best on the grid) with BN than without; without BN large learning rates
    diverge and small init scales stall in deep networks.

    Model: ``mlp`` (ReLU, ``hidden``) or ``deep_linear`` on MNIST-1D; SGD, batch ``batch_size``, ``steps``
    steps; ``init_scale`` multiplies the std of He (ReLU) / LeCun (linear) initialization.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seed: int = 0
    model: str = "mlp"
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    depth: int = 8
    width: int = 32
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    init_scales: tuple[float, ...] = (0.3, 1.0, 3.0)
    batch_size: int = 128
    steps: int = 2000
    segment: int = 500
    good_fraction: float = 0.9
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(
        Config(), lrs=(0.01, 0.1, 1.0, 3.0), init_scales=(0.3, 1.0, 3.0), steps=600, segment=300
    ),
    "smoke": dataclasses.replace(
        Config(), hidden=(16, 16), lrs=(0.1, 10.0), init_scales=(1.0,), batch_size=32, steps=20, segment=10
    ),
}


def _model(config: Config, norm: str, init_scale: float, num_classes: int):
    if config.model == "mlp":
        return models.MLP(
            features=config.hidden, num_classes=num_classes, activation="relu", norm=norm, init_scale=init_scale
        )
    if config.model == "deep_linear":
        return models.DeepLinear(
            depth=config.depth, width=config.width, num_classes=num_classes, norm=norm, init_scale=init_scale
        )
    raise ValueError(f"model must be 'mlp' or 'deep_linear' for this experiment, got {config.model!r}.")


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train the whole grid for each normalization and tabulate the outcomes."""
    if config.steps % config.segment:
        raise ValueError(f"steps ({config.steps}) must be a multiple of segment ({config.segment}).")
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    grid = list(itertools.product(config.lrs, config.init_scales))
    results = {}
    with tqdm(total=2 * (config.steps // config.segment), desc="robustness", unit="segment") as bar:
        for norm in ("none", "bn"):
            bar.set_postfix_str(norm)
            results[norm] = _sweep(config, norm, grid, ds.num_classes, x, y, x_test, y_test, bar)
    return _outcome(config, grid, results, out)


def _sweep(config, norm, grid, num_classes, x, y, x_test, y_test, bar) -> dict:
    sgd = optax.inject_hyperparams(optax.sgd)
    # The learning rate lives in each grid point's optimizer state; any of the optimizers then updates all.
    optimizer = sgd(learning_rate=config.lrs[0])
    states = [
        train.init_train_state(_model(config, norm, scale, num_classes), x[:2], sgd(learning_rate=lr), config.seed)
        for lr, scale in grid
    ]
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    model = _model(config, norm, 1.0, num_classes)  # init_scale only matters at init
    run_segment = train.minibatch_runner(train.make_train_step(model, config.loss, optimizer), config.batch_size)
    run_grid = jax.jit(jax.vmap(lambda s: run_segment(s, x, y, config.segment)))
    losses = []
    for _ in range(config.steps // config.segment):
        state, metrics = run_grid(state)
        losses.append(np.asarray(metrics.loss))
        bar.update(1)
    losses = np.concatenate(losses, axis=1)  # [grid, steps]
    test = jax.jit(jax.vmap(lambda p, b: train.eval_metrics(model, config.loss, p, b, x_test, y_test)))
    test_loss, test_acc = (np.asarray(v) for v in test(state.params, state.batch_stats))
    tail = max(1, config.steps // 10)
    diverged = ~np.all(np.isfinite(losses), axis=1)
    first_bad = [int(np.flatnonzero(~np.isfinite(row))[0]) if d else None for row, d in zip(losses, diverged)]
    return {
        "final_train_loss": np.where(diverged, np.nan, np.mean(losses[:, -tail:], axis=1)),
        "test_accuracy": np.where(diverged, np.nan, test_acc),
        "test_loss": np.where(diverged, np.nan, test_loss),
        "diverged": diverged,
        "diverged_at_step": first_bad,
    }


def _outcome(config: Config, grid, results: dict, out: pathlib.Path) -> report.Outcome:
    best = np.nanmax([np.nanmax(np.r_[r["test_accuracy"], -np.inf]) for r in results.values()])
    shape = (len(config.lrs), len(config.init_scales))
    good = {
        n: (~r["diverged"]) & (np.nan_to_num(r["test_accuracy"], nan=-1.0) >= config.good_fraction * best)
        for n, r in results.items()
    }
    fig, axes = report.figure(ncols=2, size=(4.2, 3.8))
    for ax, (norm, r) in zip(axes, results.items()):
        acc = r["test_accuracy"].reshape(shape)
        im = ax.imshow(np.nan_to_num(acc, nan=0.0), vmin=0.0, vmax=max(best, 1e-6), cmap="viridis", aspect="auto")
        for i, j in itertools.product(range(shape[0]), range(shape[1])):
            text = "div" if r["diverged"].reshape(shape)[i, j] else f"{acc[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="w", fontsize=7)
        ax.set(
            title=f"test accuracy, {'BN' if norm == 'bn' else 'no BN'} ({config.model})",
            xticks=range(shape[1]),
            xticklabels=[f"{s:g}" for s in config.init_scales],
            yticks=range(shape[0]),
            yticklabels=[f"{lr:g}" for lr in config.lrs],
            xlabel="init scale",
            ylabel="learning rate",
        )
        fig.colorbar(im, ax=ax)
    figures = [report.save_figure(fig, out, "robustness.png")]
    rows = []
    for k, (lr, scale) in enumerate(grid):
        row = [lr, scale]
        for norm in ("none", "bn"):
            r = results[norm]
            row += ["diverged", ""] if r["diverged"][k] else [r["final_train_loss"][k], r["test_accuracy"][k]]
        rows.append(row)
    table = report.markdown_table(
        ["lr", "init scale", "train loss (none)", "test acc (none)", "train loss (BN)", "test acc (BN)"], rows
    )
    counts = {n: int(g.sum()) for n, g in good.items()}
    diverged = {n: int(r["diverged"].sum()) for n, r in results.items()}
    claims = [
        report.Claim(
            "BN makes training robust to the learning rate and the initialization scale (more of the grid trains well)",
            f"grid points training well (>= {config.good_fraction:.0%} of the best test accuracy {best:.3f}): "
            f"BN {counts['bn']}/{len(grid)}, none {counts['none']}/{len(grid)}; diverged: BN {diverged['bn']}, "
            f"none {diverged['none']}",
            "held" if counts["bn"] > counts["none"] else "not held",
        )
    ]
    results_json = {
        "grid": [{"lr": lr, "init_scale": s} for lr, s in grid],
        "best_test_accuracy": best,
        "good_counts": counts,
        **{norm: r for norm, r in results.items()},
    }
    notes = [f"{config.steps} SGD steps, batch {config.batch_size}, same minibatch sequence for every grid point."]
    return report.Outcome(results_json, claims, [table], figures, notes)
