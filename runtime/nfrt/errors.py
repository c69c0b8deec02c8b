"""Runtime errors. All derive from ValueError so callers can catch bad input in one place."""

from __future__ import annotations


class NfrtError(ValueError):
    """Bad input to the runtime; the message names what is wrong."""


class ConfigError(NfrtError):
    """A model or batch description is malformed."""


class ScheduleError(NfrtError):
    """A schedule file is malformed or does not fit the model, GPU or runtime."""
