"""The README's screenshots, made from the same console the browser walk uses.
Skipped unless NEURONDECK_SCREENSHOTS=1; then it overwrites the PNGs under
webapp/docs/screenshots/ (commit them when the pages changed)."""
from __future__ import annotations

import os

import pytest

from conftest import ROOT, log_in
from live_support import clean_streams  # noqa: F401
from ui_support import build_console

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(os.environ.get("NEURONDECK_SCREENSHOTS") != "1",
                                 reason="set NEURONDECK_SCREENSHOTS=1 to remake the README's screenshots")]

OUT = ROOT / "webapp" / "docs" / "screenshots"


def test_the_readme_screenshots(cast, tiny_model, dataset, clean_streams, live_server, browser):  # noqa: F811
    console = build_console(cast, tiny_model, dataset)
    OUT.mkdir(parents=True, exist_ok=True)
    shots = [
        ("job-list.png", "/teams/vision/jobs/", 1280, 720),
        ("job-phone.png", f"/jobs/{console.jobs['inference'].pk}/", 390, 844),
        ("usage.png", "/teams/vision/usage/", 1280, 900),
    ]
    for name, path, width, height in shots:
        page = log_in(browser, live_server.url, "bob", width=width, height=height)
        page.goto(live_server.url + path)
        page.wait_for_load_state("networkidle")
        page.wait_for_function("() => [...document.querySelectorAll('[data-figure], [data-live-chart]')]"
                               ".every(el => el.classList.contains('js-plotly-plot'))")
        page.screenshot(path=str(OUT / name), full_page=False)
        assert (OUT / name).stat().st_size > 10_000, name
        page.context.close()
    assert len(list(OUT.glob("*.png"))) >= len(shots)
