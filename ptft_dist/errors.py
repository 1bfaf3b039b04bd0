"""The one family of user errors: a bad config, bad input data, a run directory that cannot be read.

Each module raises its own named subclass (``ConfigError``, ``DataError``, ``ReportError``,
``RunsError``) with a one-paragraph message that names the field or file; the CLI catches
:class:`UserError` and prints it with exit code 2 (no traceback). A ``ValueError`` subclass,
so code that catches ``ValueError`` keeps working. Imports nothing.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix (a field, a file, a folder), said in one paragraph naming it."""
