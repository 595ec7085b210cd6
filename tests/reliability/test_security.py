"""Security: the optional API key, the body size limit, and what never reaches a log line or a
response (keys, HF_TOKEN, prompts by default, tracebacks, internal paths). Each protection has a
test here that fails when the protection is taken out (docs/security.md says how that was
checked)."""

import base64
import contextlib
import hmac
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ovis_service.auth import ApiKeyGuard
from ovis_service.errors import UnauthorizedError
from tests.reliability import rawhttp
from tests.reliability.conftest import log_lines, wait_for_log
from tests.support.fakes import SECRET_IN_ERROR
from tests.support.service import FAKE_COMMAND, ServiceProcess, run_service

KEY_ONE = "k1-3f9c2a7e51d84b06a9e2c4f7d1b8e035"
KEY_TWO = "k2-8b1e6d4c90a347f2b5c8e1d6a3f9072c"
HF_TOKEN = "hf_ReliabilitySuiteFakeToken0123456789"
PRIVATE_PROMPT = "a private prompt 7c41e9"
BODY = {"prompt": "a fox", "num_inference_steps": 1, "image_size": 256}
BODY_LIMIT = 2048


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Two keys (rotation), written with the spaces an operator might leave in."""
    env = {
        "OVIS_API_KEY": f" {KEY_ONE} , {KEY_TWO} ",
        "OVIS_MAX_BODY_BYTES": str(BODY_LIMIT),
        "HF_TOKEN": HF_TOKEN,
    }
    with run_service(tmp_path_factory.mktemp("locked"), env=env, command=FAKE_COMMAND) as svc:
        yield svc


def _assert_no_secret(text: str | bytes, *, internals_allowed: bool = False) -> None:
    """No key, no token; and unless it is the operator's log, no traceback or internal path."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    secrets = [KEY_ONE, KEY_TWO, HF_TOKEN]
    if not internals_allowed:
        secrets += [SECRET_IN_ERROR, "Traceback", "site-packages", ".py"]
    for secret in secrets:
        assert secret not in text, secret


def _post(service: ServiceProcess, headers: dict[str, str]) -> httpx.Response:
    with service.client() as client:
        return client.post("/generate", json=BODY, headers=headers)


# -- API key --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY_ONE, KEY_TWO], ids=["first key", "second key"])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_each_configured_key_is_accepted(locked: ServiceProcess, key: str, scheme: str) -> None:
    response = _post(locked, {"Authorization": f"{scheme} {key}"})
    assert response.status_code == 200
    assert response.content.startswith(b"\x89PNG")


WRONG_CREDENTIALS = {
    "no header": [],
    "empty bearer": ["Authorization: Bearer "],
    "wrong key": ["Authorization: Bearer not-the-key"],
    "a key's prefix": [f"Authorization: Bearer {KEY_ONE[:-1]}"],
    "a key plus a suffix": [f"Authorization: Bearer {KEY_ONE}x"],
    "both keys joined": [f"Authorization: Bearer {KEY_ONE},{KEY_TWO}"],
    "key without a scheme": [f"Authorization: {KEY_ONE}"],
    "basic auth": ["Authorization: Basic " + base64.b64encode(f"u:{KEY_ONE}".encode()).decode()],
    "key in another header": [f"X-API-Key: {KEY_ONE}"],
    # UTF-8 bytes on the wire (the raw client writes header text as Latin-1).
    "non-ASCII key": ["Authorization: Bearer " + "ключ".encode().decode("latin-1")],
}


