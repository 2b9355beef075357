"""Screenshots of each tab of the demo for the docs, taken in headless Chromium.

    python app/screenshots.py            # writes docs/figures/app_{generate,compare,interpolate,classify}.png

Needs the ``app`` extra, selenium, and Debian's chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from diffguide.app import browser, core, ui  # noqa: E402

TABS = ("generate", "compare", "interpolate", "classify")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "figures"))
    parser.add_argument("--tabs", default=",".join(TABS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = ui.launch(core.ModelRegistry(), block=False)
    with tempfile.TemporaryDirectory() as profile:
        page = browser.open_browser(profile)
        try:
            page.get(demo.local_url)
            browser.wait_for(page, "#generate-button")
            for tab in args.tabs.split(","):
                browser.open_tab(page, tab.capitalize())
                if tab == "generate":
                    browser.click(page, "generate-button")
                    browser.wait_for(page, "#generate-image img")
                elif tab == "compare":
                    browser.click(page, "compare-button")
                    browser.wait_for(page, "#compare-gallery img")
                elif tab == "interpolate":
                    browser.click(page, "interpolate-button")
                    browser.wait_for(page, "#interpolate-smooth img", timeout=600)
                elif tab == "classify":
                    # a "7": the top bar, then the diagonal
                    browser.draw_stroke(page, "classify-sketch", [(-60, -70), (60, -70), (0, 80)])
                    browser.click(page, "classify-button")
                    browser.wait_for(page, "#classify-preview img", timeout=300)
                time.sleep(1.5)  # let plots and progress bars settle
                path = out / f"app_{tab}.png"
                page.save_screenshot(str(path))
                print(f"wrote {path}")
        finally:
            page.quit()
            demo.close()


if __name__ == "__main__":
    main()
