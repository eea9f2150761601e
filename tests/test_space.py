"""The Space's visitor model: no visitor input becomes code or a server path, runs belong to
their visitor and wait in one queue, what visitors leave expires; the owner keeps every power."""

from __future__ import annotations

import html
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from workbench import jobs, space
from workbench.errors import WorkbenchError
from workbench.runs import RunDir
from workbench.ui import distill_tab as dt
from workbench.ui.settings import AppSettings, Limits
from workbench.ui.store import Store
from workbench.ui.visitors import Runs, page_runs

FORM = {"steps": 2, "toy_samples": 8, "batch_size": 2, "lr": 1e-4, "w_task": 1.0, "w_out": 0.5, "w_feat": 0.5,
        "feature_mode": "layer", "mixed_precision": "no", "stage_teacher": "original",
        "sample_every": 0, "checkpoint_every": 1, "data": "toy"}  # fmt: skip
SCORER = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef score(images, prompts):\n    return images.mean()\n"


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


def _visitor(root: Path, token: str | None = None) -> Runs:
    key = space.visitor_key(token or space.new_token())
    return Runs(space.visitor_folder(root, key), shared=root, cap=1)


def _scorer(tmp_path: Path) -> tuple[Path, Path]:
    """A scorer file that, if ever imported, leaves a marker (as one uploaded through Gradio would)."""
    marker = tmp_path / "marker.txt"
    upload = tmp_path / "gradio" / "0123abcd" / "scorer.py"
    upload.parent.mkdir(parents=True)
    upload.write_text(SCORER.format(marker=str(marker)), encoding="utf-8")
    return upload, marker


def _values(form: dict) -> tuple:
    full = dt.FORM_DEFAULTS | form
    return tuple(full[k] for k in dt.FORM_KEYS)


# --------------------------------------------------------------------------- code and paths


@pytest.mark.parametrize("reward", ["{upload}:score", "os:getcwd", "workbench.reward:TOY_SPEC"])
def test_a_scorer_file_or_module_is_never_imported_on_a_space(base, tmp_path, reward):
    upload, marker = _scorer(tmp_path)
    runs = _visitor(tmp_path / "runs")
    form = FORM | {"lcd_reward": reward.format(upload=upload), "lcd_reward_weight": 0.1}
    view = {"base": base}
    estimate = dt.estimate_or_explain(Store(), view, ["mid_block"], dt.CURRENT_PLAN, "", _values(form), True, (None,))
    message, _ = dt.launch_or_explain(
        Store(), view, ["mid_block"], dt.CURRENT_PLAN, "", "", _values(form), Limits.for_space(), runs, True
    )
    for text in (html.unescape(estimate), html.unescape(message)):
        assert "Python code that would run on the server" in text and "on your own machine" in text, text
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing written


def test_the_owner_still_names_a_scorer_file(base, tmp_path):
    upload, marker = _scorer(tmp_path)
    form = FORM | {"lcd_reward": f"{upload}:score", "lcd_reward_weight": 0.1}
    plan = dt.form_plan(Store(), base, dt.CURRENT_PLAN, ["mid_block"], "", True)
    config = dt.check_launch(Store(), base, plan, dict(zip(dt.FORM_KEYS, _values(form))), "", Limits(), True)
    assert config.lcd_reward == f"{upload}:score"  # what Launch would start, checked by the preflight
    assert marker.read_text() == "ran"  # localhost: the owner's own code is theirs to run


@pytest.mark.parametrize(
    "box, value, says",
    [("data", "/etc", "no paths on the server as data"), ("data", "runs/x/prompts.txt", "no paths"),
     ("data", "uploaded: x.zip", "no paths"),  # the label without an upload behind it
     ("stages", "/tmp/plan.json", "presets by name only"), ("stages", "ssd-1b, ../x", "presets by name only"),
     ("choice", "/tmp/plan.json", "unknown preset")],
)  # fmt: skip
def test_server_paths_in_the_distill_form_are_refused_on_a_space(base, tmp_path, box, value, says):
    runs = _visitor(tmp_path / "runs")
    form, stages, choice = dict(FORM), "", dt.CURRENT_PLAN
    if box == "data":
        form["data"] = value
    elif box == "stages":
        stages = value
    else:
        choice = value
    message, _ = dt.launch_or_explain(
        Store(), {"base": base}, ["mid_block"], choice, stages, "", _values(form), Limits.for_space(), runs
    )
    assert "Not launched" in message and says.lower() in html.unescape(message).lower(), message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["/", "workbench/assets", "./workbench", "~/x", "../main", "tests"])
