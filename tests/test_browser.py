"""The real app in headless Chromium (Debian's package, driven by Playwright).

Starts ``python app.py`` on a free port with ``HF_HUB_OFFLINE=1`` and walks what a person
does: toggle a unit, apply the SSD-1B preset, generate a comparison. Screenshots go to
``artifacts/browser/`` (gitignored). Skips with a reason when Chromium or Playwright is
missing (``.ci/install-browser`` installs both).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from workbench import presets
from workbench.errors import WorkbenchError
from workbench.models import resolve_base
from workbench.testing import running_app
from workbench.ui import format as fmt
from workbench.ui.store import Store

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "browser"
START_TIMEOUT_S = 180  # gradio and torch imports on a busy 2-core CPU

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} is missing: run .ci/install-browser (apt-get install chromium)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")


def _toy_available() -> bool:
    try:
        resolve_base("toy")
        return True
    except WorkbenchError:
        return False


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, runs_dir):
    env = {
        "WORKBENCH_CACHE_DIR": str(tmp_path_factory.mktemp("latency-cache")),
        # Tiny models gain nothing from threads; on a shared CPU spinning OpenMP threads cost 30x.
        "OMP_NUM_THREADS": "1",
        "WORKBENCH_RUNS_DIR": str(runs_dir),
    }
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(env=env, log=log, timeout_s=START_TIMEOUT_S) as app:
        yield app.url


@pytest.fixture(scope="module")
def playwright():
    """One Playwright for the module: a second one started inside it fails (asyncio loop)."""
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(app_url, playwright):
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser, page = _open(playwright, app_url)
    yield page
    browser.close()


def _open(p, url: str, ready: bool = True) -> tuple:
    """(browser, page) on the app at ``url``, once its first page has its toggles and numbers
    (``ready``), else at once."""
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(url)
    if ready:
        page.wait_for_selector('input[type="checkbox"][name="mid_block"]')
        page.wait_for_function("() => document.querySelector('#wb-numbers')?.innerText.includes('params')")
    return browser, page


def _numbers(page) -> str:
    return page.locator("#wb-numbers").inner_text()


def _wait_numbers_show(page, text: str) -> str:
    """Wait until the deltas table shows ``text`` (and no queue/progress line on top of it)."""
    page.wait_for_function(
        "(t) => { const s = document.querySelector('#wb-numbers').innerText;"
        " return s.includes(t) && !s.includes('queue'); }",
        arg=text,
    )
    return _numbers(page)


def _start_base() -> str:
    return "toy" if _toy_available() else "sdxl-base"


def test_page_opens_on_the_start_model(page):
    status = page.locator("#wb-model-status").inner_text()
    assert f"Teacher: {_start_base()}" in status
    if not _toy_available():
        assert "toy teacher is missing" in status  # the notice that says why
    else:  # latency deltas at once, from the profile shipped with the toy (this cache is empty)
        numbers = _numbers(page)
        assert "latency, estimated" in numbers and "profile shipped with toy" in numbers, numbers
    page.screenshot(path=str(SHOTS / "01-start.png"), full_page=True)


ERROR_OVERLAYS = (
    "() => Array.from(document.querySelectorAll('.error')).filter(e => !e.closest('.toast-wrap')"
    " && e.offsetParent !== null && e.textContent.trim() === 'Error').length"
)


def test_a_failed_load_explains_itself_and_leaves_no_error_overlay(page):
    box = page.locator("#wb-model-row input").first
    box.fill("/no/such/model")
    page.get_by_role("button", name="Load", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#wb-model-status')?.innerText.includes('Could not load')"
    )
    page.screenshot(path=str(SHOTS / "01a-failed-load.png"), full_page=False)
    status = page.locator("#wb-model-status").inner_text()
    assert "not a built-in name" in status and f"Teacher: {_start_base()}" in status
    assert page.evaluate(ERROR_OVERLAYS) == 0  # Gradio's red "Error" over an output of a raising handler
    assert page.locator('input[name="mid_block"]').count() == 1  # the toggles still serve the old teacher


def test_sensitivity_section_shows_above_the_toggles(page):
    """No map is cached for the start model in this fresh cache: the section says how to get one."""
    page.wait_for_function(
        "() => document.querySelector('#wb-heat-note')?.innerText.includes('No sensitivity map')"
    )
    assert page.get_by_role("button", name="Measure sensitivity", exact=True).is_visible()
    assert page.get_by_role("button", name="Auto-prune", exact=True).is_visible()
    for box in ("#wb-autoprune-search input", "#wb-autoprune-budget input"):  # each choice shows whole
        assert page.locator(box).evaluate("e => e.scrollWidth <= e.clientWidth && e.clientWidth > 0"), box
    page.screenshot(path=str(SHOTS / "01b-sensitivity.png"), full_page=False)


def test_toggling_a_down_layer_changes_the_params_delta(page):
    expected = fmt.params(Store().spec(_start_base(), ["down_blocks.2.layers.1"]).student_params)
    assert expected not in _numbers(page)
    page.locator('input[name="down_blocks.2.layers.1"]').check()
    _wait_numbers_show(page, expected)
    notes = page.locator("#wb-notes").inner_text()
    assert "removed automatically" in notes and "up_blocks.0.layers" in notes
    page.screenshot(path=str(SHOTS / "02-toggle.png"), full_page=False)


def test_impossible_plan_explains_itself_inline(page):
    valid = ["down_blocks.0.layers.0", "down_blocks.2.layers.1"]
    page.locator('input[name="down_blocks.0.layers.0"]').check()
    before = _wait_numbers_show(page, fmt.params(Store().spec(_start_base(), valid).student_params))
    page.locator('input[name="down_blocks.0.layers.1"]').check()
    page.wait_for_selector("#wb-notes .wb-error")
    assert "at least one layer per stage" in page.locator("#wb-notes").inner_text()
    assert _numbers(page) == before  # the last valid numbers stay
    page.screenshot(path=str(SHOTS / "03-impossible.png"), full_page=False)
    page.locator('input[name="down_blocks.0.layers.1"]').uncheck()
    page.locator('input[name="down_blocks.0.layers.0"]').uncheck()
    page.wait_for_function("() => !document.querySelector('#wb-notes .wb-error')")


def test_applying_the_ssd_1b_preset_updates_toggles_and_numbers(page):
    page.get_by_role("tab", name="Presets").click()
    page.get_by_label("Preset").click()
    page.get_by_role("option", name="ssd-1b").click()
    page.wait_for_function("() => document.querySelector('#wb-preset-preview').innerText.includes('SSD-1B')")
    preset = list(presets.load_preset("ssd-1b").removed)
    expected = fmt.params(Store().spec(_start_base(), preset).student_params)
    page.get_by_role("button", name="Apply to the toggles").click()
    _wait_numbers_show(page, expected)
    assert "Applied preset 'ssd-1b'" in page.locator("#wb-presets-status").inner_text()
    page.screenshot(path=str(SHOTS / "04-preset.png"), full_page=True)
    page.get_by_role("tab", name="Blocks").click()
    checked = page.locator('input[name="mid_block.attentions.0"]')
    checked.wait_for()
    assert checked.is_checked()
    page.screenshot(path=str(SHOTS / "05-blocks-ssd-1b.png"), full_page=True)


def test_a_malformed_upload_shows_a_precise_error_and_the_app_stays_up(page, tmp_path):
    page.get_by_role("tab", name="Presets").click()
    bad = tmp_path / "broken-plan.json"
    bad.write_text('{"name": "x", "removed": []}')
    with page.expect_file_chooser() as chooser:
        page.locator("#wb-upload").click()
    chooser.value.set_files(str(bad))
    error = page.locator("#wb-presets-status .wb-error")
    error.wait_for()
    assert "missing keys" in error.inner_text() and "broken-plan.json" in error.inner_text()
    page.screenshot(path=str(SHOTS / "05b-bad-upload.png"), full_page=False)
    assert page.locator('input[name="mid_block.attentions.0"]').count() == 1  # still serving the page


def test_compare_draws_teacher_and_student(page):
    if not _toy_available():
        pytest.skip(
            "the embedded toy teacher (workbench/assets/toy-sdxl) is not there yet: nothing to sample"
        )
    page.get_by_role("tab", name="Compare").click()
    guidance = page.locator("#wb-guidance input[type='number']")
    page.wait_for_function("() => document.querySelector('#wb-guidance input[type=number]').value === '2'")
    assert guidance.input_value() == "2"  # the toy's own guidance (models.Base.guidance), not SDXL's 5
    page.locator("#wb-seeds textarea, #wb-seeds input").first.fill("0, 1")
    steps = page.locator("#wb-steps input[type='number']")
    steps.fill("2")
    steps.press("Enter")
    page.get_by_role("button", name="Generate teacher and student").click()
    page.wait_for_function("() => document.querySelectorAll('#wb-student img').length >= 2", timeout=300_000)
    assert page.locator("#wb-teacher img").count() >= 2
    summary = page.locator("#wb-compare-summary").inner_text()
    assert "2 seed(s), 2 steps, guidance 2," in summary and "per image" in summary
    # the toy's 64 px come 4x enlarged and are drawn no larger; captions show whole (once decoded:
    # an <img> is in the page before its picture has loaded, with naturalWidth 0)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#wb-teacher img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shown = page.locator("#wb-teacher img").first.evaluate(
        "i => [i.naturalWidth, i.getBoundingClientRect().width]"
    )
    assert shown[0] == 256 and shown[1] <= 272, shown
    clipped = "e => e.scrollWidth > e.clientWidth"
    assert not any(c.evaluate(clipped) for c in page.locator("#wb-teacher .caption-label").all())
    page.screenshot(path=str(SHOTS / "06-compare.png"), full_page=True)


def _loss_points(page) -> int:
    return page.evaluate(
        "() => { const g = document.querySelector('#wb-loss-plot .js-plotly-plot');"
        " return g && g.data && g.data.length ? g.data[0].x.length : 0; }"
    )


def _launch_with(page, elem: str, value: str) -> str:
    box = page.locator(f"#{elem} input[type='number']")
    box.fill(value)
    box.press("Tab")
    return _launch(page)


def _launch(page) -> str:
    """Press Launch; the message it gives (once it differs from the one before)."""
    said = "#wb-distill-message :is(.wb-error, .wb-ok)"
    before = page.locator(said).inner_text() if page.locator(said).count() else ""
    page.locator("#wb-distill-launch").click()
    page.wait_for_function(
        "([s, b]) => { const m = document.querySelector(s); return m && m.innerText !== b; }",
        arg=[said, before],
        timeout=300_000,
    )
    return page.locator(said).inner_text()


def test_distill_form_names_the_box_of_a_bad_value_and_launches_nothing(page):
    page.get_by_role("tab", name="Distill").click()
    page.locator("#wb-distill-plan input").click()
    page.get_by_role("option", name="koala-700m").click()
    for elem, value, says in (
        ("wb-distill-steps", "2.5", "Steps must be a whole number > 0, got 2.5"),  # not rounded to 2
        ("wb-distill-steps", "", "Steps is missing"),
        ("wb-distill-steps", "-3", "Steps must be > 0, got -3"),
        ("wb-distill-steps", "1e12", "Steps 1000000000000 is too large"),
    ):
        message = _launch_with(page, elem, value)
        assert "Not launched" in message and says in message and "--" not in message, message
    page.locator("#wb-distill-steps input[type='number']").fill("3")
    page.locator("#wb-distill-steps input[type='number']").press("Tab")
    message = _launch_with(page, "wb-distill-lr", "")
    assert "Not launched" in message and "Learning rate is missing" in message, message
    page.screenshot(path=str(SHOTS / "06b-distill-bad-value.png"), full_page=False)
    assert page.evaluate(ERROR_OVERLAYS) == 0
    page.locator("#wb-distill-lr input[type='number']").fill("0.0001")
    page.locator("#wb-distill-lr input[type='number']").press("Tab")


def test_distill_estimates_gpu_memory_before_launch(page):
    page.locator("#wb-distill-estimate").click()
    page.wait_for_function(
        "() => document.querySelector('#wb-distill-memory').innerText.includes('Peak GPU memory')",
        timeout=300_000,
    )
    text = page.locator("#wb-distill-memory").inner_text()
    assert "activations" in text and "24 GB" in text and "fits" in text
    page.screenshot(path=str(SHOTS / "06c-distill-memory.png"), full_page=False)


def test_distill_launch_watch_and_stop(page):
    if not _toy_available():
        pytest.skip("the embedded toy teacher is not there yet: nothing to distil")
    page.get_by_role("tab", name="Distill").click()
    page.locator("#wb-distill-plan input").click()
    page.get_by_role("option", name="koala-700m").click()
    for elem, value in (
        ("wb-distill-steps", "400"),
        ("wb-distill-toy-samples", "32"),
        ("wb-distill-batch-size", "2"),
    ):
        box = page.locator(f"#{elem} input[type='number']")
        box.fill(value)
        box.press("Tab")
    page.locator("#wb-distill-name textarea, #wb-distill-name input").first.fill("browser-run")
    # Wait for the handler's answer (success or a red error), not Gradio's pending timer or
    # the message of an earlier launch.
    assert "started browser-run" in _launch(page)
    # the loss plot gains points as the run trains (polled every 2 s)
    page.wait_for_function(
        "() => { const g = document.querySelector('#wb-loss-plot .js-plotly-plot');"
        " return g && g.data && g.data.length && g.data[0].x.length >= 3; }",
        timeout=600_000,
    )
    first = _loss_points(page)
    page.wait_for_function(
        "(n) => { const g = document.querySelector('#wb-loss-plot .js-plotly-plot'); return g.data[0].x.length > n; }",
        arg=first,
        timeout=300_000,
    )
    page.screenshot(path=str(SHOTS / "07-distill.png"), full_page=True)
    # A reload (or a second visitor) finds the run in progress selected.
    page.reload()
    page.get_by_role("tab", name="Distill").click()
    picker = page.locator("#wb-run-picker input")
    page.wait_for_function(
        "() => document.querySelector('#wb-run-picker input').value.startsWith('browser-run (running')"
    )
    page.wait_for_function("() => document.querySelector('#wb-run-status').innerText.includes('browser-run')")
    page.locator("#wb-distill-stop").click()
    page.wait_for_function(
        "() => document.querySelector('#wb-run-status').innerText.includes('stopped')", timeout=300_000
    )
    assert "browser-run" in page.locator("#wb-run-status").inner_text()
    # the run list says so too, without pressing refresh
    page.wait_for_function(
        "() => document.querySelector('#wb-run-picker input').value.startsWith('browser-run (stopped')"
    )
    assert "running" not in picker.input_value()
    page.screenshot(path=str(SHOTS / "08-distill-stopped.png"), full_page=True)


def _fill(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input[type='number'], #{elem} textarea, #{elem} input[type='text']").first
    box.fill(value)
    box.press("Tab")


def test_distill_an_lcd_stage_reaches_the_run_and_a_backwards_guidance_range_is_refused(page, runs_dir):
    import json

    from workbench import jobs
    from workbench.runs import ACTIVE, RunDir, effective_state

    page.get_by_role("tab", name="Distill").click()
    page.locator("#wb-distill-plan input").click()
    page.get_by_role("option", name="koala-700m").click()
    page.locator("#wb-distill-lcd input[type='checkbox']").check()
    page.get_by_text("LCD stage options").click()
    assert (
        page.locator(
            "#wb-distill-lcd-guidance-min textarea, #wb-distill-lcd-guidance-min input"
        ).first.input_value()
        == ""
    )
    _fill(page, "wb-distill-lcd-guidance-min", "5")
    _fill(page, "wb-distill-lcd-guidance-max", "2")
    message = _launch(page)
    assert "Not launched" in message and "LCD guidance min 5 > LCD guidance max 2" in message, message
    page.screenshot(path=str(SHOTS / "09-distill-lcd-backwards.png"), full_page=True)
    _fill(page, "wb-distill-lcd-guidance-max", "")  # empty: the base's (toy: 3)
    for elem, value in (("wb-distill-steps", "2"), ("wb-distill-toy-samples", "16"), ("wb-distill-batch-size", "2"),
                        ("wb-distill-sample-every", "0"), ("wb-distill-lcd-ema", "0.9"),
                        ("wb-distill-lcd-sample-steps", "2")):  # fmt: skip
        _fill(page, elem, value)
    page.locator("#wb-distill-name textarea, #wb-distill-name input").first.fill("browser-lcd")
    assert "started browser-lcd" in _launch(page)
    run = RunDir(runs_dir / "browser-lcd")
    deadline = time.monotonic() + 300
    while not run.job.exists() and time.monotonic() < deadline:
        time.sleep(1)
    config = json.loads(run.job.read_text())["config"]
    jobs.stop_run(run.root)
    assert config["objectives"] == ["kd", "lcd"] and config["stages"][0] == config["stages"][1]
    assert (config["lcd_guidance_min"], config["lcd_guidance_max"], config["lcd_ema"]) == (5.0, None, 0.9)
    assert config["lcd_sample_steps"] == 2 and config["steps"] == 2
    while effective_state(run.read_status()) in ACTIVE and time.monotonic() < deadline:
        time.sleep(1)


# The start model's pipeline has loaded once diffusers' loading bar has reached its end in the log.
LOADED = "Loading pipeline components...: 100%"
GENERATED_OR_FAILED = (
    "() => document.querySelectorAll('#wb-student img').length >= 1"
    " || document.querySelector('#wb-compare-summary .wb-error') !== null"
    " || [...document.querySelectorAll('.toast-body, .error')].some(e => e.offsetParent !== null"
    " && /error/i.test(e.className + ' ' + e.textContent))"
)


def test_generate_while_the_start_model_loads_gives_images(tmp_path, playwright):
    """Compare's Generate pressed as soon as the first page is served, so that its handler runs
    while the warm-up (which starts then) imports diffusers and loads the start model: once this failed with "cannot import name 'CLIPImageProcessor' from 'transformers'"
    (two threads in the libraries' lazy imports). A fresh app, so that nothing is loaded yet."""
    if not _toy_available():
        pytest.skip("the embedded toy teacher (workbench/assets/toy-sdxl) is not there: nothing to sample")
    env = {"WORKBENCH_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WORKBENCH_RUNS_DIR": str(tmp_path / "runs")}  # fmt: skip
    log = tmp_path / "app.log"
    with running_app(env=env, log=log, timeout_s=START_TIMEOUT_S) as app:
        browser, page = _open(playwright, app.url, ready=False)
        page.get_by_role("tab", name="Compare").click()
        page.locator("#wb-seeds textarea, #wb-seeds input").first.fill("0")
        steps = page.locator("#wb-steps input[type='number']")
        steps.fill("2")
        steps.press("Enter")
        # The first page's numbers are in: the warm-up has just begun importing and loading.
        page.wait_for_function("() => document.querySelector('#wb-numbers')?.textContent.includes('params')")
        page.get_by_role("button", name="Generate teacher and student").click()
        pressed_while_loading = LOADED not in log.read_text(errors="replace")
        page.wait_for_function(GENERATED_OR_FAILED, timeout=300_000)
        page.screenshot(path=str(SHOTS / "06b-compare-during-load.png"), full_page=True)
        summary = page.locator("#wb-compare-summary").inner_text()
        overlays = page.evaluate(ERROR_OVERLAYS)
        browser.close()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "cannot import name" not in text, text[-3000:]
    assert overlays == 0 and "1 seed(s), 2 steps" in summary, summary
    if not pressed_while_loading:  # the images say nothing about the race then
        pytest.skip("the start model had loaded before Generate was pressed: the race was not exercised")
