"""The web page at `/`: static checks of its markup and JS, then real headless Chromium on the live stack.

The static checks run everywhere (no marker): the page's colour table equals shared.constants,
and the markup has no inline script, style or event handler (the CSP would block them). The
browser tests (marker `integration`) drive Debian's chromium through chromedriver: upload, wait
for the overlay, pick a person, check the untrained banner, the one-time result (a second fetch
gets 410) and a console free of errors and CSP violations. With M2FP_SCREENSHOT set, the page
is saved to docs/screenshot.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import flask
import numpy as np
import pytest
import requests
from PIL import Image

from shared import constants
from tests.conftest import REPO
from tests.helpers import metrics_headers
from tests.integration.conftest import photo_jpeg

STATIC = REPO / "api" / "static"
PAGE_IDS = (
    "file-input",
    "drop-zone",
    "status",
    "overlay-canvas",
    "legend",
    "persons",
    "download-labels",
    "error",
    "untrained-banner",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1800",
)
JOB_TIMEOUT = 300


# --- static checks ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page_app() -> flask.Flask:
    """A bare Flask app serving only the web blueprint (no gateway, no Redis)."""
    from api.web import bp

    app = flask.Flask("page_test", static_folder=None)
    app.register_blueprint(bp)
    return app


class PageAudit(HTMLParser):
    """Collects ids, labels, inline code and images without alt text from an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.label_for: set[str] = set()
        self.inputs: list[str] = []
        self.inline: list[str] = []
        self.images_without_alt: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "label" and attributes.get("for"):
            self.label_for.add(attributes["for"])
        if tag == "input":
            self.inputs.append(attributes.get("id") or "<input without id>")
        if tag == "script" and not attributes.get("src"):
            self.inline.append("<script> without src")
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [
            f"{tag} {name}=" for name in attributes if name == "style" or name.startswith("on")
        ]
        if tag == "img" and not attributes.get("alt"):
            self.images_without_alt.append(attributes.get("id", tag))
        for name in ("src", "href"):
            if re.match(r"^(https?:)?//", attributes.get(name) or ""):
                self.external.append(attributes[name])


def js_array(name: str, source: str) -> list:
    """The JSON value of `const NAME = [...];` in app.js."""
    body = re.search(rf"const {name} = (\[.*?\]);", source, re.S).group(1)
    return json.loads(re.sub(r",(\s*\])", r"\1", body))  # drop trailing commas


def test_page_colours_and_names_match_shared_constants():
    source = (STATIC / "app.js").read_text()
    assert js_array("CIHP_CLASSES", source) == list(constants.CIHP_CLASSES)
    assert js_array("PALETTE", source) == [list(colour) for colour in constants.PALETTE]


def test_page_markup_is_csp_clean_and_accessible(page_app):
    reply = page_app.test_client().get("/")
    assert reply.status_code == 200 and reply.mimetype == "text/html"
    assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
    audit = PageAudit()
    audit.feed(reply.get_data(as_text=True))
    assert set(PAGE_IDS) <= audit.ids
    assert audit.inline == [] and audit.external == []
    assert audit.images_without_alt == []
    assert set(audit.inputs) <= audit.label_for, "every input needs a <label for=...>"
    assert 'lang="zh-Hans"' in reply.get_data(as_text=True)  # the privacy notice in Chinese too


def test_page_reads_the_upload_limits_from_settings(page_app, settings):
    page_app.extensions["m2fp"] = type("Gateway", (), {"settings": settings})()
    try:
        html = page_app.test_client().get("/").get_data(as_text=True)
    finally:
        del page_app.extensions["m2fp"]
    assert f'data-max-bytes="{settings.max_upload_bytes}"' in html
    assert f'data-max-pixels="{settings.max_pixels}"' in html


