"""Prompt sets from the user's files: a ``.txt`` (one prompt a line) or a ``.jsonl`` (one object
a line with a ``prompt``, ``caption`` or ``text`` string: COCO captions, PartiPrompts, yours).

Blank lines are skipped and repeated prompts kept once (first occurrence), since a sample's
seed is derived from its prompt. ``pick`` chooses ``n`` prompts spread evenly over the file,
so the same file and ``n`` always give the same prompts, and a smaller ``n`` of a sorted file
covers it as evenly as a larger one.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError

SUFFIXES = (".txt", ".jsonl")
JSONL_KEYS = ("prompt", "caption", "text")


def read(path: str | Path) -> list[str]:
    """Every distinct prompt of a prompt file, in file order."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise WorkbenchError(
            f"--prompt-file {str(path)!r} must be a .txt (one prompt a line) or a .jsonl file"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"cannot read the prompt file {str(path)!r}: {err}") from None
    found = [_jsonl(line, path, i) if path.suffix.lower() == ".jsonl" else line.strip()
             for i, line in enumerate(lines, 1) if line.strip()]  # fmt: skip
    prompts = list(dict.fromkeys(p for p in found if p))
    if not prompts:
        raise WorkbenchError(f"the prompt file {str(path)!r} holds no prompts")
    return prompts


def _jsonl(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise WorkbenchError(f"{str(path)!r} line {number} is not JSON ({err})") from None
    if isinstance(row, dict):
        for key in JSONL_KEYS:
            if isinstance(row.get(key), str):
                return row[key].strip()
    raise WorkbenchError(
        f"{str(path)!r} line {number} needs a string under one of the keys {', '.join(JSONL_KEYS)}"
    )


def pick(prompts: list[str], n: int | None, what: str = "prompts in the prompt file") -> list[str]:
    """``n`` prompts spread evenly over ``prompts`` (all of them for ``None``)."""
    if n is None:
        return list(prompts)
    if not 1 <= n <= len(prompts):
        raise WorkbenchError(
            f"--prompts {n}: there are {len(prompts)} {what}; give a number between 1 and {len(prompts)}"
        )
    return [prompts[i * len(prompts) // n] for i in range(n)]
