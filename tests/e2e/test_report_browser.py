"""The shared report opened in a real headless browser: every image loads, no console errors."""

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_report(html: Path, screenshot: Path | None = None):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        page = browser.new_page()
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # Offline: any request leaving the file would fail and show up as a console error.
        page.route("http*://**", lambda route: route.abort())
        page.goto(html.as_uri(), wait_until="load")
        images = page.evaluate(
            "Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, w: "
            "i.naturalWidth}))"
        )
        text = page.inner_text("body")
        if screenshot is not None:
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return images, errors, text


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian package 'chromium'); "
                                             ".ci/run installs it")
def test_report_opens_offline_with_all_images(smoke_report, tmp_path):
    shot = tmp_path / "report.png"
    images, errors, text = open_report(smoke_report, screenshot=shot)
    assert len(images) >= 4, images
    assert all(i["ok"] for i in images), images
    assert errors == []
    assert "Top configurations at w = 0.5" in text
    assert text.index("The answer") < text.index("The evidence") < text.index("Methods")
    # the full page, as a reader scrolls it: tall (every figure), and not blank
    from PIL import Image, ImageStat

    with Image.open(shot) as page:
        width, height = page.size
        gray = page.convert("L")
        stat = ImageStat.Stat(gray)
        dark = sum(gray.histogram()[:128]) / (width * height)
    assert width == 1400 and height > 4000, page.size
    assert stat.stddev[0] > 10 and dark > 0.005, (stat.stddev, dark)
