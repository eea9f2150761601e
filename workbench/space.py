"""The Space's visitors: what a stranger may give, which runs are theirs, and what expires.

The app has two trust levels (DESIGN.md, invariant 9):

- **Owner** (localhost, or ``--host`` on a private network): the person at the keyboard owns
  the machine. Paths, their own scorers and folders are theirs to give; nothing here applies.
- **Space** (``--space``, or inside a Hugging Face Space): every visitor is an anonymous
  stranger sharing one small machine. No visitor input is ever imported, executed or opened
  as a server path: boxes take names from the app's own lists (``check_*``); files arrive
  only as uploads, checked by type, size and count and copied into the visitor's own folder
  (``unpack_data``); each visitor's runs live in a folder named by a hash of a random token
  their browser keeps (``visitor_key``, ``visitor_folder``, ``own_run``), so a visitor sees
  and controls only their own; what visitors leave on disk expires (``expire``).

The UI asks these functions; the rest of the core does not know visitors exist.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workbench.data import IMAGE_SUFFIXES, check_source
from workbench.distill_config import LCD_STAGE
from workbench.errors import WorkbenchError
from workbench.files import remove_tree
from workbench.models import BUILTIN_CONFIGS, DEFAULT_BASE, is_hub_id
from workbench.presets import list_presets
from workbench.reward import TOY_SPEC
from workbench.runs import ACTIVE, list_runs

LOCAL_ONLY = "run the workbench on your own machine for that (python app.py)"
VISITORS = "visitors"  # <runs>/visitors/<key>/: one visitor's runs; <key>/uploads/: their data
UPLOADS = "uploads"
UPLOADED = "uploaded: "  # how the Data box names a visitor's upload
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
_CAPTIONS = (".txt",)
_METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold; anything beyond is refused before it is unpacked."""

    max_bytes: int = 50 * 2**20  # the uploaded file itself
    max_unpacked_bytes: int = 200 * 2**20  # a zip's members together (zip bombs stop here)
    max_files: int = 2000  # members of a zip
    max_prompts: int = 1000  # lines of a prompt file
    max_prompt_chars: int = 1000
    max_image_pixels: int = 4096 * 4096


# --------------------------------------------------------------------------- what a visitor may give


def check_base_name(name: str) -> str:
    """A teacher a visitor may name: a built-in name or a hub id, never a server folder."""
    name = (name or "").strip()
    if name == DEFAULT_BASE or name in BUILTIN_CONFIGS:
        return name
    if is_hub_id(name) and not Path(name).exists():
        return name
    valid = ", ".join([DEFAULT_BASE, *BUILTIN_CONFIGS])
    raise WorkbenchError(
        f"this Space loads teachers by name only: {valid}, or a hub id like "
        f"stabilityai/stable-diffusion-xl-base-1.0, not {name!r}; for a folder on a machine, {LOCAL_ONLY}"
    )


def check_stage_names(names: list[str]) -> list[str]:
    """Progressive stages a visitor may name: the app's presets and ``lcd``, never a plan file path."""
    known = list_presets()
    for name in names:
        if name != LCD_STAGE and name not in known:
            raise WorkbenchError(
                f"this Space trains presets by name only ({', '.join(known)}, or {LCD_STAGE}), not {name!r}; "
                "to train your own plan, make it in Blocks (or upload it in Presets) and pick "
                f"'(current plan)'; for a plan file path, {LOCAL_ONLY}"
            )
    return names


def check_preset(name: str | None) -> str | None:
    """A preset a visitor may pick: one of the app's, by name (never a plan file path)."""
    if name is not None and name not in list_presets():
        raise WorkbenchError(f"unknown preset {name!r}; pick one of {', '.join(list_presets())}")
    return name


def check_reward(spec: str | None) -> str | None:
    """An RG-LCD reward a visitor may name: none, or the reward the app ships (``toy``). A file
    or module scorer is Python code: it is refused here, before anything is imported."""
    text = (spec or "").strip()
    if text in ("", TOY_SPEC):
        return text or None
    raise WorkbenchError(
        f"this Space takes the shipped reward ({TOY_SPEC}) or none, not {text!r}: a scorer file or "
        f"module is Python code that would run on the server; for your own reward, {LOCAL_ONLY}"
    )


