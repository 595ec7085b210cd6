"""What every API surface shares: the JSON-only guard, the seed a request gets when it names
none, the fields of its log line, how its images are encoded, and two small documentation and
static-file fixes."""

from collections.abc import Iterator
from typing import Annotated, Any

import pytest
import structlog
from litestar import Litestar, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response.base import ASGIResponse
from litestar.testing import TestClient

from ovis_service.api.common import (
    also_answers,
    bind_request_fields,
    draw_seed,
    require_json_body,
    utf8_scripts,
)
from ovis_service.api.errors import handle_exception
from ovis_service.config import Settings
from ovis_service.engine import EngineInfo
from ovis_service.generation import encoding_for
from ovis_service.imaging import ImageFormat
from ovis_service.schemas import MAX_SEED, GenerationParams
from ovis_service.worker.pool import InferencePool
from tests.support.fakes import FakeEngine
from tests.support.worker import running_pool


@post("/echo", guards=[require_json_body], sync_to_thread=False)
def echo(
    data: Annotated[dict[str, Any], Body(media_type=RequestEncodingType.JSON)],
) -> dict[str, Any]:
    return data


@pytest.fixture(scope="module")
def guarded() -> Iterator[TestClient[Litestar]]:
    app = Litestar([echo], exception_handlers={Exception: handle_exception})
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON; Charset=UTF-8",
        "APPLICATION/JSON;charset=utf-8",
    ],
)
def test_json_is_accepted_in_any_case_and_with_a_charset(
    guarded: TestClient[Litestar], content_type: str
) -> None:
    response = guarded.post(
        "/echo", content=b'{"prompt": "a fox"}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 201
    assert response.json() == {"prompt": "a fox"}


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        # `curl -d` without a header, and the "simple" types a browser sends cross-site.
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        ("text/plain; charset=utf-8", "'text/plain'"),
        ("multipart/form-data; boundary=x", "'multipart/form-data'"),
        ("application/jsonp", "'application/jsonp'"),
        (None, "none"),
    ],
)
def test_any_other_body_is_refused_with_415_naming_what_came(
    guarded: TestClient[Litestar], content_type: str | None, named: str
) -> None:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    response = guarded.post("/echo", content=b'{"prompt": "a fox"}', headers=headers)
    assert response.status_code == 415
    assert response.json()["detail"] == f"Content-Type must be application/json, got {named}"


def test_a_drawn_seed_spans_the_whole_seed_range() -> None:
    seeds = [draw_seed() for _ in range(200)]
    assert all(0 <= seed <= MAX_SEED for seed in seeds)
    assert len(set(seeds)) == len(seeds)
    # Half of all valid seeds lie above 2**62; a 32-bit or otherwise narrow draw would never
    # reach there (200 draws all below it by chance: 2**-200).
    assert max(seeds) >= 2**62


@pytest.fixture
def clean_contextvars() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


JOB = GenerationParams(
    prompt="a fox in the snow",
    negative_prompt="blurry",
    num_inference_steps=20,
    cfg_scale=4.0,
    width=512,
    height=768,
    seed=42,
)


@pytest.mark.usefixtures("clean_contextvars")
def test_the_log_fields_leave_the_prompt_out_by_default() -> None:
    fields = bind_request_fields(JOB, Settings(model="fake"), "req-1", n=2)
    assert fields == {
        "request_id": "req-1",
        "seed": 42,
        "width": 512,
        "height": 768,
        "steps": 20,
        "cfg_scale": 4.0,
        "prompt_chars": 17,
        "n": 2,
    }
    # Bound for the rest of the request, so the error handler's line carries them too.
    assert structlog.contextvars.get_contextvars() == fields


@pytest.mark.usefixtures("clean_contextvars")
def test_the_log_fields_carry_both_prompts_when_log_prompts_is_set() -> None:
    fields = bind_request_fields(JOB, Settings(model="fake", log_prompts=True), "req-2")
    assert (fields["prompt"], fields["negative_prompt"]) == ("a fox in the snow", "blurry")
    bound = structlog.contextvars.get_contextvars()
    assert (bound["prompt"], bound["negative_prompt"]) == ("a fox in the snow", "blurry")


