"""Errors the command line turns into one line on stderr and exit code 2."""

from __future__ import annotations


class NfsearchError(Exception):
    """Bad input or an impossible request: the message is shown to the user as one line."""
