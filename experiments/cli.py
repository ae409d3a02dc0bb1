"""Command line: ``python -m experiments <name> [--quick | --smoke] [--out DIR [--overwrite]] [--debug]
[--<field> VALUE ...]``.

Every field of the experiment's ``Config`` is an option (``--lrs 0.05,0.1`` or ``--lrs "(0.05, 0.1)"`` for
tuples, ``--steps 500``, ``--model none`` for an optional field); a preset is applied first, then the explicit
options. Options with a fixed set of values (the module's ``CHOICES``, else the global ones of :func:`choices`)
accept only those. ``--help`` prints each option's syntax, allowed values and default as a command-line
example, and the runtimes of :mod:`experiments.runtimes`. User errors are one line on stderr and exit status 2
(``--debug`` shows the traceback); see :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import math
import os
import pathlib
import re
import shlex
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from bnjax import allocator
from experiments import EXPERIMENTS, data, report, runtimes

_SCALAR_FORMATS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_LIST_FORMATS = {
    "int": ("integers", "32,32", "(32, 32)"),
    "float": ("numbers", "0.05,0.1", "(0.05, 0.1)"),
    "str": ("strings", "none,bn", "(none, bn)"),
    "bool": ("true/false values", "true,false", "(true, false)"),
}
_TYPE_WORDS = {"int": "INT", "float": "NUMBER", "str": "NAME", "bool": "BOOL"}
_SINGULAR = {"momenta": "momentum", "hidden": "width"}  # a tuple field's element, where "drop the s" fails
_PATTERN = re.compile(r"([a-z0-9_]+):[A-Z]+")  # an allowed value such as "npz:PATH": that prefix, then anything


def _parse_bool(s: str) -> bool:
    value = {"true": True, "1": True, "false": False, "0": False}.get(s.strip().lower())
    if value is None:
        raise ValueError(s)
    return value


def _split_annotation(annotation: str) -> tuple[str, bool, bool]:
    """``(scalar type, is a tuple, is optional)`` of a field annotation such as ``"tuple[float, ...] | None"``."""
    annotation = annotation.replace(" ", "")
    optional = annotation.endswith("|None")
    if optional:
        annotation = annotation[: -len("|None")]
    is_tuple = annotation.startswith("tuple[") and annotation.endswith(",...]")
    scalar = annotation[len("tuple[") : -len(",...]")] if is_tuple else annotation
    if scalar not in _SCALAR_FORMATS:
        raise TypeError(f"Config fields must be int/float/str/bool, tuples of them or optional; got {annotation!r}.")
    return scalar, is_tuple, optional


def _is_allowed(value: Any, allowed: Sequence[Any]) -> bool:
    for choice in allowed:
        pattern = _PATTERN.fullmatch(choice) if isinstance(choice, str) else None
        prefix = f"{pattern[1]}:" if pattern else None
        if value == choice or (prefix and isinstance(value, str) and value.startswith(prefix) and value != prefix):
            return True
    return False


def _show_allowed(allowed: Sequence[Any]) -> str:
    return ", ".join(_format_value(a) for a in allowed)


def _parser_for(annotation: str, allowed: Sequence[Any] | None = None) -> Callable[[str], Any]:
    """A string -> value parser for a field annotation (annotations are strings: ``from __future__``).

    Tuples accept ``0.05,0.1`` (the form ``--help`` prints), ``(32, 32)``, ``[32, 32]``, ``(32,)`` and ``""``
    or ``()`` for the empty tuple; optional fields accept ``none``. With ``allowed``, a value (each element of
    a tuple) must be one of them (``"npz:PATH"`` allows any ``npz:...``). A bad value raises
    ``argparse.ArgumentTypeError`` saying what was expected, which argparse reports with the option.
    """
    scalar, is_tuple, optional = _split_annotation(annotation)
    convert: Callable[[str], Any] = {"int": int, "float": float, "str": str, "bool": _parse_bool}[scalar]

    def parse_scalar(s: str) -> Any:
        try:
            value = convert(s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_SCALAR_FORMATS[scalar]}, got {s!r}") from None
        if scalar == "float" and not math.isfinite(value):  # no option takes nan or inf
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        return value

    def check(value: Any, s: str) -> Any:
        if allowed is not None and not _is_allowed(value, allowed):
            seen = repr(_format_value(value))
            if is_tuple and s.strip() != _format_value(value):
                seen = f"element {seen} of {s!r}"
            raise argparse.ArgumentTypeError(f"{seen} is not an allowed value (allowed: {_show_allowed(allowed)})")
        return value

    def parse_tuple(s: str) -> tuple:
        body = s.strip()
        if len(body) >= 2 and body[0] + body[-1] in ("()", "[]"):
            body = body[1:-1]
        try:
            # Elements may be quoted, as in Python's repr of a tuple of strings: ('none', 'bn').
            values = tuple(parse_scalar(part.strip().strip("'\"")) for part in body.split(",") if part.strip())
        except argparse.ArgumentTypeError as err:
            what, plain, shown = _LIST_FORMATS[scalar]
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, e.g. {plain} or {shown}, got {s!r} ({err})"
            ) from None
        for value in values:
            check(value, s)
        return values

    def parse(s: str) -> Any:
        if optional and s.strip().lower() == "none":
            return None
        return parse_tuple(s) if is_tuple else check(parse_scalar(s), s)

    return parse


def _format_value(value: Any) -> str:
    """A field value in the form the parser accepts: ``0.05,0.1`` for a tuple, ``none``, ``true``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def _example(option: str, value: Any) -> str:
    """``option`` with ``value`` as one would type it in a shell (``--lrs 0.05,0.1``, ``--adam-lrs ''``)."""
    text = _format_value(value)
    if text.startswith("-"):  # argparse would take it for an option
        return f"{option}={shlex.quote(text)}"
    return f"{option} {shlex.quote(text)}"


