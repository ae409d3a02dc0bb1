"""Internal covariate shift (Santurkar, Tsipras, Ilyas, Madry 2018, §2 and §2.2, Fig. 2 and 7).

Minibatch SGD of a conv net with no normalization, BN and noisy BN (STIM18 Algorithm 1), over seeds run as
one vmapped batch. Every ``measure_every`` steps: the per-feature input statistics and histograms of every
layer on a fixed probe batch (train mode, so noisy BN's noise is in them; a conv layer's features are its
channels, averaged over batch and positions), and STIM18's gradient-based internal covariate shift
``‖G - G'‖`` and ``cos(G, G')`` per layer (:func:`bnjax.landscape.internal_covariate_shift`). STIM18: noisy
BN destroys the stability of the layer input distributions yet still trains faster than no BN, and BN does
not reduce the gradient-based ICS. Each claim is judged on per-seed ratios by
:data:`experiments.stats.INTERVAL_RULE`.
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

HIST_RANGE = (-4.0, 4.0)
# BN's relative ICS counts as "not reduced" when it is at least this fraction of the unnormalized network's.
ICS_NOT_REDUCED_AT = 0.9


@dataclasses.dataclass(frozen=True)
class Config:
    """Activation drift, gradient-based ICS and training speed: none vs BN vs noisy BN, over seeds (STIM18).

    Command: ``python -m experiments covariate_shift`` (full) or ``--quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: noisy BN's layer inputs drift more between checkpoints than BN's, yet its training
    loss at the end is below the unnormalized network's; BN's relative ICS ``‖G - G'‖ / ‖G‖`` is not
    smaller than the unnormalized network's (at least 0.9x); each with its 95% interval over seeds on the
    claimed side.

    Model: ``model`` (``cnn1d``, the default: a conv net as STIM18's VGG, on MNIST-1D; ``vgg`` for image data
    such as ``--dataset digits``; ``mlp`` with ``hidden``) with ``activation``; SGD with learning rate ``lr``
    and batch ``batch_size`` for ``steps`` steps, one run per seed in ``seeds`` (vmapped). Probe: the first
    ``probe_size`` training examples, in train mode. Drift of a layer's input between consecutive
    checkpoints: mean over features (channels of a conv layer) of ``|mean_t+1 - mean_t|`` divided by the
    mean feature std of the two checkpoints; reported averaged over checkpoints and over every layer input
    after the first (the first is the data). ICS on the minibatch of the next training step, with that
    step's SGD update. Noisy BN uses STIM18's constants (``n_mu=0.5, n_sigma=1.25, r_mu=r_sigma=0.1``).
    Differences from STIM18: MNIST-1D (or 8x8 digits) instead of CIFAR-10, a 3-layer CNN (or a 4-conv
    VGG-style net) instead of VGG-16, no 25-layer deep linear network for the ICS measurement, no data
    augmentation, fewer steps; drift is summarized by one number per layer instead of STIM18's histograms
    alone (the histograms are plotted too).
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2)
    model: str = "cnn1d"
    hidden: tuple[int, ...] = (200, 200, 200)
    activation: str = "relu"
    norms: tuple[str, ...] = ("none", "bn", "noisy")
    lr: float = 0.1
    batch_size: int = 128
    steps: int = 3000
    measure_every: int = 150
    probe_size: int = 512
    bins: int = 64
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), steps=900, measure_every=100),
    "smoke": dataclasses.replace(
        Config(),
        model="mlp",
        hidden=(8,),
        seeds=(0, 1),
        norms=("none", "noisy"),
        batch_size=32,
        steps=20,
        measure_every=10,
        probe_size=64,
        bins=16,
    ),
}
_QUICK = {"steps": 200, "measure_every": 50, "probe_size": 256}
_FULL = {"steps": 1200, "measure_every": 100}
# The claims matrix (experiments.claims): the families this experiment applies to and its forms there.
# Measured 2026-12-04 (2 CPU cores, load ~1.5; experiments/results/claims-{quick,full}): quick mlp 22 s, cnn1d 30 s,
# vgg 50 s; full 45 s, 76 s, 134 s.
MATRIX = {
    "mlp": {"quick": {"model": "mlp", **_QUICK}, "full": {"model": "mlp", **_FULL}},
    "cnn1d": {"quick": {"model": "cnn1d", **_QUICK}, "full": {"model": "cnn1d", **_FULL}},
    "vgg": {
        "quick": {"model": "vgg", "dataset": "digits", **_QUICK, "steps": 150, "batch_size": 64, "probe_size": 128},
        "full": {"model": "vgg", "dataset": "digits", "steps": 600, "measure_every": 100},
    },
}
CHOICES = {"model": models.FAMILIES, "norms": models.NORMS, "loss": train.LOSSES}


