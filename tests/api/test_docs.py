"""API docs offline: Swagger UI from our own assets; `/docs` and `/openapi.json` as elsewhere."""

import json
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ovis_service.app import create_app
from ovis_service.config import Settings
from tests.support.browser import headless_chromium
from tests.support.fakes import FakeEngine
from tests.support.service import ServiceProcess

KEY = "docs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PAGES = ("/schema", "/schema/swagger")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    app = create_app(Settings(model="fake", warmup=False, api_keys=(KEY,)), engine=FakeEngine())
    with TestClient(app) as client:
        yield client


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


def links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("path", PAGES)
def test_the_ui_loads_only_from_this_service(client: TestClient[Litestar], path: str) -> None:
    page = client.get(path, headers=AUTH)
    assert page.status_code == 200
    urls = links(page.text)
    assert sorted(urls) == [
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui-standalone-preset.js",
        "/docs/assets/swagger-ui.css",
        "data:,",
    ]
    for url in urls:
        if url.startswith("/"):
            # Public: the assets are a package's files; the page itself needs the key.
            assert client.get(url).status_code == 200, url


def test_scripts_are_served_as_utf8(client: TestClient[Litestar]) -> None:
    response = client.get("/docs/assets/swagger-ui-bundle.js")
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"


def test_the_bundle_is_swagger_ui_5_which_reads_openapi_3_1(client: TestClient[Litestar]) -> None:
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "PACKAGE_VERSION: '5." in bundle
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert schema["openapi"].startswith("3.1")


def test_docs_leads_to_the_ui(client: TestClient[Litestar]) -> None:
    response = client.get("/docs", headers=AUTH, follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == "/schema/swagger"


def test_openapi_json_at_the_root_is_the_schema(client: TestClient[Litestar]) -> None:
    root = client.get("/openapi.json", headers=AUTH)
    assert root.status_code == 200
    assert root.headers["content-type"] == "application/vnd.oai.openapi+json"
    assert root.json() == client.get("/schema/openapi.json", headers=AUTH).json()
    assert "/generate" in root.json()["paths"]


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", *PAGES])
def test_the_docs_need_the_key_when_one_is_set(client: TestClient[Litestar], path: str) -> None:
    assert client.get(path, follow_redirects=False).status_code == 401


# --- In Chromium, with every host but the service unreachable.


@pytest.fixture(scope="module")
def offline_browser(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[webdriver.Chrome]:
    # As on a GPU box without internet: no name resolves except the loopback address.
    with headless_chromium(
        tmp_path_factory.mktemp("docs-chromium"),
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        performance_log=True,
    ) as browser:
        yield browser


def test_the_ui_renders_offline_and_requests_nothing_elsewhere(
    offline_browser: webdriver.Chrome, tiny_service: ServiceProcess
) -> None:
    offline_browser.get(tiny_service.base_url + "/docs")
    # Swagger UI draws the schema's title and one block per operation once its script ran.
    WebDriverWait(offline_browser, 60).until(
        lambda browser: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    )
    title = offline_browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert title.startswith("ovis-service")
    paths = {
        element.text.replace("\u200b", "")
        for element in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert "/generate" in paths
    requested = {
        json.loads(entry["message"])["message"]["params"]["request"]["url"]
        for entry in offline_browser.get_log("performance")  # type: ignore[no-untyped-call]
        if '"Network.requestWillBeSent"' in entry["message"]
    }
    # The browser's own pages (chrome://) load too; what counts is what went over a network.
    fetched = {url for url in requested if url.startswith(("http:", "https:", "ws:", "wss:"))}
    elsewhere = {url for url in fetched if not url.startswith(tiny_service.base_url + "/")}
    assert tiny_service.base_url + "/docs/assets/swagger-ui-bundle.js" in fetched
    assert elsewhere == set()
    severe = [
        entry
        for entry in offline_browser.get_log("browser")  # type: ignore[no-untyped-call]
        if entry["level"] == "SEVERE"
    ]
    assert severe == []
