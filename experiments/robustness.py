"""Learning-rate and initialization robustness: BN trains over a wider grid of learning rates and init scales.

For each normalization (none, BN), every (learning rate, init scale) pair of the grid is trained with
minibatch SGD for the same number of steps, once per seed. All grid points and seeds of one normalization
train at once (one vmapped batch inside one jitted ``lax.scan``; the learning rate is a hyperparameter in
the optimizer state); a seed's grid points share its minibatch sequence and its initialization up to the
scale. A grid point whose loss becomes non-finite is recorded as diverged rather than stopping the sweep:
divergence is the measured outcome here. Each claim is judged per seed and then over seeds by
:data:`CLAIM_RULE`.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import models, progress, report, stats, train

MODELS = (*models.FAMILIES, "deep_linear")


@dataclasses.dataclass(frozen=True)
class Config:
    """Final loss/accuracy over a grid of learning rates and init scales, BN vs no BN, over seeds.

    Command: ``python -m experiments robustness`` (full) or ``--quick``; ``--model deep_linear`` for the deep
    linear chain ``y = x W1 ... Wd W_out`` (``depth`` layers of ``width``), where a step on one weight
    rescales the output through all the others; ``--model cnn1d`` for a 1-D conv net, ``--model vgg``
    with ``--dataset digits`` for a VGG-style conv net on 8x8 images.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: per seed, more grid points train well (not diverged and test accuracy at least
    ``good_fraction`` of that seed's best on the grid) with BN than without, and fewer diverge; without
    BN large learning rates diverge and small init scales stall in deep networks. Each with its 95%
    interval over seeds above 0 (:data:`CLAIM_RULE`).

    Model: ``model`` (``mlp`` with ``hidden`` and ``activation``, the default; ``cnn1d``; ``vgg``; or
    ``deep_linear``) on MNIST-1D (``dataset``); SGD, batch ``batch_size``, ``steps`` steps, one run per
    seed in ``seeds`` at every grid point; ``init_scale`` multiplies the std of He (ReLU) / LeCun
    (linear) initialization. Differences from the papers behind the claim (Ioffe & Szegedy 2015; Bjorck et
    al. 2018, ResNets on CIFAR-10): small networks on MNIST-1D (or 8x8 digits), plain SGD without momentum,
    weight decay or schedule, a short fixed budget of steps, and "trains well" measured against the best
    point of this grid rather than a published accuracy.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "mlp"
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    activation: str = "relu"
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
# The claims matrix (experiments.claims): the families this experiment applies to and its forms there. The conv
# nets run a smaller grid (lr 0.01 trained no setting well in 200 steps) with fewer steps: the 12-point grid's 36
# vmapped VGG runs took 7.6 min for 200 steps without and 200 with BN at batch 128 (2026-12-04, 2 CPU cores,
# load ~1; not profiled: a vmapped conv over per-run kernels is probably lowered as a grouped convolution).
# Measured 2026-12-04 (2 CPU cores, load ~1.5; experiments/results/claims-{quick,full}): quick mlp 41 s,
# cnn1d 23 s, vgg 73 s, deep_linear 37 s; full 121 s, 80 s, 171 s, 67 s.
_GRID = {"lrs": (0.01, 0.1, 1.0, 3.0), "init_scales": (0.3, 1.0, 3.0)}
_CONV_GRID = {"lrs": (0.1, 1.0, 3.0), "init_scales": (0.3, 1.0, 3.0)}
_DIGITS = {"dataset": "digits", "batch_size": 64}
MATRIX = {
    "mlp": {
        "quick": {"model": "mlp", "hidden": (100, 100, 100), **_GRID, "steps": 300, "segment": 150},
        "full": {"model": "mlp", **_GRID, "steps": 600, "segment": 300},
    },
    "cnn1d": {
        "quick": {"model": "cnn1d", **_CONV_GRID, "batch_size": 64, "steps": 150, "segment": 75},
        "full": {"model": "cnn1d", **_CONV_GRID, "steps": 400, "segment": 200},
    },
    "vgg": {
        "quick": {"model": "vgg", **_DIGITS, **_CONV_GRID, "steps": 100, "segment": 50},
        "full": {"model": "vgg", **_DIGITS, **_CONV_GRID, "steps": 300, "segment": 150},
    },
    "deep_linear": {
        "quick": {"model": "deep_linear", **_GRID, "steps": 300, "segment": 150},
        "full": {"model": "deep_linear", **_GRID, "steps": 600, "segment": 300},
    },
}
CHOICES = {"model": MODELS, "loss": train.LOSSES}
NORMS = ("none", "bn")
_NAMES = {"none": "no BN", "bn": "BN"}

CLAIM_RULE = (
    "per seed, count the grid points each normalization trains well (not diverged, test accuracy at least "
    "good_fraction of that seed's best over both grids) and those it diverged at; over the seeds, the "
    "difference of the counts (BN minus none for training well, none minus BN for diverging) gives a mean "
    "and a 95% Student-t interval; the claim is held when the whole interval lies above 0, not held when it "
    "lies wholly below 0, and inconclusive when it contains 0 or fewer than 2 seeds ran (a difference equal "
    "at every seed has a zero-width interval)"
)


def check(config: Config) -> None:
    """One-line ValueErrors for options this experiment cannot run with."""
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS} for this experiment, got {config.model!r}.")
    if config.activation not in models.ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(models.ACTIVATIONS)}, got {config.activation!r}.")
    if config.loss not in train.LOSSES:
        raise ValueError(f"loss must be one of {train.LOSSES}, got {config.loss!r}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name at least one seed, none twice, got {config.seeds}.")
    if not config.lrs or not config.init_scales or not all(v > 0 for v in config.lrs + config.init_scales):
        raise ValueError(f"lrs and init_scales must be non-empty and positive, got {config.lrs}, {config.init_scales}.")
    if config.segment < 1 or config.steps < config.segment or config.steps % config.segment:
        raise ValueError(f"steps ({config.steps}) must be a positive multiple of segment ({config.segment}).")
    if not 0 < config.good_fraction <= 1:
        raise ValueError(f"good_fraction must be in (0, 1], got {config.good_fraction}.")


