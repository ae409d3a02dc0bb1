"""Internal covariate shift (Santurkar, Tsipras, Ilyas, Madry 2018, §2 and §2.2).

Minibatch SGD with no normalization, BN and noisy BN (STIM18 Algorithm 1). Every ``measure_every`` steps:
the per-layer input statistics and histograms of a fixed probe batch (train mode, so noisy BN's noise is
in them), and STIM18's gradient-based internal covariate shift ``‖G - G'‖`` and ``cos(G, G')`` per layer
(:func:`bnjax.landscape.internal_covariate_shift`). STIM18: noisy BN destroys the stability of the layer
input distributions yet still trains faster than no BN, and BN does not reduce the gradient-based ICS.
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

HIST_RANGE = (-4.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Config:
    """Activation drift, gradient-based ICS and training speed: none vs BN vs noisy BN (STIM18).

    Command: ``python -m experiments covariate_shift`` (full) or ``--quick``.
    Expected runtime on 2 shared CPU cores (2026-11-25): quick 1.5 min (measured), full ~5 min (estimated).
    Expected result: noisy BN's layer inputs drift far more between checkpoints than BN's, yet its training
    loss at the end is below the unnormalized network's; BN's relative ICS ``‖G - G'‖ / ‖G‖`` is not
    smaller than the unnormalized network's.

    Model: ReLU MLP ``hidden`` on MNIST-1D, SGD with learning rate ``lr`` and batch ``batch_size`` for
    ``steps`` steps. Probe: the first ``probe_size`` training examples. Drift of a layer's input between
    consecutive checkpoints: mean over units of ``|mean_t+1 - mean_t|`` divided by the mean unit std.
    Noisy BN uses STIM18's constants (``n_mu=0.5, n_sigma=1.25, r_mu=r_sigma=0.1``).
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seed: int = 0
    hidden: tuple[int, ...] = (200, 200, 200)
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
        hidden=(16, 16),
        norms=("none", "noisy"),
        batch_size=32,
        steps=20,
        measure_every=10,
        probe_size=64,
        bins=16,
    ),
}