def test_static_files_are_served_with_their_types(page_app):
    client = page_app.test_client()
    for name, mimetype in (
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        reply = client.get(f"/static/{name}")
        assert reply.status_code == 200 and reply.mimetype == mimetype, name
        reply.close()
    assert client.get("/static/../web.py").status_code == 404


def test_app_js_avoids_what_the_csp_or_the_privacy_promise_forbid():
    source = (STATIC / "app.js").read_text()
    for forbidden in (
        "eval(",
        "new Function",
        "innerHTML",
        "document.write",
        "localStorage",
        "sessionStorage",
        "http://",
        "https://",
        'setAttribute("style"',
    ):
        assert forbidden not in source, forbidden
    for code in (
        "missing_image",
        "unauthorized",
        "banned",
        "not_found",
        "not_ready",
        "result_gone",
        "payload_too_large",
        "image_too_large",
        "unsupported_type",
        "type_mismatch",
        "undecodable_image",
        "rate_limited",
        "queue_full",
        "unavailable",
        "expired",
        "worker_lost",
        "timeout",
        "internal_error",
    ):
        assert re.search(rf"^\s+{code}: \"", source, re.M), f"no human message for {code}"


# --- the browser --------------------------------------------------------------------------------
def browser_or_skip():
    """(chromium, chromedriver, selenium webdriver module); skips only outside CI."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver") or next(
        (
            path
            for path in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
            if Path(path).exists()
        ),
        None,
    )
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [
        what
        for what, found in (
            ("chromium", chromium),
            ("chromedriver (Debian: chromium-driver)", driver),
            ("selenium (requirements/dev.txt)", webdriver),
        )
        if not found
    ]
    if missing:
        reason = (
            f"browser tests need {', '.join(missing)}: apt-get install chromium chromium-driver"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run the browser tests)")
        pytest.skip(reason)
    return chromium, driver, webdriver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile, no network beyond the stack, console logs kept."""
    chromium, driver_path, webdriver = browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.set_script_timeout(60)
    driver.download_dir = downloads
    yield driver
    driver.quit()


# Records the page's own fetch calls (the page never exposes its job token): the submit's reply
# and every request, so the test can count result fetches and make its own second fetch.
RECORD_FETCH = """
window.__m2fpCalls = [];
const original = window.fetch;
window.fetch = async function (input, init) {
  const url = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
  const method = ((init && init.method) || "GET").toUpperCase();
  const response = await original.apply(this, arguments);
  const entry = {url: url, method: method, status: response.status};
  if (method === "POST" && url === "/v1/jobs" && response.status === 202) entry.job = await response.clone().json();
  window.__m2fpCalls.push(entry);
  return response;
};
"""

FETCH_AGAIN = """
const [url, token, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
fetch(url, {headers: {Authorization: "Bearer " + token}, cache: "no-store"})
  .then(async (r) => done({status: r.status, body: await r.json()}))
  .catch((e) => done({status: -1, body: String(e)}));
"""

CANVAS_STATS = """
const canvas = document.getElementById("overlay-canvas");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let lit = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] + data[i + 1] + data[i + 2] > 30) lit += 1;
return {width: canvas.width, height: canvas.height, lit: lit};
"""


def wait_until(driver, predicate, timeout: float, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(predicate, message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def console_problems(driver) -> list[str]:
    """Console errors and CSP violations logged since the last call."""
    entries = driver.get_log("browser")
    return [
        e["message"]
        for e in entries
        if e["level"] == "SEVERE"
        or "Content Security Policy" in e["message"]
        or "Refused to" in e["message"]
    ]


def download(driver, link_id: str, name: str) -> Path:
    """Click a download link and wait for the file to land in the browser's download folder."""
    link = by_id(driver, link_id)
    wait_until(
        driver,
        lambda d: (
            (link.get_attribute("href") or "").startswith("blob:")
            and link.get_attribute("download") == name
        ),
        10,
        f"{link_id} does not offer {name}",
    )
    link.click()
    target = driver.download_dir / name
    wait_until(
        driver,
        lambda d: target.is_file() and target.stat().st_size > 0,
        20,
        f"{name} was not downloaded",
    )
    return target


def open_page(driver, base_url: str) -> None:
    driver.get_log("browser")  # drop what earlier tests left (e.g. their deliberate 410)
    driver.get(base_url + "/")
    wait_until(driver, lambda d: by_id(d, "file-input").is_enabled(), 20, "page did not load")
    driver.execute_script(RECORD_FETCH)


def upload_and_wait_until_done(driver, photo: Path) -> None:
    """Choose `photo` in the file input; wait for the job to end, and for it to be done."""
    by_id(driver, "file-input").send_keys(str(photo))
    wait_until(
        driver,
        lambda d: by_id(d, "status").get_attribute("data-state") in ("done", "failed"),
        JOB_TIMEOUT,
        "the job did not finish",
    )
    assert by_id(driver, "status").get_attribute("data-state") == "done", by_id(
        driver, "error"
    ).text


def assert_the_overlay_and_its_legend_are_drawn(driver, width: int, height: int) -> None:
    """The overlay canvas is at the photo's size with most of it lit, shown beside the original,
    and the legend lists named classes."""
    from selenium.webdriver.common.by import By

    stats = driver.execute_script(CANVAS_STATS)
    assert (stats["width"], stats["height"]) == (width, height) and stats[
        "lit"
    ] > width * height // 2
    assert (
        by_id(driver, "overlay-canvas").is_displayed()
        and by_id(driver, "original-image").is_displayed()
    )
    legend = by_id(driver, "legend").find_elements(By.CSS_SELECTOR, "li")
    assert legend and all(item.text for item in legend)


def assert_downloads_are_the_maps(driver, stem: str, width: int, height: int) -> None:
    """The labels download is the raw class-id PNG (as the server sent it), the overlay an RGBA
    PNG, both at the photo's size."""
    labels = download(driver, "download-labels", f"{stem}.labels.png")
    with Image.open(labels) as image:
        assert (
            image.mode == "L"
            and image.size == (width, height)
            and int(np.asarray(image).max()) <= 19
        )
    with Image.open(download(driver, "download-overlay", f"{stem}.overlay.png")) as image:
        assert image.mode == "RGBA" and image.size == (width, height)


def assert_the_result_was_fetched_once(driver) -> None:
    """The page fetched the result exactly once, and a second fetch is refused (410)."""
    calls = driver.execute_script("return window.__m2fpCalls")
    job = next(call["job"] for call in calls if "job" in call)
    result_fetches = [c for c in calls if c["url"] == job["result_url"] and c["method"] == "GET"]
    assert [c["status"] for c in result_fetches] == [200], calls  # the page fetched the result once
    again = driver.execute_async_script(FETCH_AGAIN, job["result_url"], job["token"])
    assert again["status"] == 410 and again["body"]["error"] == "result_gone"


@pytest.mark.integration
def test_upload_shows_overlay_legend_persons_and_fetches_once(live_stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = requests.get(live_stack.base_url + "/", timeout=10)
    assert "script-src 'self'" in page.headers.get("Content-Security-Policy", ""), (
        "the CSP must be on"
    )
    open_page(browser, live_stack.base_url)
    banner = by_id(browser, "untrained-banner")
    wait_until(
        browser, lambda d: banner.is_displayed(), 20, "untrained banner not shown from /readyz"
    )

    photo = tmp_path / "two people.jpg"
    width, height = 400, 300
    photo.write_bytes(photo_jpeg(width, height, seed=11))
    upload_and_wait_until_done(browser, photo)
    assert by_id(browser, "error").is_displayed() is False

    assert_the_overlay_and_its_legend_are_drawn(browser, width, height)
    assert banner.is_displayed() and "UNTRAINED" in banner.text

    # The random weights are seeded: on this photo no Human (query, class) pair even reaches the
    # top 100 (the best pair of any class scores 0.075, under the 0.1 to keep one), so the page
    # shows nobody, every run. The per-person view is tested with people_stack below.
    persons = by_id(browser, "persons")
    assert persons.find_elements(By.CSS_SELECTOR, "button.person-button") == []
    assert persons.text == "No person was found in this photo."

    assert_downloads_are_the_maps(browser, "two people", width, height)
    if os.environ.get("M2FP_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        (REPO / "docs").mkdir(exist_ok=True)
        browser.save_screenshot(str(REPO / "docs" / "screenshot.png"))

    assert console_problems(browser) == []
    assert_the_result_was_fetched_once(browser)


@pytest.mark.integration
def test_client_side_checks_refuse_a_non_image_without_uploading(live_stack, browser, tmp_path):
    open_page(browser, live_stack.base_url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    by_id(browser, "file-input").send_keys(str(notes))
    error = by_id(browser, "error")
    wait_until(browser, lambda d: error.is_displayed(), 10, "no error shown for a text file")
    assert error.get_attribute("data-code") == "client_type" and "JPEG or PNG" in error.text
    assert (
        browser.execute_script("return window.__m2fpCalls.filter(c => c.method === 'POST').length")
        == 0
    )
    assert console_problems(browser) == []


@pytest.mark.integration
def test_a_corrupt_photo_gets_a_human_error_message(live_stack, browser, tmp_path):
    open_page(browser, live_stack.base_url)
    whole = photo_jpeg(320, 240, seed=12)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(whole[: len(whole) // 2])
    by_id(browser, "file-input").send_keys(str(broken))
    error = by_id(browser, "error")
    wait_until(
        browser, lambda d: error.is_displayed(), JOB_TIMEOUT, "no error shown for a corrupt photo"
    )
    # Chromium may draw a truncated JPEG (then the worker refuses it) or refuse it itself.
    assert error.get_attribute("data-code") in ("undecodable_image", "client_undecodable")
    assert "corrupt" in error.text
    assert by_id(browser, "status").get_attribute("data-state") in ("failed", "idle")


DROP_TEXT_FILE = """
const data = new DataTransfer();
data.items.add(new File(["not a photo"], "dropped.txt", {type: "text/plain"}));
document.getElementById("drop-zone").dispatchEvent(
  new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
"""


@pytest.mark.integration
def test_dropping_a_file_on_the_drop_zone_runs_the_same_checks(live_stack, browser):
    open_page(browser, live_stack.base_url)
    browser.execute_script(DROP_TEXT_FILE)
    error = by_id(browser, "error")
    wait_until(
        browser, lambda d: error.is_displayed(), 10, "no error shown for a dropped text file"
    )
    assert error.get_attribute("data-code") == "client_type"
    assert browser.current_url == live_stack.base_url + "/"  # the drop did not navigate away
    assert console_problems(browser) == []


CANVAS_BRIGHTNESS = """
const canvas = document.getElementById("overlay-canvas");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let total = 0;
for (let i = 0; i < data.length; i += 4) total += data[i] + data[i + 1] + data[i + 2];
return total / (data.length / 4);
"""


@pytest.fixture(scope="module")
def people_stack(redis_server, tmp_path_factory):
    """A stack whose checkpoint finds people: random weights with the classifier biased to 'Human'.

    Random and golden weights find nobody, so the per-person view would otherwise go untested.
    This is a checkpoint file in the official format like any other (the worker does not know
    it is synthetic), so the page shows no untrained banner for it.
    """
    import torch

    from tests.conftest import make_service_env
    from tests.integration.conftest import StackFactory
    from worker.m2fp.checkpoint import build_model

    model, _ = build_model("random", variant="cihp")
    state_dict = {
        k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    state_dict["sem_seg_head.predictor.class_embed.bias"][20] += 6.0  # "Human"
    model_dir = tmp_path_factory.mktemp("people-checkpoint")
    torch.save({"model": state_dict}, model_dir / "pytorch_model.pt")
    del model, state_dict
    factory = StackFactory(make_service_env(redis_server["url"]), tmp_path_factory)
    stack = factory(workers=1, M2FP_WEIGHTS=str(model_dir))
    yield stack
    factory.stop_all()


def assert_choosing_a_person_dims_the_rest(driver, person) -> None:
    """Clicking `person`'s button presses it, captions the overlay with them and dims everything
    that is not theirs to 30 % (the canvas gets darker)."""
    everyone_brightness = driver.execute_script(CANVAS_BRIGHTNESS)
    person.click()
    index = person.get_attribute("data-person")
    assert person.get_attribute("aria-pressed") == "true"
    wait_until(
        driver,
        lambda d: by_id(d, "overlay-caption").text.endswith(f"person {index}"),
        5,
        "the overlay did not switch to the person",
    )
    assert driver.execute_script(CANVAS_BRIGHTNESS) < everyone_brightness - 1.0


@pytest.mark.integration
def test_clicking_a_person_shows_only_their_parts(people_stack, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, people_stack.base_url)
    assert not by_id(browser, "untrained-banner").is_displayed()
    photo = tmp_path / "group.jpg"
    photo.write_bytes(photo_jpeg(320, 240, seed=21))
    upload_and_wait_until_done(browser, photo)
    buttons = by_id(browser, "persons").find_elements(By.CSS_SELECTOR, "button.person-button")
    people = [b for b in buttons if b.get_attribute("data-person") not in (None, "0")]
    assert people, by_id(browser, "persons").text
    chosen = people[0]
    assert_choosing_a_person_dims_the_rest(browser, chosen)
    everyone = next(b for b in buttons if b.get_attribute("data-person") == "0")
    everyone.send_keys(Keys.ENTER)  # keyboard-usable: a native button
    wait_until(
        browser,
        lambda d: everyone.get_attribute("aria-pressed") == "true",
        5,
        "Enter did not select everyone",
    )
    assert chosen.get_attribute("aria-pressed") == "false"
    assert by_id(browser, "overlay-caption").text == "Parsing overlay: all people"
    assert by_id(browser, "legend").find_elements(By.CSS_SELECTOR, "li")
    assert console_problems(browser) == []


# --- cross-site submissions ------------------------------------------------------------------
# Another site's page posts junk to the service from its visitor's browser (a CORS "simple"
# request, which needs no preflight): without the Origin check each one would be a strike
# against the visitor's address. The page is served from another port: another origin.
ATTACKER_PAGE = """<!doctype html><meta charset="utf-8"><title>free kittens</title><script>
window.__sent = (async () => {
  for (let i = 0; i < 3; i++) {
    const form = new FormData();
    form.append("image", new Blob(["not a photo"], {type: "image/png"}), "kitten.png");
    // The request goes out; the gateway's Cross-Origin-Resource-Policy then hides the reply.
    await fetch("%s/v1/jobs", {method: "POST", body: form, mode: "no-cors"}).catch(() => null);
  }
  return "sent";
})().catch((e) => "failed: " + e);
</script>"""

SAME_ORIGIN_SUBMIT = """
const done = arguments[arguments.length - 1];
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const form = new FormData();
form.append("image", new Blob([bytes], {type: "image/jpeg"}), "me.jpg");
fetch("/v1/jobs", {method: "POST", body: form}).then(async (r) => done({status: r.status, body: await r.json()}));
"""


@pytest.mark.integration
def test_another_sites_page_cannot_submit_for_its_visitors(stack_factory, browser, tmp_path):
    import base64
    import functools
    import http.server
    import threading

    stack = stack_factory(workers=0, M2FP_BAN_AFTER="2")
    (tmp_path / "index.html").write_text(ATTACKER_PAGE % stack.base_url)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{attacker.server_port}/index.html")
        sent = browser.execute_async_script("window.__sent.then(arguments[arguments.length - 1])")
        assert sent == "sent"
    finally:
        attacker.shutdown()
        attacker.server_close()
    metrics = requests.get(stack.base_url + "/metrics", headers=metrics_headers(), timeout=10).text
    assert 'm2fp_rejections_total{reason="cross_origin"} 3.0' in metrics
    # The visitor (same address) was not banned by what the other page sent ...
    assert (
        requests.post(
            stack.base_url + "/v1/jobs", files={"image": ("p.jpg", photo_jpeg(64, 64))}, timeout=30
        ).status_code
        == 202
    )
    # ... and the service's own page submits from the browser as before (same origin).
    browser.get(stack.base_url + "/")
    reply = browser.execute_async_script(
        SAME_ORIGIN_SUBMIT, base64.b64encode(photo_jpeg(64, 64)).decode()
    )
    assert reply["status"] == 202 and reply["body"]["job_id"]
