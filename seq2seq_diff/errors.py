"""Exception types for people: each carries one line saying what is wrong and how to fix it.

Library callers catch the specific type; the command line prints ``str(error)`` on one line and
exits with status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

from pathlib import Path


class Seq2SeqDiffError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(Seq2SeqDiffError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(Seq2SeqDiffError):
    """Bad input data: names the file and, where known, the 1-based line."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
            where += ": "
        super().__init__(where + message)


class ModelDirError(Seq2SeqDiffError):
    """A model directory or checkpoint that cannot be loaded as asked."""


class TrainingError(Seq2SeqDiffError):
    """Training cannot go on (e.g. the loss stayed NaN/Inf); the message says what to change."""