@pytest.mark.parametrize("case", list(WRONG_CREDENTIALS))
def test_a_missing_or_wrong_key_gets_401_json_and_is_logged_without_the_key(
    locked: ServiceProcess, case: str
) -> None:
    request_id = f"auth-{list(WRONG_CREDENTIALS).index(case)}"
    body = httpx.Request("POST", "/", json=BODY).content
    headers = [*WRONG_CREDENTIALS[case], f"X-Request-ID: {request_id}"]
    response = rawhttp.post(locked.base_url, "/generate", body, *headers)
    assert response.status == 401
    assert response.header("www-authenticate") == "Bearer"
    parsed = rawhttp_json(response)
    assert set(parsed) == {"detail", "request_id"}
    assert parsed["detail"] in {
        "missing API key: send 'Authorization: Bearer <key>'",
        "invalid API key",
    }
    _assert_no_secret(response.body)
    line = wait_for_log(locked, "auth_failed", request_id=request_id)
    assert line["level"] == "warning"
    assert line["path"] == "/generate"


def test_a_key_in_the_query_string_is_not_accepted(locked: ServiceProcess) -> None:
    with locked.client() as client:
        response = client.post("/generate", json=BODY, params={"api_key": KEY_ONE})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/schema", 200),
        ("/schema/openapi.json", 200),
        ("/schema/swagger", 200),
        ("/openapi.json", 200),
        ("/docs", 302),
        # Viewers the service does not ship (they would load from CDNs), and no YAML.
        ("/schema/openapi.yaml", 404),
        ("/schema/redoc", 404),
        ("/schema/elements", 404),
        ("/schema/rapidoc", 404),
        ("/schema/anything-else", 404),
    ],
)
def test_the_openapi_schema_and_its_viewers_need_the_key(
    locked: ServiceProcess, path: str, status: int
) -> None:
    with locked.client() as client:
        refused = client.get(path)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/json"
        allowed = client.get(path, headers={"Authorization": f"Bearer {KEY_TWO}"})
    assert allowed.status_code == status
    _assert_no_secret(allowed.content)


def test_the_schema_declares_the_bearer_scheme(locked: ServiceProcess) -> None:
    with locked.client(headers={"Authorization": f"Bearer {KEY_ONE}"}) as client:
        schema = client.get("/schema/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["security"] == [{"bearer": []}]


def test_health_needs_no_key(locked: ServiceProcess) -> None:
    with locked.client() as client:
        response = client.get("/health")
    assert response.status_code == 200
    _assert_no_secret(response.text)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nowhere", 404), ("POST", "/generate/../admin", 404), ("GET", "/generate", 405)],
)
def test_unrouted_requests_answer_without_a_key_and_reveal_nothing(
    locked: ServiceProcess, method: str, path: str, status: int
) -> None:
    """No route, no guard: a 404 or 405 answers before authentication. It says only that the
    path or method does not exist (documented in docs/security.md)."""
    with locked.client() as client:
        response = client.request(method, path)
    assert response.status_code == status
    assert set(response.json()) == {"detail", "request_id"}
    _assert_no_secret(response.text)


def test_a_body_without_a_key_is_refused_before_it_is_read(locked: ServiceProcess) -> None:
    # The guard runs before the body is parsed: 401, not 413, for a body over the limit.
    response = rawhttp.post(locked.base_url, "/generate", b"x" * (BODY_LIMIT * 4))
    assert response.status == 401


