"""``python -m experiments [<name>] --help``: every option's syntax is what the parser accepts, options with a
fixed set of values show and enforce it, and the runtimes come from one source (experiments/runtimes.py) that
README.md agrees with."""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
import shlex
import types

import pytest

from experiments import EXPERIMENTS, cli, data, models, runtimes, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = sorted(EXPERIMENTS)
# The allowed values an experiment's option has when its module's CHOICES gives none.
GLOBAL_CHOICES = {
    "model": models.FAMILIES,
    "norms": models.NORMS,
    "loss": train.LOSSES,
    "dataset": (*data.NAMES, "npz:PATH"),
}


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(EXPERIMENTS[name][0])


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_runtime_list_syntax_and_allowed_values(name, capsys):
    module = _module(name)
    text = _flat(_help([name, "--help"], capsys))
    assert runtimes.describe(name) in text
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    own = getattr(module, "CHOICES", {})
    for field, allowed in GLOBAL_CHOICES.items():
        if field in fields:
            assert "one of: " + ", ".join(own.get(field, allowed)) in text, field
    for field in fields.values():
        if field.type.startswith("tuple["):  # NORM[,NORM...], not the Python repr of a tuple
            assert re.search(rf"{_option(field.name)} ([A-Z_]+)\[,\1\.\.\.\] ", text), field.name
    assert "tuple[" not in text


@pytest.mark.parametrize("name", NAMES)
def test_every_example_help_shows_parses_to_the_default(name):
    module = _module(name)
    parser = cli._experiment_parser(name, module)
    text = _flat(parser.format_help())
    defaults = module.Config()
    for field in dataclasses.fields(module.Config):
        example = parser.examples[_option(field.name)]
        assert f"default: {example}" in text
        args = parser.parse_args(shlex.split(example))
        assert getattr(args, field.name) == getattr(defaults, field.name), example
    for field, allowed in cli.choices(module).items():  # every allowed value is accepted
        values = [a.replace("PATH", "x.npz") if isinstance(a, str) else a for a in allowed]
        if module.Config.__dataclass_fields__[field].type.startswith("tuple["):
            args = parser.parse_args([_option(field), ",".join(map(str, values))])
            assert getattr(args, field) == tuple(values)
        else:
            for value in values:
                assert getattr(parser.parse_args([_option(field), str(value)]), field) == value


@pytest.mark.parametrize("name", NAMES)
def test_options_the_config_docstring_shows_parse(name):
    module = _module(name)
    parser = cli._experiment_parser(name, module)
    shown = re.findall(r"``(--[a-z][a-z0-9-]*(?: [^`\s]+)*)``", module.Config.__doc__ or "")
    for fragment in shown:
        if fragment != "--help":
            parser.parse_args(shlex.split(fragment))


def _bad_value(annotation: str, allowed: tuple) -> tuple[str, str]:
    """A value outside ``allowed`` for the option (as typed), and the element the error must name."""
    bad = "bogus" if "str" in annotation else str(max(allowed) + 1)
    return (f"{allowed[0]},{bad}" if annotation.startswith("tuple[") else bad), bad


CASES = [(name, field) for name in NAMES for field in cli.choices(_module(name))]


@pytest.mark.parametrize("name, field", CASES)
def test_a_value_outside_the_allowed_ones_is_a_one_line_error(name, field, capsys):
    module = _module(name)
    allowed = cli.choices(module)[field]
    value, bad = _bad_value(module.Config.__dataclass_fields__[field].type, allowed)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--smoke", _option(field), value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"argument {_option(field)}: " in err and repr(bad) in err, err
    assert "(allowed: " + ", ".join(map(str, allowed)) + ")" in err, err


@dataclasses.dataclass(frozen=True)
class _OddConfig:
    """Defaults that are awkward to type: negative numbers, empty and one-element tuples, spaces, none."""

    offsets: tuple[float, ...] = (-1.0, 2.0)
    shift: float = -0.5
    empty: tuple[int, ...] = ()
    limit: int | None = None
    flag: bool = True
    label: str = "two words"
    dataset: str = "npz:/tmp/a b.npz"
    loss: str = "square"
    kinds: tuple[str, ...] = ("a",)


def _odd_module(choices: dict) -> types.ModuleType:
    module = types.ModuleType("odd")
    module.Config, module.PRESETS, module.CHOICES = _OddConfig, {"smoke": _OddConfig()}, choices
    return module


def test_examples_of_awkward_defaults_parse_back():
    parser = cli._experiment_parser("odd", _odd_module({"kinds": ("a", "b"), "loss": ("square",)}))
    for field in dataclasses.fields(_OddConfig):
        example = parser.examples[_option(field.name)]
        args = parser.parse_args(shlex.split(example))
        assert getattr(args, field.name) == getattr(_OddConfig(), field.name), example
    assert parser.examples["--shift"] == "--shift=-0.5" and parser.examples["--empty"] == "--empty ''"
    assert parser.parse_args(["--limit", "3"]).limit == 3 and parser.parse_args(["--limit", "none"]).limit is None
    text = _flat(parser.format_help())
    assert "--limit LIMIT|none" in text and "--flag {true,false}" in text and "--kinds KIND[,KIND...]" in text
    # The module's CHOICES replace the global ones; "npz:PATH" stands for any npz:<path>.
    for argv in (["--loss", "cross_entropy"], ["--kinds", "a,c"], ["--dataset", "npz:"], ["--dataset", "cifar"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert parser.parse_args(["--dataset", "npz:d.npz"]).dataset == "npz:d.npz"


def test_choices_must_name_config_fields():
    with pytest.raises(TypeError, match=r"CHOICES names fields its Config lacks: \['norm'\]"):
        cli.choices(_odd_module({"norm": ("bn",)}))


def test_runtimes_cover_every_experiment_in_one_form():
    assert set(EXPERIMENTS) | {"claims"} <= set(runtimes.RUNTIMES)
    for name, entry in runtimes.RUNTIMES.items():
        assert set(entry) == {"quick", "full", "measured"}, name
        assert re.fullmatch(r"\d+(\.\d+)? min", entry["quick"]) and re.fullmatch(r"\d+(\.\d+)? min", entry["full"])
        measured = entry["measured"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d, 2 CPU cores, load \S.*", measured) or measured.startswith("estimated")
    assert runtimes.describe("eos") == (
        f"Runtime (measured {runtimes.RUNTIMES['eos']['measured']}): quick {runtimes.RUNTIMES['eos']['quick']}, "
        f"full {runtimes.RUNTIMES['eos']['full']}."
    )


def test_top_level_help_lists_each_experiment_with_its_runtimes(capsys):
    text = _help(["--help"], capsys)
    for name in EXPERIMENTS:
        entry = runtimes.RUNTIMES[name]
        quick, full = re.escape(entry["quick"]), re.escape(entry["full"])
        assert re.search(rf"^ +{name} +{quick} +{full}  \S", text, re.M), name


def test_readme_states_the_measured_runtime_of_the_main_job():
    readme = _flat((ROOT / "README.md").read_text())
    main_job = readme[readme.index("Main job") : readme.index("python -m experiments eos --quick")]
    assert re.findall(r"about (\S+ min) on 2 CPU cores", main_job) == [runtimes.RUNTIMES["eos"]["quick"]]
