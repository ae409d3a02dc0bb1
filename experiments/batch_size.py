"""Batch size and BN's implicit regularization (Luo, Wang, Shao, Peng 2018, "Towards understanding
regularization in batch normalization").

A conv net trained with SGD + momentum at several batch sizes, with no normalization, BN, and ghost BN (BN
over fixed sub-batches of ``ghost_size``, :class:`bnjax.BatchNorm`'s ``virtual_batch_size``), over seeds run
as one vmapped batch. As in LWSP18 the learning rate is scaled linearly with the batch size (Goyal et al.
2017) and every batch size trains for the same number of epochs, so the gradient noise of SGD is about the
same at every batch size and what changes is the noise of BN's batch statistics. LWSP18: BN's regularization
comes from that noise and weakens as the batch grows (its strength is inversely proportional to the batch
size), so BN's generalization gap widens and its advantage shrinks at large batches, and BN works best with
moderate batches; ghost BN keeps the small-batch noise at any batch size and is the control. Claims are judged
on per-seed differences (and slopes over log2 batch size) by the interval rule of :mod:`experiments.stats`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data as data_lib
from experiments import models, progress, report, stats, train

VARIANTS = ("none", "bn", "ghost")
MODERATE = (32, 128)  # LWSP18: BN works best with batches of about 50-100


@dataclasses.dataclass(frozen=True)
class Config:
    """Train/test accuracy and generalization gap vs batch size: none vs BN vs ghost BN, over seeds (LWSP18).

    Command: ``python -m experiments batch_size`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: BN's generalization gap (train - test accuracy) widens as the batch grows and its test
    accuracy advantage over no BN shrinks; BN is best at moderate batches (32-128); at the largest batch
    ghost BN (sub-batches of ``ghost_size``) has a higher test accuracy than BN.

    Model: ``model`` (``cnn1d``, the default: a conv net as LWSP18's ResNet, on MNIST-1D; ``vgg`` for image
    data such as ``--dataset digits``; ``mlp`` with ``hidden``) with ``activation``. SGD with momentum
    ``momentum``; learning rate ``lr`` at batch ``base_batch``, scaled linearly with the batch size
    (``lr_scaling="linear"``, LWSP18 after Goyal et al. 2017; ``"none"``: ``lr`` at every batch size), with a
    linear warm-up over ``warmup_epochs`` and a cosine decay to 0; ``epochs`` passes over the training set at
    every batch size (steps = epochs x examples / batch), checked for divergence ``segments`` times per
    run. One run per seed in ``seeds`` (vmapped). Ghost BN normalizes sub-batches of ``ghost_size`` (which
    must divide every batch size above it; at batch sizes up to ``ghost_size`` ghost BN is BN and is not
    run). Accuracies in eval mode with the population statistics of the training set (precise BN: one
    train-mode pass over the whole training set), so that the EWMA of a short large-batch run does not count.
    Differences from LWSP18: MNIST-1D (or 8x8 digits) instead of CIFAR-10/ImageNet, a 3-layer CNN instead
    of ResNet-18, cosine decay instead of their continuous decay, no weight decay or augmentation, batch sizes
    up to an eighth of the 4000 training examples.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "cnn1d"
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    ghost_size: int = 32
    lr: float = 0.1
    base_batch: int = 128
    lr_scaling: str = "linear"
    momentum: float = 0.9
    epochs: int = 30
    warmup_epochs: float = 2.0
    segments: int = 4
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), batch_sizes=(16, 64, 256), epochs=10, warmup_epochs=1.0),
    "smoke": dataclasses.replace(
        Config(),
        model="mlp",
        hidden=(16,),
        batch_sizes=(32, 128),
        ghost_size=16,
        epochs=1,
        warmup_epochs=0.0,
        segments=1,
    ),
}
CHOICES = {"model": models.FAMILIES, "lr_scaling": ("linear", "none"), "loss": train.LOSSES}
# The claims matrix (python -m experiments claims): the Config overrides per architecture family.
# Measured 2026-12-04 (2 CPU cores, load ~1.5, 3 seeds; experiments/results/claims-{quick,full}): quick mlp 20 s,
# cnn1d 23 s, vgg 33 s (compile-bound: each batch size has its own shapes); full 49 s, 64 s, 77 s.
MATRIX = {
    "mlp": {
        "quick": {"model": "mlp", "batch_sizes": (16, 64, 256), "epochs": 2, "warmup_epochs": 0.25},
        "full": {"model": "mlp", "batch_sizes": (16, 32, 64, 128, 256), "epochs": 6},
    },
    "cnn1d": {
        "quick": {"model": "cnn1d", "batch_sizes": (16, 64, 256), "epochs": 2, "warmup_epochs": 0.25},
        "full": {"model": "cnn1d", "batch_sizes": (16, 32, 64, 128, 256), "epochs": 6},
    },
    "vgg": {
        "quick": {
            "model": "vgg",
            "dataset": "digits",
            "batch_sizes": (16, 64, 256),
            "epochs": 2,
            "warmup_epochs": 0.25,
        },
        "full": {"model": "vgg", "dataset": "digits", "batch_sizes": (16, 32, 64, 128, 256), "epochs": 6},
    },
}


def check(config: Config, n_train: int | None = None) -> None:
    """The configuration's checks (``n_train``, the training set's size, for the ones that need it)."""
    if config.model not in models.FAMILIES:
        raise ValueError(f"model must be one of {models.FAMILIES} for this experiment, got {config.model!r}.")
    if config.loss not in train.LOSSES:
        raise ValueError(f"loss must be one of {train.LOSSES}, got {config.loss!r}.")
    if config.lr_scaling not in CHOICES["lr_scaling"]:
        raise ValueError(f"lr_scaling must be one of {CHOICES['lr_scaling']}, got {config.lr_scaling!r}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name distinct seeds, at least one, got {config.seeds}.")
    sizes = config.batch_sizes
    if len(sizes) < 2 or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"batch_sizes must be at least two increasing batch sizes, got {sizes}.")
    if sizes[0] < 2 or (n_train is not None and sizes[-1] > n_train):
        raise ValueError(f"batch_sizes must lie in [2, {n_train}] (BN needs 2 examples; {n_train} to draw from).")
    if not 2 <= config.ghost_size < sizes[-1]:
        raise ValueError(
            f"ghost_size must be >= 2 and below the largest batch size ({sizes[-1]}), got {config.ghost_size}."
        )
    bad = [b for b in sizes if b > config.ghost_size and b % config.ghost_size]
    if bad:
        raise ValueError(
            f"ghost_size={config.ghost_size} must divide every batch size above it; it does not divide {bad}."
        )
    if config.lr <= 0 or config.base_batch < 1 or not 0 <= config.momentum < 1:
        raise ValueError(
            f"need lr > 0, base_batch >= 1 and momentum in [0, 1); got lr={config.lr}, "
            f"base_batch={config.base_batch}, momentum={config.momentum}."
        )
    if config.epochs < 1 or not 0 <= config.warmup_epochs < config.epochs:
        raise ValueError(
            f"need epochs >= 1 and 0 <= warmup_epochs < epochs; got epochs={config.epochs}, "
            f"warmup_epochs={config.warmup_epochs}."
        )
    if config.segments < 1:
        raise ValueError(f"segments must be >= 1, got {config.segments}.")
    if n_train is not None and config.segments > math.ceil(config.epochs * n_train / sizes[-1]):
        raise ValueError(
            f"segments ({config.segments}) must not exceed the steps of the largest batch's run "
            f"({math.ceil(config.epochs * n_train / sizes[-1])}): each segment takes at least one step."
        )


def schedule(config: Config, batch_size: int, n_train: int) -> tuple[float, int, optax.Schedule]:
    """``(peak learning rate, steps, schedule)`` of the run at ``batch_size``: ``epochs`` passes (rounded up
    to a multiple of ``segments`` steps), the learning rate scaled by ``lr_scaling``, warm-up then cosine."""
    peak = config.lr * (batch_size / config.base_batch if config.lr_scaling == "linear" else 1.0)
    per_segment = max(1, math.ceil(config.epochs * n_train / batch_size / config.segments))
    steps = per_segment * config.segments
    warmup = round(config.warmup_epochs * n_train / batch_size)
    if 0 < warmup < steps:
        return peak, steps, optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps)
    return peak, steps, optax.cosine_decay_schedule(peak, steps)


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every (batch size, variant) pair over the seeds and measure train/test accuracy."""
    ds = data_lib.load(config.dataset, config.data_seed)
    n = ds.x_train.shape[0]
    check(config, n)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    specs = [(b, v) for b in config.batch_sizes for v in VARIANTS if v != "ghost" or b > config.ghost_size]
    with progress.StepBar(sum(schedule(config, b, n)[1] for b, _ in specs), "batch_size") as bar:
        runs = [_one_run(config, b, v, ds, x, y, bar) for b, v in specs]
    return _outcome(config, ds, runs, out)


def _one_run(config: Config, batch_size: int, variant: str, ds, x, y, bar) -> dict:
    n = x.shape[0]
    peak, steps, lr_schedule = schedule(config, batch_size, n)
    # Ghost BN changes train mode only: the variables are those of plain BN, which initializes and evaluates them.
    model = models.family_model(
        config.model,
        "none" if variant == "none" else "bn",
        ds.num_classes,
        hidden=config.hidden,
        activation=config.activation,
    )
    train_model = model.clone(virtual_batch_size=config.ghost_size) if variant == "ghost" else model
    optimizer = optax.sgd(lr_schedule, momentum=config.momentum)
    state = train.init_seed_states(model, x[:2], optimizer, config.seeds)
    runner = train.minibatch_runner(
        train.make_train_step(train_model, config.loss, optimizer), batch_size, over_seeds=True
    )
    entry: dict = {"batch_size": batch_size, "variant": variant, "lr": peak, "steps": steps}
    label = f"batch {batch_size} {variant}"
    try:
        log = train.train_in_segments(
            runner, state, x, y, num_steps=steps, every=steps // config.segments, bar=bar, label=label
        )
    except train.Diverged as err:
        nan = np.full(len(config.seeds), np.nan)
        entry.update(diverged=str(err), diverged_at=[0] * len(config.seeds))
        entry.update({k: nan for k in ("train_accuracy", "test_accuracy", "train_loss", "test_loss", "gap")})
        return entry
    finished = log.diverged_at < 0
    metrics = _evaluate(model, config.loss, log.state, x, y, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    for key, value in metrics.items():
        entry[key] = np.where(finished, np.asarray(value, np.float64), np.nan)
    entry["gap"] = entry["train_accuracy"] - entry["test_accuracy"]
    entry["diverged_at"] = log.diverged_at.tolist()
    return entry


def _evaluate(model, loss: str, state: train.TrainState, x, y, x_test, y_test) -> dict:
    """Per-seed eval-mode loss and accuracy on the train and test sets, with the population statistics of the
    training set: one train-mode pass over all of it with momentum 0 (the running statistics become that
    batch's), which for a net whose BN layers see each example once is exactly precise BN."""
    return _evaluator(model, loss)(state.params, state.batch_stats, x, y, x_test, y_test)


@functools.lru_cache(maxsize=8)
def _evaluator(model, loss: str):
    """The jitted, seed-vmapped evaluation of ``model`` (compiled once per model: every batch size reuses it)."""
    population = model.clone(momentum=0.0)

    def one(params, batch_stats, x, y, x_test, y_test):
        _, updates = population.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        pop_stats = updates.get("batch_stats", {})
        train_loss, train_acc = train.eval_metrics(model, loss, params, pop_stats, x, y)
        test_loss, test_acc = train.eval_metrics(model, loss, params, pop_stats, x_test, y_test)
        return {
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "train_loss": train_loss,
            "test_loss": test_loss,
        }

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, None, None)))


def _series(runs: list[dict], variant: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(batch sizes, values[seeds, batch sizes])`` of ``variant``'s ``key``."""
    chosen = [r for r in runs if r["variant"] == variant]
    return np.array([r["batch_size"] for r in chosen]), np.stack([r[key] for r in chosen], axis=1)


def _slopes(sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-seed least-squares slope of ``values[seeds, batch sizes]`` over log2(batch size) (NaN for a seed
    with a diverged point)."""
    t = np.log2(sizes.astype(np.float64))
    t = t - t.mean()
    return values @ t / np.sum(t**2)


def _pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def format_points(iv: stats.Interval, unit: str = "pp") -> str:
    """A difference of accuracies in percentage points: ``+1.2 pp [+0.3, +2.1]`` (``+1.2 pp`` with one seed)."""
    if iv.n == 0:
        return "no seed finished"
    if iv.n == 1:
        return f"{_pp(iv.mean)} {unit} (1 seed)"
    return f"{_pp(iv.mean)} {unit} [{_pp(iv.low)}, {_pp(iv.high)}]"


def percent_cell(values: np.ndarray) -> str:
    """Mean accuracy over seeds [95% interval]: ``92.3% [91.0%, 93.6%]``."""
    iv = stats.interval(values)
    if iv.n == 0:
        return "diverged"
    if iv.n == 1:
        return f"{100 * iv.mean:.1f}%"
    return f"{100 * iv.mean:.1f}% [{100 * iv.low:.1f}%, {100 * iv.high:.1f}%]"


CLAIM_RULE = (
    "over the seeds, the per-seed differences (or slopes over log2 batch size) give a mean and a 95% Student-t "
    "interval; a claim is held when the whole interval lies on the claimed side of 0 (stated with each claim), "
    "not held when it lies wholly on the other side, and inconclusive when it contains 0 or fewer than 2 seeds "
    "finished; 'moderate batches are best' needs both of its differences held (not held when either is not "
    "held); a seed that diverged at a batch size drops out of the differences that use that batch size"
)


def _difference_claim(claim: str, what: str, values: np.ndarray, claimed: str, unit: str = "pp") -> tuple:
    iv = stats.interval(values)
    verdict = stats.interval_verdict(iv, claimed, at=0.0)
    return report.Claim(claim, f"{what}: {format_points(iv, unit)}", verdict, effect=format_points(iv, unit)), iv


def _claims(config: Config, runs: list[dict]) -> tuple[list[report.Claim], dict]:
    sizes, bn_gap = _series(runs, "bn", "gap")
    _, bn_test = _series(runs, "bn", "test_accuracy")
    _, none_test = _series(runs, "none", "test_accuracy")
    _, none_gap = _series(runs, "none", "gap")
    claims, effects = [], {}

    none_slope = stats.interval(_slopes(sizes, none_gap))
    claim, iv = _difference_claim(
        "LWSP18: BN's regularization weakens as the batch grows, so its generalization gap (train - test "
        "accuracy) widens (claimed: slope > 0)",
        f"slope of BN's gap over log2 batch size (no BN: {format_points(none_slope, 'pp per doubling')})",
        _slopes(sizes, bn_gap),
        "above",
        "pp per doubling",
    )
    claims.append(claim)
    effects["gap_slope"] = iv._asdict()

    claim, iv = _difference_claim(
        "LWSP18: BN's test-accuracy advantage over no BN shrinks as the batch grows (claimed: slope < 0)",
        "slope of BN - none test accuracy over log2 batch size",
        _slopes(sizes, bn_test - none_test),
        "below",
        "pp per doubling",
    )
    claims.append(claim)
    effects["advantage_slope"] = iv._asdict()

    low, high = MODERATE
    moderate = (sizes >= low) & (sizes <= high)
    text = f"LWSP18: BN works best with moderate batches ({low}-{high}; claimed: both differences > 0)"
    if not (moderate.any() and (sizes < low).any() and (sizes > high).any()):
        claims.append(
            report.Claim(text, f"needs batch sizes below {low}, in {low}-{high} and above {high}", "inconclusive", "–")
        )
    else:
        mid = np.mean(bn_test[:, moderate], axis=1)
        d_small = stats.interval(mid - np.mean(bn_test[:, sizes < low], axis=1))
        d_large = stats.interval(mid - np.mean(bn_test[:, sizes > high], axis=1))
        verdicts = [stats.interval_verdict(iv, "above", at=0.0) for iv in (d_small, d_large)]
        verdict = "held" if verdicts == ["held", "held"] else "not held" if "not held" in verdicts else "inconclusive"
        claims.append(
            report.Claim(
                text,
                f"BN test accuracy, mean over batches {low}-{high} minus mean over smaller batches: "
                f"{format_points(d_small)}; minus mean over larger batches: {format_points(d_large)}",
                verdict,
                effect=f"vs smaller {format_points(d_small)}; vs larger {format_points(d_large)}",
            )
        )
        effects["moderate_vs_smaller"], effects["moderate_vs_larger"] = d_small._asdict(), d_large._asdict()

    ghost = next(r for r in runs if r["variant"] == "ghost" and r["batch_size"] == sizes[-1])
    bn_last = next(r for r in runs if r["variant"] == "bn" and r["batch_size"] == sizes[-1])
    claim, iv = _difference_claim(
        f"Control: at the largest batch ({sizes[-1]}) ghost BN (sub-batches of {config.ghost_size}) recovers "
        "small-batch regularization (claimed: ghost - BN test accuracy > 0)",
        f"ghost - BN test accuracy at batch {sizes[-1]}",
        ghost["test_accuracy"] - bn_last["test_accuracy"],
        "above",
    )
    claims.append(claim)
    effects["ghost_vs_bn"] = iv._asdict()
    return claims, effects


def _outcome(config: Config, ds, runs: list[dict], out: pathlib.Path) -> report.Outcome:
    claims, effects = _claims(config, runs)
    fig, axes = report.figure(ncols=3)
    for i, variant in enumerate(VARIANTS):
        color = f"C{i}"
        sizes, test = _series(runs, variant, "test_accuracy")
        _, gap = _series(runs, variant, "gap")
        report.seed_band(axes[0], sizes, 100 * test, label=variant, color=color, marker="o")
        report.seed_band(axes[1], sizes, 100 * gap, label=variant, color=color, marker="o")
    for i, variant in enumerate(VARIANTS):  # after the bands, so that the marks sit at the bottom of each panel
        for r in (r for r in runs if r["variant"] == variant):
            lost = sum(d >= 0 for d in r["diverged_at"])
            if lost:
                label = f"{variant} batch {r['batch_size']} ({lost} of {len(config.seeds)} seeds)"
                for ax in axes[:2]:
                    report.mark_diverged(ax, r["batch_size"], ax.get_ylim()[0], label, color=f"C{i}")
    axes[0].set(title="test accuracy (%)", xlabel="batch size", xscale="log")
    axes[1].set(title="generalization gap: train - test accuracy (pp)", xlabel="batch size", xscale="log")
    names = ("gap_slope", "advantage_slope", "moderate_vs_smaller", "moderate_vs_larger", "ghost_vs_bn")
    shown = [n for n in names if n in effects]
    for k, name in enumerate(shown):
        iv = effects[name]
        lo, hi = iv["mean"] - iv["low"], iv["high"] - iv["mean"]
        err = [[lo], [hi]] if math.isfinite(lo) and math.isfinite(hi) else None
        axes[2].errorbar([k], [100 * iv["mean"]], yerr=None if err is None else 100 * np.array(err), fmt="o", capsize=4)
    report.threshold_line(axes[2], 0.0, "no effect")
    axes[2].set(title="claim effects, mean [95% interval] (pp; slopes pp per doubling)", xticks=range(len(shown)))
    axes[2].set_xticklabels([n.replace("_", " ") for n in shown], rotation=20, fontsize=7)
    for ax in axes:
        report.legend(ax)
    figures = [report.save_figure(fig, out, "batch_size.png")]

    rows = []
    for r in runs:
        lost = sum(d >= 0 for d in r["diverged_at"])
        rows.append(
            [
                r["batch_size"],
                r["variant"],
                f"{r['lr']:.3g}",
                r["steps"],
                percent_cell(r["train_accuracy"]),
                percent_cell(r["test_accuracy"]),
                "diverged" if stats.interval(r["gap"]).n == 0 else format_points(stats.interval(r["gap"])),
                stats.format_mean(r["test_loss"]),
                f"{lost} of {len(config.seeds)}",
            ]
        )
    table = report.markdown_table(
        ["batch size", "variant", "peak lr", "steps", "train acc", "test acc", "gap", "test loss", "seeds diverged"],
        rows,
    )
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        "LWSP18 argue that batch norm regularizes because each example is normalized with the statistics of a "
        "random batch, a noise whose strength falls as the batch grows; with the learning rate scaled with the "
        "batch size (so that SGD's own noise stays about the same), larger batches should then leave BN with "
        "less regularization: a wider gap between train and test accuracy, a smaller advantage over an "
        "unnormalized net, and ghost BN (statistics over small sub-batches) should win back the lost accuracy "
        f"at the largest batch. Here {held} of {len(claims)} claims held for the {config.model} over "
        f"{len(config.seeds)} seeds: each 'measured' entry is a mean over seeds with its 95% interval, in "
        "percentage points (pp) of accuracy; an interval wholly on the claimed side of 0 is a reproducible "
        "effect, one that contains 0 cannot be told from seed noise."
    )
    n = ds.x_train.shape[0]
    steps = ", ".join(f"{schedule(config, b, n)[1]} at {b}" for b in config.batch_sizes)
    scaling = f"x batch/{config.base_batch}" if config.lr_scaling == "linear" else "at every batch size"
    setting = report.setting(
        model=models.describe_family(config.model, hidden=config.hidden, activation=config.activation),
        data=f"{ds.name}, {n} training / {ds.x_test.shape[0]} test examples",
        loss=config.loss.replace("_", "-"),
        optimizer=f"SGD, momentum {config.momentum:g}, peak lr {config.lr:g} {scaling}, warm-up "
        f"{config.warmup_epochs:g} epochs then cosine decay",
        steps=f"{config.epochs} epochs per run ({steps})",
        seeds=config.seeds,
        batch_sizes=", ".join(str(b) for b in config.batch_sizes),
        variants=f"none, BN, ghost BN (sub-batches of {config.ghost_size}, run at batches above it)",
        evaluation="eval mode with the training set's population statistics (precise BN)",
    )
    notes = [
        "Each table cell is the mean over seeds [95% interval]; gaps and differences in percentage points (pp).",
        "Slopes: per seed, the least-squares slope over log2(batch size), i.e. the change per doubling of the batch.",
        f"Ghost BN at batch sizes up to {config.ghost_size} would be BN itself and is not run.",
        "Differences from LWSP18: MNIST-1D (or digits) instead of CIFAR-10/ImageNet, a small conv net instead of "
        "ResNet-18, cosine decay, no weight decay or augmentation.",
    ]
    results = {"runs": runs, "effects": effects}
    return report.Outcome(results, claims, [table], figures, notes, setting, reading, CLAIM_RULE)