def test_keys_are_compared_in_constant_time_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hmac.compare_digest for each configured key, with no early exit on the first match, so
    the time taken says nothing about which key matched or how much of it."""
    calls: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    guard = ApiKeyGuard((KEY_ONE, KEY_TWO))

    class Connection:
        def __init__(self, token: str) -> None:
            self.headers = {"authorization": f"Bearer {token}"}
            self.url = httpx.URL("http://127.0.0.1/generate")

    class Handler:
        opt: dict[str, object] = {}  # noqa: RUF012 - a stand-in for a route handler

    for token in (KEY_ONE, "wrong-key"):
        calls.clear()
        # The wrong key raises; only the comparisons matter here.
        with contextlib.suppress(UnauthorizedError):
            guard(Connection(token), Handler())  # type: ignore[arg-type]
        assert [b for _, b in calls] == [KEY_ONE.encode(), KEY_TWO.encode()], token


def test_configured_keys_and_the_hf_token_never_reach_the_log(locked: ServiceProcess) -> None:
    # Runs after the tests above, which presented right keys, wrong keys and near misses.
    assert log_lines(locked, "service_starting")[0]["auth"] == "on"
    _assert_no_secret(locked.raw_log(), internals_allowed=True)


# -- body size limit ------------------------------------------------------------------------------

KEY = {"Authorization": f"Bearer {KEY_ONE}"}


def _padded(size: int) -> bytes:
    """A valid request body of exactly `size` bytes (JSON allows the trailing spaces)."""
    body = httpx.Request("POST", "/", json=BODY).content
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_a_body_at_the_limit_is_accepted(locked: ServiceProcess) -> None:
    response = rawhttp.post(locked.base_url, "/generate", _padded(BODY_LIMIT), *_header_lines())
    assert response.status == 200


def test_one_byte_over_the_limit_gets_413_json(locked: ServiceProcess) -> None:
    response = rawhttp.post(locked.base_url, "/generate", _padded(BODY_LIMIT + 1), *_header_lines())
    assert response.status == 413
    assert response.header("content-type") == "application/json"
    assert set(rawhttp_json(response)) == {"detail", "request_id"}


@pytest.mark.parametrize("chunk", [1, 100, BODY_LIMIT + 1])
def test_a_chunked_body_over_the_limit_gets_413(locked: ServiceProcess, chunk: int) -> None:
    """No Content-Length to trust: the limit holds on the bytes as they arrive."""
    head = rawhttp.post_head("/generate", "Transfer-Encoding: chunked", *_header_lines())
    body = rawhttp.chunked(_padded(BODY_LIMIT + 1), chunk)
    response = rawhttp.send(locked.base_url, head, body)
    assert response.status == 413


def test_a_chunked_body_at_the_limit_is_accepted(locked: ServiceProcess) -> None:
    head = rawhttp.post_head("/generate", "Transfer-Encoding: chunked", *_header_lines())
    response = rawhttp.send(locked.base_url, head, rawhttp.chunked(_padded(BODY_LIMIT), 100))
    assert response.status == 200


def _header_lines() -> list[str]:
    return [f"{name}: {value}" for name, value in KEY.items()]


def rawhttp_json(response: rawhttp.RawResponse) -> dict[str, object]:
    parsed: dict[str, object] = httpx.Response(200, content=response.body).json()
    return parsed


# -- privacy --------------------------------------------------------------------------------------


def _generate_private(service: ServiceProcess) -> None:
    with service.client() as client:
        ok = client.post("/generate", json={**BODY, "prompt": PRIVATE_PROMPT})
        failed = client.post("/generate", json={**BODY, "prompt": f"fail {PRIVATE_PROMPT}"})
        refused = client.post("/generate", json={**BODY, "prompt": PRIVATE_PROMPT, "seed": -1})
    assert (ok.status_code, failed.status_code, refused.status_code) == (200, 500, 422)
    for response in (failed, refused):
        _assert_no_secret(response.text)
        assert PRIVATE_PROMPT not in response.text
    wait_for_log(service, "request_completed")


def test_prompts_are_not_logged_by_default(tmp_path: Path) -> None:
    with run_service(tmp_path, command=FAKE_COMMAND, env={"HF_TOKEN": HF_TOKEN}) as service:
        _generate_private(service)
    log = service.raw_log()
    assert PRIVATE_PROMPT not in log
    assert log_lines(service, "request_completed")[0]["prompt_chars"] == len(PRIVATE_PROMPT)
    # The 500's traceback is meant for the log; keys and tokens are not.
    _assert_no_secret(log, internals_allowed=True)


def test_ovis_log_prompts_turns_prompt_logging_on(tmp_path: Path) -> None:
    env = {"OVIS_LOG_PROMPTS": "true"}
    with run_service(tmp_path, command=FAKE_COMMAND, env=env) as service:
        _generate_private(service)
    assert log_lines(service, "request_completed", prompt=PRIVATE_PROMPT)
