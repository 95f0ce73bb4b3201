"""The web console at `/`: its static files over HTTP, and the page driven in a real Chromium (Playwright)
against a real server behind an API key: load a variant, generate at two dtypes, run a report, watch live."""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect  # the page's CSP forbids eval, so waits go through locators

from server.app import create_app
from server.routes.console import PUBLIC_PATHS
from tests.conftest import ROOT, make_settings, start_server, stop_server

KEY = "console-test-key"
CHROMIUM = os.environ.get("DTYPE_SERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored; docs/console-*.png are copies from a run of this test


@pytest.fixture(scope="module")
async def keyed_client():
    app = create_app(make_settings(api_key=(KEY,), warmup=False))
    async with app.router.lifespan_context(app):
        await app.state.start_task
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def test_the_page_and_its_assets_need_no_key_and_hold_no_data(keyed_client):
    page = await keyed_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # the page names no model, dtype or number: all of that comes from the API, with the key
    assert "tiny-arith" not in page.text and "bfloat16" not in page.text
    for path in sorted(PUBLIC_PATHS - {"/"}):
        r = await keyed_client.get(path)
        assert r.status_code == 200 and len(r.content) > 500, path
    assert (await keyed_client.get("/console/console.js")).headers["content-type"].startswith("text/javascript")
    # nothing from another origin: no absolute URL in what the page loads
    for path in PUBLIC_PATHS:
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", (await keyed_client.get(path)).text), path


@pytest.mark.parametrize("path", ["/console/", "/console/index.html", "/console/../memory", "/console/console.js/",
                                  "/console/%2E%2E/memory", "/console", "/?x=/memory", "/memory?/"])
async def test_other_paths_still_need_the_key(keyed_client, path):
    r = await keyed_client.get(httpx.URL("http://test" + path))
    if path.startswith("/?"):  # the page itself, whatever the query
        assert r.status_code == 200
    else:
        assert r.status_code == 401, (path, r.status_code)
    assert (await keyed_client.get("/memory")).status_code == 401


async def test_unknown_asset_is_a_json_404(client):
    r = await client.get("/console/secrets.txt")
    assert r.status_code == 404 and r.json()["error"]["status"] == 404
    assert "/" not in r.json()["error"]["message"]  # no server path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the console test needs Chromium at {CHROMIUM}: `apt-get install -y chromium` (scripts/install.sh "
                    "does it as root with EXTRAS=test), or set DTYPE_SERVE_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def keyed_server():
    proc, base = start_server("--api-key", KEY, "--memory-budget", "32MiB")  # a budget the bar can show
    yield base
    stop_server(proc)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


@contextmanager
def traffic(base: str, clients: int = 3):
    """Clients streaming float32 generations one after another until the block ends, for the live view."""
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            with httpx.stream("POST", base + "/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                              json={"prompt": "The cat", "dtype": "float32", "max_tokens": 120, "ignore_eos": True,
                                    "stream": True}) as r:
                r.raise_for_status()  # a failure shows as pytest's unhandled-thread-exception warning
                for _ in r.iter_lines():
                    pass

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def enter_key(page, base: str) -> None:
    page.goto(base + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key-input", "wrong-key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#key-form", state="hidden")


def test_console_in_a_real_browser(browser, keyed_server):
    dtypes = httpx.get(keyed_server + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["dtypes"]
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(60_000)
    enter_key(page, keyed_server)

    # Memory: the resident default, then float32 loaded from the page
    page.wait_for_selector('#resident tr[data-variant="tiny-arith:bfloat16"]')
    assert page.eval_on_selector_all("#load-dtype option", "os => os.map(o => o.value)") == dtypes
    estimates = httpx.get(keyed_server + "/memory/estimate?include_quantized=true",
                          headers={"Authorization": f"Bearer {KEY}"}).json()["estimates"]
    assert page.locator("#estimates tbody tr").count() == len(estimates)  # every precision the API estimates
    page.select_option("#load-dtype", "float32")
    page.click("#load-form button")
    page.wait_for_selector('#resident tr[data-variant="tiny-arith:float32"]')
    expect(page.locator("#load-notes")).to_contain_text("loaded tiny-arith:float32")
    assert "float32 4.05 MiB" in page.inner_text('#resident tr[data-variant="tiny-arith:float32"]')
    assert page.locator("#budget-bar > div").count() >= 2
    shot(page, "memory")
    # an estimate row's button loads float16; its Unload button frees it again
    page.click('#estimates tr:has(td:text-is("float16")) button')
    page.click('#resident tr[data-variant="tiny-arith:float16"] button')
    page.wait_for_selector('#resident tr[data-variant="tiny-arith:float16"]', state="detached")
    expect(page.locator("#load-notes")).to_contain_text(re.compile(r"unloaded tiny-arith:float16, 2\.0\d MiB freed"))

    # Playground: the same prompt at two dtypes, streamed, side by side
    page.click('#tabs button[data-view="playground"]')
    page.fill("#play-prompt", "17+25=")
    page.select_option("#play-dtype-a", "bfloat16")
    page.check("#play-compare")
    page.select_option("#play-dtype-b", "float32")
    page.click("#play-run")
    page.wait_for_selector('#pane-b[data-state="done"]')
    assert page.inner_text("#pane-a .out") == "42" and page.inner_text("#pane-b .out") == "42"
    assert "tokens/s" in page.inner_text("#pane-a .stats") and "tokens/s" in page.inner_text("#pane-b .stats")
    assert "identical" in page.inner_text("#divergence")
    page.fill("#play-prompt", "The cat")
    page.fill("#play-max-tokens", "24")
    page.click("#play-run")
    page.wait_for_selector('#pane-b[data-state="done"]')
    assert page.inner_text("#pane-a .out") and page.inner_text("#pane-b .out")
    # sampled hot with one seed, the two dtypes' texts part: both are marked from the first differing character
    page.fill("#play-temperature", "2")
    page.fill("#play-seed", "7")
    page.fill("#play-max-tokens", "48")
    page.click("#play-run")
    page.wait_for_selector('#pane-b[data-state="done"]')
    a, b = page.inner_text("#pane-a .out"), page.inner_text("#pane-b .out")
    assert a != b
    common = len(os.path.commonprefix([a, b]))
    assert f"diverge at character {common} " in page.inner_text("#divergence")
    assert page.inner_text("#pane-a mark") == a[common:] and page.inner_text("#pane-b mark") == b[common:]
    shot(page, "playground")
    page.fill("#play-temperature", "0")
    page.fill("#play-seed", "")
    # chat: the tokenizer's template through /v1/chat/completions, the turn kept in the log
    page.select_option("#play-mode", "chat")
    page.uncheck("#play-compare")
    page.fill("#play-prompt", "17+25=")
    page.click("#play-run")
    page.wait_for_selector('#pane-a[data-state="done"]')
    assert page.inner_text("#pane-a .out") == "42"
    assert page.locator("#chat-log p").count() == 2

    # Report: float32 against bfloat16, started from the page, its progress, then the chart and the table
    page.click('#tabs button[data-view="report"]')
    offered = [box.get_attribute("value") for box in page.locator("#report-dtypes input").all()]
    assert {"bfloat16", "float16", "q8", "q4"} <= set(offered)  # /models' report_dtypes: quantized ones too
    for box in page.locator("#report-dtypes input").all():
        box.set_checked(box.get_attribute("value") == "bfloat16")
    page.click("#report-form button")
    page.wait_for_selector("#report-progress:not([hidden])")
    page.wait_for_selector("#report-chart svg rect.bar-value", timeout=180_000)
    assert page.locator("#report-chart rect.bar-value").count() == 2
    assert page.eval_on_selector_all("#report-table tbody tr", "rs => rs.map(r => r.dataset.dtype)") == \
        ["float32", "bfloat16"]
    page.select_option("#report-metric", "total_bytes")
    page.click('#report-chart rect.bar-value[data-dtype="bfloat16"]')
    assert page.locator('#report-table tr.selected[data-dtype="bfloat16"]').count() == 1
    assert "0.50x" in page.inner_text('#report-table tr[data-dtype="bfloat16"]')
    shot(page, "report")

    # Live: per variant counters and the last time to first token of this page's requests
    row = '#live-table tr[data-variant="tiny-arith:float32"]'
    with traffic(keyed_server):
        page.click('#tabs button[data-view="live"]')
        # a rate needs two polls of the counters
        expect(page.locator(f"{row} td:nth-child(3)")).to_have_text(re.compile(r"\d"), timeout=60_000)
        shot(page, "live")
    assert re.search(r"\d\.\d{3} s", page.inner_text(row))
    assert errors == []
    context.close()


def test_console_fits_a_phone_screen(browser, keyed_server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    enter_key(page, keyed_server)
    page.click('#tabs button[data-view="playground"]')
    page.check("#play-compare")
    page.click("#play-run")
    page.wait_for_selector('#pane-b[data-state="done"]')
    # nothing wider than the screen: the page never scrolls sideways (tables scroll in their own box)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "phone")
    context.close()
