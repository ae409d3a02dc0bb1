"""Train vs inference statistics: eval accuracy vs the BN momentum, and with precise population statistics.

A BN network trained with minibatch SGD, over seeds run as one vmapped batch; the BN momentum only changes
the running statistics (train mode normalizes with batch statistics), so every momentum follows the same
parameter trajectory at a given seed and differs only in what eval mode uses. Each trained model is evaluated
with (a) its EWMA running statistics, (b) precise population statistics recomputed over the training set
(:func:`bnjax.precise.precise_batch_stats`, Wu & Johnson 2021), (c) the statistics of the evaluated batch
itself ("test local stats"). Momenta are given in Flax's convention (weight of the old value) and PyTorch's
(weight of the latest batch; ``none`` = cumulative average), through :class:`bnjax.BatchNorm`'s
``convention``. The claims are judged on per-seed accuracy differences by :data:`CLAIM_RULE`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnjax.precise import precise_batch_stats
from experiments import data as data_lib
from experiments import models, progress, report, stats, train

# "At least as good": precise minus EWMA test accuracy above this (one point of accuracy) at every momentum.
NO_WORSE_BY = -0.01
STATISTICS = (("ewma", "EWMA running stats"), ("precise", "precise population stats"), ("local", "test-batch stats"))


@dataclasses.dataclass(frozen=True)
class Config:
    """Eval accuracy vs BN momentum (Flax and PyTorch conventions) and with precise BN statistics, over seeds.

    Command: ``python -m experiments inference_stats`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: the EWMA statistics cost eval accuracy where they are poor (Flax 0.999: stale statistics
    of earlier weights; PyTorch ``None``: the cumulative average over all of training) and precise statistics
    recover it, with the 95% interval over seeds of the gain above 0; elsewhere precise statistics are within
    one point of accuracy of the EWMA; PyTorch ``momentum=0.1`` gives the same running means as Flax ``0.9``.

    Model: ``model`` (``cnn1d``, the default: a conv net, as Wu & Johnson's ResNets; ``vgg`` for image data
    such as ``--dataset digits``; ``mlp`` with ``hidden``), ReLU, BN after every layer; SGD + momentum 0.9,
    learning rate ``lr``, batch ``batch_size``, ``steps`` steps, one run per seed in ``seeds`` (vmapped), the
    same seeds for every momentum. Precise statistics over the whole training set in batches of
    ``precise_batch_size``. Differences from Wu & Johnson 2021: MNIST-1D (or 8x8 digits) instead of ImageNet,
    a 3-layer CNN instead of ResNet-50, fewer steps.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "cnn1d"
    hidden: tuple[int, ...] = (256, 256, 256)
    flax_momenta: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    torch_momenta: tuple[str, ...] = ("0.1", "none")
    lr: float = 0.05
    batch_size: int = 32
    steps: int = 3000
    segment: int = 500
    precise_batch_size: int = 500
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), flax_momenta=(0.9, 0.999), steps=1000, segment=500),
    "smoke": dataclasses.replace(
        Config(),
        model="mlp",
        hidden=(16,),
        seeds=(0, 1),
        flax_momenta=(0.9,),
        torch_momenta=("0.1",),
        steps=20,
        segment=10,
        precise_batch_size=1000,
    ),
}
_QUICK = {"flax_momenta": (0.9, 0.999), "steps": 1000, "segment": 500}
_VGG = {"model": "vgg", "dataset": "digits"}
# The claims matrix (experiments.claims). Quick: Flax 0.9 / 0.999 and PyTorch 0.1 / None over 3 seeds, 1000 steps
# (the VGG on 8x8 digits 500 steps; its 1437 training images are 11 epochs of batch 32). Full: every momentum,
# 3000 steps (VGG 1500). Measured 2026-12-04 (2 CPU cores, load ~1.5; experiments/results/claims-{quick,full}):
# quick mlp 42 s, cnn1d 45 s, vgg 65 s; full 151 s, 161 s, 170 s.
MATRIX = {
    "mlp": {"quick": {"model": "mlp", **_QUICK}, "full": {"model": "mlp"}},
    "cnn1d": {"quick": {"model": "cnn1d", **_QUICK}, "full": {"model": "cnn1d"}},
    "vgg": {
        "quick": {**_VGG, **_QUICK, "steps": 500, "segment": 250},
        "full": {**_VGG, "steps": 1500},
    },
}
CHOICES = {"model": models.FAMILIES, "loss": train.LOSSES}

CLAIM_RULE = (
    "per momentum, the per-seed differences precise - EWMA test accuracy give a mean and a 95% Student-t "
    "interval; 'fixes the gap' is held when at every momentum whose EWMA is poor (Flax 0.999, PyTorch None) "
    "the interval lies above 0, not held when it lies below 0 at one, inconclusive otherwise; 'at least as "
    f"good' is held when at every momentum the interval lies above {NO_WORSE_BY:+.2f}, not held when it lies "
    "below it at one, inconclusive otherwise (fewer than 2 finished seeds: inconclusive); the two conventions "
    "agree when the running means of every BN layer differ by less than 1e-4 at every seed"
)


def _runs(config: Config) -> list[tuple[str, float | None]]:
    torch = [("torch", None if m.lower() == "none" else float(m)) for m in config.torch_momenta]
    return [("flax", m) for m in config.flax_momenta] + torch


def _label(convention: str, momentum: float | None) -> str:
    return f"{convention} momentum={'None' if momentum is None else f'{momentum:g}'}"


def _poor(convention: str, momentum: float | None) -> bool:
    """The momenta whose EWMA averages over far more steps than the weights stay still for (the claim's)."""
    return (convention == "flax" and momentum is not None and momentum >= 0.999) or (
        convention == "torch" and momentum is None
    )


def check(config: Config) -> None:
    if config.model not in models.FAMILIES:
        raise ValueError(f"model must be one of {models.FAMILIES} for this experiment, got {config.model!r}.")
    if len(config.seeds) < 1 or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name distinct seeds, at least one, got {config.seeds}.")
    if config.loss not in train.LOSSES:
        raise ValueError(f"loss must be one of {train.LOSSES}, got {config.loss!r}.")
    for m in config.torch_momenta:
        if m.lower() != "none":
            try:
                value = float(m)
            except ValueError:
                raise ValueError(f"torch_momenta must be numbers or 'none', got {m!r}.") from None
            if not 0 <= value <= 1:  # PyTorch's momentum weighs the new batch: in [0, 1]
                raise ValueError(f"torch_momenta must be in [0, 1] or 'none', got {m!r}.")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}.")
    if config.precise_batch_size < 1:
        raise ValueError(f"precise_batch_size must be >= 1, got {config.precise_batch_size}.")
    if not _runs(config):
        raise ValueError("flax_momenta and torch_momenta are both empty: nothing to run.")
    if config.segment < 1 or config.steps < config.segment or config.steps % config.segment:
        raise ValueError(f"steps ({config.steps}) must be a positive multiple of segment ({config.segment}).")


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train one model per (convention, momentum) over the seeds and evaluate each seed three ways."""
    check(config)
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    batches = [x[i : i + config.precise_batch_size] for i in range(0, x.shape[0], config.precise_batch_size)]
    results = []
    specs = _runs(config)
    with progress.StepBar(len(specs) * config.steps, "inference_stats") as bar:
        for convention, momentum in specs:
            model = models.family_model(
                config.model,
                "bn",
                ds.num_classes,
                hidden=config.hidden,
                activation="relu",
                momentum=momentum,
                convention=convention,
            )
            optimizer = optax.sgd(config.lr, momentum=0.9)
            state = train.init_seed_states(model, x[:2], optimizer, config.seeds)
            step = train.make_train_step(model, config.loss, optimizer)
            runner = train.minibatch_runner(step, config.batch_size, over_seeds=True)
            label = _label(convention, momentum)
            entry: dict = {"convention": convention, "momentum": momentum, "label": label}
            try:
                log = train.train_in_segments(
                    runner, state, x, y, num_steps=config.steps, every=config.segment, bar=bar, label=label
                )
            except train.Diverged as err:
                entry.update(_diverged(config, str(err)))
                results.append(entry)
                continue
            entry["diverged_at"] = log.diverged_at.tolist()
            per_seed = [
                _evaluate_seed(
                    model, config, jax.tree.map(lambda a, s=s: a[s], log.state), batches, (x, y, x_test, y_test)
                )
                for s in range(len(config.seeds))
            ]
            for key in per_seed[0]:
                entry[key] = np.asarray([p[key] for p in per_seed], np.float64)
            entry["running_means"] = [_running_means(bs) for bs in _stats_per_seed(log.state)]
            results.append(entry)
    return _outcome(config, ds, results, out)


def _diverged(config: Config, message: str) -> dict:
    nan = np.full(len(config.seeds), np.nan)
    out = {f"{split}_accuracy_{name}": nan for split in ("test", "train") for name, _ in STATISTICS}
    return {**out, "param_checksum": nan, "diverged": message, "diverged_at": [0] * len(config.seeds)}


def _stats_per_seed(state: train.TrainState) -> list:
    num = jax.tree.leaves(state.params)[0].shape[0]
    return [jax.tree.map(lambda a, s=s: np.asarray(a[s]), state.batch_stats) for s in range(num)]


def _running_means(batch_stats) -> np.ndarray:
    """Every BN layer's running mean, concatenated in the tree's order (the conventions are compared on it)."""
    flat = jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    means = [np.ravel(v) for path, v in flat if getattr(path[-1], "key", None) == "mean"]
    return np.concatenate(means) if means else np.zeros(0)


def _evaluate_seed(model, config: Config, state: train.TrainState, batches, data) -> dict:
    """One seed's accuracies with the three kinds of statistics (NaN when the seed's weights are not finite)."""
    x, y, x_test, y_test = data
    params, ewma = state.params, state.batch_stats
    checksum = float(sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params)))
    out: dict = {"param_checksum": checksum}
    if not np.isfinite(checksum):
        return {**out, **{f"{s}_accuracy_{n}": np.nan for s in ("test", "train") for n, _ in STATISTICS}}
    precise = precise_batch_stats(
        lambda v, b: model.apply(v, b, train=False), {"params": params, "batch_stats": ewma}, batches, progress=False
    )
    for name, batch_stats in (("ewma", ewma), ("precise", precise)):
        out[f"test_accuracy_{name}"] = train.evaluate(model, params, batch_stats, x_test, y_test, config.loss)[1]
        out[f"train_accuracy_{name}"] = train.evaluate(model, params, batch_stats, x, y, config.loss)[1]
    for split, (xs, ys) in (("test", (x_test, y_test)), ("train", (x, y))):
        out[f"{split}_accuracy_local"] = train.evaluate(model, params, ewma, xs, ys, config.loss, train=True)[1]
    return out


def format_difference(iv: stats.Interval) -> str:
    """``+0.038 [+0.021, +0.055]`` (accuracy differences, three decimals; no interval with one seed)."""
    if iv.n == 0:
        return "–"
    if iv.n == 1:
        return f"{iv.mean:+.3f}"
    return f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def _gaps(results: list[dict]) -> list[tuple[dict, stats.Interval]]:
    return [(r, stats.interval(r["test_accuracy_precise"] - r["test_accuracy_ewma"])) for r in results]


def _combine(verdicts: list[str]) -> str:
    if not verdicts:
        return "inconclusive"
    if all(v == "held" for v in verdicts):
        return "held"
    return "not held" if "not held" in verdicts else "inconclusive"


def _claims(results: list[dict]) -> list[report.Claim]:
    gaps = _gaps(results)
    claims = []
    poor = [(r, iv) for r, iv in gaps if _poor(r["convention"], r["momentum"])]
    if poor:
        claims.append(
            report.Claim(
                "Wu & Johnson 2021: precise population statistics fix the train/eval gap where the EWMA is poor "
                "(Flax momentum 0.999, PyTorch momentum=None)",
                "test accuracy precise - EWMA: "
                + "; ".join(f"{r['label']}: {format_difference(iv)}" for r, iv in poor),
                _combine([stats.interval_verdict(iv, "above", at=0.0) for _, iv in poor]),
                effect="; ".join(f"{r['label'].replace(' momentum=', ' ')}: {format_difference(iv)}" for r, iv in poor),
            )
        )
    worst = min(gaps, key=lambda g: g[1].mean if np.isfinite(g[1].mean) else np.inf)
    claims.append(
        report.Claim(
            f"Wu & Johnson 2021: precise population statistics are at least as good as the EWMA at every "
            f"momentum (within {abs(NO_WORSE_BY):.2f} of test accuracy)",
            "test accuracy precise - EWMA: " + "; ".join(f"{r['label']}: {format_difference(iv)}" for r, iv in gaps),
            _combine([stats.interval_verdict(iv, "above", at=NO_WORSE_BY) for _, iv in gaps]),
            effect=f"lowest: {worst[0]['label'].replace(' momentum=', ' ')} {format_difference(worst[1])}",
        )
    )
    flax09 = next((r for r in results if r["convention"] == "flax" and r["momentum"] == 0.9), None)
    torch01 = next((r for r in results if r["convention"] == "torch" and r["momentum"] == 0.1), None)
    if flax09 is not None and torch01 is not None and "diverged" not in flax09 and "diverged" not in torch01:
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(flax09["running_means"], torch01["running_means"])]
        worst_diff = max(diffs) if all(np.isfinite(diffs)) else np.inf
        claims.append(
            report.Claim(
                "PyTorch momentum=0.1 is Flax momentum=0.9 (weight on the latest batch vs on the old value)",
                f"max abs difference of the BN layers' running means over {len(diffs)} seeds {worst_diff:.2e}; "
                f"test accuracy (EWMA) torch {format_difference(stats.interval(torch01['test_accuracy_ewma']))[1:]} "
                f"vs flax {format_difference(stats.interval(flax09['test_accuracy_ewma']))[1:]}",
                "held" if worst_diff < 1e-4 else "not held",
                effect=f"max |running mean difference| {worst_diff:.1e}",
            )
        )
    return claims


def _outcome(config: Config, ds, results: list[dict], out: pathlib.Path) -> report.Outcome:
    fig, axes = report.figure(ncols=1, size=(7.5, 4.2))
    ax = axes[0]
    pos = np.arange(len(results))
    for k, (name, title) in enumerate(STATISTICS):
        ivs = [stats.interval(r[f"test_accuracy_{name}"]) for r in results]
        means = np.array([iv.mean for iv in ivs])
        err = np.array([[iv.mean - iv.low, iv.high - iv.mean] if iv.n >= 2 else [0.0, 0.0] for iv in ivs]).T
        ax.bar(pos + (k - 1) * 0.27, np.nan_to_num(means), width=0.27, label=title, yerr=err, capsize=2)
    for i, r in enumerate(results):
        if "diverged" in r:
            report.mark_diverged(ax, i, 0.0, "diverged")
    ax.set(
        title=f"test accuracy by the statistics used in eval mode (mean over {len(config.seeds)} seeds, 95% CI)",
        xticks=pos,
        ylabel="test accuracy",
    )
    ax.set_xticklabels([r["label"] for r in results], rotation=20, fontsize=7)
    report.legend(ax)
    figures = [report.save_figure(fig, out, "inference_stats.png")]

    def cell(values) -> str:
        iv = stats.interval(values)
        if iv.n == 0:
            return "diverged"
        return f"{iv.mean:.3f}" if iv.n == 1 else f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]"

    rows = []
    for r in results:
        diverged = sum(d >= 0 for d in r["diverged_at"])
        rows.append(
            [
                r["label"],
                cell(r["test_accuracy_ewma"]),
                cell(r["test_accuracy_precise"]),
                cell(r["test_accuracy_local"]),
                format_difference(stats.interval(r["test_accuracy_precise"] - r["test_accuracy_ewma"])),
                cell(r["train_accuracy_ewma"]),
                cell(r["train_accuracy_precise"]),
                f"{diverged} of {len(config.seeds)}",
            ]
        )
    table = report.markdown_table(
        [
            "run",
            "test acc (EWMA)",
            "test acc (precise)",
            "test acc (batch stats)",
            "precise - EWMA (test)",
            "train acc (EWMA)",
            "train acc (precise)",
            "seeds diverged",
        ],
        rows,
    )
    claims = _claims(results)
    finished = [r for r in results if "diverged" not in r]
    same = all(
        np.allclose(r["param_checksum"], finished[0]["param_checksum"], rtol=1e-6, equal_nan=True) for r in finished
    )
    notes = [
        "Each accuracy cell is the mean over seeds [95% interval]; the difference column is the mean of the per-seed "
        "differences with its interval.",
        "The BN momentum does not change training (train mode uses batch statistics): at each seed every run has "
        f"the same parameters (checksums {'identical' if same else 'DIFFER: check determinism'}); only eval-mode "
        "statistics differ.",
        "PyTorch's convention stores the unbiased running variance; the running means are comparable directly.",
        "Differences from Wu & Johnson 2021: MNIST-1D (or digits) instead of ImageNet, a small network instead of "
        "ResNet-50, fewer steps.",
    ]
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        "In train mode BN normalizes with the statistics of the batch; in eval mode with running statistics, "
        "usually an exponential moving average (EWMA) of past batches' statistics. With a momentum close to 1 "
        "the EWMA averages over statistics of weights long since changed, and eval accuracy falls below what "
        "the weights can give; Wu & Johnson propose recomputing the population statistics with the final "
        "weights (precise BN). Here every momentum trained the same weights at each seed, so the table isolates "
        f"the statistics. {held} of {len(claims)} claims held over {len(config.seeds)} seeds; the difference "
        "column is precise minus EWMA test accuracy with its 95% interval: an interval above 0 is a reproducible "
        "gain."
    )
    momenta = ", ".join(r["label"] for r in results)
    setting = report.setting(
        model=models.describe_family(config.model, hidden=config.hidden, activation="relu"),
        data=f"{ds.name}, {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test (minibatches of {config.batch_size})",
        loss=config.loss.replace("_", "-"),
        optimizer=f"SGD + momentum 0.9, lr {config.lr:g}",
        steps=config.steps,
        seeds=config.seeds,
        BN_momenta=momenta,
        precise_statistics=f"whole training set in batches of {config.precise_batch_size}",
    )
    return report.Outcome({"runs": results}, claims, [table], figures, notes, setting, reading, CLAIM_RULE)
