"""Edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar 2021): sharpness settles at the stability threshold.

Full-batch gradient descent at several learning rates ``eta``, with and without batch norm, on a fixed
training set; the sharpness (top eigenvalue of the training-loss Hessian) is tracked every ``track_every``
steps by :class:`bnjax.curvature.EoSTracker` with warm-started solves. CKLKT21 predict progressive
sharpening up to ``2/eta``, then hovering at it while the loss keeps falling non-monotonically; for
heavy-ball momentum ``beta`` the threshold is ``(2 + 2 beta)/eta``; for Adam the *preconditioned* sharpness
settles near ``(2 + 2 beta1)/((1 - beta1) eta) = 38/eta`` (Cohen et al. 2022).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from bnjax import curvature
from experiments import data as data_lib
from experiments import models, report, train


@dataclasses.dataclass(frozen=True)
class Config:
    """Edge of stability (CKLKT21), the flagship.

    Command: ``python -m experiments eos`` (full) or ``python -m experiments eos --quick``.
    Expected runtime on 2 shared CPU cores (2026-11-25): quick 1.6 min, full 10 min (both measured); with the
    top-3 tracking of the GD runs (at most 3 x solver_iters HVPs each) the quick form took 104 s at load ~4
    (2026-12-04; 98-100% of the top-3 solves converged, 40 HVPs per checkpoint on the BN run).
    Expected result: with square loss, GD runs with and without BN reach ``2/eta`` (BN nets start there:
    their sharpness at initialization is already above it) and stay within 0.95-1.10 of it ("held") while
    the loss keeps decreasing non-monotonically; momentum and Adam runs hover at ``(2+2 beta)/eta`` and at a
    preconditioned ``38/eta``. Full run of 2026-11-25 (``experiments/results/eos-full/``): 10 of 12 runs
    held; momentum at lr 0.03 without BN was still sharpening at step 5000 (0.65 x threshold, "not reached");
    GD at lr 0.2 with BN diverged within 50 steps (reported, left out of the claim's verdict).

    Model: a tanh MLP (``hidden``) on the first ``n_train`` MNIST-1D training examples; hidden kernels drawn
    with ``init_scale`` times the LeCun normal std (0.577 matches the std of PyTorch's default ``Linear``
    init, which CKLKT21's code uses; with 1.0 the initial sharpness is already near ``2/0.1``). Loss:
    ``square`` (``0.5 ||f - onehot||^2``, CKLKT21's main figures) or ``cross_entropy`` (with it the sharpness
    falls late in training as the margins grow, so "held" is not expected at the end).
    Sharpness: :class:`bnjax.curvature.EoSTracker` on the Hessian of the full-batch training loss with BN in
    train mode (the function GD optimizes; ``chunk_size`` < ``n_train`` gives ghost batches as in CKLKT21's
    code), ``solver`` (``lanczos`` or ``power``) warm-started from the previous eigenvector, at most
    ``solver_iters`` HVPs per checkpoint, relative tolerance ``solver_tol``. GD runs track the top ``topk``
    eigenvalues (``EoSTracker(..., k=topk)``, block Lanczos warm-started from the previous ``topk`` Ritz
    vectors, at most ``solver_iters`` HVPs per tracked eigenvalue; ``topk=1`` tracks the sharpness alone, as
    the other optimizers' runs do); the figure's last column
    shows them against ``2/eta`` and the report tabulates them.
    Devices: ``devices > 1`` shards the training set over that many devices along the example axis and lets
    ``jax.jit`` partition training and HVPs (the sharded-jit data-parallel path; BN statistics stay those of
    the full batch), so the same command scales to an accelerator host. The tracker runs data-parallel
    (``EoSTracker(..., shards=devices)``: every device reads only its rows, no data set is gathered); with
    ``chunk_size < n_train`` a chunk (ghost batch) is then the ``c``-th slice of ``chunk_size / devices`` rows
    of every device's shard, so ``chunk_size`` must be a multiple of ``devices``.
    Schedule: ``schedule_lrs = (lr0, lr1)`` adds GD runs (each norm) whose learning rate steps from ``lr0`` to
    ``lr1`` at mid-run (``optax.piecewise_constant_schedule``); their threshold at each checkpoint is that
    step's ``2/eta`` (``StabilityRule.threshold_at``), and the claim is that the sharpness follows it to the new
    threshold. ``()`` leaves them out.
    Verdict per run: over the last ``verdict_window`` of the checkpoints, "held" when at least
    ``min_in_band`` of them lie within ``[band_low, band_high]`` times the threshold, "not reached" when the
    sharpness never reached ``band_low`` times it, "not held" otherwise; "diverged" when the loss became
    non-finite (left out of the claim). ``short_run`` (set by the quick and smoke presets): the runs are too
    short to refute (a run still sharpening at step 1000 may hover at the threshold by step 5000), so a run
    that did not hold reads "too short" and its claim "too short to judge" instead of "not held" or
    "inconclusive"; only "held" is a verdict there.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    n_train: int = 1000
    seed: int = 0
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    init_scale: float = 0.577
    loss: str = "square"
    norms: tuple[str, ...] = ("none", "bn")
    gd_lrs: tuple[float, ...] = (0.05, 0.1, 0.2)
    momentum: float = 0.9
    momentum_lrs: tuple[float, ...] = (0.03, 0.1)
    adam_lrs: tuple[float, ...] = (0.001,)
    schedule_lrs: tuple[float, ...] = (0.05, 0.1)
    adam_beta2: float = 0.999
    adam_eps: float = 1e-7
    steps: int = 5000
    track_every: int = 50
    solver: str = "lanczos"
    solver_iters: int = 20
    solver_tol: float = 1e-3
    topk: int = 3
    chunk_size: int = 1000
    devices: int = 1
    verdict_window: float = 0.25
    band_low: float = 0.95
    band_high: float = 1.10
    min_in_band: float = 0.9
    short_run: bool = False


PRESETS = {
    "quick": dataclasses.replace(
        Config(), gd_lrs=(0.1,), momentum_lrs=(0.03,), adam_lrs=(0.001,), steps=1000, track_every=20, short_run=True
    ),
    "smoke": dataclasses.replace(
        Config(),
        n_train=200,
        hidden=(32, 32),
        norms=("bn",),
        gd_lrs=(0.1,),
        momentum_lrs=(),
        adam_lrs=(0.001,),
        steps=40,
        track_every=10,
        solver_iters=5,
        chunk_size=200,
        short_run=True,
    ),
}


ADAM_B1 = 0.9


class RunSpec(NamedTuple):
    """One training run: optimizer (``"gd"``, ``"momentum"``, ``"adam"``, or ``"gd-schedule"``: GD whose
    learning rate steps from ``lr`` to ``lr_after`` at mid-run), learning rate and normalization."""

    optimizer: str
    lr: float
    norm: str
    lr_after: float | None = None

    @property
    def label(self) -> str:
        lr = f"{self.lr:g}" if self.lr_after is None else f"{self.lr:g}->{self.lr_after:g}"
        return f"{self.optimizer} lr={lr} {'BN' if self.norm == 'bn' else 'no BN'}"


def _learning_rate(spec: RunSpec, config: Config) -> float | optax.Schedule:
    if spec.lr_after is None:
        return spec.lr
    return optax.piecewise_constant_schedule(spec.lr, {config.steps // 2: spec.lr_after / spec.lr})


def stability_rule(spec: RunSpec, config: Config) -> curvature.StabilityRule:
    """The run's :class:`bnjax.curvature.StabilityRule`: GD ``2/eta``, heavy ball ``(2+2 beta)/eta``, Adam
    preconditioned ``(2+2 b1)/((1-b1) eta)``."""
    if spec.optimizer in ("gd", "gd-schedule"):
        return curvature.gd_rule(_learning_rate(spec, config))
    if spec.optimizer == "momentum":
        return curvature.heavy_ball_rule(spec.lr, config.momentum)
    return curvature.adam_rule(spec.lr, b1=ADAM_B1, b2=config.adam_beta2, eps=config.adam_eps)


def run_verdict(ratios: np.ndarray, config: Config) -> tuple[str, float]:
    """``(verdict, fraction of the final window in the band)`` for sharpness/threshold ratios at checkpoints."""
    ratios = np.asarray(ratios)
    if ratios.size == 0:
        return "not reached", 0.0
    tail = ratios[-max(1, math.ceil(config.verdict_window * len(ratios))) :]
    in_band = float(np.mean((tail >= config.band_low) & (tail <= config.band_high)))
    if not np.any(ratios >= config.band_low):
        return "not reached", in_band
    return ("held" if in_band >= config.min_in_band else "not held"), in_band


def judged(verdict: str, config: Config) -> str:
    """A run's verdict as reported: in the quick form a run that did not hold is "too short" (it cannot refute)."""
    if config.short_run and verdict in ("not held", "not reached"):
        return "too short"
    return verdict


def _optimizer(spec: RunSpec, config: Config) -> optax.GradientTransformation:
    if spec.optimizer in ("gd", "gd-schedule"):
        return optax.sgd(_learning_rate(spec, config))
    if spec.optimizer == "momentum":
        return optax.sgd(spec.lr, momentum=config.momentum)
    return optax.adam(spec.lr, b1=ADAM_B1, b2=config.adam_beta2, eps=config.adam_eps)


def _specs(config: Config) -> list[RunSpec]:
    groups = (("gd", config.gd_lrs), ("momentum", config.momentum_lrs), ("adam", config.adam_lrs))
    specs = [RunSpec(opt, lr, norm) for opt, lrs in groups for lr in lrs for norm in config.norms]
    if config.schedule_lrs:
        lr0, lr1 = config.schedule_lrs
        specs += [RunSpec("gd-schedule", lr0, norm, lr1) for norm in config.norms]
    return specs


def _check(config: Config) -> None:
    train.check_loss_and_norms(config.loss, config.norms)
    if config.solver not in ("lanczos", "power"):
        raise ValueError(f"solver must be 'lanczos' or 'power', got {config.solver!r}.")
    if config.solver == "power" and config.topk > 1:
        raise ValueError(f"topk={config.topk} tracks with block Lanczos: use solver='lanczos' or topk=1.")
    if not 1 <= config.topk <= config.solver_iters:
        raise ValueError(f"need 1 <= topk <= solver_iters, got topk={config.topk}, solver_iters={config.solver_iters}.")
    if config.steps < config.track_every or config.track_every < 1:
        raise ValueError(f"need 1 <= track_every <= steps, got track_every={config.track_every}, steps={config.steps}.")
    if not 1 <= config.devices <= jax.device_count() or config.n_train % config.devices:
        raise ValueError(
            f"devices must be in [1, {jax.device_count()}] (available) and divide n_train={config.n_train}; "
            f"got {config.devices}."
        )
    if min(config.chunk_size, config.n_train) % config.devices:
        raise ValueError(
            f"chunk_size={config.chunk_size} must be a multiple of devices={config.devices} (every chunk takes "
            "the same number of rows from each device's shard)."
        )
    if len(config.schedule_lrs) not in (0, 2) or not all(lr > 0 for lr in config.schedule_lrs):
        raise ValueError(
            f"schedule_lrs must be () or two positive learning rates (lr0, lr1), got {config.schedule_lrs!r}."
        )
    if not 0 < config.band_low < 1 < config.band_high:
        raise ValueError(f"need 0 < band_low < 1 < band_high, got {config.band_low}, {config.band_high}.")


class RunRecord(NamedTuple):
    """What one run produced (host NumPy arrays).

    Fields:
      losses: float32[steps_done] full-batch training loss before each step.
      steps: int[checkpoints] step after which each sharpness was measured (``track_every``, 2x, ...).
      sharpness: float32[checkpoints] top Hessian eigenvalue (preconditioned for Adam).
      eigenvalues: float32[checkpoints, k] the top ``k`` eigenvalues, descending (``k = topk`` for GD runs,
        else 1: the sharpness).
      thresholds: float32[checkpoints] the stability threshold at each checkpoint (that step's learning rate).
      hvps: int[checkpoints] Hessian-vector products each solve used.
      residual: float32[checkpoints] relative residual of each solve.
      converged: bool[checkpoints] each solve's stopping rule held (for every pair with ``k > 1``) within
        ``solver_iters`` HVPs.
      checkpoint_losses: float32[checkpoints] full-batch loss at each checkpoint's parameters.
      diverged: the error message if the loss became non-finite, else "".
    """

    losses: np.ndarray
    steps: np.ndarray
    sharpness: np.ndarray
    eigenvalues: np.ndarray
    thresholds: np.ndarray
    hvps: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    checkpoint_losses: np.ndarray
    diverged: str


def _train_one(spec: RunSpec, config: Config, x: jax.Array, y: jax.Array, num_classes: int, bar: tqdm) -> RunRecord:
    model = models.MLP(
        features=config.hidden,
        num_classes=num_classes,
        activation=config.activation,
        norm=spec.norm,
        init_scale=config.init_scale,
    )
    optimizer = _optimizer(spec, config)
    k = config.topk if spec.optimizer == "gd" else 1
    state = train.init_train_state(model, x[:2], optimizer, config.seed)
    run_steps = train.full_batch_runner(train.make_train_step(model, config.loss, optimizer))
    fns = curvature.flax_curvature_fns(
        model.apply, train.output_loss(config.loss), bn_mode="train" if spec.norm == "bn" else None
    )
    tracker = curvature.EoSTracker(
        fns.loss_fn,
        stability_rule(spec, config),
        every=config.track_every,
        chunk_size=config.chunk_size,
        shards=config.devices if config.devices > 1 else None,
        per_example=fns.per_example,  # nets without BN: one all-reduce per product on several devices
        method=config.solver,
        tol=config.solver_tol,
        max_iters=config.solver_iters * k,  # a budget per tracked eigenvalue
        k=k,
    )
    # Sharpness is first measured after `track_every` steps: Adam's preconditioner needs a step.
    tracker_state = tracker.init(state.params, jax.random.PRNGKey(config.seed + 1))
    losses, records, diverged = [], [], ""
    bar.set_postfix_str(spec.label)
    segments = config.steps // config.track_every
    for i in range(segments):
        try:
            state, metrics = run_steps(state, x, y, config.track_every)
            losses.append(train.check_finite(metrics.loss, i * config.track_every, f" ({spec.label})"))
            stats = state.batch_stats if spec.norm == "bn" else None
            record, tracker_state = tracker.measure(
                tracker_state, int(state.step), state.params, (x, y), stats, opt_state=state.opt_state
            )
        except FloatingPointError as err:  # train.Diverged, or the tracker's non-finite loss
            diverged = str(err)
            bar.update(segments - i)
            break
        records.append(record)
        bar.update(1)
    fields = ("step", "sharpness", "threshold", "hvps", "residual", "converged", "loss")
    arrays = {k: np.asarray([r[k] for r in records]) for k in fields}
    eigenvalues = np.asarray([r.get("eigenvalues", [r["sharpness"]]) for r in records], np.float32)
    return RunRecord(
        np.concatenate(losses) if losses else np.zeros(0, np.float32),
        arrays["step"],
        arrays["sharpness"].astype(np.float32),
        eigenvalues.reshape(len(records), k),  # (0, k) when the run diverged before its first checkpoint
        arrays["threshold"].astype(np.float32),
        arrays["hvps"],
        arrays["residual"].astype(np.float32),
        arrays["converged"].astype(bool),
        arrays["loss"].astype(np.float32),
        diverged,
    )


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every run, track sharpness, write the plots; see :class:`Config`."""
    _check(config)
    ds = data_lib.subset(data_lib.load(config.dataset, config.data_seed), config.n_train)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if config.devices > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: config.devices]), ("data",))
        examples = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        x, y = jax.device_put(x, examples), jax.device_put(y, examples)
    specs = _specs(config)
    records: dict[RunSpec, RunRecord] = {}
    with tqdm(total=len(specs) * (config.steps // config.track_every), desc="eos", unit="segment") as bar:
        for spec in specs:
            records[spec] = _train_one(spec, config, x, y, ds.num_classes, bar)
    return _outcome(config, records, out)


OPTIMIZER_TITLES = {
    "gd": "GD: threshold 2/eta",
    "momentum": "heavy-ball momentum: (2+2 beta)/eta",
    "adam": "Adam: preconditioned, 38/eta",
    "gd-schedule": "GD, step schedule: 2/eta_t",
}


def _last(values: np.ndarray) -> float:
    return float(values[-1]) if values.size else float("nan")


def _outcome(config: Config, records: dict[RunSpec, RunRecord], out: pathlib.Path) -> report.Outcome:
    rows, runs = [], []
    for spec, rec in records.items():
        # The threshold at each checkpoint (constant unless the learning rate follows a schedule); the table
        # shows the one at the end of the run.
        thr = stability_rule(spec, config).threshold_at(config.steps)
        ratios = rec.sharpness / rec.thresholds
        verdict, in_band = run_verdict(ratios, config)
        verdict = "diverged" if rec.diverged else judged(verdict, config)
        reached = np.flatnonzero(ratios >= config.band_low)
        first = int(rec.steps[reached[0]]) if reached.size else None
        entry = {
            "optimizer": spec.optimizer,
            "lr": spec.lr,
            "lr_after": spec.lr_after,
            "norm": spec.norm,
            "threshold": thr,
            "first_sharpness": float(rec.sharpness[0]) if rec.sharpness.size else float("nan"),
            "final_sharpness": _last(rec.sharpness),
            "final_ratio": _last(ratios),
            "max_ratio": float(ratios.max()) if ratios.size else float("nan"),
            "fraction_in_band": in_band,
            "first_step_at_threshold": first,
            "final_loss": _last(rec.losses),
            "loss_increases": int(np.sum(np.diff(rec.losses) > 0)),
            # The first solve is cold; the mean counts the warm-started ones.
            "mean_hvps_per_checkpoint": float(rec.hvps[1:].mean()) if rec.hvps.size > 1 else float("nan"),
            "verdict": verdict,
            "diverged": rec.diverged,
            "steps": rec.steps,
            "sharpness": rec.sharpness,
            "eigenvalues": rec.eigenvalues,
            "final_eigenvalues": rec.eigenvalues[-1] if rec.eigenvalues.size else [],
            "loss_at_checkpoints": rec.checkpoint_losses,
        }
        runs.append(entry)
        rows.append(
            [
                spec.optimizer,
                f"{spec.lr:g}" if spec.lr_after is None else f"{spec.lr:g} -> {spec.lr_after:g}",
                "BN" if spec.norm == "bn" else "none",
                thr,
                entry["first_sharpness"],
                entry["final_sharpness"],
                entry["final_ratio"],
                in_band,
                first,
                entry["final_loss"],
                verdict,
            ]
        )
    table = report.markdown_table(
        [
            "optimizer",
            "lr",
            "norm",
            "threshold",
            f"sharpness at step {config.track_every}",
            "final sharpness",
            "final / threshold",
            f"in band (last {config.verdict_window:.0%})",
            "first step at threshold",
            "final loss",
            "verdict",
        ],
        rows,
    )
    tables = [table]
    topk = _topk_runs(records)
    if topk:
        tables.append(_topk_table(config, topk))
    claims = [_claim(config, runs, opt) for opt in OPTIMIZER_TITLES if any(r["optimizer"] == opt for r in runs)]
    claims.append(_loss_claim(runs, config.short_run))
    figures = [_plot(config, records, out)]
    notes = [
        f"Sharpness: bnjax.curvature.EoSTracker ({config.solver}) warm-started from the previous eigenvector "
        f"every {config.track_every} steps (at most {config.solver_iters} HVPs per tracked eigenvalue; mean HVPs "
        "per checkpoint: "
        + ", ".join(f"{r['mean_hvps_per_checkpoint']:.1f}" for r in runs)
        + "). BN in train mode with the full batch: the Hessian of the function GD optimizes.",
        f"Verdict per run: 'held' when at least {config.min_in_band:.0%} of the checkpoints in the last "
        f"{config.verdict_window:.0%} of the run lie within {config.band_low}-{config.band_high} x the threshold "
        "of their step; 'not reached' when the sharpness never reached the band; 'not held' otherwise; "
        "'diverged' when the loss became non-finite (reported, left out of its claim: EoS describes runs that "
        "train)."
        + (" Quick form: a run that did not hold reads 'too short' (it cannot refute)." if config.short_run else ""),
        "Verdict per claim: " + CLAIM_RULE,
    ]
    if config.loss == "cross_entropy":
        notes.append(
            "Cross-entropy: the sharpness decreases late in training as the margins grow (CKLKT21 Appendix), "
            "so runs that reached the threshold may end below it and read 'not held'."
        )
    results = {"runs": runs, "n_train": config.n_train, "dataset": config.dataset}
    if topk:
        notes.append(
            f"Top-{config.topk} eigenvalues of the GD runs: EoSTracker(k={config.topk}), block Lanczos warm-started "
            "from the previous Ritz vectors (same tolerance; each pair's own stopping rule). Second table: the "
            "final eigenvalues over the threshold and how many of the last checkpoints (same window as the "
            "verdict) have each eigenvalue at or above band_low x threshold."
        )
    return report.Outcome(results, claims, tables, figures, notes)


def _topk_runs(records: dict[RunSpec, RunRecord]) -> list[tuple[RunSpec, RunRecord]]:
    """The runs that tracked more than one eigenvalue and reached at least one checkpoint (a run that diverged
    in its first segment has none)."""
    return [(s, r) for s, r in records.items() if r.eigenvalues.shape[1] > 1 and r.eigenvalues.shape[0] > 0]


def _topk_table(config: Config, topk: list[tuple[RunSpec, RunRecord]]) -> str:
    """Final top-k eigenvalues / threshold and the fraction of the final window at the threshold, per GD run."""
    rows = []
    for spec, rec in topk:
        thr = stability_rule(spec, config).threshold
        ratios = rec.eigenvalues / thr
        tail = ratios[-max(1, math.ceil(config.verdict_window * len(ratios))) :]
        rows.append(
            [
                spec.label,
                thr,
                " / ".join(f"{r:.3f}" for r in ratios[-1]),
                " / ".join(f"{np.mean(t >= config.band_low):.0%}" for t in tail.T),
                float(rec.hvps[1:].mean()) if rec.hvps.size > 1 else float("nan"),
                f"{np.mean(rec.converged):.0%}" if rec.converged.size else "n/a",
            ]
        )
    k = topk[0][1].eigenvalues.shape[1]
    return report.markdown_table(
        [
            "GD run",
            "threshold 2/eta",
            f"final lambda_1..{k} / threshold",
            f"last {config.verdict_window:.0%} at >= {config.band_low} x threshold (each)",
            "mean HVPs / checkpoint",
            f"solves converged (all {k} pairs, within {k} x solver_iters HVPs)",
        ],
        rows,
    )


CLAIM_RULE = (
    "'held' when every run of the claim that trained held; otherwise, in the full form, 'not held' when a run "
    "ended outside the band and 'inconclusive' when runs only failed to reach it (or every run diverged); in the "
    "quick form 'too short to judge' (a short run cannot refute a claim about long-run behaviour)."
)


def claim_verdict(verdicts: list[str], quick: bool) -> str:
    """Combine the runs' verdicts into the claim's (see :data:`CLAIM_RULE`; diverged runs are left out)."""
    trained = [v for v in verdicts if v != "diverged"]
    if trained and all(v == "held" for v in trained):
        return "held"
    if quick:
        return "too short to judge"
    return "not held" if "not held" in trained else "inconclusive"


def _claim(config: Config, runs: list[dict], optimizer: str) -> report.Claim:
    mine = [r for r in runs if r["optimizer"] == optimizer]
    text = {
        "gd": "CKLKT21: under full-batch GD the sharpness rises to 2/eta and hovers there, with and without BN",
        "momentum": f"CKLKT21: with heavy-ball momentum (beta={config.momentum}) it hovers at (2+2 beta)/eta",
        "adam": "Cohen et al. 2022: Adam's preconditioned sharpness hovers at 38/eta",
        "gd-schedule": (
            f"The threshold follows the learning rate: when GD's lr steps from {config.schedule_lrs[0]:g} to "
            f"{config.schedule_lrs[-1]:g} at step {config.steps // 2}, the sharpness moves to the new 2/eta"
            if config.schedule_lrs
            else ""
        ),
    }[optimizer]
    measured = "; ".join(
        f"lr={_lr_text(r)} {'BN' if r['norm'] == 'bn' else 'no BN'}: "
        + (
            "diverged (excluded)"
            if r["diverged"]
            else f"final/threshold {r['final_ratio']:.3f}, {r['fraction_in_band']:.0%} in band, {r['verdict']}"
        )
        for r in mine
    )
    # The claim is about runs that train; a run that diverged outright is reported, not counted.
    return report.Claim(text, measured, claim_verdict([r["verdict"] for r in mine], config.short_run))


def _lr_text(run: dict) -> str:
    return f"{run['lr']:g}" if run["lr_after"] is None else f"{run['lr']:g}->{run['lr_after']:g}"


def _loss_claim(runs: list[dict], quick: bool) -> report.Claim:
    """At the edge of stability the loss keeps decreasing, non-monotonically."""
    text = "CKLKT21: at the edge of stability the loss keeps decreasing over long times, non-monotonically"
    at_eos = [r for r in runs if r["verdict"] == "held"]
    if not at_eos:
        return report.Claim(text, "no run held at the threshold", "too short to judge" if quick else "inconclusive")
    decreasing, measured = [], []
    for r in at_eos:
        arrival = int(np.searchsorted(np.asarray(r["steps"]), r["first_step_at_threshold"]))
        loss_at_arrival = float(np.asarray(r["loss_at_checkpoints"])[arrival])
        decreasing.append(r["final_loss"] < loss_at_arrival and r["loss_increases"] > 0)
        measured.append(
            f"{r['optimizer']} lr={_lr_text(r)} {'BN' if r['norm'] == 'bn' else 'no BN'}: loss {loss_at_arrival:.3g}"
            f" at arrival -> {r['final_loss']:.3g}, {r['loss_increases']} step-to-step increases"
        )
    verdict = "held" if all(decreasing) else ("too short to judge" if quick else "not held")
    return report.Claim(text, "; ".join(measured), verdict)


def _plot(config: Config, records: dict[RunSpec, RunRecord], out: pathlib.Path) -> str:
    optimizers = [o for o in OPTIMIZER_TITLES if any(s.optimizer == o for s in records)]
    topk = _topk_runs(records)
    ncols = len(optimizers) + bool(topk)
    fig, axes = report.figure(ncols=ncols, nrows=2)
    for col, opt in enumerate(optimizers):
        ax_s, ax_l = axes[col], axes[ncols + col]
        for i, (spec, rec) in enumerate((s, r) for s, r in records.items() if s.optimizer == opt):
            color = f"C{i}"
            ax_s.plot(rec.steps, rec.sharpness, color=color, label=spec.label)
            if opt != "gd-schedule":
                ax_s.axhline(stability_rule(spec, config).threshold, color=color, linestyle="--", linewidth=1)
            ax_l.plot(np.arange(rec.losses.size), rec.losses, color=color, linewidth=0.8, label=spec.label)
        if opt == "gd-schedule":  # every run of the panel has the same schedule: one threshold line, in black
            spec = next(s for s in records if s.optimizer == opt)
            steps = np.arange(config.track_every, config.steps + 1, config.track_every)
            rule = stability_rule(spec, config)
            ax_s.step(
                steps,
                [rule.threshold_at(int(t)) for t in steps],
                where="post",
                color="k",
                linestyle="--",
                linewidth=1,
                label=f"2/eta_t: {rule.threshold_at(0):g} -> {rule.threshold_at(config.steps):g}",
            )
        ylabel = "preconditioned sharpness" if opt == "adam" else "sharpness"
        ax_s.set(title=OPTIMIZER_TITLES[opt], xlabel="step", ylabel=ylabel)
        ax_l.set(xlabel="step", ylabel=f"train loss ({config.loss})", yscale="log")
        ax_s.legend(fontsize=7)
        ax_l.legend(fontsize=7)
    if topk:
        _plot_topk(config, topk, axes[len(optimizers)], axes[ncols + len(optimizers)])
    return report.save_figure(fig, out, "sharpness_and_loss.png")


def _plot_topk(config: Config, topk: list[tuple[RunSpec, RunRecord]], ax_values, ax_ratio) -> None:
    """Top panel: the top-k eigenvalues of each GD run (solid: lambda_1, fainter: the next) with 2/eta;
    bottom panel: lambda_i / threshold."""
    for i, (spec, rec) in enumerate(topk):
        thr = stability_rule(spec, config).threshold
        for j in range(rec.eigenvalues.shape[1]):
            style = {"color": f"C{i}", "alpha": 1.0 - 0.3 * j, "linewidth": 1.2 if j == 0 else 0.8}
            label = f"{spec.label}" if j == 0 else None
            ax_values.plot(rec.steps, rec.eigenvalues[:, j], label=label, **style)
            ax_ratio.plot(rec.steps, rec.eigenvalues[:, j] / thr, label=f"{spec.label}: lambda_{j + 1}", **style)
        ax_values.axhline(thr, color=f"C{i}", linestyle="--", linewidth=1)
    k = topk[0][1].eigenvalues.shape[1]
    ax_values.set(title=f"GD: top-{k} eigenvalues (fainter: lambda_2, ...)", xlabel="step", ylabel="eigenvalue")
    ax_ratio.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax_ratio.set(xlabel="step", ylabel="eigenvalue / threshold")
    ax_values.legend(fontsize=7)
    ax_ratio.legend(fontsize=6)
