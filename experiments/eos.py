"""Edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar 2021): sharpness settles at the stability threshold.

Full-batch gradient descent at several learning rates ``eta``, with and without batch norm, on a fixed
training set; the sharpness (top eigenvalue of the training-loss Hessian) is tracked every ``track_every``
steps by :class:`bnjax.curvature.EoSTracker` with warm-started solves. CKLKT21 predict progressive
sharpening up to ``2/eta``, then hovering at it while the loss keeps falling non-monotonically; for
heavy-ball momentum ``beta`` the threshold is ``(2 + 2 beta)/eta``; for Adam the *preconditioned* sharpness
settles near ``(2 + 2 beta1)/((1 - beta1) eta) = 38/eta`` (Cohen et al. 2022). Every setting runs once per
seed (the tracker is driven from the host per training state, so seeds run one after the other, reusing the
compiled programs); each run has its verdict and a setting's verdict combines its seeds (:data:`SEED_RULE`).
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

from bnjax import curvature
from experiments import data as data_lib
from experiments import models, progress, report, stats, train


@dataclasses.dataclass(frozen=True)
class Config:
    """Edge of stability (CKLKT21), the flagship.

    Command: ``python -m experiments eos`` (full) or ``python -m experiments eos --quick``.
    Expected runtime on 2 CPU cores: see ``experiments/runtimes.py`` (``--help`` prints it).
    Expected result: with square loss, GD runs with and without BN reach ``2/eta`` (BN nets start there:
    their sharpness at initialization is already above it) and stay within 0.95-1.10 of it ("held") at every
    seed while the loss keeps decreasing non-monotonically; momentum and Adam runs hover at ``(2+2 beta)/eta``
    and at a preconditioned ``38/eta``. Known exceptions (full run over seeds 0-2 of 2026-12-04,
    ``experiments/results/claims-full/eos-mlp/``): momentum at lr 0.03 without BN is still sharpening at step
    5000 (0.70 x threshold, "not reached", at every seed); the BN nets at lr 0.1 (GD and momentum) diverge
    within about 30 steps at seeds 1 and 2, so those settings rest on seed 0 (the table's "seeds" column says
    so), and GD at lr 0.2 with BN diverges at every seed (their sharpness at initialization is above 2/eta);
    diverged runs are reported and left out of the claims' verdicts.

    Model: a tanh MLP (``hidden``) on the first ``n_train`` MNIST-1D training examples; hidden kernels drawn
    with ``init_scale`` times the LeCun normal std (0.577 matches the std of PyTorch's default ``Linear``
    init, which CKLKT21's code uses; with 1.0 the initial sharpness is already near ``2/0.1``). Loss:
    ``square`` (``0.5 ||f - onehot||^2``, CKLKT21's main figures) or ``cross_entropy`` (with it the sharpness
    falls late in training as the margins grow, so "held" is not expected at the end).
    Seeds: every setting (optimizer, learning rate, norm) runs once per seed in ``seeds`` (initialization and
    the tracker's start vector), one after the other: the tracker is host-driven per training state, so the
    seeds cannot share one vmapped program; they reuse each setting's compiled programs. The quick and smoke
    presets run one seed (the quick form can only confirm a claim; see ``short_run``).
    Sharpness: :class:`bnjax.curvature.EoSTracker` on the Hessian of the full-batch training loss with BN in
    train mode (the function GD optimizes; ``chunk_size`` < ``n_train`` gives ghost batches as in CKLKT21's
    code), ``solver`` (``lanczos`` or ``power``) warm-started from the previous eigenvector, at most
    ``solver_iters`` HVPs per checkpoint, relative tolerance ``solver_tol``. GD runs track the top ``topk``
    eigenvalues (``EoSTracker(..., k=topk)``, block Lanczos warm-started from the previous ``topk`` Ritz
    vectors, at most ``solver_iters`` HVPs per tracked eigenvalue; ``topk=1`` tracks the sharpness alone, as
    the other optimizers' runs do); the figure's last column shows them over ``2/eta`` and the report
    tabulates them.
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
    Verdict per run (setting x seed): over the last ``verdict_window`` of the checkpoints, "held" when at least
    ``min_in_band`` of them lie within ``[band_low, band_high]`` times the threshold, "not reached" when the
    sharpness never reached ``band_low`` times it, "not held" otherwise; "diverged" when the loss became
    non-finite. Per setting (:data:`SEED_RULE`): "held" when every seed that trained held, "diverged" when
    every seed diverged, else "not held" if a seed did not hold, else "not reached". Per claim
    (:data:`CLAIM_RULE`): over the settings, diverged ones left out. The report also gives, per setting, the
    mean over seeds of the sharpness / threshold over the verdict window with its 95% t-interval.
    ``short_run`` (set by the quick and smoke presets): the runs are too short to refute (a run still
    sharpening at step 1000 may hover at the threshold by step 5000), so a run that did not hold reads "too
    short" and its claim "too short to judge" instead of "not held" or "inconclusive"; only "held" is a
    verdict there.
    Differences from CKLKT21: MNIST-1D (1000 examples) instead of CIFAR-10 subsets, a small tanh MLP instead
    of their fully-connected and conv nets, 5000 steps, sharpness every 50 steps.
    """

    dataset: str = "mnist1d"
    data_seed: int = 42
    n_train: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
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


# The quick form: one seed, short runs (it may confirm a claim, never refute one).
_QUICK = {
    "seeds": (0,),
    "gd_lrs": (0.1,),
    "momentum_lrs": (0.03,),
    "adam_lrs": (0.001,),
    "steps": 1000,
    "track_every": 20,
    "short_run": True,
}
PRESETS = {
    "quick": dataclasses.replace(Config(), **_QUICK),
    "smoke": dataclasses.replace(
        Config(),
        seeds=(0,),
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
# The claims matrix (experiments.claims): this experiment's own tanh MLP, 3 seeds in both forms. Quick: the quick
# preset's GD and Adam settings over 3 seeds, without the top-k tracking (the momentum and schedule runs read
# "too short" at 1000 steps anyway), to fit the matrix's quick budget; full: the full defaults (the full eos run).
_MATRIX_QUICK = {**_QUICK, "seeds": (0, 1, 2), "momentum_lrs": (), "schedule_lrs": (), "topk": 1}
MATRIX = {"mlp": {"quick": _MATRIX_QUICK, "full": {}}}
SOLVERS = ("lanczos", "power")
CHOICES = {"loss": train.LOSSES, "norms": ("none", "bn"), "solver": SOLVERS}


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


def check(config: Config) -> None:
    train.check_loss_and_norms(config.loss, config.norms)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct and nonempty, got {config.seeds}.")
    if config.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {config.solver!r}.")
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
    for name in ("gd_lrs", "momentum_lrs", "adam_lrs"):
        lrs = getattr(config, name)
        if not all(0 < lr < math.inf for lr in lrs) or len(set(lrs)) != len(lrs):
            raise ValueError(f"{name} must be distinct finite positive learning rates, got {lrs!r}.")
    if not (config.gd_lrs or config.momentum_lrs or config.adam_lrs or config.schedule_lrs):
        raise ValueError("gd_lrs, momentum_lrs, adam_lrs and schedule_lrs are all empty: nothing to run.")
    if len(set(config.norms)) != len(config.norms):
        raise ValueError(f"norms must be distinct, got {config.norms!r}.")
    if not config.hidden or min(config.hidden) < 1:
        raise ValueError(f"hidden must be one or more positive layer widths, got {config.hidden!r}.")
    if not 0 < config.init_scale < math.inf:
        raise ValueError(f"init_scale must be a finite number > 0, got {config.init_scale}.")
    for name in ("verdict_window", "min_in_band"):
        if not 0 < getattr(config, name) <= 1:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {getattr(config, name)}.")


class RunRecord(NamedTuple):
    """What one run (one setting, one seed) produced (host NumPy arrays).

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
      diverged_at: the step ending the segment in which the loss became non-finite; -1 for a run that finished.
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
    diverged_at: int = -1


class _Setup(NamedTuple):
    """What every seed of one setting shares (built once, so the seeds after the first reuse the compiled code)."""

    model: models.MLP
    optimizer: optax.GradientTransformation
    run_steps: object
    tracker: curvature.EoSTracker
    k: int


def _train_spec(
    spec: RunSpec, config: Config, x: jax.Array, y: jax.Array, num_classes: int, bar: progress.StepBar | None = None
) -> list[RunRecord]:
    """Train ``spec`` once per seed of ``config.seeds`` (in that order), tracking the sharpness."""
    model = models.MLP(
        features=config.hidden,
        num_classes=num_classes,
        activation=config.activation,
        norm=spec.norm,
        init_scale=config.init_scale,
    )
    optimizer = _optimizer(spec, config)
    k = config.topk if spec.optimizer == "gd" else 1
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
    setup = _Setup(model, optimizer, run_steps, tracker, k)
    return [_train_seed(spec, config, seed, setup, x, y, bar, compiled=i > 0) for i, seed in enumerate(config.seeds)]


def _train_seed(
    spec: RunSpec,
    config: Config,
    seed: int,
    setup: _Setup,
    x: jax.Array,
    y: jax.Array,
    bar: progress.StepBar | None,
    compiled: bool,
) -> RunRecord:
    state = train.init_train_state(setup.model, x[:2], setup.optimizer, seed)
    # Sharpness is first measured after `track_every` steps: Adam's preconditioner needs a step.
    tracker_state = setup.tracker.init(state.params, jax.random.PRNGKey(seed + 1))
    losses, records, diverged, diverged_at = [], [], "", -1
    if bar is not None:
        bar.start_run()
        bar.set_label(f"{spec.label}, seed {seed}")
    every = config.track_every
    segments = config.steps // every
    for i in range(segments):
        try:
            state, metrics = setup.run_steps(state, x, y, every)
            losses.append(train.check_finite(metrics.loss, i * every, f" ({spec.label}, seed {seed})"))
            batch_stats = state.batch_stats if spec.norm == "bn" else None
            record, tracker_state = setup.tracker.measure(
                tracker_state, int(state.step), state.params, (x, y), batch_stats, opt_state=state.opt_state
            )
        except FloatingPointError as err:  # train.Diverged, or the tracker's non-finite loss
            diverged, diverged_at = str(err), (i + 1) * every
            if bar is not None:  # the steps not run count as done; their time does not enter the estimate
                bar.advance((segments - i) * every, warm=False)
            break
        records.append(record)
        if bar is not None:  # the first segment of a setting's first seed compiles
            bar.advance(every, warm=compiled or i > 0)
    fields = ("step", "sharpness", "threshold", "hvps", "residual", "converged", "loss")
    arrays = {name: np.asarray([r[name] for r in records]) for name in fields}
    eigenvalues = np.asarray([r.get("eigenvalues", [r["sharpness"]]) for r in records], np.float32)
    return RunRecord(
        np.concatenate(losses) if losses else np.zeros(0, np.float32),
        arrays["step"].astype(int),
        arrays["sharpness"].astype(np.float32),
        eigenvalues.reshape(len(records), setup.k),  # (0, k) when the run diverged before its first checkpoint
        arrays["threshold"].astype(np.float32),
        arrays["hvps"].astype(int),
        arrays["residual"].astype(np.float32),
        arrays["converged"].astype(bool),
        arrays["loss"].astype(np.float32),
        diverged,
        diverged_at,
    )


def run(config: Config, out: pathlib.Path) -> report.Outcome:
    """Train every setting once per seed, track sharpness, write the plots; see :class:`Config`."""
    check(config)
    ds = data_lib.subset(data_lib.load(config.dataset, config.data_seed), config.n_train)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    if config.devices > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: config.devices]), ("data",))
        examples = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        x, y = jax.device_put(x, examples), jax.device_put(y, examples)
    specs = _specs(config)
    records: dict[RunSpec, list[RunRecord]] = {}
    steps_per_run = (config.steps // config.track_every) * config.track_every
    with progress.StepBar(len(specs) * len(config.seeds) * steps_per_run, "eos") as bar:
        for spec in specs:
            records[spec] = _train_spec(spec, config, x, y, ds.num_classes, bar)
    return _outcome(config, ds, records, out)


OPTIMIZER_TITLES = {
    "gd": "GD: threshold 2/eta",
    "momentum": "heavy-ball momentum: (2+2 beta)/eta",
    "adam": "Adam: preconditioned, 38/eta",
    "gd-schedule": "GD, step schedule: 2/eta_t",
}
THRESHOLD_NAMES = {"gd": "2/eta", "momentum": "(2+2 beta)/eta", "adam": "38/eta", "gd-schedule": "2/eta_t"}


# -- verdicts: per run (setting x seed), per setting (over seeds), per claim (over settings) ------------------

SEED_RULE = (
    "a setting, over its seeds: 'held' when every seed that trained held, 'diverged' when every seed diverged, "
    "otherwise 'not held' when a seed ended outside the band after reaching it and 'not reached' when a seed "
    "never reached the band (quick form: 'too short'); a seed that diverged is reported and left out"
)

CLAIM_RULE = (
    "a claim, over its settings: 'held' when every setting of the claim that trained held; otherwise, in the "
    "full form, 'not held' when a setting did not hold and 'inconclusive' when settings only did not reach the "
    "band (or every setting diverged); in the quick form 'too short to judge' (a short run cannot refute a "
    "claim about long-run behaviour)"
)

LOSS_RULE = (
    "the loss claim is held when every run (setting x seed) that held ends with a lower loss than at its arrival "
    "at the threshold and its loss rose from one step to the next at least once"
)


def verdict_rule(config: Config) -> str:
    """The whole rule, as the report prints it: per run, per setting (:data:`SEED_RULE`), per claim
    (:data:`CLAIM_RULE`, :data:`LOSS_RULE`)."""
    run_rule = (
        f"a run (setting x seed) is 'held' when at least {config.min_in_band:.0%} of its checkpoints in the last "
        f"{config.verdict_window:.0%} of the run lie within {config.band_low:.2f}-{config.band_high:.2f} x the "
        f"threshold of their step, 'not reached' when the sharpness never reached {config.band_low:.2f} x the "
        "threshold, 'not held' otherwise, and 'diverged' when the loss became non-finite"
    )
    if config.short_run:
        run_rule += " (in this short form a run that did not hold reads 'too short': it cannot refute)"
    return f"{run_rule}; {SEED_RULE}; {CLAIM_RULE}; {LOSS_RULE}"


def seed_verdict(verdicts: list[str]) -> str:
    """A setting's verdict from its seeds' run verdicts (see :data:`SEED_RULE`)."""
    trained = [v for v in verdicts if v != "diverged"]
    if not trained:
        return "diverged"
    if all(v == "held" for v in trained):
        return "held"
    return next(v for v in ("too short", "not held", "not reached") if v in trained)


def claim_verdict(verdicts: list[str], quick: bool) -> str:
    """Combine the settings' verdicts into the claim's (see :data:`CLAIM_RULE`; diverged ones are left out)."""
    trained = [v for v in verdicts if v != "diverged"]
    if trained and all(v == "held" for v in trained):
        return "held"
    if quick:
        return "too short to judge"
    return "not held" if "not held" in trained else "inconclusive"


def _window(values: np.ndarray, config: Config) -> np.ndarray:
    """The last ``verdict_window`` of the checkpoints (at least one) of ``values[checkpoints, ...]``."""
    return values[-max(1, math.ceil(config.verdict_window * len(values))) :]


def _last(values: np.ndarray) -> float:
    return float(values[-1]) if values.size else float("nan")


def _seed_entry(spec: RunSpec, seed: int, rec: RunRecord, config: Config) -> dict:
    """One run's numbers and verdict (``results.json``'s ``runs``)."""
    ratios = rec.sharpness / rec.thresholds
    verdict, in_band = run_verdict(ratios, config)
    verdict = "diverged" if rec.diverged else judged(verdict, config)
    reached = np.flatnonzero(ratios >= config.band_low)
    return {
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "lr_after": spec.lr_after,
        "norm": spec.norm,
        "seed": seed,
        # The threshold at the end of the run (constant unless the learning rate follows a schedule).
        "threshold": stability_rule(spec, config).threshold_at(config.steps),
        "first_sharpness": float(rec.sharpness[0]) if rec.sharpness.size else float("nan"),
        "final_sharpness": _last(rec.sharpness),
        "final_ratio": _last(ratios),
        # Mean sharpness / threshold over the verdict window; NaN for a run that diverged (left out).
        "window_ratio": float(np.mean(_window(ratios, config))) if ratios.size and not rec.diverged else float("nan"),
        "max_ratio": float(ratios.max()) if ratios.size else float("nan"),
        "fraction_in_band": in_band,
        "first_step_at_threshold": int(rec.steps[reached[0]]) if reached.size else None,
        "final_loss": _last(rec.losses),
        "loss_increases": int(np.sum(np.diff(rec.losses) > 0)),
        # The first solve is cold; the mean counts the warm-started ones.
        "mean_hvps_per_checkpoint": float(rec.hvps[1:].mean()) if rec.hvps.size > 1 else float("nan"),
        "solves_converged": float(np.mean(rec.converged)) if rec.converged.size else float("nan"),
        "verdict": verdict,
        "diverged": rec.diverged,
        "diverged_at": rec.diverged_at,
        "steps": rec.steps,
        "sharpness": rec.sharpness,
        "eigenvalues": rec.eigenvalues,
        "final_eigenvalues": rec.eigenvalues[-1] if rec.eigenvalues.size else [],
        "loss_at_checkpoints": rec.checkpoint_losses,
    }


def _finite_mean(values: list[float]) -> float:
    v = np.asarray(values, np.float64)
    return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")


def _summary(spec: RunSpec, runs: list[dict], config: Config) -> dict:
    """One setting over its seeds (``results.json``'s ``settings``)."""
    trained = [r for r in runs if not r["diverged"]]
    first = [r["first_step_at_threshold"] for r in trained if r["first_step_at_threshold"] is not None]
    return {
        "optimizer": spec.optimizer,
        "lr": spec.lr,
        "lr_after": spec.lr_after,
        "norm": spec.norm,
        "label": spec.label,
        "threshold": runs[0]["threshold"],
        "seeds": [r["seed"] for r in runs],
        "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
        "seed_verdicts": [r["verdict"] for r in runs],
        "verdict": seed_verdict([r["verdict"] for r in runs]),
        "window_ratio": stats.interval([r["window_ratio"] for r in runs])._asdict(),
        "fraction_in_band": _finite_mean([r["fraction_in_band"] for r in trained]),
        "first_sharpness": _finite_mean([r["first_sharpness"] for r in trained]),
        "final_sharpness": _finite_mean([r["final_sharpness"] for r in trained]),
        "final_loss": _finite_mean([r["final_loss"] for r in trained]),
        "first_step_at_threshold": int(np.median(first)) if first else None,
        "mean_hvps_per_checkpoint": _finite_mean([r["mean_hvps_per_checkpoint"] for r in trained]),
        "solves_converged": _finite_mean([r["solves_converged"] for r in trained]),
    }


# -- report ------------------------------------------------------------------------------------------------------


def _dash(value: float, fmt: str) -> str:
    """``value`` formatted, or an en dash for a missing (non-finite) one."""
    return format(value, fmt) if value is not None and math.isfinite(value) else "–"


def _ratio_text(iv: dict) -> str:
    """Sharpness / threshold over seeds: ``1.012 [1.004, 1.020]`` (three decimals; no interval from one seed)."""
    if iv["n"] == 0:
        return "–"
    if iv["n"] == 1:
        return f"{iv['mean']:.3f}"
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _seed_counts(verdicts: list[str]) -> str:
    """``3 held`` or ``2 held, 1 diverged``: the seeds' run verdicts, counted."""
    order = ("held", "not held", "not reached", "too short", "diverged")
    return ", ".join(f"{verdicts.count(v)} {v}" for v in order if v in verdicts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("s" if n != 1 else "")


def _threshold_text(value: float) -> str:
    """A threshold in plain digits, at most one decimal (``40``, ``126.7``, ``38000``); three significant
    digits below 1 (``0.002``)."""
    return f"{value:.1f}".rstrip("0").rstrip(".") if value >= 1 else f"{value:.3g}"


def _lr_text(run: dict) -> str:
    return f"{run['lr']:g}" if run["lr_after"] is None else f"{run['lr']:g}->{run['lr_after']:g}"


def _norm_text(run: dict) -> str:
    return "BN" if run["norm"] == "bn" else "no BN"


def _outcome(config: Config, ds, records: dict[RunSpec, list[RunRecord]], out: pathlib.Path) -> report.Outcome:
    runs_by_spec = {
        spec: [_seed_entry(spec, seed, rec, config) for seed, rec in zip(config.seeds, recs)]
        for spec, recs in records.items()
    }
    summaries = [_summary(spec, runs, config) for spec, runs in runs_by_spec.items()]
    runs = [r for rs in runs_by_spec.values() for r in rs]
    window = f"last {config.verdict_window:.0%}"
    rows = [
        [
            s["optimizer"],
            _lr_text(s).replace("->", " -> "),
            "BN" if s["norm"] == "bn" else "none",
            _threshold_text(s["threshold"]),
            _dash(s["first_sharpness"], ".1f"),
            _dash(s["final_sharpness"], ".1f"),
            _ratio_text(s["window_ratio"]),
            _dash(s["fraction_in_band"], ".0%"),
            "never" if s["first_step_at_threshold"] is None else str(s["first_step_at_threshold"]),
            _dash(s["final_loss"], ".2e"),
            _seed_counts(s["seed_verdicts"]),
            s["verdict"],
        ]
        for s in summaries
    ]
    table = report.markdown_table(
        [
            "optimizer",
            "lr",
            "norm",
            "threshold",
            f"sharpness at step {config.track_every}",
            "final sharpness",
            f"sharpness / threshold, {window} (seed mean [95% CI])",
            f"in band, {window}",
            "first step at threshold (median)",
            "final loss",
            "seeds",
            "verdict",
        ],
        rows,
    )
    tables = [table]
    topk = _topk_settings(config, runs_by_spec)
    if topk:
        tables.append(_topk_table(config, topk))
    claims = [
        _claim(config, summaries, opt) for opt in OPTIMIZER_TITLES if any(s["optimizer"] == opt for s in summaries)
    ]
    claims.append(_loss_claim(runs, config.short_run))
    figures = [_plot(config, records, out)]
    notes = [
        f"Sharpness: bnjax.curvature.EoSTracker ({config.solver}) warm-started from the previous eigenvector "
        f"every {config.track_every} steps (at most {config.solver_iters} HVPs per tracked eigenvalue; mean HVPs "
        "per checkpoint, per setting: "
        + ", ".join(_dash(s["mean_hvps_per_checkpoint"], ".1f") for s in summaries)
        + "). BN in train mode with the full batch: the Hessian of the function GD optimizes.",
        f"Table: each cell is the mean over the seeds that trained; 'sharpness / threshold' is the mean over "
        f"seeds of each run's mean over the {window} of its checkpoints, with its 95% t-interval over seeds "
        "(none from one seed); 'seeds' counts the seeds' run verdicts.",
        f"Differences from CKLKT21: {config.dataset} ({config.n_train} examples) instead of CIFAR-10 subsets, a "
        f"small tanh MLP instead of their fully-connected and conv nets, {config.steps} steps, "
        f"{_plural(len(config.seeds), 'seed')} per setting.",
    ]
    if config.loss == "cross_entropy":
        notes.append(
            "Cross-entropy: the sharpness decreases late in training as the margins grow (CKLKT21 Appendix), "
            "so runs that reached the threshold may end below it and read 'not held'."
        )
    if topk:
        notes.append(
            f"Top-{config.topk} eigenvalues of the GD runs: EoSTracker(k={config.topk}), block Lanczos warm-started "
            "from the previous Ritz vectors (same tolerance; each pair's own stopping rule). Second table: the "
            "final eigenvalues over the threshold and how many of the last checkpoints (same window as the "
            "verdict) have each eigenvalue at or above band_low x threshold, means over the seeds that trained."
        )
    rule = verdict_rule(config)
    results = {
        "runs": runs,
        "settings": summaries,
        "n_train": config.n_train,
        "dataset": config.dataset,
        "verdict_rule": rule,
    }
    return report.Outcome(
        results, claims, tables, figures, notes, _setting(config, ds), _reading(config, summaries, claims), rule
    )


def _optimizers_text(config: Config) -> str:
    parts = []
    if config.gd_lrs:
        parts.append("GD lr " + ", ".join(f"{lr:g}" for lr in config.gd_lrs))
    if config.momentum_lrs:
        parts.append(
            f"heavy-ball momentum {config.momentum:g}, lr " + ", ".join(f"{lr:g}" for lr in config.momentum_lrs)
        )
    if config.adam_lrs:
        parts.append(
            f"Adam (b1 {ADAM_B1:g}, b2 {config.adam_beta2:g}, eps {config.adam_eps:g}), lr "
            + ", ".join(f"{lr:g}" for lr in config.adam_lrs)
        )
    if config.schedule_lrs:
        lr0, lr1 = config.schedule_lrs
        parts.append(f"GD lr {lr0:g} -> {lr1:g} at step {config.steps // 2}")
    return "; ".join(parts) + " (full batch)"


def _setting(config: Config, ds) -> tuple[tuple[str, str], ...]:
    return report.setting(
        model=models.describe_family("mlp", hidden=config.hidden, activation=config.activation)
        + f"; hidden kernels {config.init_scale:g} x LeCun normal std",
        data=f"{ds.name}, first {config.n_train} training examples (full batch)",
        loss="square (0.5 ||f - onehot||^2)" if config.loss == "square" else "cross-entropy",
        optimizer=_optimizers_text(config),
        steps=config.steps,
        seeds=config.seeds,
        devices_used=f"{config.devices} (data-parallel over examples)" if config.devices > 1 else "1",
        norms=", ".join("BN" if n == "bn" else "none" for n in config.norms),
        sharpness=(
            f"EoSTracker ({config.solver}), every {config.track_every} steps, at most {config.solver_iters} HVPs "
            f"per eigenvalue, tolerance {config.solver_tol:g}; top {config.topk} for GD"
        ),
        verdict_window=(
            f"last {config.verdict_window:.0%} of the checkpoints; band {config.band_low:.2f}-{config.band_high:.2f}"
            f" x threshold, held when at least {config.min_in_band:.0%} of them are in it"
        ),
    )


def _reading(config: Config, summaries: list[dict], claims: list[report.Claim]) -> str:
    """The one-paragraph reading for a newcomer, written from the run's numbers and verdicts."""
    trained = [s for s in summaries if s["window_ratio"]["n"] > 0]
    counts = [s["verdict"] for s in summaries]
    text = (
        "Gradient descent on a quadratic is stable only while the curvature along its steepest direction (the "
        "sharpness: the top eigenvalue of the loss Hessian) stays below 2/eta, eta being the learning rate. "
        "CKLKT21 found that full-batch GD on neural nets drives the sharpness up to that threshold (progressive "
        "sharpening) and then keeps it there, the edge of stability, while the loss goes on falling, "
        "non-monotonically; heavy-ball momentum and Adam have thresholds of their own. "
        f"Here {len(summaries)} settings (optimizer x learning rate x with or without BN) ran "
        f"{_plural(len(config.seeds), 'seed')} each for {config.steps} steps. "
    )
    if trained:
        means = [s["window_ratio"]["mean"] for s in trained]
        text += (
            f"Averaged over the last {config.verdict_window:.0%} of each run, the sharpness divided by its "
            f"threshold was {min(means):.3f} to {max(means):.3f} across the settings that trained (1.000 is "
            "exactly at the threshold). "
        )
    text += (
        f"Settings: {_seed_counts(counts)}; a setting held when, at every seed that trained, "
        f"at least {config.min_in_band:.0%} of its final checkpoints lay within {config.band_low:.2f}-"
        f"{config.band_high:.2f} x threshold. "
        f"{sum(c.verdict == 'held' for c in claims)} of {len(claims)} claims held."
    )
    runs = [v for s in summaries for v in s["seed_verdicts"]]
    if "diverged" in runs:
        text += (
            f" {runs.count('diverged')} of {len(runs)} runs diverged (GD with BN can start above its threshold); "
            "they are left out of the verdicts, and the table's 'seeds' column says where."
        )
    if config.short_run:
        text += (
            f" This is a short run (the quick form, {_plural(len(config.seeds), 'seed')}): it can confirm a claim "
            "but not refute one, so a run that did not hold reads 'too short' and its claim 'too short to judge'."
        )
    return text


def _topk_settings(config: Config, runs_by_spec: dict[RunSpec, list[dict]]) -> list[tuple[RunSpec, list[dict]]]:
    """The settings that tracked more than one eigenvalue, with their seeds that trained (a setting whose every
    seed diverged is left out: the main table reports it)."""
    out = []
    for spec, runs in runs_by_spec.items():
        trained = [r for r in runs if not r["diverged"] and np.asarray(r["eigenvalues"]).shape[0] > 0]
        if trained and np.asarray(trained[0]["eigenvalues"]).shape[1] > 1:
            out.append((spec, trained))
    return out


def _topk_table(config: Config, topk: list[tuple[RunSpec, list[dict]]]) -> str:
    """Final top-k eigenvalues / threshold and the fraction of the final window at the threshold, per GD
    setting (means over its seeds that trained)."""
    rows = []
    for spec, runs in topk:
        thr = stability_rule(spec, config).threshold
        ratios = [np.asarray(r["eigenvalues"], np.float64) / thr for r in runs]  # each [checkpoints, k]
        final = np.mean([r[-1] for r in ratios], axis=0)
        at = np.mean([np.mean(_window(r, config) >= config.band_low, axis=0) for r in ratios], axis=0)
        rows.append(
            [
                spec.label,
                _threshold_text(thr),
                " / ".join(f"{v:.3f}" for v in final),
                " / ".join(f"{v:.0%}" for v in at),
                _dash(_finite_mean([r["mean_hvps_per_checkpoint"] for r in runs]), ".1f"),
                _dash(_finite_mean([r["solves_converged"] for r in runs]), ".0%"),
                str(len(runs)),
            ]
        )
    k = np.asarray(topk[0][1][0]["eigenvalues"]).shape[1]
    return report.markdown_table(
        [
            "GD setting",
            "threshold 2/eta",
            f"final lambda_1..{k} / threshold",
            f"last {config.verdict_window:.0%} at >= {config.band_low:.2f} x threshold (each)",
            "mean HVPs / checkpoint",
            f"solves converged (all {k} pairs, within {k} x solver_iters HVPs)",
            "seeds",
        ],
        rows,
    )


def _effect(summaries: list[dict]) -> str:
    """The claim's effect for the claims matrix: the range of sharpness / threshold over its settings (the ends
    of their 95% intervals; the value itself for a setting with one finished seed), and how many diverged."""
    trained = [s["window_ratio"] for s in summaries if s["window_ratio"]["n"] > 0]
    diverged = len(summaries) - len(trained)
    tail = f"; {diverged} diverged" if diverged else ""
    if not trained:
        return "every setting diverged"
    low = min(iv["low"] if iv["n"] >= 2 else iv["mean"] for iv in trained)
    high = max(iv["high"] if iv["n"] >= 2 else iv["mean"] for iv in trained)
    single = sum(iv["n"] < 2 for iv in trained)
    what = (
        "95% CIs" if not single else "no CI: one seed" if single == len(trained) else f"95% CIs; {single} from one seed"
    )
    return f"{low:.3f}-{high:.3f}x threshold ({_plural(len(trained), 'setting')}, {what}){tail}"


def _claim(config: Config, summaries: list[dict], optimizer: str) -> report.Claim:
    mine = [s for s in summaries if s["optimizer"] == optimizer]
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
    several = len(config.seeds) > 1

    def one(s: dict) -> str:
        name = f"lr={_lr_text(s)} {_norm_text(s)}"
        if s["verdict"] == "diverged":
            return f"{name}: diverged at every seed (excluded)"
        seeds = f" ({_seed_counts(s['seed_verdicts'])})" if several else ""
        return (
            f"{name}: {_ratio_text(s['window_ratio'])} x threshold, {s['fraction_in_band']:.0%} in band, "
            f"{s['verdict']}{seeds}"
        )

    # The claim is about runs that train; a setting that diverged outright is reported, not counted.
    return report.Claim(
        text,
        "; ".join(one(s) for s in mine),
        claim_verdict([s["verdict"] for s in mine], config.short_run),
        effect=_effect(mine),
    )


def _loss_claim(runs: list[dict], quick: bool) -> report.Claim:
    """At the edge of stability the loss keeps decreasing, non-monotonically (judged on every run that held)."""
    text = "CKLKT21: at the edge of stability the loss keeps decreasing over long times, non-monotonically"
    at_eos = [r for r in runs if r["verdict"] == "held"]
    if not at_eos:
        verdict = "too short to judge" if quick else "inconclusive"
        return report.Claim(text, "no run held at the threshold", verdict, effect="no run at the edge")
    groups: dict[tuple, list[dict]] = {}
    for r in at_eos:
        groups.setdefault((r["optimizer"], r["lr"], r["lr_after"], r["norm"]), []).append(r)
    decreasing, measured, arrivals, finals = [], [], [], []
    for mine in groups.values():
        arrival = [
            float(np.asarray(r["loss_at_checkpoints"])[np.searchsorted(r["steps"], r["first_step_at_threshold"])])
            for r in mine
        ]
        final = [r["final_loss"] for r in mine]
        decreasing += [f < a and r["loss_increases"] > 0 for r, a, f in zip(mine, arrival, final)]
        arrivals += arrival
        finals += final
        r = mine[0]
        measured.append(
            f"{r['optimizer']} lr={_lr_text(r)} {_norm_text(r)}: loss {np.mean(arrival):.2e} at arrival -> "
            f"{np.mean(final):.2e}, {np.mean([m['loss_increases'] for m in mine]):.0f} step-to-step increases"
            + (f" (mean of {len(mine)} seeds)" if len(mine) > 1 else "")
        )
    verdict = "held" if all(decreasing) else ("too short to judge" if quick else "not held")
    effect = (
        f"final / arrival loss {stats.format_effect(stats.ratio_interval(finals, arrivals))}; "
        f"{sum(decreasing)} of {len(decreasing)} runs decreased"
    )
    return report.Claim(text, "; ".join(measured), verdict, effect=effect)


# -- plots -------------------------------------------------------------------------------------------------------


def _padded(values: list[np.ndarray], length: int) -> np.ndarray:
    """Per-seed series of different lengths (a diverged run stops early) as ``[seeds, length]``, NaN-padded."""
    out = np.full((len(values), length), np.nan)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def _with_data(values: np.ndarray) -> np.ndarray:
    """The rows (seeds) of ``values[seeds, T]`` with at least one finite value: a seed that diverged before its
    first point neither counts in a band's seed number nor draws a line (its x marks it)."""
    return values[np.isfinite(values).any(axis=1)]


def _window_start(config: Config) -> float:
    """Where the verdict window of a run that finished starts on the plots: half a segment before its first
    checkpoint (so that a window of one checkpoint is visible)."""
    steps = np.arange(config.track_every, config.steps + 1, config.track_every)
    return float(_window(steps, config)[0]) - config.track_every / 2


def _mark_runs_diverged(ax, spec: RunSpec, recs: list[RunRecord], seeds, series, color: str) -> None:
    """An x at the last finite point of each diverged seed (at the bottom of the panel when it has none)."""
    diverged = [(s, r) for s, r in zip(seeds, recs) if r.diverged]
    every = len(diverged) == len(recs)
    bottom = ax.get_ylim()[0]
    for i, (seed, rec) in enumerate(diverged):
        x, y = series(rec)
        finite = np.flatnonzero(np.isfinite(y))
        px, py = (x[finite[-1]], y[finite[-1]]) if finite.size else (rec.diverged_at, bottom)
        label = f"{spec.label} (every seed)" if every else f"{spec.label} seed {seed}"
        report.mark_diverged(ax, px, py, label if i == 0 or not every else "_nolegend_", color=color)


def legend_above_data(ax) -> None:
    """:func:`report.legend` after raising the top of the panel by room for the legend's entries, so that it
    can sit above the data instead of on it."""
    entries = len(ax.get_legend_handles_labels()[1])
    fraction = min(1.5, 0.1 * entries + 0.1)
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(low, high * (high / low) ** fraction)
    else:
        ax.set_ylim(low, high + fraction * (high - low))
    report.legend(ax)


def _plot(config: Config, records: dict[RunSpec, list[RunRecord]], out: pathlib.Path) -> str:
    """One column per optimizer: sharpness / threshold over steps (one line at 1, the band, the verdict window;
    seed means with 95% bands), then the loss; a last column with the GD runs' top-k eigenvalues."""
    optimizers = [o for o in OPTIMIZER_TITLES if any(s.optimizer == o for s in records)]
    gd_norms = {s.norm for s in records if s.optimizer == "gd"}
    topk_norms = [n for n in config.norms if n in gd_norms] if config.topk > 1 else []
    ncols = len(optimizers) + bool(topk_norms)
    fig, axes = report.figure(ncols=ncols, nrows=2)
    segments = config.steps // config.track_every
    grid = np.arange(1, segments + 1) * config.track_every
    seeds = config.seeds
    for col, opt in enumerate(optimizers):
        ax_s, ax_l = axes[col], axes[ncols + col]
        report.acceptance_band(ax_s, config.band_low, config.band_high)
        report.threshold_line(ax_s, 1.0, THRESHOLD_NAMES[opt])
        report.verdict_window(ax_s, _window_start(config), config.steps)
        mine = [(s, r) for s, r in records.items() if s.optimizer == opt]
        for i, (spec, recs) in enumerate(mine):
            color = f"C{i}"
            ratios = _with_data(_padded([r.sharpness / r.thresholds for r in recs], segments))
            losses = _with_data(_padded([r.losses for r in recs], segments * config.track_every))
            if ratios.size:
                report.seed_band(ax_s, grid, ratios, label=spec.label, color=color)
            if losses.size:
                report.seed_band(
                    ax_l, np.arange(1, losses.shape[1] + 1), losses, label=spec.label, color=color, linewidth=0.8
                )
        for i, (spec, recs) in enumerate(mine):  # after the data, so that the panel's limits are known
            _mark_runs_diverged(ax_s, spec, recs, seeds, lambda r: (r.steps, r.sharpness / r.thresholds), f"C{i}")
            _mark_runs_diverged(ax_l, spec, recs, seeds, lambda r: (np.arange(1, r.losses.size + 1), r.losses), f"C{i}")
        thresholds = sorted({stability_rule(s, config).threshold_at(config.steps) for s, _ in mine}, reverse=True)
        if opt == "gd-schedule":
            rule = stability_rule(mine[0][0], config)
            ax_s.axvline(config.steps // 2, color="0.5", linestyle=":", linewidth=1, label="lr step")
            before, after = (_threshold_text(rule.threshold_at(t)) for t in (0, config.steps))
            where = f"2/eta_t: {before} -> {after}"
        else:
            where = f"{THRESHOLD_NAMES[opt]} = " + ", ".join(_threshold_text(t) for t in thresholds)
        ylabel = "preconditioned sharpness / threshold" if opt == "adam" else "sharpness / threshold"
        ax_s.set(title=f"{OPTIMIZER_TITLES[opt]}\n({where})", xlabel="step", ylabel=ylabel)
        ax_l.set(xlabel="step", ylabel=f"train loss ({config.loss})", yscale="log")
        legend_above_data(ax_s)
        legend_above_data(ax_l)
    if topk_norms:
        col = len(optimizers)
        for row in range(2):
            ax = axes[row * ncols + col]
            if row < len(topk_norms):
                _plot_topk(config, records, topk_norms[row], ax, grid)
            else:
                ax.axis("off")
    if len(seeds) > 1:
        fig.suptitle(f"lines: means over {len(seeds)} seeds; shaded: 95% t-intervals over seeds", fontsize=9)
    return report.save_figure(fig, out, "sharpness_and_loss.png")


def _plot_topk(config: Config, records: dict[RunSpec, list[RunRecord]], norm: str, ax, grid: np.ndarray) -> None:
    """The top-k eigenvalues / 2/eta of the GD settings with ``norm`` (solid: lambda_1, fainter: the next)."""
    report.acceptance_band(ax, config.band_low, config.band_high)
    report.threshold_line(ax, 1.0, "2/eta")
    report.verdict_window(ax, _window_start(config), config.steps)
    mine = [(s, r) for s, r in records.items() if s.optimizer == "gd"]
    for i, (spec, recs) in enumerate(mine):
        if spec.norm != norm:
            continue
        thr = stability_rule(spec, config).threshold
        for j in range(config.topk):
            values = _with_data(_padded([r.eigenvalues[:, j] / thr for r in recs], len(grid)))
            if not values.size:
                continue
            style = {"alpha": 1.0 - 0.3 * j, "linewidth": 1.2 if j == 0 else 0.8}
            label = spec.label if j == 0 else "_nolegend_"
            report.seed_band(ax, grid, values, label=label, color=f"C{i}", **style)
    name = "BN" if norm == "bn" else "no BN"
    ax.set(
        title=f"GD, {name}: top-{config.topk} eigenvalues / 2/eta\n(solid: lambda_1; fainter: lambda_2, ...)",
        xlabel="step",
        ylabel="eigenvalue / threshold",
    )
    legend_above_data(ax)