def test_a_visitor_names_teachers_not_folders(name):
    with pytest.raises(WorkbenchError, match="loads teachers by name only"):
        space.check_base_name(name)


@pytest.mark.parametrize("name", ["toy", "sdxl-base", "sd15-base", "stabilityai/stable-diffusion-xl-base-1.0"])
def test_names_and_hub_ids_are_a_visitors_teachers(name):
    assert space.check_base_name(name) == name


def test_a_visitor_picks_presets_by_name_only():
    assert space.check_preset("ssd-1b") == "ssd-1b"
    with pytest.raises(WorkbenchError, match="unknown preset"):
        space.check_preset("presets/ssd-1b.json")


# --------------------------------------------------------------------------- uploads


def _png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(tmp_path: Path, members: dict[str, bytes | str], name: str = "data.zip") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def test_an_uploaded_zip_of_captioned_images_becomes_the_visitors_data(tmp_path):
    folder = tmp_path / "visitor"
    upload = _zip(tmp_path, {"a/red.png": _png(), "a/red.txt": "a red square", "../../blue.png": _png(),
                             "../../blue.txt": "a blue square", "__MACOSX/._red.png": b"junk"})  # fmt: skip
    source, summary = space.unpack_data(upload, folder)
    assert summary == "2 images with captions"
    assert Path(source).parent == folder / space.UPLOADS
    assert sorted(p.name for p in Path(source).iterdir()) == ["blue.png", "blue.txt", "red.png", "red.txt"]
    assert not (tmp_path / "blue.png").exists()  # '../' names land inside, under their base name


def test_an_uploaded_prompt_file(tmp_path):
    upload = tmp_path / "prompts.txt"
    upload.write_text("a red circle\n\na blue square\n", encoding="utf-8")
    source, summary = space.unpack_data(upload, tmp_path / "v")
    assert Path(source).read_text().splitlines() == ["a red circle", "a blue square"]
    assert summary.startswith("2 prompts")


@pytest.mark.parametrize(
    "members, says",
    [({"x.py": "print(1)"}, "may hold only images"),
     ({"red.png": b"not an image", "red.txt": "cap"}, "not a readable image"),
     ({"red.png": _png()}, "have no caption"),
     ({"red.png": _png(), "metadata.jsonl": json.dumps({"file_name": "../../etc/passwd", "text": "x"})},
      "by its name alone"),
     ({"a/red.png": _png(), "b/red.png": _png(), "red.txt": "x"}, "two files named 'red.png'"),
     ({}, "empty")],
)  # fmt: skip
def test_bad_uploads_are_refused_and_leave_nothing(tmp_path, members, says):
    upload = _zip(tmp_path, members)
    with pytest.raises(WorkbenchError, match=says):
        space.unpack_data(upload, tmp_path / "v")
    assert not any((tmp_path / "v" / space.UPLOADS).iterdir())


def test_uploads_are_checked_by_type_size_and_count(tmp_path):
    small = space.UploadLimits(max_bytes=1000, max_unpacked_bytes=10_000, max_files=2, max_prompts=3)
    script = tmp_path / "scorer.py"
    script.write_text("print(1)")
    with pytest.raises(WorkbenchError, match="not a .py"):
        space.unpack_data(script, tmp_path / "v", small)
    big = tmp_path / "big.txt"
    big.write_text("x\n" * 600)
    with pytest.raises(WorkbenchError, match="the upload is 1,200 bytes; this Space takes up to 1,000 bytes"):
        space.unpack_data(big, tmp_path / "v", space.UploadLimits(max_bytes=1000))
    many = tmp_path / "many.txt"
    many.write_text("a\nb\nc\nd\n")
    with pytest.raises(WorkbenchError, match="4 prompts; this Space takes up to 3"):
        space.unpack_data(many, tmp_path / "v", small)
    bomb = _zip(tmp_path, {"a.png": b"\0" * 50_000}, "bomb.zip")  # compresses to a few hundred bytes
    with pytest.raises(WorkbenchError, match="unpacks to"):
        space.unpack_data(bomb, tmp_path / "v", small)
    with pytest.raises(WorkbenchError, match="holds 3 files"):
        space.unpack_data(_zip(tmp_path, {"a.png": b"", "b.png": b"", "c.png": b""}, "n.zip"), tmp_path / "v", small)


# --------------------------------------------------------------------------- whose runs


def _run(folder: Path, name: str, **status) -> RunDir:
    run = RunDir(folder / name)
    run.root.mkdir(parents=True)
    run.write_status(**status)
    return run


