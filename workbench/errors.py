"""User-facing errors.

Every error a user can cause (a bad plan, a bad path, a bad option) is raised as a
``WorkbenchError`` whose message says what was wrong and what would be valid. The CLI
prints it on one line and exits non-zero; the UI shows it inline.
"""


class WorkbenchError(ValueError):
    """A problem with the user's input, explained in its message."""
