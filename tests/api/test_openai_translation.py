"""The OpenAI request turned into jobs, without HTTP: sizes, seeds, formats, previews, and the
fields the service refuses, each naming itself."""

import msgspec
import pytest

from ovis_service.api.openai_schemas import ImagesRequestBase, images_request_type
from ovis_service.api.openai_translation import preview_steps, translate
from ovis_service.config import Settings
from ovis_service.errors import BadRequestError
from ovis_service.schemas import DEFAULT_CFG_SCALE, MAX_SEED

SETTINGS = Settings(model="fake", warmup=False, max_image_size=1024, max_steps=50)
REQUEST_TYPE = images_request_type(
    max_prompt_chars=1000, max_steps=50, max_images=4, max_image_size=1024
)


def body(**fields: object) -> ImagesRequestBase:
    return msgspec.convert({"prompt": "a lighthouse", **fields}, REQUEST_TYPE)


def test_defaults_are_the_native_apis() -> None:
    plan = translate(body(), SETTINGS, draw=lambda: 42)
    [params] = plan.params
    assert (params.width, params.height, params.num_inference_steps) == (1024, 1024, 50)
    assert params.cfg_scale == DEFAULT_CFG_SCALE
    assert params.negative_prompt == ""
    assert params.seed == 42
    assert (plan.image_format, plan.encode_quality, plan.stream) == ("png", None, False)
    assert plan.echo == {
        "output_format": "png",
        "size": "1024x1024",
        "quality": "auto",
        "background": "opaque",
    }


def test_extensions_and_size_reach_every_job() -> None:
    plan = translate(
        body(
            n=3,
            size="512x256",
            seed=7,
            negative_prompt="fog",
            num_inference_steps=8,
            guidance_scale=1.0,
            output_format="webp",
            output_compression=30,
        ),
        SETTINGS,
    )
    assert [p.seed for p in plan.params] == [7, 8, 9]
    assert {(p.width, p.height, p.num_inference_steps, p.cfg_scale) for p in plan.params} == {
        (512, 256, 8, 1.0)
    }
    assert {p.negative_prompt for p in plan.params} == {"fog"}
    assert (plan.image_format, plan.encode_quality) == ("webp", 30)
    assert plan.echo["size"] == "512x256"


def test_seeds_wrap_past_the_largest_so_every_valid_seed_works_with_every_n() -> None:
    plan = translate(body(n=3, seed=MAX_SEED - 1), SETTINGS)
    assert [p.seed for p in plan.params] == [MAX_SEED - 1, MAX_SEED, 0]


def test_without_a_seed_each_image_draws_its_own() -> None:
    drawn = iter([5, 900])
    plan = translate(body(n=2), SETTINGS, draw=lambda: next(drawn))
    assert [p.seed for p in plan.params] == [5, 900]


def test_partial_images_spread_over_the_run_only_when_streaming() -> None:
    assert translate(body(partial_images=2, num_inference_steps=9), SETTINGS).preview_steps == (
        frozenset()
    )
    streamed = translate(body(stream=True, partial_images=2, num_inference_steps=9), SETTINGS)
    assert streamed.preview_steps == frozenset({3, 6})
    assert preview_steps(3, 2) == frozenset({1})  # never the last step, which is the image


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "url", "stream": True}, "response_format"),
        ({"background": "transparent"}, "background"),
        ({"prompt": "   "}, "prompt"),
        ({"size": "100x100"}, "size"),
        ({"size": "2048x2048"}, "size"),
        ({"output_format": "gif"}, "output_format"),
    ],
)
def test_what_is_not_served_is_refused_naming_the_field(
    fields: dict[str, object], param: str
) -> None:
    with pytest.raises(BadRequestError) as refused:
        translate(body(**fields), SETTINGS)
    assert refused.value.param == param
    assert refused.value.status_code == 422  # the handler answers 400 under /v1