class LeveredEngine(FakeEngine):
    """Reports speed levers, as the diffusers engine does once loaded."""

    def load(self) -> EngineInfo:
        return EngineInfo(
            model="fake",
            device="cpu",
            dtype="float32",
            offload="none",
            levers={"compile": "regional", "cfg_batch": "true"},
        )


ENCODING_SETTINGS = Settings(model="/srv/models/ovis-image", jpeg_quality=70, webp_quality=60)


@pytest.fixture(scope="module")
def loaded_pool() -> Iterator[InferencePool]:
    with running_pool(LeveredEngine(), capacity=1) as pool:
        yield pool


@pytest.mark.parametrize(("image_format", "quality"), [("webp", 60), ("jpeg", 70)])
def test_images_are_written_at_the_configured_quality_when_the_request_names_none(
    loaded_pool: InferencePool, image_format: ImageFormat, quality: int
) -> None:
    encoding = encoding_for(loaded_pool, ENCODING_SETTINGS, image_format)
    assert (encoding.image_format, encoding.quality) == (image_format, quality)


@pytest.mark.parametrize("quality", [95, 0])
def test_a_quality_the_request_names_wins_even_zero(
    loaded_pool: InferencePool, quality: int
) -> None:
    assert encoding_for(loaded_pool, ENCODING_SETTINGS, "webp", quality).quality == quality


def test_the_metadata_names_the_model_without_the_host_path_and_the_levers_in_force(
    loaded_pool: InferencePool,
) -> None:
    encoding = encoding_for(loaded_pool, ENCODING_SETTINGS, "png")
    assert encoding.model_name == "ovis-image"
    assert encoding.levers == {"compile": "regional", "cfg_batch": "true"}


def test_before_the_model_loads_no_levers_are_claimed() -> None:
    never_started = InferencePool(LeveredEngine(), capacity=1)
    assert encoding_for(never_started, ENCODING_SETTINGS, "png").levers == {}


@post(
    "/draw",
    media_type="image/png",
    status_code=200,
    operation_class=also_answers("image/webp", "text/event-stream"),
    sync_to_thread=False,
)
def draw() -> bytes:
    return b""


def test_the_openapi_200_lists_every_media_type_the_handler_answers_with() -> None:
    schema = Litestar([draw]).openapi_schema.to_schema()
    content = schema["paths"]["/draw"]["post"]["responses"]["200"]["content"]
    assert set(content) == {"image/png", "image/webp", "text/event-stream"}
    assert content["image/webp"]["schema"] == {"type": "string", "format": "binary"}
    assert set(content["text/event-stream"]["schema"]["properties"]) == {
        "event",
        "data",
        "id",
        "retry",
    }


# The static files router answers with an ASGI response whose headers already hold the type
# that `mimetypes` guessed; these stand in for it with each type fixed.
@get("/app.js", sync_to_thread=False)
def script() -> ASGIResponse:
    # What Python 3.10 and some /etc/mime.types call a script: browsers then guess the charset.
    return ASGIResponse(body=b"", media_type="application/javascript")


@get("/labelled.js", sync_to_thread=False)
def labelled_script() -> ASGIResponse:
    return ASGIResponse(
        body=b"", headers={"content-type": "application/javascript; charset=iso-8859-1"}
    )


@get("/data", sync_to_thread=False)
def data() -> ASGIResponse:
    return ASGIResponse(body=b"{}", media_type="application/json")


@pytest.fixture(scope="module")
def static_files() -> Iterator[TestClient[Litestar]]:
    app = Litestar([script, labelled_script, data], after_request=utf8_scripts)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/app.js", "text/javascript; charset=utf-8"),
        # A script that names its charset, and anything that is not a script, stay as they are.
        ("/labelled.js", "application/javascript; charset=iso-8859-1"),
        ("/data", "application/json"),
    ],
)
def test_scripts_without_a_charset_are_labelled_utf8(
    static_files: TestClient[Litestar], path: str, content_type: str
) -> None:
    assert static_files.get(path).headers["content-type"] == content_type