def _layers(order: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Each Dense together with the normalization that follows it: one ICS layer."""
    groups: list[list[str]] = []
    for name in order:
        if name.startswith("_NormAct") and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    return [tuple(g) for g in groups]


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train each network and record activation statistics and ICS along the way."""
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    probe = x[: config.probe_size]
    runs = {}
    with tqdm(total=len(config.norms) * (config.steps // config.measure_every), desc="covariate_shift") as bar:
        for norm in config.norms:
            runs[norm] = _one_run(config, norm, ds, x, y, probe, bar)
    return _outcome(config, runs, out)


def _one_run(config, norm, ds, x, y, probe, bar) -> dict:
    model = models.MLP(features=config.hidden, num_classes=ds.num_classes, activation="relu", norm=norm)
    optimizer = optax.sgd(config.lr)
    state = train.init_train_state(model, x[:2], optimizer, config.seed)
    runner = train.minibatch_runner(train.make_train_step(model, config.loss, optimizer), config.batch_size)
    loss_fn = train.landscape_loss(model, config.loss)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    layers = _layers(landscape.module_call_order(model.apply, variables, probe, train=False))

    @jax.jit
    def measure(state):
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
        _, perm_key = jax.random.split(state.key)
        idx = jax.random.permutation(perm_key, x.shape[0])[: config.batch_size]
        batch = (x[idx], y[idx], jax.random.fold_in(state.key, 1))
        grads = jax.grad(loss_fn)(state.params, batch, state.batch_stats)
        updates, _ = optimizer.update(grads, state.opt_state, state.params)
        ics = landscape.internal_covariate_shift(
            loss_fn, state.params, batch, state.batch_stats, updates=updates, layers=layers
        )
        return acts, ics

    bar.set_postfix_str(norm)
    log = train.train_in_segments(
        runner,
        state,
        x,
        y,
        num_steps=config.steps,
        every=config.measure_every,
        measure=measure,
        bar=bar,
        label=norm,
    )
    test_loss, test_acc = train.evaluate(
        model, log.state.params, log.state.batch_stats, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), config.loss
    )
    names = list(log.measurements[0][0])
    acts = {n: [m[0][n] for m in log.measurements] for n in names}
    ics = [m[1] for m in log.measurements]
    rel = np.stack([m.grad_distance / np.maximum(m.grad_norm, 1e-30) for m in ics])  # [checkpoints, layers]
    drift = {}
    for n in names:
        means = np.stack([a.mean for a in acts[n]])
        stds = np.stack([a.std for a in acts[n]])
        drift[n] = float(np.mean(np.abs(np.diff(means, axis=0))) / max(float(np.mean(stds)), 1e-12))
    tail = max(1, config.steps // 10)
    return {
        "norm": norm,
        "steps": log.steps,
        "losses": log.losses,
        "final_train_loss": float(np.mean(log.losses[-tail:])),
        "final_train_accuracy": float(np.mean(log.accuracies[-tail:])),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "layers": [" + ".join(g) for g in layers],
        "ics_relative_distance": rel,
        "ics_cosine": np.stack([m.cosine for m in ics]),
        "mean_ics_relative_distance": float(rel.mean()),
        "mean_ics_cosine": float(np.mean([m.cosine for m in ics])),
        "input_drift": drift,
        "mean_input_drift": float(np.mean([drift[n] for n in names[1:]] or [0.0])),
        "histograms": {n: np.stack([a.histogram for a in acts[n]]) for n in names},
    }


def _outcome(config: Config, runs: dict, out: pathlib.Path) -> report.Outcome:
    norms = list(runs)
    figures = []
    fig, axes = report.figure(ncols=3)
    for norm, r in runs.items():
        window = max(1, min(50, r["losses"].size))
        axes[0].plot(np.convolve(r["losses"], np.ones(window) / window, mode="valid"), label=norm, linewidth=0.8)
        axes[1].plot(r["steps"], r["ics_relative_distance"].mean(axis=1), marker=".", label=norm)
        axes[2].plot(r["steps"], r["ics_cosine"].mean(axis=1), marker=".", label=norm)
    axes[0].set(title="train loss (moving average)", xlabel="step", yscale="log")
    axes[1].set(title="ICS: ‖G - G'‖ / ‖G‖ (mean over layers)", xlabel="step")
    axes[2].set(title="ICS: cos(G, G') (mean over layers)", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=7)
    figures.append(report.save_figure(fig, out, "training_and_ics.png"))

    # Histograms of the input of the last hidden-to-hidden layer at a few checkpoints (STIM18 Fig. 2, right).
    fig, axes = report.figure(ncols=len(norms))
    edges = np.asarray(landscape.histogram_edges(config.bins, HIST_RANGE))
    centers = 0.5 * (edges[1:] + edges[:-1])
    for ax, (norm, r) in zip(axes, runs.items()):
        layer = sorted(r["histograms"])[-1]
        hists = r["histograms"][layer]
        picks = sorted({0, len(hists) // 2, len(hists) - 1})
        for k in picks:
            ax.plot(centers, hists[k] / max(hists[k].sum(), 1), label=f"step {r['steps'][k]}")
        ax.set(title=f"{norm}: input of {layer}", xlabel="activation", ylabel="fraction")
        ax.legend(fontsize=7)
    figures.append(report.save_figure(fig, out, "activation_histograms.png"))

    rows = [
        [
            n,
            r["final_train_loss"],
            r["final_train_accuracy"],
            r["test_accuracy"],
            r["mean_input_drift"],
            r["mean_ics_relative_distance"],
            r["mean_ics_cosine"],
        ]
        for n, r in runs.items()
    ]
    table = report.markdown_table(
        [
            "norm",
            "train loss (last 10%)",
            "train acc (last 10%)",
            "test acc",
            "input drift",
            "ICS ‖G-G'‖/‖G‖",
            "ICS cos",
        ],
        rows,
    )
    claims = []
    if "noisy" in runs and "bn" in runs:
        a, b = runs["noisy"]["mean_input_drift"], runs["bn"]["mean_input_drift"]
        claims.append(
            report.Claim(
                "STIM18: noisy BN destroys the distributional stability of layer inputs (more drift than BN)",
                f"input drift between checkpoints: noisy BN {a:.3g} vs BN {b:.3g}",
                "held" if a > b else "not held",
            )
        )
    if "noisy" in runs and "none" in runs:
        a, b = runs["noisy"]["final_train_loss"], runs["none"]["final_train_loss"]
        bn = f", BN {runs['bn']['final_train_loss']:.3g}" if "bn" in runs else ""
        claims.append(
            report.Claim(
                "STIM18: noisy BN still trains faster than no BN",
                f"train loss over the last 10% of steps: noisy BN {a:.3g} vs none {b:.3g}{bn}",
                "held" if a < b else "not held",
            )
        )
    if "bn" in runs and "none" in runs:
        a, b = runs["bn"]["mean_ics_relative_distance"], runs["none"]["mean_ics_relative_distance"]
        claims.append(
            report.Claim(
                "STIM18: BN does not reduce internal covariate shift in the gradient sense (‖G - G'‖)",
                f"mean ‖G - G'‖ / ‖G‖: BN {a:.3g} vs none {b:.3g}; mean cos: BN "
                f"{runs['bn']['mean_ics_cosine']:.3g} vs none {runs['none']['mean_ics_cosine']:.3g}",
                "held" if a >= 0.9 * b else "not held",
            )
        )
    notes = [
        "ICS claim counted as held unless BN's relative ‖G - G'‖ is more than 10% below the unnormalized network's.",
        f"Probe batch: first {config.probe_size} training examples, train mode; drift compares consecutive "
        f"checkpoints {config.measure_every} steps apart, for every layer input after the first.",
    ]
    return report.Outcome({"runs": runs}, claims, [table], figures, notes)
