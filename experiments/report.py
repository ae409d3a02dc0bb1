"""Output of an experiment: one folder with ``config.json``, ``results.json``, PNG plots and ``report.md``.

The folder defaults to ``runs/<name>-<timestamp>/``. ``report.md`` states each claim tested, the numbers
measured, and whether the claim held (``held`` / ``not held`` / ``inconclusive`` / ``too short to judge``),
followed by the figures.

Run status: ``results.json`` has ``"status"`` and ``report.md`` a ``Status:`` line from the moment the run
starts (``running``), replaced at the end by ``complete``, ``failed`` (with the error) or ``interrupted``. A
folder whose status is not ``complete`` holds an unfinished run (a killed process stays at ``running``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import platform
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import matplotlib
import numpy as np

from bnjax import allocator

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


class Claim(NamedTuple):
    """One claim from the literature and what this run measured about it.

    Fields:
      claim: the statement tested, with its source (e.g. "CKLKT21: sharpness hovers at 2/eta").
      measured: the numbers, in words.
      verdict: ``"held"``, ``"not held"``, ``"inconclusive"``, or ``"too short to judge"`` (a quick run that
        could not have shown the claim: it may only confirm, never refute).
      effect: the measured effect in a few characters with its interval (e.g. ``"0.46x [0.31, 0.68]"``), for
        the claims matrix (``python -m experiments claims``); empty: the matrix shows ``measured``.
    """

    claim: str
    measured: str
    verdict: str
    effect: str = ""


VERDICTS = ("held", "not held", "inconclusive", "too short to judge")


RUN_FILES = ("config.json", "results.json", "report.md")
STATUSES = ("running", "complete", "failed", "interrupted")


class OutputFolderError(ValueError):
    """The output folder cannot be used (holds another run, is not a folder, cannot be created)."""


def run_dir(name: str, out: str | pathlib.Path | None, *, overwrite: bool = False) -> pathlib.Path:
    """The output folder: ``out`` if given, else ``runs/<name>-<YYYYmmdd-HHMMSS>``; created if missing.

    A folder that already holds a run (any of :data:`RUN_FILES`) is refused unless ``overwrite``, which
    deletes that run's files (:data:`RUN_FILES` and its PNG plots) first, so nothing of the old run can be
    mistaken for the new one. A non-empty folder holding no run is always refused (nothing is deleted).

    Raises:
      OutputFolderError: with a one-line message naming the folder and what to do.
    """
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("runs") / f"{name}-{stamp}"
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"--out {path}: exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()):
        if not any((path / f).exists() for f in RUN_FILES):
            raise OutputFolderError(
                f"--out {path}: the folder is not empty and holds no experiment run; choose a new or empty folder."
            )
        if not overwrite:
            raise OutputFolderError(
                f"--out {path}: the folder already holds a run; pass --overwrite to replace it, or choose "
                "another folder."
            )
        try:
            for old in [path / f for f in RUN_FILES] + sorted(path.glob("*.png")):
                old.unlink(missing_ok=True)
        except OSError as err:
            raise OutputFolderError(f"--out {path}: cannot remove the previous run ({err}).") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"--out {path}: cannot create the output folder ({err}).") from None
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(path: pathlib.Path, value: Any) -> None:
    """``value`` (dataclasses, NumPy/JAX arrays and scalars allowed) as indented JSON; NaN/inf as strings."""
    path.write_text(json.dumps(_jsonable(value), indent=2) + "\n")


def write_config(out: pathlib.Path, name: str, config: Any, preset: str | None) -> None:
    """``config.json``: the experiment's config plus the environment needed to reproduce it."""
    write_json(
        out / "config.json",
        {
            "experiment": name,
            "preset": preset,
            "config": config,
            "environment": {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "jax": jax.__version__,
                "backend": jax.default_backend(),
                "devices": [str(d) for d in jax.devices()],
                "retain_freed_memory": allocator.retained(),
            },
        },
    )