def _metavar(name: str, annotation: str) -> str:
    """The syntax of an option's value: ``NORM[,NORM...]`` for a tuple, ``{true,false}``, ``STEPS``."""
    scalar, is_tuple, optional = _split_annotation(annotation)
    if is_tuple:
        word = name.rsplit("_", 1)[-1]
        word = _SINGULAR.get(word) or (word[:-1] if word.endswith("s") and not word.endswith("ss") else "")
        word = word.upper() or _TYPE_WORDS[scalar]
        metavar = f"{word}[,{word}...]"
    elif scalar == "bool":
        metavar = "{true,false}"
    else:
        metavar = name.upper()
    return f"{metavar}|none" if optional else metavar


def choices(module: types.ModuleType) -> dict[str, tuple]:
    """The allowed values of an experiment's options: its module's ``CHOICES``, and where it gives none for a
    field, the global ones (``model``: :data:`models.FAMILIES`; ``norms``: :data:`models.NORMS`; ``loss``:
    :data:`train.LOSSES`; ``activation``: :data:`models.ACTIVATIONS`; ``dataset``: :data:`data.NAMES` and
    ``npz:PATH``), for the fields its ``Config`` has."""
    from experiments import models, train

    fields = {f.name for f in dataclasses.fields(module.Config)}
    own = dict(getattr(module, "CHOICES", {}))
    unknown = sorted(set(own) - fields)
    if unknown:
        raise TypeError(f"{module.__name__}.CHOICES names fields its Config lacks: {unknown}.")
    defaults = {
        "model": models.FAMILIES,
        "norms": models.NORMS,
        "loss": train.LOSSES,
        "activation": tuple(models.ACTIVATIONS),
        "dataset": (*data.NAMES, "npz:PATH"),
    }
    merged = {name: tuple(allowed) for name, allowed in defaults.items() if name in fields}
    merged.update({name: tuple(allowed) for name, allowed in own.items()})
    return merged


