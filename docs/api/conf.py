"""Sphinx configuration of flatjax's API reference (built offline by `make docs`)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "flatjax"
author = "The flatjax developers"
copyright = "2026, the flatjax developers"
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Returns", "params_style"), ("Attributes", "params_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
html_theme = "alabaster"
html_static_path = []
# Offline: no intersphinx, no remote images.
suppress_warnings = ["config.cache"]
