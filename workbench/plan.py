"""``PruningPlan``: which units a user removed, as a strict, versioned JSON value.

Which teacher layers each student layer inherits follows from the removed ids: a
student keeps the teacher's remaining layers and transformer blocks in order, so
removing ``...transformer_blocks.3`` to ``.9`` of a 10-deep attention keeps blocks 0-2.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.catalog import Catalog, natural_key
from workbench.errors import WorkbenchError
from workbench.files import write_text_atomic

SCHEMA_VERSION = 1
_FIELDS = ("schema_version", "name", "description", "source", "topology", "removed")


@dataclass(frozen=True)
class PruningPlan:
    """Units removed from a teacher of a given topology (see ``Topology.signature``)."""

    name: str
    topology: dict[str, Any] = field(compare=False)
    removed: tuple[str, ...] = ()
    description: str = ""
    source: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise WorkbenchError(
                f"plan {self.name!r} has schema_version {self.schema_version!r}; "
                f"this workbench reads schema_version {SCHEMA_VERSION}"
            )
        if not isinstance(self.name, str) or not self.name.strip():
            raise WorkbenchError("a plan needs a non-empty 'name'")
        if not all(isinstance(u, str) for u in self.removed):
            raise WorkbenchError(f"plan {self.name!r}: 'removed' must be a list of unit ids")
        dupes = sorted({u for u in self.removed if self.removed.count(u) > 1})
        if dupes:
            raise WorkbenchError(f"plan {self.name!r} lists units twice: {', '.join(dupes)}")
        object.__setattr__(self, "removed", tuple(sorted(self.removed, key=natural_key)))

    @classmethod
    def empty(cls, catalog: Catalog, name: str = "empty") -> PruningPlan:
        return cls(name=name, topology=catalog.topology.signature())

    def with_removed(self, removed: list[str] | tuple[str, ...] | set[str], **changes: Any) -> PruningPlan:
        data = asdict(self) | {"removed": tuple(removed)} | changes
        return PruningPlan(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["removed"] = list(self.removed)
        return {k: data[k] for k in _FIELDS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, origin: str = "plan") -> PruningPlan:
        if not isinstance(data, dict):
            raise WorkbenchError(f"{origin}: a plan must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        missing = sorted(set(_FIELDS) - set(data))
        if unknown or missing:
            parts = [
                f"unknown keys {unknown}" if unknown else "",
                f"missing keys {missing}" if missing else "",
            ]
            raise WorkbenchError(
                f"{origin}: {'; '.join(p for p in parts if p)}; a plan has exactly {list(_FIELDS)}"
            )
        if data["schema_version"] != SCHEMA_VERSION:
            raise WorkbenchError(
                f"{origin}: schema_version {data['schema_version']!r} is not supported; "
                f"this workbench reads schema_version {SCHEMA_VERSION}"
            )
        if not isinstance(data["removed"], list):
            raise WorkbenchError(f"{origin}: 'removed' must be a list of unit ids")
        if not isinstance(data["topology"], dict):
            raise WorkbenchError(f"{origin}: 'topology' must be an object (see `units --json`)")
        return cls(**{**data, "removed": tuple(data["removed"])})

    @classmethod
    def from_json(cls, text: str, origin: str = "plan") -> PruningPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise WorkbenchError(f"{origin} is not valid JSON: {err.msg} at line {err.lineno}") from None
        return cls.from_dict(data, origin)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise WorkbenchError(f"plan file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise WorkbenchError(f"cannot read plan file {str(path)!r}: {err}") from None
        return cls.from_json(text, origin=f"plan file {str(path)!r}")

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written plan."""

        return write_text_atomic(path, self.to_json())

    def check_fits(self, catalog: Catalog) -> None:
        """Raise unless this plan was made for ``catalog``'s topology and names only its units."""
        ours = catalog.topology.signature()
        if _canonical(self.topology) != _canonical(ours):
            raise WorkbenchError(
                f"plan {self.name!r} was made for another UNet topology; this model is "
                f"{catalog.topology.describe()}. Start from this model's empty plan instead"
            )
        unknown = [u for u in self.removed if u not in catalog.by_id]
        if unknown:
            hints = []
            for u in unknown[:3]:
                close = difflib.get_close_matches(u, list(catalog.by_id), n=1)
                hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise WorkbenchError(
                f"plan {self.name!r} names unknown units: {', '.join(hints)}"
                + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
                + "; list valid ids with `python -m workbench units`"
            )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