def check(config: Config) -> None:
    """One-line ValueErrors for options this experiment cannot run with."""
    if config.model not in models.FAMILIES:
        raise ValueError(f"model must be one of {models.FAMILIES} for this experiment, got {config.model!r}.")
    for norm in config.norms:
        if norm not in models.NORMS:
            raise ValueError(f"norms must be among {models.NORMS}, got {norm!r}.")
    if len(set(config.norms)) != len(config.norms):
        raise ValueError(f"norms must not repeat a normalization, got {config.norms}.")
    if not any(set(pair) <= set(config.norms) for pair in _CLAIM_PAIRS):
        raise ValueError(
            f"norms must include a pair a claim compares (noisy and bn, noisy and none, or bn and none), "
            f"got {config.norms}."
        )
    if config.activation not in models.ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(models.ACTIVATIONS)}, got {config.activation!r}.")
    if config.loss not in train.LOSSES:
        raise ValueError(f"loss must be one of {train.LOSSES}, got {config.loss!r}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must name at least one seed, none twice, got {config.seeds}.")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}.")
    if config.measure_every < 1 or config.steps % config.measure_every or config.steps < 2 * config.measure_every:
        raise ValueError(
            f"steps ({config.steps}) must be a multiple of measure_every ({config.measure_every}) and at least "
            "twice it (drift compares consecutive checkpoints)."
        )
    if config.probe_size < 2 or config.bins < 1:
        raise ValueError(f"probe_size must be >= 2 and bins >= 1, got {config.probe_size} and {config.bins}.")


def _check_data(config: Config, ds: data_lib.Dataset) -> None:
    shape = ds.x_train.shape
    if config.model == "vgg" and len(shape) != 4:
        raise ValueError(f"model 'vgg' needs images [n, h, w, c] (e.g. --dataset digits); {ds.name} has {shape}.")
    if config.model == "cnn1d" and len(shape) not in (2, 3):
        raise ValueError(f"model 'cnn1d' needs sequences [n, length(, c)] (e.g. mnist1d); {ds.name} has {shape}.")
    if not config.probe_size <= shape[0] or not config.batch_size <= shape[0]:
        raise ValueError(
            f"probe_size ({config.probe_size}) and batch_size ({config.batch_size}) must be at most the "
            f"{shape[0]} training examples of {ds.name}."
        )


