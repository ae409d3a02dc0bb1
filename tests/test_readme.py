"""README.md stays true: its commands are what .ci/run runs, its links resolve, its example executes; and the
core and module examples it used to carry, now on the docs' getting-started page, execute with the same
checks."""

import pathlib
import re

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _code_cells(page: pathlib.Path) -> list[str]:
    """The MyST-NB code cells of a docs page, in order, without their ``:option:`` lines."""
    cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", page.read_text(), re.S)
    return ["\n".join(line for line in c.splitlines() if not line.startswith(":")) for c in cells]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in CI.splitlines() if "pytest" in line]
    assert len(ci_command) == 1
    assert ci_command[0].strip() in README


def test_ci_builds_the_docs_with_the_readme_command_before_the_tests():
    build = [line for line in CI.splitlines() if "sphinx-build" in line]
    assert len(build) == 1
    assert build[0].strip() in README
    assert "sphinx-build -W --keep-going -j auto -b html docs docs/_build/html" in build[0]
    assert CI.index("sphinx-build") < CI.index("pytest")


def test_readme_links_resolve_and_name_the_built_entry_page():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert "docs/_build/html/index.html" in local  # produced by the build command
    for link in local:
        if link != "docs/_build/html/index.html":
            assert (ROOT / link).exists(), link
    for page in ["getting_started.md", "api/index.md"] + [
        f"tutorials/{t}.md" for t in ("eos_tracker", "sync_bn_shard_map", "loss_surface")
    ]:
        assert f"docs/{page}" in local, page


def test_readme_example_executes():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(blocks[0], namespace)
    assert namespace["y"].shape == (32, 8, 8, 16)
    assert float(abs(namespace["state"].mean).max()) > 0


def test_core_and_module_examples_execute():
    cells = _code_cells(ROOT / "docs" / "getting_started.md")
    namespace: dict = {}
    exec(cells[0], namespace)  # the functional core example
    assert namespace["y"].shape == (32, 8, 8, 16)
    assert float(abs(namespace["state"].mean).max()) > 0  # the EWMA was updated
    namespace = {}
    exec(cells[1], namespace)  # the Flax module example
    assert namespace["x"].shape == (4, 8, 8, 3) and isinstance(namespace["key"], jax.Array)
    assert set(namespace["updates"]["batch_stats"]) == {"BatchNorm_0"}
