"""Batch size and BN's implicit regularization (Luo, Wang, Shao, Peng 2018).

An MLP trained with SGD + momentum at several batch sizes, with no normalization, BN, and ghost BN (BN over
fixed sub-batches of ``ghost_size``, :class:`bnjax.BatchNorm`'s ``virtual_batch_size``). LWSP18: BN's
regularization comes from the noise of batch statistics and weakens as the batch grows, so BN's test
accuracy falls and its generalization gap widens at large batches; ghost BN keeps the small-batch noise at
any batch size and is the control.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments import models, report, train

VARIANTS = ("none", "bn", "ghost")


@dataclasses.dataclass(frozen=True)
class Config:
    """Train/test accuracy and generalization gap vs batch size: none vs BN vs ghost BN (LWSP18).

    Command: ``python -m experiments batch_size`` (full) or ``--quick``.
    Expected runtime on 2 shared CPU cores (2026-11-25): quick 1.8 min (measured), full ~8 min (estimated).
    Expected result: BN's test accuracy is highest at small-to-moderate batches (~32-128) and falls at the
    largest batch, where ghost BN (sub-batches of ``ghost_size``) recovers part of it; without BN the
    dependence on batch size is weaker.

    Every run takes ``steps`` SGD steps (momentum ``momentum``, learning rate ``lr``), so large batches see
    more epochs; accuracies are measured in eval mode (running statistics) on the full train and test sets.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    seed: int = 0
    hidden: tuple[int, ...] = (256, 256)
    batch_sizes: tuple[int, ...] = (8, 32, 128, 512, 2048)
    ghost_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    steps: int = 3000
    segment: int = 500
    loss: str = "cross_entropy"


PRESETS = {
    "quick": dataclasses.replace(Config(), batch_sizes=(16, 128, 1024), steps=1000, segment=500),
    "smoke": dataclasses.replace(Config(), hidden=(16,), batch_sizes=(16,), ghost_size=8, steps=20, segment=10),
}


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every (batch size, variant) pair and measure train/test accuracy."""
    if config.steps % config.segment:
        raise ValueError(f"steps ({config.steps}) must be a multiple of segment ({config.segment}).")
    ds = data_lib.load(config.dataset, config.data_seed)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    runs = []
    total = len(config.batch_sizes) * len(VARIANTS) * (config.steps // config.segment)
    with tqdm(total=total, desc="batch_size", unit="segment") as bar:
        for batch_size in config.batch_sizes:
            for variant in VARIANTS:
                bar.set_postfix_str(f"batch {batch_size} {variant}")
                runs.append(_one_run(config, batch_size, variant, ds, x, y, bar))
    return _outcome(config, runs, out)


def _one_run(config, batch_size, variant, ds, x, y, bar) -> dict:
    ghost = None
    if variant == "ghost" and config.ghost_size < batch_size:
        if batch_size % config.ghost_size:
            raise ValueError(f"ghost_size={config.ghost_size} must divide every batch size; got {batch_size}.")
        ghost = config.ghost_size
    # Ghost BN changes train mode only; the variables are those of plain BN, and the plain model initializes
    # and evaluates them (bnjax checks virtual_batch_size divisibility even in eval mode).
    model = models.MLP(
        features=config.hidden,
        num_classes=ds.num_classes,
        activation="relu",
        norm="none" if variant == "none" else "bn",
    )
    optimizer = optax.sgd(config.lr, momentum=config.momentum)
    state = train.init_train_state(model, x[:2], optimizer, config.seed)
    train_model = model.clone(virtual_batch_size=ghost)
    runner = train.minibatch_runner(train.make_train_step(train_model, config.loss, optimizer), batch_size)
    log = train.train_in_segments(
        runner,
        state,
        x,
        y,
        num_steps=config.steps,
        every=config.segment,
        bar=bar,
        label=f"batch {batch_size} {variant}",
    )
    params, stats = log.state.params, log.state.batch_stats
    train_loss, train_acc = train.evaluate(model, params, stats, x, y, config.loss)
    test_loss, test_acc = train.evaluate(
        model, params, stats, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), config.loss
    )
    return {
        "batch_size": batch_size,
        "variant": variant,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "gap": train_acc - test_acc,
    }


def _outcome(config: Config, runs: list[dict], out: pathlib.Path) -> report.Outcome:
    def series(variant: str, key: str) -> np.ndarray:
        return np.array(
            [next(r[key] for r in runs if r["batch_size"] == b and r["variant"] == variant) for b in config.batch_sizes]
        )

    fig, axes = report.figure(ncols=2)
    for variant in VARIANTS:
        axes[0].plot(config.batch_sizes, series(variant, "test_accuracy"), marker="o", label=variant)
        axes[1].plot(config.batch_sizes, series(variant, "gap"), marker="o", label=variant)
    axes[0].set(title="test accuracy", xlabel="batch size", xscale="log")
    axes[1].set(title="generalization gap (train - test accuracy)", xlabel="batch size", xscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    figures = [report.save_figure(fig, out, "batch_size.png")]
    table = report.markdown_table(
        ["batch size", "variant", "train acc", "test acc", "gap", "test loss"],
        [
            [r["batch_size"], r["variant"], r["train_accuracy"], r["test_accuracy"], r["gap"], r["test_loss"]]
            for r in runs
        ],
    )
    bn_test, ghost_test = series("bn", "test_accuracy"), series("ghost", "test_accuracy")
    none_test = series("none", "test_accuracy")
    sizes = np.array(config.batch_sizes)
    best_bn = int(sizes[np.argmax(bn_test)])
    claims = [
        report.Claim(
            "LWSP18: BN's benefit weakens as the batch grows (test accuracy at the largest batch below its best)",
            f"BN test accuracy {bn_test[np.argmax(bn_test)]:.3f} at batch {best_bn} vs {bn_test[-1]:.3f} at batch "
            f"{sizes[-1]}; BN minus none: smallest batch {bn_test[0] - none_test[0]:+.3f}, largest "
            f"{bn_test[-1] - none_test[-1]:+.3f}",
            "held" if bn_test[-1] < bn_test.max() else "not held",
        ),
        report.Claim(
            "LWSP18: BN works best with moderate batches (~32-128)",
            f"best BN batch size {best_bn}",
            "held" if 32 <= best_bn <= 128 else ("inconclusive" if len(sizes) < 3 else "not held"),
        ),
        report.Claim(
            f"Control: ghost BN (sub-batches of {config.ghost_size}) recovers small-batch regularization at the "
            "largest batch",
            f"test accuracy at batch {sizes[-1]}: ghost {ghost_test[-1]:.3f} vs BN {bn_test[-1]:.3f}",
            "held" if ghost_test[-1] > bn_test[-1] else "not held",
        ),
    ]
    notes = [
        f"{config.steps} SGD steps (lr {config.lr}, momentum {config.momentum}) at every batch size; "
        "eval-mode accuracies on the full train and test sets."
    ]
    return report.Outcome({"runs": runs}, claims, [table], figures, notes)