def _layers(order: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Each Dense/Conv together with the normalization that follows it: one ICS layer."""
    groups: list[list[str]] = []
    for name in order:
        if name.startswith("_NormAct") and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    return [tuple(g) for g in groups]


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train each network over the seeds and record activation statistics and ICS along the way."""
    check(config)
    ds = data_lib.load(config.dataset, config.data_seed)
    _check_data(config, ds)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    runs = {}
    with progress.StepBar(len(config.norms) * config.steps, "covariate_shift") as bar:
        for norm in config.norms:
            runs[norm] = _one_run(config, norm, ds, x, y, bar)
    return _outcome(config, ds, runs, out)


def _one_run(config, norm, ds, x, y, bar) -> dict:
    model = models.family_model(config.model, norm, ds.num_classes, hidden=config.hidden, activation=config.activation)
    optimizer = optax.sgd(config.lr)
    state = train.init_seed_states(model, x[:2], optimizer, config.seeds)
    runner = train.minibatch_runner(
        train.make_train_step(model, config.loss, optimizer), config.batch_size, over_seeds=True
    )
    loss_fn = train.landscape_loss(model, config.loss)
    probe = x[: config.probe_size]
    first = jax.tree.map(lambda a: a[0], state)
    variables = {"params": first.params, "batch_stats": first.batch_stats}
    layers = _layers(landscape.module_call_order(model.apply, variables, probe, train=False))

    def measure_one(state):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        acts = landscape.activation_statistics(
            model.apply,
            variables,
            probe,
            train=True,
            mutable=["batch_stats"],
            rngs={"noise": state.key},
            bins=config.bins,
            value_range=HIST_RANGE,
        )
        # The minibatch and noise the next training step would use (same draw as minibatch_runner's).
        _, perm_key = jax.random.split(state.key)
        idx = jax.random.permutation(perm_key, x.shape[0])[: config.batch_size]
        batch = (x[idx], y[idx], jax.random.fold_in(state.key, 1))
        grads = jax.grad(loss_fn)(state.params, batch, state.batch_stats)
        updates, _ = optimizer.update(grads, state.opt_state, state.params)
        ics = landscape.internal_covariate_shift(
            loss_fn, state.params, batch, state.batch_stats, updates=updates, layers=layers
        )
        return acts, ics

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
            label=norm,
        )
    except train.Diverged as err:
        return {"norm": norm, "diverged": str(err), "diverged_at": [0] * len(config.seeds)}
    return _summarize(config, norm, model, ds, log, layers)


