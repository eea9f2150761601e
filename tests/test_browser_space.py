"""The app in Space mode (``python app.py --space``) in headless Chromium, as strangers use it:
two visitors in separate browser contexts, and a hostile one who uploads a Python file through
Gradio's upload endpoint and names its server path as the reward and as data.

Screenshots go to ``artifacts/browser/space-*.png`` (gitignored).
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from workbench.testing import running_app

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: run .ci/install-browser", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("space-runs")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, runs_dir):
    env = {"WORKBENCH_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1",
           "WORKBENCH_RUNS_DIR": str(runs_dir)}  # fmt: skip
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app("--space", env=env, log=log, timeout_s=180) as app:
        yield app.url


@pytest.fixture(scope="module")
def browser(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def _visitor(browser, url: str):
    """A new visitor: a fresh browser context (its own local storage) on the Distill tab."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    page.wait_for_selector('input[type="checkbox"][name="mid_block"]')
    page.get_by_role("tab", name="Distill").click()
    return page


def _upload(url: str, name: str, data: bytes) -> str:
    """POST a file to Gradio's upload endpoint as any visitor can; the server path it answers."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
        "Content-Type: text/x-python\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url + "gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]


def _fill(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input[type='number'], #{elem} textarea, #{elem} input[type='text']").first
    box.fill(value)
    box.press("Tab")


def _press(page, button: str, panel: str, answer: str = "Not launched|No estimate|started|queued") -> str:
    """Press a button; the text of ``panel`` once the handler's answer (``answer``, a regex) is in it
    and no progress timer ("0.1s") stands over it."""
    page.evaluate("(s) => { const m = document.querySelector(s); if (m) m.setAttribute('data-old', m.innerText); }", panel)
    page.locator(button).click()
    page.wait_for_function(
        "([s, a]) => { const m = document.querySelector(s); if (!m) return false; const t = m.innerText;"
        " return new RegExp(a).test(t) && t !== m.getAttribute('data-old') && !/^\\s*[0-9.]+s/.test(t); }",
        arg=[panel, answer],
        timeout=300_000,
    )
    return page.locator(panel).inner_text()


def _pick_plan(page, name: str) -> None:
    page.locator("#wb-distill-plan input").click()
    page.get_by_role("option", name=name).click()


def test_an_uploaded_python_file_named_as_reward_or_data_is_never_opened(app_url, browser, tmp_path):
    marker = tmp_path / "imported.txt"
    scorer = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef score(x, p):\n    return x.mean()\n"
    path = _upload(app_url, "scorer.py", scorer.encode())
    assert Path(path).name == "scorer.py"  # the endpoint tells any visitor where the file lies
    page = _visitor(browser, app_url)
    _pick_plan(page, "koala-700m")
    page.locator("#wb-distill-lcd input[type='checkbox']").check()
    page.locator("#wb-distill-lcd-options").click()  # open the accordion
    _fill(page, "wb-distill-lcd-reward", f"{path}:score")
    _fill(page, "wb-distill-lcd-reward-weight", "0.1")
    estimate = _press(page, "#wb-distill-estimate", "#wb-distill-memory")
    assert "Python code that would run on the server" in estimate, estimate
    launched = _press(page, "#wb-distill-launch", "#wb-distill-message")
    assert "Not launched" in launched and "Python code that would run on the server" in launched, launched
    page.screenshot(path=str(SHOTS / "space-1-reward-refused.png"), full_page=False)
    _fill(page, "wb-distill-lcd-reward", "os:getcwd")
    assert "Python code" in _press(page, "#wb-distill-launch", "#wb-distill-message")
    _fill(page, "wb-distill-lcd-reward", "")
    _fill(page, "wb-distill-lcd-reward-weight", "0")
    _fill(page, "wb-distill-data", str(Path(path).parent))
    launched = _press(page, "#wb-distill-launch", "#wb-distill-message")
    assert "no paths on the server as data" in launched, launched
    page.screenshot(path=str(SHOTS / "space-2-data-path-refused.png"), full_page=False)
    assert not marker.exists()


def test_two_visitors_see_only_their_own_runs_and_the_second_waits_in_the_queue(app_url, browser, runs_dir):
    alice, bob = _visitor(browser, app_url), _visitor(browser, app_url)
    for page, name in ((alice, "alice-run"), (bob, "bob-run")):
        _pick_plan(page, "koala-700m")
        for elem, value in (("wb-distill-steps", "200"), ("wb-distill-toy-samples", "32")):
            _fill(page, elem, value)
        _fill(page, "wb-distill-name", name)
    assert "started alice-run" in _press(alice, "#wb-distill-launch", "#wb-distill-message")
    assert "queued bob-run" in _press(bob, "#wb-distill-launch", "#wb-distill-message")
    bob.wait_for_function(
        "() => document.querySelector('#wb-run-status').innerText.includes(\"in this Space's queue\")"
    )
    status = bob.locator("#wb-run-status").inner_text()
    assert "bob-run: waiting" in status and "step" not in status and "#1" in status and "alice" not in status, status
    bob.locator("#wb-run-picker input").click()
    options = bob.locator("[role='option']").all_inner_texts()
    assert options and all("bob-run" in o for o in options), options  # none of alice's
    bob.keyboard.press("Escape")
    bob.screenshot(path=str(SHOTS / "space-3-second-visitor-queued.png"), full_page=False)
    # alice stops her run; the queue starts bob's
    alice.wait_for_function("() => document.querySelector('#wb-run-status').innerText.includes('alice-run')")
    alice.locator("#wb-distill-stop").click()
    bob.wait_for_function(
        "() => /bob-run: (queued|running|done)/.test(document.querySelector('#wb-run-status').innerText)",
        timeout=300_000,
    )
    bob.screenshot(path=str(SHOTS / "space-4-second-visitor-started.png"), full_page=False)
    bob.locator("#wb-distill-stop").click()
    bob.wait_for_function(
        "() => /bob-run: (stopped|done)/.test(document.querySelector('#wb-run-status').innerText)", timeout=300_000
    )
    # a reload keeps the visitor (the token lives in the browser); a new visitor sees nothing
    bob.reload()
    bob.get_by_role("tab", name="Distill").click()
    bob.locator("#wb-run-picker input").click()
    bob.wait_for_function("() => [...document.querySelectorAll('[role=option]')].some(o => o.innerText.includes('bob-run'))")
    bob.keyboard.press("Escape")
    stranger = _visitor(browser, app_url)
    stranger.locator("#wb-run-picker input").click()
    assert not [o for o in stranger.locator("[role='option']").all_inner_texts() if "run" in o]


def test_a_visitor_trains_on_an_upload_and_a_bad_upload_is_refused(app_url, browser, tmp_path):
    import io
    import zipfile

    from PIL import Image

    page = _visitor(browser, app_url)
    good = tmp_path / "squares.zip"
    with zipfile.ZipFile(good, "w") as z:
        for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
            z.writestr(f"squares/{name}.png", buf.getvalue())
            z.writestr(f"squares/{name}.txt", f"a {name} square")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("run_me.py", "print('hi')")
    page.locator("#wb-distill-upload input[type='file']").set_input_files(str(bad))
    page.wait_for_function("() => document.querySelector('#wb-distill-message').innerText.includes('Upload refused')")
    assert "may hold only images" in page.locator("#wb-distill-message").inner_text()
    page.locator("#wb-distill-upload button[aria-label='Clear']").first.click()
    page.locator("#wb-distill-upload input[type='file']").set_input_files(str(good))
    page.wait_for_function("() => document.querySelector('#wb-distill-message').innerText.includes('2 images')")
    data = page.locator("#wb-distill-data textarea, #wb-distill-data input").first.input_value()
    assert data == "uploaded: squares.zip", data
    page.screenshot(path=str(SHOTS / "space-5-upload.png"), full_page=False)
    _pick_plan(page, "koala-700m")
    _fill(page, "wb-distill-steps", "2")
    estimate = _press(page, "#wb-distill-estimate", "#wb-distill-memory", "Peak GPU memory|No estimate")
    assert "Peak GPU memory" in estimate, estimate  # the upload is the run's data