def data_source(text: str | None, uploaded: str | None) -> str:
    """What a visitor's Data box trains on: ``toy``, or their own upload (``uploaded`` holds its
    folder, set by the app, never typed); any other text is refused as a server path."""
    text = (text or "").strip() or "toy"
    if text == "toy":
        return text
    if text.startswith(UPLOADED.strip()) and uploaded:
        return uploaded
    raise WorkbenchError(
        f"this Space takes no paths on the server as data ({text!r}): type toy, or upload a .zip of "
        f"images with captions or a .txt of prompts below; for a folder on a machine, {LOCAL_ONLY}"
    )


# --------------------------------------------------------------------------- whose run is it


def new_token() -> str:
    """A secret the visitor's browser keeps (local storage); never shown, never stored on disk."""
    return secrets.token_urlsafe(32)


def valid_token(token: object) -> bool:
    return isinstance(token, str) and bool(_TOKEN.match(token))


def visitor_key(token: str) -> str:
    """The visitor's folder name: a hash of their token (the folder reveals nothing to act with)."""
    if not valid_token(token):
        raise WorkbenchError("this page has no visitor id yet; reload the page")
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def visitor_folder(runs_root: str | Path, key: str | None) -> Path:
    """``<runs>/visitors/<key>``: where one visitor's runs live."""
    if not key or not re.fullmatch(r"[0-9a-f]{32}", key):
        raise WorkbenchError("this page has no visitor id yet; wait a moment or reload the page")
    return Path(runs_root) / VISITORS / key


def own_run(folder: Path, run_dir: str | None) -> Path:
    """``run_dir`` if it is one of the runs in ``folder`` (the visitor's own), else an error."""
    if not run_dir:
        raise WorkbenchError("select a run first")
    path = Path(run_dir).resolve()
    if path.parent != Path(folder).resolve() or path.name in (UPLOADS,):
        raise WorkbenchError("that is not one of your runs; pick one from the list")
    return path


def all_run_folders(runs_root: str | Path) -> list[Path]:
    """Every visitor's runs folder (the queue and expiry look across all of them)."""
    root = Path(runs_root) / VISITORS
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# --------------------------------------------------------------------------- uploads


def unpack_data(upload: str | Path, folder: Path, limits: UploadLimits = UploadLimits()) -> tuple[str, str]:
    """Check a visitor's upload and copy it into ``folder`` (their own uploads): a ``.txt`` of
    prompts, or a ``.zip`` of images with captions (``NAME.txt`` beside each image, or a
    ``metadata.jsonl``). Returns (the data source for the run, a one-line summary)."""
    upload = Path(upload)
    size = upload.stat().st_size
    if size > limits.max_bytes:
        raise WorkbenchError(f"the upload is {_size_text(size)}; this Space takes up to {_size_text(limits.max_bytes)}")
    suffix = upload.suffix.lower()
    if suffix not in (".txt", ".zip"):
        raise WorkbenchError(f"upload a .zip of captioned images or a .txt of prompts, not a {suffix or 'file without suffix'}")
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()[:16]
    dest = folder / UPLOADS / digest
    remove_tree(dest)
    dest.mkdir(parents=True)
    try:
        return _prompts(upload, dest, limits) if suffix == ".txt" else _images(upload, dest, limits)
    except WorkbenchError:
        remove_tree(dest)
        raise


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n:,} bytes"


def _prompts(upload: Path, dest: Path, limits: UploadLimits) -> tuple[str, str]:
    try:
        text = upload.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkbenchError("the prompt file is not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise WorkbenchError("the prompt file has no prompts (one per line)")
    if len(prompts) > limits.max_prompts:
        raise WorkbenchError(f"the prompt file has {len(prompts)} prompts; this Space takes up to {limits.max_prompts}")
    if (longest := max(len(p) for p in prompts)) > limits.max_prompt_chars:
        raise WorkbenchError(f"a prompt has {longest} characters; this Space takes up to {limits.max_prompt_chars}")
    path = dest / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path), f"{len(prompts)} prompts (the teacher draws their images)"