def _summarize(config, norm, model, ds, log, layers) -> dict:
    """Per-seed numbers of one run over seeds (NaN for a seed that diverged)."""
    ok = log.diverged_at < 0  # [S]
    evaluate = jax.jit(
        jax.vmap(
            lambda p, b: train.eval_metrics(model, config.loss, p, b, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
        )
    )
    test_loss, test_acc = (np.where(ok, np.asarray(v, np.float64), np.nan) for v in evaluate(*log.state[:2]))
    names = list(log.measurements[0][0])
    acts = {n: [m[0][n] for m in log.measurements] for n in names}
    ics = [m[1] for m in log.measurements]
    with np.errstate(invalid="ignore", divide="ignore"):
        # [seeds, checkpoints, layers]
        rel = np.stack([m.grad_distance / np.maximum(m.grad_norm, 1e-30) for m in ics], axis=1)
        cos = np.stack([m.cosine for m in ics], axis=1)
        drift = {}  # layer -> [seeds, checkpoints - 1]
        for n in names:
            means = np.stack([a.mean for a in acts[n]], axis=1)  # [S, checkpoints, features]
            stds = np.stack([a.std for a in acts[n]], axis=1)
            scale = 0.5 * (np.mean(stds[:, 1:], axis=-1) + np.mean(stds[:, :-1], axis=-1))
            drift[n] = np.mean(np.abs(np.diff(means, axis=1)), axis=-1) / np.maximum(scale, 1e-12)
    inner = names[1:] or names  # every layer input after the data
    drift_curve = np.mean(np.stack([drift[n] for n in inner]), axis=0)  # [S, checkpoints - 1]
    tail = max(1, config.steps // 10)

    def per_seed(values):
        return np.where(ok, np.asarray(values, np.float64), np.nan)

    return {
        "norm": norm,
        "steps": log.steps,
        "diverged_at": log.diverged_at.tolist(),
        "losses": log.losses,
        "final_train_loss": per_seed(np.mean(log.losses[:, -tail:], axis=1)),
        "final_train_accuracy": per_seed(np.mean(log.accuracies[:, -tail:], axis=1)),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "layers": [" + ".join(g) for g in layers],
        "ics_relative_distance": rel,
        "ics_cosine": cos,
        "mean_ics_relative_distance": per_seed(np.mean(rel, axis=(1, 2))),
        "mean_ics_cosine": per_seed(np.mean(cos, axis=(1, 2))),
        "input_drift": {n: per_seed(np.mean(drift[n], axis=1)) for n in names},
        "drift_curve": drift_curve,
        "mean_input_drift": per_seed(np.mean(drift_curve, axis=1)),
        "histograms": {n: np.stack([a.histogram for a in acts[n]], axis=1) for n in names},  # [S, ckpt, bins]
    }


# (claim, measure, numerator, denominator, claimed side, at): each claim is the per-seed ratio num / den.
_CLAIMS = (
    (
        "STIM18: noisy BN destroys the distributional stability of layer inputs (more drift than BN)",
        "mean_input_drift",
        "noisy",
        "bn",
        "above",
        1.0,
    ),
    (
        "STIM18: noisy BN still trains faster than no BN (lower train loss at the end)",
        "final_train_loss",
        "noisy",
        "none",
        "below",
        1.0,
    ),
    (
        "STIM18: BN does not reduce internal covariate shift in the gradient sense (‖G - G'‖ / ‖G‖)",
        "mean_ics_relative_distance",
        "bn",
        "none",
        "above",
        ICS_NOT_REDUCED_AT,
    ),
)
_CLAIM_PAIRS = tuple((num, den) for _, _, num, den, _, _ in _CLAIMS)
_NAMES = {"none": "none", "bn": "BN", "noisy": "noisy BN"}

CLAIM_RULE = (
    stats.INTERVAL_RULE + f"; the claimed sides: noisy BN / BN input drift > 1, noisy BN / none train loss < 1, "
    f"BN / none relative ICS > {ICS_NOT_REDUCED_AT:g} (not reduced by more than "
    f"{1 - ICS_NOT_REDUCED_AT:.0%}); a claim whose denominator diverged at every seed while the numerator did "
    "not counts as held for the train-loss claim and inconclusive otherwise; one whose numerator diverged at "
    "every seed is inconclusive"
)


def claim_verdicts(runs: dict) -> tuple[list[report.Claim], dict]:
    """The claims of :data:`_CLAIMS` that ``runs`` (``{norm: run}``, each run with one value per seed of every
    claim's measure, or ``"diverged"`` when every seed diverged) can judge, and their intervals by name."""
    claims, effects = [], {}
    for text, measure, num, den, side, at in _CLAIMS:
        if num not in runs or den not in runs:
            continue
        a, b = runs[num], runs[den]
        label = f"{_NAMES[num]} / {_NAMES[den]}"
        if "diverged" in a:
            claims.append(report.Claim(text, f"{_NAMES[num]} diverged at every seed", "inconclusive", "–"))
            continue
        if "diverged" in b:
            verdict = "held" if measure == "final_train_loss" else "inconclusive"
            claims.append(report.Claim(text, f"{_NAMES[den]} diverged at every seed", verdict, "–"))
            continue
        iv = stats.ratio_interval(a[measure], b[measure])
        effects[measure] = iv._asdict()
        verdict = stats.interval_verdict(iv, side, at=at)
        extra = ""
        if measure == "mean_ics_relative_distance":
            extra = f"; mean cos(G, G'): BN {stats.format_mean(a['mean_ics_cosine'])}, none " + stats.format_mean(
                b["mean_ics_cosine"]
            )
        measured = f"{measure.replace('_', ' ')} {label}: {stats.format_ratio(iv)} (claimed {side} {at:g}x){extra}"
        claims.append(report.Claim(text, measured, verdict, effect=stats.format_effect(iv)))
    return claims, effects


def _outcome(config: Config, ds, runs: dict, out: pathlib.Path) -> report.Outcome:
    claims, effects = claim_verdicts(runs)
    figures = [_training_figure(config, runs, out), _claims_figure(runs, out), _histogram_figure(config, runs, out)]

    rows = []
    for n, r in runs.items():
        if "diverged" in r:
            rows.append([n, *["diverged"] * 6, "all"])
            continue
        cells = [
            stats.format_mean(r[k])
            for k in (
                "final_train_loss",
                "final_train_accuracy",
                "test_accuracy",
                "mean_input_drift",
                "mean_ics_relative_distance",
                "mean_ics_cosine",
            )
        ]
        diverged = sum(d >= 0 for d in r["diverged_at"])
        rows.append([n, *cells, f"{diverged} of {len(config.seeds)}"])
    table = report.markdown_table(
        [
            "norm",
            "train loss (last 10%)",
            "train acc (last 10%)",
            "test acc",
            "input drift",
            "ICS ‖G-G'‖/‖G‖",
            "ICS cos(G, G')",
            "seeds diverged",
        ],
        rows,
    )
    held = sum(c.verdict == "held" for c in claims)
    reading = (
        "Ioffe and Szegedy introduced batch norm to reduce 'internal covariate shift': the change, during "
        "training, of the distribution of each layer's input. STIM18 test that story two ways. Noisy BN adds "
        "random, changing shifts and scales after every BN, so the layer inputs drift a lot (input drift "
        "column: how far the per-feature means move between checkpoints, in units of their spread), yet it "
        "still trains faster than the unnormalized network. And measured through gradients (how much a "
        "layer's gradient changes when the layers before it take their step: ‖G - G'‖ / ‖G‖, and cos(G, G')), "
        f"BN does not reduce the shift. Here {held} of {len(claims)} of these claims held for the "
        f"{config.model} over {len(config.seeds)} seeds; the 'measured' column gives the ratio of the two "
        "networks' per-seed values with its 95% interval, and the claim is decided by which side of the "
        "threshold the whole interval lies on."
    )
    setting = report.setting(
        model=models.describe_family(config.model, hidden=config.hidden, activation=config.activation),
        data=f"{ds.name}, {ds.x_train.shape[0]} training examples (minibatches of {config.batch_size}), "
        f"{ds.x_test.shape[0]} test",
        loss=config.loss.replace("_", "-"),
        optimizer=f"SGD, lr {config.lr:g}",
        steps=config.steps,
        seeds=config.seeds,
        norms=", ".join(config.norms),
        measured=f"every {config.measure_every} steps: layer inputs on a probe of the first {config.probe_size} "
        "training examples (train mode); ICS on the next step's minibatch",
    )
    notes = [
        "Each cell of the table is the mean over seeds [95% interval]; a seed that diverged is left out of its "
        "run's cells and of the claims' ratios (the seeds diverged column counts them).",
        f"Probe batch: first {config.probe_size} training examples, train mode (noisy BN's noise included); "
        f"drift compares consecutive checkpoints {config.measure_every} steps apart, for every layer input "
        "after the first; a conv layer's features are its channels (statistics over batch and positions).",
        f"ICS claim: held when BN's relative ‖G - G'‖ is, over seeds, at least {ICS_NOT_REDUCED_AT:g}x the "
        "unnormalized network's (STIM18 find it often larger).",
        "Differences from STIM18: MNIST-1D (or 8x8 digits) instead of CIFAR-10, a small conv net instead of "
        "VGG-16, no deep linear network for ICS, no augmentation, fewer steps.",
    ]
    results = {"runs": runs, "effects": effects}
    return report.Outcome(results, claims, [table], figures, notes, setting, reading, CLAIM_RULE)


def _training_figure(config: Config, runs: dict, out: pathlib.Path) -> str:
    fig, axes = report.figure(ncols=4)
    for i, (norm, r) in enumerate(runs.items()):
        color = f"C{i}"
        if "diverged" in r:
            axes[0].plot([], [], marker="x", linestyle="none", color=color, label=f"{norm}: diverged at every seed")
            continue
        smooth = report.moving_average(r["losses"], 50)
        report.seed_band(axes[0], np.arange(1, config.steps + 1), smooth, label=norm, color=color, linewidth=0.8)
        for s, at in enumerate(r["diverged_at"]):
            if at >= 0:
                last = smooth[s, : max(at, 1)]
                last = last[np.isfinite(last)]
                report.mark_diverged(
                    axes[0], at, last[-1] if last.size else 1.0, f"{norm} seed {config.seeds[s]}", color=color
                )
        report.seed_band(axes[1], r["steps"][1:], r["drift_curve"], label=norm, color=color, marker=".")
        report.seed_band(axes[2], r["steps"], r["ics_relative_distance"].mean(axis=2), label=norm, color=color)
        report.seed_band(axes[3], r["steps"], r["ics_cosine"].mean(axis=2), label=norm, color=color)
    axes[0].set(title="train loss (moving average)", xlabel="step", yscale="log")
    axes[1].set(title="input drift between checkpoints (mean over layers)", xlabel="step")
    axes[2].set(title="ICS: ‖G - G'‖ / ‖G‖ (mean over layers)", xlabel="step")
    axes[3].set(title="ICS: cos(G, G') (mean over layers)", xlabel="step")
    for ax in axes:
        report.legend(ax)
    return report.save_figure(fig, out, "training_and_ics.png")


def _claims_figure(runs: dict, out: pathlib.Path) -> str:
    """One panel per claim: the per-seed ratios, their geometric mean and 95% interval, the threshold."""
    judged = [c for c in _CLAIMS if c[2] in runs and c[3] in runs]
    fig, axes = report.figure(ncols=len(judged), size=(3.6, 3.2))
    for ax, (_, measure, num, den, side, at) in zip(axes, judged):
        a, b = runs[num], runs[den]
        title = f"{measure.replace('mean_', '').replace('_', ' ')}\n{_NAMES[num]} / {_NAMES[den]}"
        ax.set(title=title, xticks=[], yscale="log", ylabel="ratio")
        report.threshold_line(ax, at, f"claimed {side}")
        if "diverged" in a or "diverged" in b:
            ax.plot([], [], marker="x", linestyle="none", color="C3", label="diverged at every seed")
            report.legend(ax)
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = np.asarray(a[measure], np.float64) / np.asarray(b[measure], np.float64)
        finite = np.isfinite(ratios) & (ratios > 0)
        ax.plot(np.zeros(finite.sum()), ratios[finite], "o", color="C0", alpha=0.6, label="per seed")
        if (~finite).any():
            report.mark_diverged(ax, 0.0, at, f"{int((~finite).sum())} seed(s)", color="C3")
        iv = stats.ratio_interval(a[measure], b[measure])
        if iv.n >= 2:
            ax.errorbar(
                [0.3],
                [iv.mean],
                yerr=[[iv.mean - iv.low], [iv.high - iv.mean]],
                fmt="s",
                color="C1",
                capsize=4,
                label=f"mean [95%] {stats.format_effect(iv)}",
            )
        ax.set_xlim(-0.5, 0.8)
        report.legend(ax)
    return report.save_figure(fig, out, "claims.png")


def _histogram_figure(config: Config, runs: dict, out: pathlib.Path) -> str:
    """Histograms of the input of the last hidden layer at a few checkpoints, first seed (STIM18 Fig. 2)."""
    fig, axes = report.figure(ncols=len(runs))
    edges = np.asarray(landscape.histogram_edges(config.bins, HIST_RANGE))
    centers = 0.5 * (edges[1:] + edges[:-1])
    for ax, (norm, r) in zip(axes, runs.items()):
        if "diverged" in r:
            ax.set(title=f"{norm}: diverged at every seed")
            continue
        layer = list(r["histograms"])[-1]
        hists = r["histograms"][layer][0]
        picks = sorted({0, len(hists) // 2, len(hists) - 1})
        for k in picks:
            ax.plot(centers, hists[k] / max(hists[k].sum(), 1), label=f"step {r['steps'][k]}")
        ax.set(title=f"{norm}: input of {layer} (seed {config.seeds[0]})", xlabel="activation", ylabel="fraction")
        report.legend(ax)
    return report.save_figure(fig, out, "activation_histograms.png")
