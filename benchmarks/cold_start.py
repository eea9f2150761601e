"""Cold start: seconds from ``python app.py`` to the first page that shows the toggles.

Starts the app on a free port (``HF_HUB_OFFLINE=1``, an empty latency cache unless
``--cache`` is given), polls until the server answers, then opens the page in headless
Chromium (Debian's ``/usr/bin/chromium`` through Playwright) and waits for a toggle and
the deltas table. Prints, per round, the seconds to the server answering and to the
toggles, and the load average before each round (the machine's load decides the figure:
run it alone on a quiet machine).

    python benchmarks/cold_start.py [--rounds 3] [--base toy] [--space] [--json]

``--space`` starts the app in Space mode (``python app.py --space``), as a Hugging Face Space runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from workbench.errors import WorkbenchError
from workbench.testing import running_app

CHROMIUM = "/usr/bin/chromium"
TOGGLES = 'input[type="checkbox"][name="mid_block"]'
NUMBERS = "() => document.querySelector('#wb-numbers')?.innerText.includes('params')"


def one_round(base: str, cache: str | None, timeout_s: float, space: bool = False) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    env = {"WORKBENCH_CACHE_DIR": cache or tempfile.mkdtemp(prefix="cold-start-cache-")}
    load = os.getloadavg()[0]
    with sync_playwright() as p:  # the browser starts before the clock: it is the visitor's, not ours
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(timeout_s * 1000)
        try:
            args = ("--base", base, *(("--space",) if space else ()))
            with running_app(*args, env=env, timeout_s=timeout_s, poll_s=0.05) as app:
                server_s = time.monotonic() - app.started
                page.goto(app.url)
                page.wait_for_selector(TOGGLES)
                page.wait_for_function(NUMBERS)
                toggles_s = time.monotonic() - app.started
        except WorkbenchError as e:
            raise SystemExit(str(e)) from None
        finally:
            browser.close()
    return {"load_avg_1min": round(load, 2), "server_s": round(server_s, 2), "toggles_s": round(toggles_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default="toy")
    parser.add_argument("--cache", default=None, help="latency cache folder (default: a new empty one)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--space", action="store_true", help="serve in Space mode (python app.py --space)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = [one_round(args.base, args.cache, args.timeout, args.space) for _ in range(args.rounds)]
    summary = {
        "base": args.base,
        "space": args.space,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "median_toggles_s": statistics.median(r["toggles_s"] for r in rounds),
        "median_server_s": statistics.median(r["server_s"] for r in rounds),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    for i, r in enumerate(rounds, 1):
        print(
            f"round {i}: server answers {r['server_s']:.1f} s, toggles {r['toggles_s']:.1f} s "
            f"(load {r['load_avg_1min']:.2f})"
        )
    print(
        f"median: server {summary['median_server_s']:.1f} s, toggles {summary['median_toggles_s']:.1f} s "
        f"on {summary['cpus']} CPUs{' in Space mode' if args.space else ''} (target <= 10 s; Space <= 15 s)"
    )


if __name__ == "__main__":
    main()