def _images(upload: Path, dest: Path, limits: UploadLimits) -> tuple[str, str]:
    """Members are read as bytes and written under their base names only: no member path,
    link or name reaches outside ``dest``."""
    try:
        archive = zipfile.ZipFile(upload)
    except zipfile.BadZipFile:
        raise WorkbenchError("the upload is not a readable .zip file") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not _junk(m.filename)]
        _check_members(members, limits)
        for m in members:
            name = Path(m.filename).name
            if (dest / name).exists():
                raise WorkbenchError(f"the zip holds two files named {name!r}; give each image its own name")
            (dest / name).write_bytes(archive.read(m))
    _check_images(dest, limits)
    if (dest / _METADATA).exists():
        _check_metadata(dest)
    check_source(str(dest))  # the same reading the run does: every image has its caption
    n = sum(1 for p in dest.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return str(dest), f"{n} images with captions"


def _junk(name: str) -> bool:
    parts = Path(name).parts
    return "__MACOSX" in parts or Path(name).name.startswith(".")


def _check_members(members: list[zipfile.ZipInfo], limits: UploadLimits) -> None:
    if not members:
        raise WorkbenchError("the zip is empty; put images with NAME.txt captions (or a metadata.jsonl) in it")
    if len(members) > limits.max_files:
        raise WorkbenchError(f"the zip holds {len(members)} files; this Space takes up to {limits.max_files}")
    total = sum(m.file_size for m in members)
    if total > limits.max_unpacked_bytes:
        raise WorkbenchError(
            f"the zip unpacks to {_size_text(total)}; this Space takes up to {_size_text(limits.max_unpacked_bytes)}"
        )
    allowed = (*IMAGE_SUFFIXES, *_CAPTIONS)
    for m in members:
        name = Path(m.filename).name
        if name != _METADATA and Path(name).suffix.lower() not in allowed:
            raise WorkbenchError(
                f"the zip holds {name!r}; it may hold only images ({', '.join(IMAGE_SUFFIXES)}), "
                f".txt captions and a {_METADATA}"
            )


def _check_images(dest: Path, limits: UploadLimits) -> None:
    for path in sorted(p for p in dest.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                pixels = img.size[0] * img.size[1]
                img.verify()
        except Exception as err:  # PIL raises many kinds for a broken file
            raise WorkbenchError(f"{path.name!r} is not a readable image ({type(err).__name__})") from None
        if pixels > limits.max_image_pixels:
            raise WorkbenchError(f"{path.name!r} has {pixels} pixels; this Space takes images up to {limits.max_image_pixels}")


def _check_metadata(dest: Path) -> None:
    """``metadata.jsonl`` may name only files of the upload itself (no ``../``, no absolute path)."""
    for n, line in enumerate((dest / _METADATA).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            name = json.loads(line)["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WorkbenchError(f"{_METADATA} line {n} must be a JSON object with 'file_name' and 'text'") from None
        if not isinstance(name, str) or Path(name).name != name:
            raise WorkbenchError(f"{_METADATA} line {n} names {name!r}; name a file of the zip by its name alone")


# --------------------------------------------------------------------------- what expires


def expire(runs_root: str | Path, max_age_s: float, max_bytes: int, now: float | None = None) -> list[str]:
    """Delete what visitors left: runs not in progress and uploads older than ``max_age_s``, then
    the oldest of them while the visitors' folders hold more than ``max_bytes``. Returns what went."""
    now = time.time() if now is None else now
    items = sorted(_expirable(runs_root), key=lambda item: item[0])  # oldest first
    gone = [path for mtime, path in items if now - mtime > max_age_s]
    kept = [(mtime, path) for mtime, path in items if now - mtime <= max_age_s]
    total = sum(_size(path) for _, path in kept)
    for _, path in kept:
        if total <= max_bytes:
            break
        total -= _size(path)
        gone.append(path)
    for path in gone:
        remove_tree(path)
    for folder in all_run_folders(runs_root):  # a visitor with nothing left leaves no folder
        for empty in (folder / UPLOADS, folder):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
    return [str(p) for p in gone]


def _expirable(runs_root: str | Path) -> list[tuple[float, Path]]:
    """(last change, path) of every finished run and every upload of every visitor."""
    items = []
    for folder in all_run_folders(runs_root):
        items += [(r["updated"], Path(r["run_dir"])) for r in list_runs(folder) if r["state"] not in ACTIVE]
        uploads = folder / UPLOADS
        if uploads.is_dir():
            items += [(p.stat().st_mtime, p) for p in uploads.iterdir()]
    return items



def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size

