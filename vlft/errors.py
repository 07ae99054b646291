"""The one base class of the mistakes a user can fix: a config value, a missing file, bad data, an output in the way.

`vlft` (vlft/cli.py) prints such an error as one or a few lines and exits 2; anything else is reported as an internal
error. Each module keeps its own subclasses (ConfigError, BadInput, ExportError, ...) so callers can still catch them
one by one.
"""

from __future__ import annotations


class UserError(Exception):
    """Something in what the user gave (config, paths, data, an existing output) that they must change; the message
    names it and says where."""


class ConfigError(UserError, ValueError):
    """A config value or key that is not allowed; the message names the dotted key."""