def _check_data(config: Config, ds: data_lib.Dataset) -> None:
    shape = ds.x_train.shape
    if config.model == "vgg" and len(shape) != 4:
        raise ValueError(f"model 'vgg' needs images [n, h, w, c] (e.g. --dataset digits); {ds.name} has {shape}.")
    if config.model in ("cnn1d", "mlp", "deep_linear") and len(shape) not in (2, 3):
        raise ValueError(f"model {config.model!r} needs vectors or sequences (e.g. mnist1d); {ds.name} has {shape}.")
    if config.batch_size > shape[0]:
        raise ValueError(f"batch_size ({config.batch_size}) exceeds the {shape[0]} training examples of {ds.name}.")


def _model(config: Config, norm: str, init_scale: float, num_classes: int):
    if config.model == "deep_linear":
        return models.DeepLinear(
            depth=config.depth, width=config.width, num_classes=num_classes, norm=norm, init_scale=init_scale
        )
    model = models.family_model(config.model, norm, num_classes, hidden=config.hidden, activation=config.activation)
    return model.clone(init_scale=init_scale)


def _describe(config: Config) -> str:
    if config.model == "deep_linear":
        return f"deep linear chain: {config.depth} x Dense({config.width}, no bias) - norm, then Dense"
    return models.describe_family(config.model, hidden=config.hidden, activation=config.activation)


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train the whole grid over the seeds for each normalization and tabulate the outcomes."""
    check(config)
    ds = data_lib.load(config.dataset, config.data_seed)
    _check_data(config, ds)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    grid = list(itertools.product(config.lrs, config.init_scales))
    results = {}
    with progress.StepBar(len(NORMS) * config.steps, "robustness") as bar:
        for norm in NORMS:
            results[norm] = _sweep(config, norm, grid, ds.num_classes, x, y, x_test, y_test, bar)
    return _outcome(config, ds, grid, results, out)


def _sweep(config, norm, grid, num_classes, x, y, x_test, y_test, bar) -> dict:
    """Every grid point at every seed as one vmapped batch (flat axis: grid point major, seed minor)."""
    sgd = optax.inject_hyperparams(optax.sgd)
    # The learning rate lives in each run's optimizer state; any of the optimizers then updates all.
    optimizer = sgd(learning_rate=config.lrs[0])
    per_point = [
        train.init_seed_states(_model(config, norm, scale, num_classes), x[:2], sgd(learning_rate=lr), config.seeds)
        for lr, scale in grid
    ]
    state = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *per_point)  # [grid * seeds, ...]
    model = _model(config, norm, 1.0, num_classes)  # init_scale only matters at init
    runner = train.minibatch_runner(
        train.make_train_step(model, config.loss, optimizer), config.batch_size, over_seeds=True
    )

    # Not wrapped in jit: the runner places its loop itself (on CPU a conv net's steps run one jitted call
    # each, as XLA:CPU runs backward convolutions inside a scan 15-20x slower; jax-ml/jax#12868).
    def run_segment(s):
        return runner(s, x, y, config.segment)

    bar.start_run()
    bar.set_label(norm)
    losses = []
    for k in range(config.steps // config.segment):
        state, metrics = run_segment(state)
        losses.append(np.asarray(metrics.loss))  # [segment, grid * seeds]
        bar.advance(config.segment, warm=k > 0)
    g, s = len(grid), len(config.seeds)
    losses = np.concatenate(losses, axis=0).T.reshape(g, s, config.steps)
    test = jax.jit(jax.vmap(lambda p, b: train.eval_metrics(model, config.loss, p, b, x_test, y_test)))
    test_loss, test_acc = (np.asarray(v, np.float64).reshape(g, s) for v in test(state.params, state.batch_stats))
    return summarize(losses, test_loss, test_acc)


def summarize(losses: np.ndarray, test_loss: np.ndarray, test_acc: np.ndarray) -> dict:
    """Per grid point and seed (``[grid, seeds]``) outcomes from the losses ``[grid, seeds, steps]``; a run
    whose loss became non-finite is diverged (``diverged_at`` its first bad step, -1 when it finished) and
    NaN in the other fields."""
    finite = np.isfinite(losses)
    diverged = ~np.all(finite, axis=-1)
    diverged_at = np.where(diverged, np.argmin(finite, axis=-1), -1)
    tail = max(1, losses.shape[-1] // 10)
    with np.errstate(invalid="ignore"):
        final = np.mean(losses[..., -tail:], axis=-1)
    return {
        "final_train_loss": np.where(diverged, np.nan, final),
        "test_accuracy": np.where(diverged, np.nan, test_acc),
        "test_loss": np.where(diverged, np.nan, test_loss),
        "diverged": diverged,
        "diverged_at": diverged_at,
    }


def good_points(results: dict, good_fraction: float) -> tuple[dict, np.ndarray]:
    """``{norm: bool[grid, seeds]}``: trained well (not diverged, test accuracy at least ``good_fraction`` of
    the seed's best over every norm's grid), and that best per seed."""
    stacked = np.concatenate([r["test_accuracy"] for r in results.values()])  # [norms * grid, seeds]
    best = np.max(np.where(np.isfinite(stacked), stacked, -np.inf), axis=0)
    best = np.where(np.isfinite(best), best, np.inf)  # a seed with every run diverged has no good point
    good = {
        n: (~r["diverged"]) & (np.nan_to_num(r["test_accuracy"], nan=-1.0) >= good_fraction * best)
        for n, r in results.items()
    }
    return good, best


def difference_verdict(diff: np.ndarray) -> tuple[stats.Interval, str]:
    """The interval of the per-seed differences and its verdict by :data:`CLAIM_RULE` (claimed: above 0)."""
    iv = stats.interval(diff)
    if iv.n >= 2 and iv.low == iv.high:  # the same difference at every seed
        return iv, "held" if iv.mean > 0 else "not held" if iv.mean < 0 else "inconclusive"
    return iv, stats.interval_verdict(iv, "above", at=0.0)


def format_difference(iv: stats.Interval, unit: str = "grid points") -> str:
    """``+3 [1.2, 4.8] grid points`` (the mean difference and its 95% interval)."""
    if iv.n == 0:
        return "–"
    if iv.n == 1:
        return f"{iv.mean:+.2g} {unit}, 1 seed"
    return f"{iv.mean:+.2g} [{iv.low:+.2g}, {iv.high:+.2g}] {unit}"


def claim_verdicts(results: dict, good_fraction: float, n_grid: int) -> tuple[list[report.Claim], dict]:
    """The claims on ``results`` (``{"none": run, "bn": run}``, each with ``[grid, seeds]`` fields)."""
    good, best = good_points(results, good_fraction)
    counts = {n: g.sum(axis=0) for n, g in good.items()}  # [seeds]
    div = {n: r["diverged"].sum(axis=0) for n, r in results.items()}
    claims, effects = [], {}
    for key, text, diff, what in (
        (
            "good_difference",
            "BN makes training robust to the learning rate and the initialization scale (more of the grid trains well)",
            counts["bn"] - counts["none"],
            f"grid points (of {n_grid}) training well, >= {good_fraction:.0%} of the seed's best test accuracy",
        ),
        (
            "diverged_difference",
            "Without BN large learning rates diverge (more of the grid diverges without BN)",
            div["none"] - div["bn"],
            f"grid points (of {n_grid}) diverged",
        ),
    ):
        iv, verdict = difference_verdict(diff)
        effects[key] = iv._asdict()
        a, b = (counts["bn"], counts["none"]) if key == "good_difference" else (div["none"], div["bn"])
        first, second = ("BN", "none") if key == "good_difference" else ("none", "BN")
        per_seed = ", ".join(f"{int(u)} vs {int(v)}" for u, v in zip(a, b))
        measured = (
            f"{what}, {first} minus {second}: {format_difference(iv)}, {iv.n} seeds (per seed {first} vs "
            f"{second}: {per_seed})"
        )
        claims.append(report.Claim(text, measured, verdict, effect=format_difference(iv, "pts")))
    return claims, {**effects, "best_test_accuracy": best, "good_counts": counts, "diverged_counts": div}


def _cell(values: np.ndarray, diverged: np.ndarray) -> str:
    """Mean [95% interval] over the seeds that finished, and how many diverged."""
    iv = stats.interval(values)
    n_div = int(diverged.sum())
    if iv.n == 0:
        return f"diverged ({n_div} of {diverged.size})"
    text = f"{iv.mean:.3f}" if iv.n == 1 else f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]"
    return text + (f", diverged {n_div} of {diverged.size}" if n_div else "")


def _outcome(config: Config, ds, grid, results: dict, out: pathlib.Path) -> report.Outcome:
    claims, effects = claim_verdicts(results, config.good_fraction, len(grid))
    good, best = good_points(results, config.good_fraction)
    n_seeds = len(config.seeds)
    rows = []
    for k, (lr, scale) in enumerate(grid):
        row = [f"{lr:g}", f"{scale:g}"]
        for norm in NORMS:
            r = results[norm]
            row += [
                _cell(r["final_train_loss"][k], r["diverged"][k]),
                _cell(r["test_accuracy"][k], r["diverged"][k]),
                f"{int(good[norm][k].sum())} of {n_seeds}",
            ]
        rows.append(row)
    header = ["lr", "init scale"]
    for norm in NORMS:
        name = _NAMES[norm]
        header += [f"train loss ({name})", f"test acc ({name})", f"trains well ({name})"]
    table = report.markdown_table(header, rows)
    figures = [_grid_figure(config, results, good, out), _lr_figure(config, results, best, out)]
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        "Batch norm is said to make training far less sensitive to the learning rate and to the scale of the "
        "initial weights. Here both networks (with and without BN) are trained at every learning rate and "
        f"init scale of a {len(config.lrs)} x {len(config.init_scales)} grid, {n_seeds} times (seeds); a "
        f"grid point 'trains well' at a seed when it did not diverge and reached at least "
        f"{config.good_fraction:.0%} of that seed's best test accuracy anywhere on either grid. The claims "
        "compare, seed by seed, how many grid points train well and how many diverge, BN against none, and "
        f"decide on the 95% interval of that difference over seeds. {held} of {len(claims)} claims held for "
        f"the {config.model}."
    )
    lr_text = ", ".join(f"{v:g}" for v in config.lrs)
    setting = report.setting(
        model=_describe(config),
        data=f"{ds.name}, {ds.x_train.shape[0]} training examples (minibatches of {config.batch_size}), "
        f"{ds.x_test.shape[0]} test",
        loss=config.loss.replace("_", "-"),
        optimizer=f"SGD at each learning rate of ({lr_text})",
        steps=config.steps,
        seeds=config.seeds,
        init_scales=", ".join(f"{v:g}" for v in config.init_scales) + " x the He/LeCun std",
        norms="none, bn",
    )
    notes = [
        f"{config.steps} SGD steps, batch {config.batch_size}; at each seed every grid point uses the same "
        "minibatch sequence and the same initialization up to the scale.",
        "Table cells: mean over the seeds that finished [95% interval]; a seed whose loss became non-finite "
        "is diverged, left out of the mean and counted in the cell.",
        "Best test accuracy per seed (over both grids): " + ", ".join(f"{b:.3f}" for b in best) + ".",
    ]
    results_json = {
        "grid": [{"lr": lr, "init_scale": s} for lr, s in grid],
        "seeds": list(config.seeds),
        "best_test_accuracy": best,
        "good_counts": {n: g.sum(axis=0) for n, g in good.items()},
        "effects": effects,
        **{norm: r for norm, r in results.items()},
    }
    return report.Outcome(results_json, claims, [table], figures, notes, setting, reading, CLAIM_RULE)


def _grid_figure(config: Config, results: dict, good: dict, out: pathlib.Path) -> str:
    """Mean test accuracy over the grid per normalization; each cell says how many seeds trained well or
    diverged."""
    shape = (len(config.lrs), len(config.init_scales))
    n_seeds = len(config.seeds)
    fig, axes = report.figure(ncols=len(NORMS), size=(4.4, 3.8))
    for ax, norm in zip(axes, NORMS):
        r = results[norm]
        with np.errstate(invalid="ignore"):
            finished = np.isfinite(r["test_accuracy"])
            acc = np.sum(np.where(finished, r["test_accuracy"], 0.0), axis=1) / np.maximum(finished.sum(axis=1), 1)
        acc = acc.reshape(shape)
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        div = r["diverged"].sum(axis=1).reshape(shape)
        ok = good[norm].sum(axis=1).reshape(shape)
        for i, j in itertools.product(range(shape[0]), range(shape[1])):
            text = f"{acc[i, j]:.2f}\nwell {ok[i, j]}/{n_seeds}"
            if div[i, j]:
                text = (f"{acc[i, j]:.2f}\n" if div[i, j] < n_seeds else "") + f"div {div[i, j]}/{n_seeds}"
            ax.text(j, i, text, ha="center", va="center", color="w", fontsize=6)
        ax.set(
            title=f"test accuracy (mean over seeds), {_NAMES[norm]}",
            xticks=range(shape[1]),
            xticklabels=[f"{s:g}" for s in config.init_scales],
            yticks=range(shape[0]),
            yticklabels=[f"{lr:g}" for lr in config.lrs],
            xlabel="init scale",
            ylabel="learning rate",
        )
        fig.colorbar(im, ax=ax)
    return report.save_figure(fig, out, "robustness.png")


def _lr_figure(config: Config, results: dict, best: np.ndarray, out: pathlib.Path) -> str:
    """Test accuracy against the learning rate, one panel per init scale, seed bands; diverged runs marked."""
    shape = (len(config.lrs), len(config.init_scales), len(config.seeds))
    fig, axes = report.figure(ncols=len(config.init_scales), size=(3.8, 3.2))
    lrs = np.asarray(config.lrs)
    good_at = config.good_fraction * float(np.mean(best[np.isfinite(best)])) if np.isfinite(best).any() else 0.0
    for j, (ax, scale) in enumerate(zip(axes, config.init_scales)):
        for i, norm in enumerate(NORMS):
            r = results[norm]
            acc = r["test_accuracy"].reshape(shape)[:, j, :].T  # [seeds, lrs]
            report.seed_band(ax, lrs, acc, label=_NAMES[norm], color=f"C{i}", marker=".")
            div = r["diverged"].reshape(shape)[:, j, :].sum(axis=1)
            for k in np.flatnonzero(div):
                label = f"{_NAMES[norm]} lr {lrs[k]:g} ({div[k]}/{len(config.seeds)} seeds)"
                report.mark_diverged(ax, lrs[k], 0.0, label, color=f"C{i}")
        report.threshold_line(ax, good_at, f"trains well ({config.good_fraction:.0%} of mean best)")
        ax.set(title=f"init scale {scale:g}", xlabel="learning rate", ylabel="test accuracy", xscale="log")
        ax.set_ylim(-0.05, 1.05)
        report.legend(ax)
    return report.save_figure(fig, out, "accuracy_vs_lr.png")
