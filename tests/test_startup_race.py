"""Compare's Generate while the app's warm-up loads the start model: both in one fresh process.

diffusers and transformers import lazily on first attribute access; two threads doing that at
once could see a half-initialised module ("cannot import name 'CLIPImageProcessor' from
'transformers'"). A fresh interpreter, because this test process has imported them long ago.
The browser version is tests/test_browser.py::test_generate_while_the_start_model_loads_gives_images.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from workbench.models import TOY_DIR
from workbench.testing import ROOT

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from workbench.ui import app, compare_tab, plan_view
    from workbench.ui.settings import Limits
    from workbench.ui.store import Store

    store, first_page, failures = Store(), threading.Event(), []

    def warm():
        app.warm_up(store, "toy", first_page)

    def generate(delay):
        time.sleep(delay)
        try:
            view = plan_view.new_view("toy", 64)
            form = compare_tab.Form("a red circle", "", "0", 1, 2.0, 64)
            teacher, student, _ = compare_tab.compare(store, Limits(), view, [], form)
            assert len(teacher) == len(student) == 1
        except BaseException as err:
            failures.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=warm), threading.Thread(target=generate, args=(float(sys.argv[1]),))]
    for t in threads:
        t.start()
    first_page.set()  # the first page is served: the warm-up imports and loads now
    for t in threads:
        t.join()
    print("FAILURES", failures)
    sys.exit(1 if failures else 0)
    """
)


@pytest.mark.skipif(not (TOY_DIR / "model_index.json").exists(), reason="needs the embedded toy teacher")
@pytest.mark.parametrize("delay", [0.0])  # 1.0 failed the same way before the fix; one keeps the suite short
def test_generate_during_the_warm_up_samples_without_import_errors(delay, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                        "WORKBENCH_CACHE_DIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(delay)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "FAILURES []" in done.stdout
