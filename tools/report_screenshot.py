"""The README's pictures of a real report: its headline (the top of the page) and Figure 7, taken in
headless Chromium at 1400 px wide from a study's report.html. Run it again after the report changes.

    python tools/report_screenshot.py outputs/default [--out docs]

Needs Debian's chromium (`apt install chromium`) and playwright (a test dependency).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    report = (args.study_dir / "report.html").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not report.is_file():
        sys.exit(f"{report} does not exist: run the study (make study) or `llm-energy report "
                 f"{args.study_dir}` first")
    if chromium is None:
        sys.exit("no chromium on this machine: apt install chromium")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.route("http*://**", lambda route: route.abort())  # the report is self-contained
        page.goto(report.as_uri(), wait_until="load")
        headline = page.get_by_text("Top configurations at w", exact=False).first
        headline.scroll_into_view_if_needed()
        top = headline.bounding_box()["y"] + page.evaluate("window.scrollY") - 20
        page.screenshot(path=str(args.out / "report-headline.png"),
                        clip={"x": 0, "y": top, "width": 1400, "height": 900}, full_page=True)
        figure = page.locator("img").first  # the first figure after the headline: Figure 7
        figure.screenshot(path=str(args.out / "report-figure7.png"))
        browser.close()
    print(f"wrote {args.out / 'report-headline.png'} and {args.out / 'report-figure7.png'}")


if __name__ == "__main__":
    main()
