"""Validation rules of the request body, checked by msgspec against the configured limits."""

import msgspec
import pytest

from ovis_service.schemas import (
    MAX_SEED,
    GenerateRequestBase,
    generate_request_type,
    hint_unknown_field,
)

RequestType = generate_request_type(max_prompt_chars=20, max_steps=100, max_image_size=2048)


def decode(body: str) -> GenerateRequestBase:
    return msgspec.json.decode(body.encode(), type=RequestType)


def test_defaults() -> None:
    request = decode('{"prompt": "a fox"}')
    assert request.negative_prompt == ""
    assert request.num_inference_steps == 50
    assert request.cfg_scale == 5.0
    assert request.image_size == 1024
    assert request.seed is None


def test_the_largest_seed_is_accepted() -> None:
    assert decode(f'{{"prompt": "a", "seed": {MAX_SEED}}}').seed == MAX_SEED


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"prompt": "   "}', "prompt must contain at least one non-whitespace character"),
        ('{"prompt": ""}', "Expected `str` of length >= 1 - at `$.prompt`"),
        ('{"prompt": "' + "x" * 21 + '"}', "Expected `str` of length <= 20 - at `$.prompt`"),
        ('{"prompt": "a", "negative_prompt": "' + "x" * 21 + '"}', "`$.negative_prompt`"),
        ('{"prompt": "a", "num_inference_steps": 0}', "Expected `int` >= 1"),
        ('{"prompt": "a", "num_inference_steps": 101}', "Expected `int` <= 100"),
        ('{"prompt": "a", "cfg_scale": -0.1}', "Expected `float` >= 0.0"),
        ('{"prompt": "a", "cfg_scale": 20.5}', "Expected `float` <= 20.0"),
        ('{"prompt": "a", "cfg_scale": 1e999}', "`$.cfg_scale`"),
        ('{"prompt": "a", "image_size": 250}', "Expected `int` >= 256"),
        ('{"prompt": "a", "image_size": 1000}', "multiple of 16 - at `$.image_size`"),
        ('{"prompt": "a", "image_size": 2064}', "Expected `int` <= 2048"),
        ('{"prompt": "a", "seed": -1}', "Expected `int` >= 0 - at `$.seed`"),
        (f'{{"prompt": "a", "seed": {MAX_SEED + 1}}}', "`$.seed`"),
        ('{"prompt": "a", "steps": 4}', "Object contains unknown field `steps`"),
        ('{"prompt": 4}', "Expected `str`, got `int` - at `$.prompt`"),
        ('{"prompt": "a", "image_size": 512.0}', "Expected `int`, got `float`"),
        ("{}", "Object missing required field `prompt`"),
    ],
)
def test_each_rule_names_its_field(body: str, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as error:
        decode(body)
    assert message in str(error.value)


def test_not_a_number_is_not_json() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode('{"prompt": "a", "cfg_scale": NaN}')


def test_limits_appear_in_the_json_schema() -> None:
    schema = msgspec.json.schema(RequestType)
    properties = schema["$defs"]["GenerateRequest"]["properties"]
    assert properties["prompt"]["maxLength"] == 20
    assert properties["num_inference_steps"]["maximum"] == 100
    assert properties["image_size"]["multipleOf"] == 16
    assert properties["image_size"]["maximum"] == 2048
    assert properties["cfg_scale"]["maximum"] == 20.0


@pytest.mark.parametrize(
    ("message", "hinted"),
    [
        ("Object contains unknown field steps", "; did you mean num_inference_steps?"),
        ("Object contains unknown field `size`", "; did you mean image_size?"),
        ("Object contains unknown field seeed", "; did you mean seed?"),
        ("Object contains unknown field zzz", "; the fields are prompt, negative_prompt, "),
    ],
)
def test_an_unknown_field_gets_the_closest_known_one(message: str, hinted: str) -> None:
    assert hinted in hint_unknown_field(message)