def test_a_visitor_sees_and_controls_only_their_own_runs(tmp_path):
    alice, bob = _visitor(tmp_path), _visitor(tmp_path)
    mine = _run(alice.folder, "alices-run", state="stopped", step=3)
    assert [c[1] for c in dt.run_choices(alice)] == [str(mine.root)]
    assert dt.run_choices(bob) == []
    for act in (dt._stop, dt._resume, dt.student_zip):
        with pytest.raises(WorkbenchError, match="not one of your runs"):
            act(str(mine.root), bob)
    with pytest.raises(WorkbenchError, match="not one of your runs"):
        bob.own(str(bob.folder / space.UPLOADS))
    assert RunDir(mine.root).read_status()["state"] == "stopped"  # untouched


def test_the_same_token_finds_the_same_runs_and_a_forged_one_is_refused(tmp_path):
    token = space.new_token()
    assert _visitor(tmp_path, token).folder == _visitor(tmp_path, token).folder
    for bad in ("", "short", "../../etc/passwd" * 3, None):
        assert not space.valid_token(bad)
    with pytest.raises(WorkbenchError, match="no visitor id"):
        page_runs(AppSettings(space=True, limits=Limits.for_space()), None)
    owner = page_runs(AppSettings(), None)
    assert not owner.space and owner.own("/any/run") == "/any/run"  # localhost: every run is the owner's


def test_a_second_visitor_waits_in_the_queue_and_starts_when_the_first_is_done(base, tmp_path):
    alice, bob = _visitor(tmp_path), _visitor(tmp_path)
    training = _run(alice.folder, "alice", state="running", step=1, pid=os.getpid())  # a live process
    store, limits = Store(), Limits.for_space()
    waiting = dt.launch(store, base, "koala-700m", [], FORM, "", "bob", limits, root=bob)
    assert RunDir(waiting).read_status()["state"] == "waiting"
    assert jobs.queue_position(waiting, space.all_run_folders(tmp_path)) == (1, 1)
    assert "#1 in this Space's queue, 1 run(s) of other visitors training" in dt.status_md(waiting, bob)
    assert "alice" not in dt.status_md(waiting, bob)
    with pytest.raises(WorkbenchError, match="one run per visitor"):
        dt.launch(store, base, "koala-700m", [], FORM, "", "bob-2", limits, root=bob)
    training.write_status(state="done")
    bob.dispatch()
    status = RunDir(waiting).read_status()
    assert status["state"] in ("queued", "running", "done") and status["pid"], status
    jobs.stop_run(waiting)
    deadline = time.time() + 300
    while dt.effective_state(RunDir(waiting).read_status()) in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    assert dt.effective_state(RunDir(waiting).read_status()) in ("stopped", "done")


def test_stopping_a_waiting_run_takes_it_out_of_the_queue(tmp_path):
    bob = _visitor(tmp_path)
    run = jobs.submit_run(bob.folder, "bob", ["--steps", "1"])
    jobs.stop_run(run.root)
    assert run.read_status()["state"] == "stopped"
    assert jobs.dispatch(space.all_run_folders(tmp_path), cap=1) == []


# --------------------------------------------------------------------------- expiry


def test_what_visitors_leave_expires(tmp_path):
    alice, bob = _visitor(tmp_path), _visitor(tmp_path)
    old = _run(alice.folder, "old", state="done", step=3)
    live = _run(alice.folder, "live", state="running", step=1, pid=os.getpid())
    fresh = _run(bob.folder, "fresh", state="stopped", step=1)
    upload = bob.folder / space.UPLOADS / "abc"
    upload.mkdir(parents=True)
    (upload / "prompts.txt").write_text("a red circle\n")
    now = time.time()
    status = json.loads(old.status.read_text()) | {"updated": now - 2 * 86400}
    old.status.write_text(json.dumps(status))  # write_status stamps 'updated' with now: age it by hand
    gone = space.expire(tmp_path, max_age_s=86400, max_bytes=10**9, now=now)
    assert gone == [str(old.root)]
    assert live.root.exists() and fresh.root.exists() and upload.exists()
    assert dt.run_choices(alice) == [(dt.run_choices(alice)[0][0], str(live.root))]
    # past the disk limit the oldest go first, never a run in progress
    gone = space.expire(tmp_path, max_age_s=86400, max_bytes=0, now=now)
    assert set(gone) == {str(fresh.root), str(upload)} and live.root.exists()
    assert not bob.folder.exists()  # a visitor with nothing left leaves no folder
