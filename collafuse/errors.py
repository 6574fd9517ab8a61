"""Errors that name the argument and the value (STYLE.md rule 7).

The command line turns every :class:`CollafuseError` into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class CollafuseError(ValueError):
    """Bad input from a user: a config, a data file, a run folder, a name."""


class ConfigError(CollafuseError):
    """A configuration value is unknown, missing or impossible."""


class DataError(CollafuseError):
    """A data source is missing, corrupt or has the wrong shape/range."""


class RunError(CollafuseError):
    """A run folder is missing, incomplete or corrupt."""
