"""The built wheel ships `bnjax` and nothing else: py.typed, the license and the version included."""

import email.parser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import bnjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Local state that is not part of the source tree (a stale build/ folder would leak old files into a wheel).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "runs",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
)


def test_wheel_contains_bnjax_only(tmp_path):
    # Build from a copy of the source tree, so the test neither sees nor leaves build artifacts in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    dist_info = f"bnjax-{bnjax.__version__}.dist-info"
    assert wheel.name.startswith(f"bnjax-{bnjax.__version__}-"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        license_text = zf.read(f"{dist_info}/licenses/LICENSE").decode()

    assert {name.split("/")[0] for name in names} == {"bnjax", dist_info}
    assert "bnjax/py.typed" in names
    # Every module of the source package is shipped (subpackages included), and no other Python file.
    source_modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnjax").rglob("*.py")}
    assert {name for name in names if name.endswith(".py")} == source_modules
    assert license_text == (ROOT / "LICENSE").read_text()
    assert metadata["Name"] == "bnjax"
    assert metadata["Version"] == bnjax.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
