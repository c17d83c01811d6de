"""The errors a user can fix, reported as one line and exit status 2 by :func:`experiments.lib.cli.run_cli`.

A leaf module: it imports nothing from the project, so every other module may raise these."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option value or options that cannot work together; reported as one line, exit status 2."""


class OptionError(UsageError):
    """One field of a settings dataclass holds a value that is not allowed.

    Attributes: ``field`` (the dataclass field name), ``value``, ``allowed`` (what would be accepted). The command
    line names the option that sets the field (:func:`parse`); library callers see the field name.
    """

    def __init__(self, field_name: str, value, allowed: str):
        self.field, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"{field_name}={value!r}: {allowed}")


class CheckpointError(ValueError):
    """A training checkpoint or log that is missing, partial, corrupt or does not fit the run (the message names the
    file)."""
