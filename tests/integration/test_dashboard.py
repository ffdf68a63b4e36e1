"""The dashboard in a real browser: headless Debian chromium driven by Playwright (no browser download).
After a known load the page's QPS chart holds non-zero points (read with `page.evaluate` from the
chart's own data arrays), the chart area is drawn (at least 500 pixels that are not background), the
token lives in the tab's session storage only, and the query box answers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import poll

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BODY = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20]}}
SCREENSHOT = os.environ.get("BERTH_DASHBOARD_SCREENSHOT")  # where to keep the picture (the README's)


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/setup test installs Debian's package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def non_background(path: Path) -> int:
    """Pixels that differ from the image's most common colour (its background)."""
    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    assert colours is not None
    background = max(colours)[1]
    return sum(n for n, colour in colours if colour != background)


def test_the_dashboard_charts_a_known_load_and_answers_a_query(shared_server, model_zoo, browser, tmp_path):
    name = "dash"
    shared_server.deploy(name, model_zoo("sklearn_classifier"))
    for _ in range(3):  # three seconds of load, 40 requests in each
        for _ in range(40):
            assert shared_server.invoke(name, BODY).status_code == 200
        __import__("time").sleep(1.0)

    page = browser.new_page(viewport={"width": 1700, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{shared_server.url}/dashboard#endpoint={name}")
    page.fill("#token", shared_server.token)
    page.click("#token-form button")
    page.wait_for_selector(f"#endpoints tr[data-name='{name}']")
    poll(lambda: page.evaluate("window.berth.charts.qps ? window.berth.charts.qps.data[1].length : 0") > 3,
         timeout=30, what="the QPS chart's points")
    qps = page.evaluate("window.berth.charts.qps.data[1]")
    assert sum(1 for v in qps if v and v > 0) >= 2, qps
    assert max(qps) >= 10, qps  # 40 requests in a second of the load
    p50 = [v for v in page.evaluate("window.berth.charts.latency.data[1]") if v]
    assert p50
    assert all(v > 0 for v in p50)
    ready = page.evaluate("window.berth.charts.replicas.data[1]")
    assert max(ready) >= 1, ready

    # The token: in this tab's session storage, nowhere that outlives it.
    assert page.evaluate("sessionStorage.getItem('berth.token')") == shared_server.token
    assert page.evaluate("localStorage.length") == 0
    assert "berth.token" not in page.evaluate("document.cookie")

    chart_png = tmp_path / "qps.png"
    page.locator("#chart-qps").screenshot(path=str(chart_png))
    assert non_background(chart_png) >= 500

    page.fill("#query-body", __import__("json").dumps(BODY))
    page.click("#query-form button")
    # (Polled from here: the page's Content-Security-Policy forbids the eval that wait_for_function uses.)
    answer = poll(lambda: (text := page.text_content("#query-answer") or "").startswith("200") and text,
                  timeout=30, what="the query's answer")
    assert "predictions" in answer
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    assert not errors, errors

    # A fresh tab of a new context has no token: the page asks for one.
    other = browser.new_page()
    other.goto(f"{shared_server.url}/dashboard")
    other.wait_for_selector("#login:not([hidden])")
    assert other.evaluate("sessionStorage.getItem('berth.token')") is None
    page.close()
    other.close()
    shared_server.api("DELETE", f"/{name}")


def test_the_dashboard_files_need_no_token_and_the_rest_is_404(shared_server):
    import httpx

    for path, kind in (("/dashboard", "text/html"), ("/dashboard/dashboard.js", "text/javascript"),
                       ("/dashboard/uPlot.iife.min.js", "text/javascript")):
        response = httpx.get(shared_server.url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert httpx.head(shared_server.url + "/dashboard").status_code == 200
    assert httpx.get(shared_server.url + "/dashboard/%2e%2e%2fberth.db").status_code == 404
    assert httpx.get(shared_server.url + "/dashboard/nope.js").status_code == 404
    assert httpx.get(shared_server.url + "/api/2.0/serving-endpoints").status_code == 401
