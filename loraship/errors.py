"""The exception every stage raises for a user's mistake.

Each stage subclasses :class:`UserError` (``TrainError``, ``ExportError``,
``ServeError``); ``__main__`` catches it, prints one line with the fix and exits
with status 2. Anything else is a failure of ours and exits with status 1.
"""


class UserError(Exception):
    """Bad input: a setting, a file, a dataset row. The message says what to do."""

    exit_code = 2
