"""The documentation stays complete and its examples run.

* Every public name (``bnjax.__all__``, ``bnjax.nnx``, ``bnjax.torch_interop``, ``bnjax.loops``,
  ``bnjax.curvature.__all__``, ``bnjax.landscape.__all__``) has an autodoc entry in ``docs/api/``.
* Docstring examples (``>>>``) in every ``bnjax`` module run as doctests here.
* Code on the site is executed by the (strict) Sphinx build: every Python block in ``docs/`` is a MyST-NB
  ``code-cell`` of a page declared as a notebook, never a plain fence that would be shown without running.
"""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import bnjax
from bnjax import curvature, landscape

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Directives that document one object, and the module-level ones that document a module with its members.
_ENTRY = re.compile(r"^(?:```\{|\.\. )(auto\w+)\}?:*\s+(bnjax[\w.]*)\s*$", re.M)


def _api_entries() -> dict[str, set[str]]:
    entries: dict[str, set[str]] = {}
    for page in (DOCS / "api").glob("*.md"):
        for directive, target in _ENTRY.findall(page.read_text()):
            entries.setdefault(target, set()).add(directive)
    return entries


def _defined_in(module) -> list[str]:
    """Public names a module defines itself (for modules without ``__all__``)."""
    own = module.__name__
    return [n for n, o in vars(module).items() if not n.startswith("_") and getattr(o, "__module__", None) == own]


def _public_names() -> list[str]:
    names = [f"bnjax.{n}" for n in bnjax.__all__]
    names += [f"bnjax.curvature.{n}" for n in curvature.__all__]
    names += [f"bnjax.landscape.{n}" for n in landscape.__all__]
    for module in (bnjax.nnx, bnjax.torch_interop, bnjax.loops):
        names += [f"{module.__name__}.{n}" for n in _defined_in(module)]
    return names


def test_entry_pattern_reads_both_directive_spellings():
    text = (
        "```{autofunction} bnjax.batch_norm\n```\n.. automodule:: bnjax.loops\n.. autoclass:: bnjax.X\n   :members:\n"
    )
    found = dict((t, d) for d, t in _ENTRY.findall(text))
    assert found == {"bnjax.batch_norm": "autofunction", "bnjax.loops": "automodule", "bnjax.X": "autoclass"}


def test_every_public_name_is_in_the_api_reference():
    entries = _api_entries()
    # A module documented with ``:members:`` covers the names it defines.
    with_members = set()
    for page in (DOCS / "api").glob("*.md"):
        with_members |= set(re.findall(r"automodule\}?:* *(bnjax[\w.]*)\n\s*:members:", page.read_text()))
    missing = [n for n in _public_names() if n not in entries and n.rsplit(".", 1)[0] not in with_members]
    assert not missing, f"public names without an entry in docs/api/*.md: {missing}"
    modules = [n for n in bnjax.__all__ if isinstance(getattr(bnjax, n), type(bnjax))]
    assert all("automodule" in entries.get(f"bnjax.{m}", set()) for m in modules), modules


def test_api_entries_name_real_objects():
    """A typo in a directive would only warn in the build; here it fails with the name."""
    for target in _api_entries():
        module, _, attr = target.rpartition(".")
        try:
            importlib.import_module(target)
            continue
        except ImportError:
            pass
        assert hasattr(importlib.import_module(module), attr), target


def _modules():
    yield bnjax
    for info in pkgutil.walk_packages(bnjax.__path__, "bnjax."):
        yield importlib.import_module(info.name)


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for module in _modules() for t in finder.find(module) if t.examples]


DOCTESTS = _doctests()


def test_docstring_examples_are_collected():
    names = {t.name for t in DOCTESTS}
    assert {"bnjax.frozen", "bnjax.curvature.eos"} <= names, names


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example_runs(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    result = runner.run(test, out=out.append)
    assert result.failed == 0, "".join(out)


def _pages():
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def test_docs_code_is_executed_by_the_build():
    conf = (DOCS / "conf.py").read_text()
    assert 'nb_execution_mode = "force"' in conf and "nb_execution_raise_on_error = True" in conf
    pages_with_cells = 0
    for page in _pages():
        text = page.read_text()
        plain = re.findall(r"^```(?:python|py|ipython3?)\s*$", text, re.M)
        assert not plain, f"{page.relative_to(ROOT)}: a plain Python fence is never run; use {{code-cell}}"
        if re.search(r"^```\{code-cell\}", text, re.M):
            assert text.startswith("---\nfile_format: mystnb\n"), f"{page.relative_to(ROOT)} is not a notebook"
            pages_with_cells += 1
    assert pages_with_cells >= 9  # getting started, six guides with code, three tutorials


@pytest.mark.parametrize("name", ["eos_tracker", "sync_bn_shard_map", "loss_surface"])
def test_tutorials_embed_a_plot(name):
    text = (DOCS / "tutorials" / f"{name}.md").read_text()
    assert re.search(r"plt\.show\(\)|Image\(", text), name
    assert f"tutorials/{name}" in (DOCS / "index.md").read_text()
