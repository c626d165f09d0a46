"""Tailor's gateway. `__version__` is the one source of the distribution's version: pyproject.toml
reads it (`dynamic`), and `tailor --version` and the OpenAPI document show it."""

__version__ = "0.1.0"
