"""Drive the served demo in a real headless Chromium (selenium + Debian's chromedriver).

Used by the browser test and by ``app/screenshots.py``; nothing in the app depends on it.
The Chromium flags keep it from reaching out to the network, which these machines refuse.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1300",
)


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` paths, or None when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def open_browser(user_data_dir: str | Path):
    """A headless Chromium under selenium, with a fresh profile in ``user_data_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    chromium, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(browser, css: str, timeout: float = 120.0):
    """The first element matching ``css`` once it is displayed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(
        expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css))
    )


def open_tab(browser, name: str) -> None:
    """Click the tab button labelled ``name``."""
    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
        if button.text.strip() == name:
            button.click()
            return
    raise LookupError(f"no tab called {name!r}")


def click(browser, element_id: str) -> None:
    wait_for(browser, f"#{element_id}").click()


def draw_stroke(browser, sketchpad_id: str, points: list[tuple[int, int]]) -> None:
    """Pick the brush of the sketchpad ``sketchpad_id``, press, move through ``points``
    (offsets from the canvas centre) and release."""
    from selenium.webdriver.common.action_chains import ActionChains

    wait_for(browser, f"#{sketchpad_id} button[aria-label='Brush']").click()
    canvas = wait_for(browser, f"#{sketchpad_id} canvas")
    chain = ActionChains(browser).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
    previous = points[0]
    for point in points[1:]:
        chain = chain.move_by_offset(point[0] - previous[0], point[1] - previous[1])
        previous = point
    chain.release().perform()
