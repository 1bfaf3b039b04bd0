"""The one exception of the data package, kept apart so that every data module can raise it
without importing the others."""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError):
    """Bad input data: the message names the file (and line, column, shard or sample key)."""
