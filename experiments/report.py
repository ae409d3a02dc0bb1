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
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


class Claim(NamedTuple):
    """One claim from the literature and what this run measured about it.

    Fields:
      claim: the statement tested, with its source (e.g. "CKLKT21: sharpness hovers at 2/eta").
      measured: the numbers, in words.
      verdict: ``"held"``, ``"not held"``, ``"inconclusive"``, or ``"too short to judge"`` (a quick run that
        could not have shown the claim: it may only confirm, never refute).
    """

    claim: str
    measured: str
    verdict: str


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
) -> None:
    """``report.md`` of a complete run: claims with measured numbers and verdicts, then tables, notes, figures."""
    for c in claims:
        if c.verdict not in VERDICTS:
            raise ValueError(f"Claim verdict must be one of {VERDICTS}, got {c.verdict!r} for {c.claim!r}.")
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Runtime: {runtime_s:.1f} s  ", "Status: **complete**"]
    lines += ["", "## Claims", ""]
    lines += ["| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | **{c.verdict}** |" for c in claims]
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


class Outcome(NamedTuple):
    """What an experiment's ``run`` returns; :func:`experiments.cli.execute` writes it out.

    Fields:
      results: JSON-able numbers (written to ``results.json``).
      claims: the claims tested, for ``report.md``.
      tables: Markdown tables for ``report.md``.
      figures: PNG file names already saved in the output folder.
      notes: caveats for ``report.md``.
    """

    results: dict
    claims: Sequence[Claim]
    tables: Sequence[str] = ()
    figures: Sequence[str] = ()
    notes: Sequence[str] = ()
