"""OpenAI's request body on the wire: `size` parsing, and the configured limits enforced by msgspec
and shown in the OpenAPI schema that clients and fuzzers read."""

import re
from typing import Any

import msgspec
import pytest

from ovis_service.api.openai_schemas import ImagesRequestBase, images_request_type, parse_size
from ovis_service.app import create_app
from ovis_service.config import Settings
from ovis_service.schemas import MAX_SEED
from tests.support.fakes import FakeEngine

MAX_SIZE = 512
DEFAULT_SIZE = 384
RULE = 'size must be "auto" or "WIDTHxHEIGHT" with each side a multiple of 16 from 256 to 512'
# Limits unlike the defaults, so a schema that ignored the settings would show.
SETTINGS = Settings(
    model="fake",
    warmup=False,
    max_prompt_chars=100,
    max_steps=40,
    max_images_per_request=3,
    max_image_size=MAX_SIZE,
)
REQUEST_TYPE = images_request_type(
    max_prompt_chars=100, max_steps=40, max_images=3, max_image_size=MAX_SIZE
)


def decode(**fields: object) -> ImagesRequestBase:
    return msgspec.json.decode(
        msgspec.json.encode({"prompt": "a fox", **fields}), type=REQUEST_TYPE
    )


@pytest.mark.parametrize("size", [None, "auto"])
def test_auto_or_no_size_is_the_default_square(size: str | None) -> None:
    assert parse_size(size, DEFAULT_SIZE, MAX_SIZE) == (DEFAULT_SIZE, DEFAULT_SIZE)


@pytest.mark.parametrize(
    ("size", "width_height"),
    [
        ("512x256", (512, 256)),
        ("256x512", (256, 512)),
        ("256x256", (256, 256)),
        ("400x496", (400, 496)),
    ],
)
def test_width_comes_first_and_every_allowed_size_is_kept_exactly(
    size: str, width_height: tuple[int, int]
) -> None:
    assert parse_size(size, DEFAULT_SIZE, MAX_SIZE) == width_height


@pytest.mark.parametrize(
    "size",
    [
        "500x512",  # not a multiple of 16
        "512x300",
        "240x256",  # below the smallest side
        "528x512",  # above the configured largest
        "512x528",
        "0x0",
        "1024x1024",  # OpenAI's own default, but past this server's limit
        "",
        "Auto",
        "big",
        "512",
        "512x",
        "x512",
        "512X512",
        "512*512",
        " 512x512",
        "512x512 ",
        "-256x256",
        "256.0x256",
        "123456x256",
    ],
)
def test_any_other_size_is_refused_with_the_rule_never_rounded(size: str) -> None:
    with pytest.raises(ValueError, match="size must be") as refused:
        parse_size(size, DEFAULT_SIZE, MAX_SIZE)
    assert str(refused.value) == f"{RULE}, got {size!r}"


def test_null_is_not_set_and_unknown_fields_are_ignored() -> None:
    """Gateways send `null` for what they do not set, and clients add fields faster than
    servers learn them; neither may turn a request away."""
    request = decode(n=None, size=None, seed=None, stream=None, a_field_from_the_future=1)
    assert (request.n, request.size, request.seed, request.stream) == (None, None, None, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "Expected `str` of length >= 1 - at `$.prompt`"),
        ({"prompt": "x" * 101}, "Expected `str` of length <= 100 - at `$.prompt`"),
        (
            {"negative_prompt": "x" * 101},
            "Expected `str` of length <= 100 - at `$.negative_prompt`",
        ),
        ({"n": 0}, "Expected `int` >= 1 - at `$.n`"),
        ({"n": 4}, "Expected `int` <= 3 - at `$.n`"),
        ({"num_inference_steps": 0}, "Expected `int` >= 1 - at `$.num_inference_steps`"),
        ({"num_inference_steps": 41}, "Expected `int` <= 40 - at `$.num_inference_steps`"),
        ({"guidance_scale": -0.5}, "Expected `float` >= 0.0 - at `$.guidance_scale`"),
        ({"guidance_scale": 20.5}, "Expected `float` <= 20.0 - at `$.guidance_scale`"),
        ({"seed": -1}, "Expected `int` >= 0 - at `$.seed`"),
        ({"seed": MAX_SEED + 1}, "at `$.seed`"),
        ({"output_compression": 101}, "Expected `int` <= 100 - at `$.output_compression`"),
        ({"partial_images": 4}, "Expected `int` <= 3 - at `$.partial_images`"),
        ({"size": "x" * 17}, "Expected `str` of length <= 16 - at `$.size`"),
        ({"user": "x" * 257}, "Expected `str` of length <= 256 - at `$.user`"),
    ],
)
def test_each_limit_is_enforced_naming_its_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as refused:
        decode(**fields)
    assert message in str(refused.value)


def test_the_limits_at_their_edges_are_accepted() -> None:
    request = decode(
        prompt="x" * 100, n=3, num_inference_steps=40, guidance_scale=20.0, seed=MAX_SEED
    )
    assert (request.n, request.num_inference_steps, request.seed) == (3, 40, MAX_SEED)


@pytest.fixture(scope="module")
def schema_properties() -> dict[str, Any]:
    """The request body as the service's own OpenAPI document shows it."""
    schema = create_app(SETTINGS, engine=FakeEngine()).openapi_schema.to_schema()
    properties: dict[str, Any] = schema["components"]["schemas"]["ImagesGenerateRequest"][
        "properties"
    ]
    return properties


@pytest.mark.parametrize(
    ("field", "minimum", "maximum"),
    [
        ("n", 1, 3),
        ("num_inference_steps", 1, 40),
        ("guidance_scale", 0.0, 20.0),
        # Bounds of 0 on optional fields are the ones Litestar would drop unless kept on purpose.
        ("seed", 0, MAX_SEED),
        ("output_compression", 0, 100),
        ("partial_images", 0, 3),
    ],
)
def test_the_openapi_schema_shows_each_configured_bound(
    schema_properties: dict[str, Any], field: str, minimum: float, maximum: float
) -> None:
    shown = schema_properties[field]
    assert (shown["minimum"], shown["maximum"]) == (minimum, maximum)


def parses(size: str) -> bool:
    try:
        parse_size(size, DEFAULT_SIZE, MAX_SIZE)
    except ValueError:
        return False
    return True


def test_the_openapi_schema_lists_exactly_the_sizes_that_parse(
    schema_properties: dict[str, Any],
) -> None:
    pattern = re.compile(schema_properties["size"]["pattern"])
    candidates = ["auto"] + [f"{w}x{h}" for w in range(0, 700, 8) for h in (256, 272, 500, 512)]
    for size in candidates:
        assert bool(pattern.fullmatch(size)) == parses(size), size


def test_the_openapi_schema_limits_the_prompt_and_offers_only_what_is_served(
    schema_properties: dict[str, Any],
) -> None:
    prompt = schema_properties["prompt"]
    assert (prompt["minLength"], prompt["maxLength"]) == (1, 100)
    # A transparent background is known but refused, so the schema does not offer it.
    assert schema_properties["response_format"]["enum"] == ["b64_json", "url", None]
    assert schema_properties["background"]["enum"] == ["auto", "opaque", None]
