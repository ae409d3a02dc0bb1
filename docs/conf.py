"""Sphinx configuration: MyST-NB pages (guides and tutorials executed at every build) and autodoc.

Build (strict; what .ci/run runs): ``sphinx-build -W --keep-going -j auto -b html docs docs/_build/html``.
"""

import os
import sys

# The docs build the checkout it sits in, even without an editable install.
sys.path.insert(0, os.path.abspath(".."))

# The pages' kernels inherit this environment. Their examples are tiny, so XLA:CPU spends most of the build
# compiling, not running: its backend optimization level 0 cuts the build's CPU time by about a third. Pages
# that force host devices append to XLA_FLAGS instead of replacing it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

project = "bnjax"
author = "bnjax authors"
copyright = "2026, bnjax authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]

html_theme = "furo"
html_title = "bnjax"

# Every page with code cells is executed at every build (nothing cached between builds), and a cell that
# raises fails the build: the code on the site is the code that ran.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_merge_streams = True
# Progress bars (precise_batch_stats) and import-time notices go to stderr; the pages show results only.
nb_output_stderr = "remove"
# Run each page in a fresh temporary folder: files a page writes (eos.json, plots) never land in docs/.
nb_execution_in_temp = True

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# Google-style "Args:/Returns:" sections (napoleon); the signature already shows the type hints.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The Flax shells document their fields in these sections; render them like "Args".
napoleon_custom_sections = [("Extra fields", "params_style"), ("Fields as in Flax", "params_style")]
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}

suppress_warnings = ["mystnb.unknown_mime_type"]
