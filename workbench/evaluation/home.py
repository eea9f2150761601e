"""Where an evaluation of a student is kept: beside the student it judged.

- a run's student (``RUN/student``): ``RUN/evaluation/``, read by the results table;
- an export (a folder with ``plan.json`` and the model card ``README.md``, the UNet in it or in
  its ``unet/``): ``EXPORT/evaluation/``, and the model card gains an "Evaluation (workbench
  evaluate)" section, replaced on every new evaluation.

Each evaluation folder holds ``evaluation.json`` (the record) and the images it scored
(``teacher/0000.png``, ``student/0000.png``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from workbench.files import write_text_atomic

FOLDER = "evaluation"
RECORD = "evaluation.json"
_BEGIN, _END = "<!-- workbench-evaluate:begin -->", "<!-- workbench-evaluate:end -->"


@dataclass(frozen=True)
class Home:
    folder: Path  # where evaluation.json and the images go
    card: Path | None  # the model card to update, if any


def is_run(folder: Path) -> bool:
    return (folder / "job.json").is_file()


def is_export(folder: Path) -> bool:
    return (folder / "plan.json").is_file() and (folder / "README.md").is_file()


def home_of(unet: str | Path) -> Home | None:
    """The evaluation folder of a student UNet folder, or ``None`` when it is neither a run's
    nor an export's (the caller then keeps nothing unless told where)."""
    unet = Path(unet).expanduser().resolve()
    if is_run(unet.parent):
        return Home(unet.parent / FOLDER, None)
    for folder in (unet, unet.parent):
        if is_export(folder):
            return Home(folder / FOLDER, folder / "README.md")
    return None


def card_section(card: Path, lines: list[str]) -> None:
    """Put the evaluation's table into the model card, replacing an earlier one."""
    body = (
        f"{_BEGIN}\n## Evaluation (workbench evaluate)\n\nMean and 95% interval per metric; how each "
        f"was computed follows the table. Images and per-sample scores: `{FOLDER}/`.\n\n```text\n"
        + "\n".join(lines) + f"\n```\n{_END}"
    )  # fmt: skip
    text = card.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(_BEGIN) + ".*?" + re.escape(_END), re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body + "\n"
    write_text_atomic(card, text)
