"""User-facing errors.

Every error a user can cause (a bad plan, a bad path, a bad option) is raised as a
``WorkbenchError`` whose message says what was wrong and what would be valid. The CLI
prints it on one line and exits non-zero; the UI shows it inline.

A bad option value is a ``ConfigError``: it also carries the option's field name, and its
message names options through placeholders, so each audience sees its own words: the CLI
its flags (``--steps must be > 0, got 0``, the default ``str``), the UI its labels
(``err.phrased(label_of)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class WorkbenchError(ValueError):
    """A problem with the user's input, explained in its message."""


def flag(field: str) -> str:
    """The CLI flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


class _Names(dict):
    """Template values; any other ``{name}`` is an option, named by ``name_of``."""

    def __init__(self, values: dict[str, Any], name_of: Callable[[str], str]) -> None:
        super().__init__(values)
        self.name_of = name_of

    def __missing__(self, key: str) -> str:
        return self.name_of(key)


class ConfigError(WorkbenchError):
    """A bad option value: ``field`` is the option it is about (e.g. ``steps``).

    ``template`` names this option as ``{field}``, other options by their field names
    (``{w_feat}``), and fills the other placeholders from ``values``:
    ``ConfigError("steps", "{field} must be > 0, got {got}", got=0)``.
    """

    def __init__(self, field: str, template: str, **values: Any) -> None:
        self.field, self.template, self.values = field, template, values
        super().__init__(self.phrased(flag))

    def phrased(self, name_of: Callable[[str], str]) -> str:
        """The message with each option named by ``name_of(field)`` (a flag, a label, ...)."""
        return self.template.format_map(_Names(self.values | {"field": name_of(self.field)}, name_of))

    @property
    def message(self) -> str:
        """The neutral message: options named by their field names (``steps must be > 0``)."""
        return self.phrased(lambda name: name)

    @classmethod
    def about(cls, field: str, err: WorkbenchError) -> ConfigError:
        """``err`` (already a whole sentence) as an error about ``field``."""
        if isinstance(err, ConfigError):
            return err
        return cls(field, "{text}", text=str(err))