class _Parser(argparse.ArgumentParser):
    """argparse, with a user error reported in one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _experiment_parser(name: str, module: types.ModuleType) -> argparse.ArgumentParser:
    """The parser of ``python -m experiments <name>``: presets, ``--out``/``--overwrite``/``--debug`` and one
    option per ``Config`` field, each with its syntax, allowed values and default (an example the parser
    accepts); ``parser.examples`` maps each field option to that example."""
    config_cls = module.Config
    allowed = choices(module)
    prog = f"python -m experiments {name}"
    parser = _Parser(
        prog=prog,
        usage=f"{prog} [{' | '.join('--' + p for p in module.PRESETS)}] [--out DIR [--overwrite]] [--debug] "
        "[--default-malloc] "
        "[--FIELD VALUE ...]",
        description=f"{runtimes.describe(name)}\n\n{inspect.cleandoc(config_cls.__doc__ or '')}",
        formatter_class=argparse.RawTextHelpFormatter,  # keeps each option's "default: ..." on its own line
    )
    presets = parser.add_mutually_exclusive_group()
    for preset in module.PRESETS:
        presets.add_argument(f"--{preset}", action="store_true", help=f"use the {preset!r} preset")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<name>-<timestamp>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default allocator settings (otherwise bnjax.retain_freed_memory() runs first, which "
        "removes XLA:CPU's page faults on conv nets; results are the same either way)",
    )
    defaults = config_cls()
    parser.examples = {}
    for field in dataclasses.fields(config_cls):
        option = f"--{field.name.replace('_', '-')}"
        scalar, is_tuple, optional = _split_annotation(field.type)
        what = f"comma-separated {_LIST_FORMATS[scalar][0]}" if is_tuple else _SCALAR_FORMATS[scalar]
        if field.name in allowed:
            what = "comma-separated, each one of: " if is_tuple else "one of: "
            what += _show_allowed(allowed[field.name])
        if is_tuple:
            what += " ('' for an empty list)"
        if optional:
            what += ", or none"
        example = _example(option, getattr(defaults, field.name))
        parser.examples[option] = example
        parser.add_argument(
            option,
            dest=field.name,
            metavar=_metavar(field.name, field.type),
            type=_parser_for(field.type, allowed.get(field.name)),
            default=argparse.SUPPRESS,
            help=f"{what}\ndefault: {example}".replace("%", "%%"),
        )
    return parser


def execute(
    name: str, module: types.ModuleType, config: Any, out: pathlib.Path, preset: str | None, command: str
) -> report.Outcome:
    """Run an experiment into ``out``: ``config.json``, the experiment's plots, ``results.json``, ``report.md``.

    From the start the folder says the run is unfinished (status ``running``); an exception or Ctrl-C marks
    it ``failed`` (with the error) or ``interrupted`` before propagating, so no folder looks complete unless
    the run was.
    """
    title = f"{name}: {module.__doc__.strip().splitlines()[0]}"
    report.write_config(out, name, config, preset)
    start = time.perf_counter()
    try:  # the status is written inside: an interrupt right after it still marks the run
        report.write_status(out, title, command=command, status="running")
        outcome = module.run(config, out)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        message = None if status == "interrupted" else f"{type(err).__name__}: {err}"
        report.write_status(
            out, title, command=command, status=status, runtime_s=time.perf_counter() - start, error=message
        )
        raise
    runtime = time.perf_counter() - start
    report.write_json(out / "results.json", {**outcome.results, "runtime_s": runtime, "status": "complete"})
    report.write_report(
        out,
        title,
        outcome.claims,
        command=command,
        runtime_s=runtime,
        tables=outcome.tables,
        figures=outcome.figures,
        notes=outcome.notes,
        setting=outcome.setting,
        reading=outcome.reading,
        rule=outcome.rule,
    )
    return outcome


def _check_dataset(config: Any) -> None:
    """Load the configured data set once before anything is written, so a bad one is a clean user error."""
    if hasattr(config, "dataset"):
        try:
            data.load(config.dataset, getattr(config, "data_seed", 42))
        except (ValueError, OSError) as err:
            raise UserError(f"--dataset {config.dataset}: {err}") from err


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def _listing() -> str:
    """The experiments with their quick and full runtimes (from :mod:`experiments.runtimes`) and summaries."""
    lines = [f"  {'experiment':<16} {'quick':>9} {'full':>9}  what it tests"]
    for name, (_, summary) in EXPERIMENTS.items():
        entry = runtimes.RUNTIMES.get(name, {})
        lines.append(f"  {name:<16} {entry.get('quick', '?'):>9} {entry.get('full', '?'):>9}  {summary}")
    return (
        "\n".join(lines)
        + "\n\nRuntimes on 2 CPU cores (when and at what load: `python -m experiments <name> --help`, which also "
        "lists an experiment's options)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 done, 2 user error, 130 interrupted).

    User errors (a bad option or value, a bad data set, an unusable ``--out``, a configuration the experiment
    rejects with ``ValueError``) print one line and return 2; ``--debug`` shows their traceback instead.
    Other exceptions propagate with their traceback (after marking the run ``failed``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        top = _Parser(
            prog="python -m experiments",
            description="Experiments that test the batchnorm literature's claims with bnjax.",
            epilog=_listing(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        top.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment to run")
        top.parse_args(argv)  # prints help or a clear error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(EXPERIMENTS[name][0])
    args = _experiment_parser(name, module).parse_args(argv[1:])
    if not args.default_malloc and not allocator.backend_started():  # in a fresh process only: it must
        allocator.retain_freed_memory()  # precede JAX's backend, and main() called in-process (tests) skips it
    prog = f"python -m experiments {name}"
    out = None
    try:
        preset = next((p for p in module.PRESETS if getattr(args, p)), None)
        config = module.PRESETS[preset] if preset else module.Config()
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
        config = dataclasses.replace(config, **overrides)
        _check_dataset(config)
        if hasattr(module, "check"):  # the experiment's own checks, before a run folder exists
            try:
                module.check(config)
            except ValueError as err:
                raise UserError(str(err)) from err
        try:
            out = report.run_dir(name, args.out, overwrite=args.overwrite)
        except report.OutputFolderError as err:
            raise UserError(str(err)) from err
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: the folder is not writable.")
        command = "python -m experiments " + " ".join(shlex.quote(a) for a in argv)
        try:
            execute(name, module, config, out, preset, command)
        except ValueError as err:  # the experiment rejected its configuration or data
            raise UserError(f"{err} (the run in {out} is marked failed)") from err
    except UserError as err:
        if args.debug:
            raise
        print(f"{prog}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = "" if out is None else f"; the run in {out} is marked interrupted"
        print(f"{prog}: interrupted{where}.", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}")
    return 0
