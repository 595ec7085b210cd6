"""The playground page: served public and self-contained, then driven in headless Chromium
against the real service process with the tiny model (one service and one browser for the
module)."""

import base64
import io
import json
import mimetypes
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from ovis_service.api.page import STATIC_DIR, page_router
from ovis_service.auth import ApiKeyGuard
from tests.support.browser import headless_chromium
from tests.support.service import ServiceProcess, run_service

API_KEY = "page-test-key"
MAX_IMAGE_SIZE = 768  # not the page's fallback (1024), so the select proves it read the schema
KEY_STORAGE = "ovis-service.api_key"
WAIT_SECONDS = 60.0

# --- Served by the page router alone (no browser).


@pytest.fixture
def page_client() -> Iterator[TestClient[Litestar]]:
    app = Litestar(route_handlers=[page_router], guards=[ApiKeyGuard((API_KEY,))])
    with TestClient(app) as client:
        yield client


def test_page_and_assets_are_public_when_a_key_is_set(page_client: TestClient[Litestar]) -> None:
    page = page_client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
        assert page_client.get(f"/{asset}").status_code == 200, asset
    script = page_client.get("/static/page.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"


def test_scripts_are_utf8_where_mimetypes_call_them_application_javascript(
    page_client: TestClient[Litestar], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.10's own table, and some /etc/mime.types, give `.js` this older name.
    monkeypatch.setattr(
        "litestar.response.file.guess_type",
        lambda name: (
            ("application/javascript", None)
            if str(name).endswith(".js")
            else mimetypes.guess_type(name)
        ),
    )
    script = page_client.get("/static/page.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert page_client.get("/static/page.css").headers["content-type"].startswith("text/css")


def test_assets_name_no_other_host() -> None:
    for asset in STATIC_DIR.iterdir():
        text = asset.read_text(encoding="utf-8")
        assert not re.search(r"\b(?:https?:)?//[\w.-]+\.[a-z]", text), asset.name
        assert "@import" not in text, asset.name


# --- In Chromium, against the real service.


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {
        "OVIS_API_KEY": API_KEY,
        "OVIS_QUEUE_SIZE": "1",
        "OVIS_MAX_IMAGE_SIZE": str(MAX_IMAGE_SIZE),
        "OVIS_WARMUP": "false",
    }
    with run_service(tmp_path_factory.mktemp("page-service"), env=env) as process:
        yield process


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    with headless_chromium(
        tmp_path_factory.mktemp("chromium-profile"), "--window-size=1000,1150"
    ) as browser:
        yield browser


class Playground:
    """The page as a test sees it; every wait is on a state the page shows."""

    def __init__(self, driver: webdriver.Chrome, service: ServiceProcess) -> None:
        self.driver = driver
        self.service = service
        self._allowed: list[re.Pattern[str]] = []

    def el(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
        return WebDriverWait(self.driver, timeout).until(lambda _: condition(), what)

    def open(self, *, key: str | None) -> None:
        # Storage is set on another page of the origin first, so the playground's first load
        # already sees it (or its absence). That JSON page makes Chrome ask for a favicon.
        self.allow_network_error("/favicon.ico", 404)
        self.driver.get(self.service.base_url + "/health")
        self.js("sessionStorage.clear(); localStorage.clear();")
        if key is not None:
            self.js("sessionStorage.setItem(arguments[0], arguments[1]);", KEY_STORAGE, key)
        self.driver.get(self.service.base_url + "/")
        self.wait(lambda: self.el("health").get_attribute("data-status") == "ok", "health ok")
        # The sizes come from the schema, which needs the key when one is set.
        if key is not None:
            self.wait(lambda: self.size_choices()[-1] == MAX_IMAGE_SIZE, "sizes from schema")

    def size_choices(self) -> list[int]:
        return [int(str(o.get_attribute("value"))) for o in Select(self.el("image_size")).options]

    def fill(self, prompt: str, *, size: int, steps: int, seed: str = "") -> None:
        for element_id, value in (("prompt", prompt), ("num_inference_steps", str(steps))):
            field = self.el(element_id)
            field.clear()
            field.send_keys(value)
        seed_field = self.el("seed")
        seed_field.clear()
        seed_field.send_keys(seed)
        Select(self.el("image_size")).select_by_value(str(size))

    def error(self) -> str:
        box = self.el("error")
        return box.text if box.is_displayed() else ""

    def wait_for_error(self) -> str:
        return str(self.wait(self.error, "an error shown"))

    def wait_for_image(self, side: int) -> None:
        self.wait(
            lambda: (
                self.js("return document.getElementById('result').naturalWidth") == side
                or self.error()
            ),
            "the image or an error",
        )
        assert not self.error()

    def allow_network_error(self, path: str, status: int) -> None:
        """Chrome logs every 4xx/5xx answer as a console error; these are ones a test asks for."""
        url = re.escape(self.service.base_url + path)
        self._allowed.append(re.compile(rf"^{url} - .* status of {status} "))

    def console_problems(self) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            if entry["level"] == "SEVERE"
            and not any(pattern.search(entry["message"]) for pattern in self._allowed)
        ]


@pytest.fixture
def playground(driver: webdriver.Chrome, service: ServiceProcess) -> Iterator[Playground]:
    page = Playground(driver, service)
    page.console_problems()  # drop what earlier tests left in the log
    yield page
    assert page.console_problems() == []


def _health(service: ServiceProcess) -> dict[str, Any]:
    with service.client() as client:
        state: dict[str, Any] = client.get("/health").json()
        return state


def _wait_for_health(
    service: ServiceProcess, condition: Callable[[dict[str, Any]], bool], what: str
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition(_health(service)):
        assert time.monotonic() < deadline, f"/health never showed {what}"
        time.sleep(0.05)


def test_page_asks_for_the_key_and_keeps_it_in_this_tab(playground: Playground) -> None:
    playground.allow_network_error("/schema/openapi.json", 401)
    playground.allow_network_error("/generate", 401)
    playground.open(key=None)
    playground.fill("a lighthouse at dusk", size=256, steps=2)
    playground.el("generate").click()
    assert "API key" in playground.wait_for_error()
    key_field = playground.el("api_key")
    assert key_field.is_displayed()
    assert key_field.get_attribute("type") == "password"

    key_field.send_keys(API_KEY)
    playground.el("prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard path
    playground.wait_for_image(256)
    assert playground.js("return sessionStorage.getItem(arguments[0])", KEY_STORAGE) == API_KEY
    assert playground.js("return localStorage.length + document.cookie.length") == 0


def _pixels_on_page(playground: Playground) -> Image.Image:
    """The shown image, read back through a canvas (CSP keeps fetch() off blob: URLs)."""
    data_url = playground.js(
        """const img = document.getElementById('result');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        canvas.getContext('2d').drawImage(img, 0, 0);
        return canvas.toDataURL('image/png');"""
    )
    png = base64.b64decode(data_url.partition(",")[2])
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_generates_with_progress_seed_download_and_a_reproducing_curl(
    playground: Playground, service: ServiceProcess, tmp_path: Path
) -> None:
    playground.open(key=API_KEY)
    assert re.search(r"Ready: tiny .* 0 of 1 queued", playground.el("health").text)
    sizes = playground.size_choices()
    assert sizes[0] == 256
    assert sizes[-1] == MAX_IMAGE_SIZE

    playground.fill("a lighthouse at dusk, oil painting", size=256, steps=2)
    playground.el("generate").click()
    playground.wait_for_image(256)
    assert playground.js("return document.getElementById('result').naturalHeight") == 256
    seed = playground.el("result-seed").text
    assert re.fullmatch(r"\d+", seed), seed
    # The page moves the bar only on `progress` events, so 2 of 2 means both steps arrived.
    assert playground.js(
        "const p = document.getElementById('progress'); return [p.value, p.max]"
    ) == [2, 2]
    download = playground.el("download")
    assert str(download.get_attribute("href")).startswith("blob:")
    assert download.get_attribute("download") == f"ovis-{seed}.png"

    # "Copy as curl" must reproduce the same pixels, seed included (seeds pass 2^53, which a
    # JS number would round).
    curl = str(playground.el("curl").get_attribute("value"))
    assert f"{service.base_url}/generate" in curl
    assert 'Authorization: Bearer $OVIS_API_KEY"' in curl
    assert API_KEY not in curl
    body_text = re.search(r"-d '(.*)'", curl, re.DOTALL)
    assert body_text is not None
    body = json.loads(body_text.group(1).replace("'\\''", "'"))
    assert body["seed"] == int(seed)
    assert body["image_size"] == 256
    with service.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        again = client.post("/generate", json=body)
    assert again.status_code == 200, again.text
    assert again.headers["x-seed"] == seed
    reproduced = Image.open(io.BytesIO(again.content)).convert("RGB")
    assert reproduced.tobytes() == _pixels_on_page(playground).tobytes()

    # Nothing came from another origin (the CSP would also have refused it).
    origins = playground.js(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert origins
    assert set(origins) == {service.base_url}

    shot = tmp_path / "playground.png"
    assert playground.driver.save_screenshot(str(shot))
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None
    assert len(colours) > 64


def test_empty_prompt_shows_the_fields_problem(playground: Playground) -> None:
    playground.allow_network_error("/generate", 422)
    playground.open(key=API_KEY)
    playground.fill("", size=256, steps=2)
    playground.el("generate").click()
    message = playground.wait_for_error()
    assert "prompt" in message
    assert playground.el("prompt").get_attribute("aria-invalid") == "true"
    assert playground.js("return document.activeElement.id") == "prompt"


def _hold_a_slot(service: ServiceProcess) -> socket.socket:
    """A long request over a raw socket; closing the socket is the client hanging up."""
    payload = json.dumps(
        {"prompt": "hold", "image_size": MAX_IMAGE_SIZE, "num_inference_steps": 100}
    ).encode()
    port = int(service.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def test_full_queue_is_explained_with_when_to_retry(
    playground: Playground, service: ServiceProcess
) -> None:
    playground.allow_network_error("/generate", 503)
    playground.open(key=API_KEY)
    playground.fill("a lighthouse", size=256, steps=2)
    running = _hold_a_slot(service)
    queued = None
    try:
        _wait_for_health(service, lambda h: h["running"] >= 1, "a running job")
        queued = _hold_a_slot(service)
        _wait_for_health(service, lambda h: h["queue_depth"] >= h["queue_capacity"], "a full queue")
        playground.el("generate").click()
        message = playground.wait_for_error()
    finally:
        for sock in (running, queued):
            if sock is not None:
                sock.close()
    assert "busy" in message
    assert re.search(r"Try again in (\d+ seconds?|about \d+ minutes)\.", message), message
    _wait_for_health(service, lambda h: h["running"] == 0 and h["queue_depth"] == 0, "idle")


def test_cancel_stops_the_job_on_the_server(
    playground: Playground, service: ServiceProcess
) -> None:
    def stopped_jobs() -> int:
        return sum(
            1
            for line in service.logs()
            if line.get("event") == "job_stopped" and line.get("reason") == "JobCancelledError"
        )

    before = stopped_jobs()
    playground.open(key=API_KEY)
    playground.fill("a long one", size=MAX_IMAGE_SIZE, steps=100)
    button = playground.el("generate")
    button.click()
    playground.wait(
        lambda: playground.js("return document.getElementById('progress').value") >= 1,
        "a first progress event",
    )
    assert button.text == "Cancel"
    button.click()
    playground.wait(lambda: button.text == "Generate", "the button back to Generate")
    assert "Cancelled" in playground.el("progress-text").text
    assert not playground.error()
    deadline = time.monotonic() + WAIT_SECONDS
    while stopped_jobs() == before:
        assert time.monotonic() < deadline, "the server never stopped the job"
        time.sleep(0.05)
    _wait_for_health(service, lambda h: h["running"] == 0, "no running job")
    assert not playground.el("output").is_displayed()


def test_fits_a_phone_width(playground: Playground) -> None:
    playground.driver.set_window_size(390, 844)
    try:
        playground.open(key=API_KEY)
        overflow = playground.js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        assert playground.el("generate").is_displayed()
    finally:
        playground.driver.set_window_size(1000, 1150)
