"""The demo in a real headless Chromium: load the page, generate, see an image.

CI installs Debian's chromium and chromium-driver and sets DIFFGUIDE_REQUIRE_BROWSER=1, so
there a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os

import pytest

from diffguide.app import browser, core

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    pytest.importorskip("gradio")
    if browser.find_chromium() is None or not _has_selenium():
        if os.environ.get("DIFFGUIDE_REQUIRE_BROWSER") == "1":
            pytest.fail("DIFFGUIDE_REQUIRE_BROWSER=1 but chromium, chromedriver or selenium is missing")
        pytest.skip("needs chromium, chromium-driver (Debian) and selenium")
    from diffguide.app import ui

    demo = ui.launch(core.ModelRegistry(), block=False)
    driver = browser.open_browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        driver.get(demo.local_url)
        yield driver
    finally:
        driver.quit()
        demo.close()


def _has_selenium() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return True


def test_browser_generates_an_image(page, tmp_path):
    browser.click(page, "generate-button")
    image = browser.wait_for(page, "#generate-image img")
    assert image.get_attribute("src")
    assert page.execute_script("return arguments[0].naturalWidth", image) == 224
    shot = tmp_path / "generate.png"
    page.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
