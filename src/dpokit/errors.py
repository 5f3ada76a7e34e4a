"""The errors a person can fix. `dpokit`'s command line prints these as one line (exit 2); anything else is a bug
and keeps its traceback.

Every module raises a subclass of `UserError` for bad input, bad settings or a bad environment, with a message that
says what is wrong, where (file:line, config key, path) and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, settings or environment: the message names the file, key or value and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config problem a person can fix: the message names the key and the value, and what to do."""
