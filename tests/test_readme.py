"""README.md stays true: its test command is what .ci/run runs, and its first examples execute."""

import pathlib
import re

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci_command) == 1
    assert ci_command[0].strip() in README


def test_core_and_module_examples_execute():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    namespace: dict = {}
    exec(blocks[0], namespace)  # the functional core example
    assert namespace["y"].shape == (32, 8, 8, 16)
    assert float(abs(namespace["state"].mean).max()) > 0  # the EWMA was updated
    namespace = {"key": jax.random.key(0), "x": jax.random.normal(jax.random.key(1), (4, 8, 8, 3))}
    exec(blocks[1], namespace)  # the Flax module example
    assert set(namespace["updates"]["batch_stats"]) == {"BatchNorm_0"}