def write_status(
    out: pathlib.Path,
    title: str,
    *,
    command: str,
    status: str,
    runtime_s: float | None = None,
    error: str | None = None,
) -> None:
    """Mark an unfinished run: ``results.json`` and a header-only ``report.md`` with ``status``.

    ``status`` is ``"running"`` (written when the run starts), ``"failed"`` (with ``error``) or
    ``"interrupted"``; a complete run's files are written by :func:`write_report` and the caller instead.
    """
    if status not in STATUSES or status == "complete":
        raise ValueError(f"status must be one of {STATUSES[:1] + STATUSES[2:]}, got {status!r}.")
    results: dict[str, Any] = {"status": status}
    if runtime_s is not None:
        results["runtime_s"] = runtime_s
    if error is not None:
        results["error"] = error
    write_json(out / "results.json", results)
    lines = [f"# {title}", "", f"Command: `{command}`  "]
    if runtime_s is not None:
        lines.append(f"Runtime: {runtime_s:.1f} s  ")
    lines.append(f"Status: **{status}**" + (f": {error}" if error else ""))
    lines += ["", "This run did not finish: no claim was tested and its numbers are incomplete."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def setting(
    *,
    model: str,
    data: str,
    loss: str,
    optimizer: str,
    steps: str | int,
    seeds: Sequence[int] | str,
    **more: str,
) -> tuple[tuple[str, str], ...]:
    """The rows of a report's setting table, in the order every report uses (then ``more``, in order).

    ``data`` names the data set and its size (e.g. ``"MNIST-1D, 4000 train / 1000 test"``); the device count
    is added from JAX.
    """
    seeds_text = seeds if isinstance(seeds, str) else f"{len(seeds)} ({', '.join(str(s) for s in seeds)})"
    rows = [
        ("model", model),
        ("data", data),
        ("loss", loss),
        ("optimizer", optimizer),
        ("steps", str(steps)),
        ("seeds", seeds_text),
        ("devices", f"{jax.device_count()} ({jax.default_backend()})"),
    ]
    return tuple(rows) + tuple((k.replace("_", " "), v) for k, v in more.items())


def write_report(
    out: pathlib.Path,
    title: str,
    claims: Sequence[Claim],
    *,
    command: str,
    runtime_s: float,
    tables: Sequence[str] = (),
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
    setting: Sequence[tuple[str, str]] = (),
    reading: str = "",
    rule: str = "",
) -> None:
    """``report.md`` of a complete run: the setting, a reading of the result, claims with measured numbers and
    verdicts (and the rule that decided them), then tables, notes, figures."""
    for c in claims:
        if c.verdict not in VERDICTS:
            raise ValueError(f"Claim verdict must be one of {VERDICTS}, got {c.verdict!r} for {c.claim!r}.")
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Runtime: {runtime_s:.1f} s  ", "Status: **complete**"]
    if setting:
        lines += ["", "## Setting", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in setting]
    if reading:
        lines += ["", "## Reading", "", reading]
    lines += ["", "## Claims", ""]
    lines += ["| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | **{c.verdict}** |" for c in claims]
    if rule:
        lines += ["", f"Verdict rule: {rule}."]
    for table in tables:
        lines += ["", table]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats printed with 4 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """A matplotlib figure and a flat array of axes, ``size`` per panel."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, out: pathlib.Path, filename: str) -> str:
    """Save ``fig`` as PNG into ``out``, close it, and return the file name (for the report)."""
    fig.tight_layout()
    fig.savefig(out / filename, dpi=110)
    plt.close(fig)
    return filename


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average of per-step curves along the last axis (for plotting); same length as the input, the first
    ``window - 1`` points averaged over a window padded with the first value."""
    values = np.atleast_2d(values)
    window = max(1, min(window, values.shape[-1]))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.repeat(values[:, :1], window - 1, axis=1), values], axis=1)
    return np.stack([np.convolve(v, kernel, mode="valid") for v in padded])


def seed_band(ax, x: np.ndarray, values: np.ndarray, *, label: str, color: str | None = None, **kw: Any):
    """The mean over seeds (rows of ``values``, NaN for a diverged seed) as a line and its 95% interval as a
    shaded band of the same colour; returns the line."""
    values = np.atleast_2d(np.asarray(values, np.float64))
    finite = np.isfinite(values)
    n = np.sum(finite, axis=0)
    values = np.where(finite, values, np.nan)  # inf (a diverged seed) counts as missing, like NaN
    with warnings.catch_warnings():  # a step where every seed diverged: NaN mean, drawn as a gap
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else 0
    (line,) = ax.plot(
        x, mean, color=color, label=f"{label} ({values.shape[0]} seeds)" if values.shape[0] > 1 else label, **kw
    )
    if values.shape[0] > 1:
        from experiments.stats import t95

        half = np.array([t95(int(k) - 1) if k >= 2 else np.nan for k in n]) * std / np.sqrt(np.maximum(n, 1))
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def threshold_line(ax, value: float, name: str) -> None:
    """The panel's one threshold: a black dashed line, its value in the legend."""
    ax.axhline(value, color="k", linestyle="--", linewidth=1, label=f"{name} = {value:.3g}")


def acceptance_band(ax, low: float, high: float, what: str = "band") -> None:
    """The acceptance band of a verdict (e.g. 0.9-1.1 x the threshold), shaded grey and named in the legend."""
    ax.axhspan(low, high, color="0.85", zorder=0, label=f"{what} [{low:.3g}, {high:.3g}]")


def verdict_window(ax, start: float, end: float) -> None:
    """The steps the verdict is judged on, hatched along the bottom and named in the legend."""
    ax.axvspan(start, end, ymax=0.04, color="k", alpha=0.5, label="verdict window")


def mark_diverged(ax, x: float, y: float, label: str, color: str | None = None) -> None:
    """A diverged run: an x at its last finite point (``y``), labelled in the legend."""
    ax.plot([x], [y], marker="x", markersize=9, linestyle="none", color=color, label=f"{label}: diverged")


def legend(ax) -> None:
    """A legend placed by matplotlib where it covers the least data, small font."""
    ax.legend(fontsize=7, loc="best", framealpha=0.8)


class Outcome(NamedTuple):
    """What an experiment's ``run`` returns; :func:`experiments.cli.execute` writes it out.

    Fields:
      results: JSON-able numbers (written to ``results.json``).
      claims: the claims tested, for ``report.md``.
      tables: Markdown tables for ``report.md``.
      figures: PNG file names already saved in the output folder.
      notes: caveats for ``report.md``.
      setting: ``(name, value)`` rows describing the run (:func:`setting`), shown first.
      reading: one paragraph saying what the result means, for a newcomer.
      rule: how run verdicts combine into each claim's verdict (printed under the claims).
    """

    results: dict
    claims: Sequence[Claim]
    tables: Sequence[str] = ()
    figures: Sequence[str] = ()
    notes: Sequence[str] = ()
    setting: Sequence[tuple[str, str]] = ()
    reading: str = ""
    rule: str = ""
