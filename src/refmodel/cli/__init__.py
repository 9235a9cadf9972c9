"""The ``refmodel`` command line: :mod:`.main` holds the group, one module per command group."""

from .main import main

__all__ = ["main"]
