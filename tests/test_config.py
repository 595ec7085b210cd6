import pytest

from ovis_service.config import (
    DEFAULT_MODEL,
    Settings,
    SettingsError,
    load_settings,
    parse_gpu_memory,
)


def test_defaults_match_the_documented_product() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.port == 4201
    assert settings.max_prompt_chars == 2000
    assert settings.max_steps == 100
    assert settings.max_image_size == 2048
    assert settings.api_keys == ()
    assert settings.log_prompts is False


def test_values_are_parsed_from_strings() -> None:
    settings = load_settings(
        {
            "OVIS_MODEL": "tiny",
            "OVIS_QUEUE_SIZE": "3",
            "OVIS_REQUEST_TIMEOUT": "12.5",
            "OVIS_LOG_PROMPTS": "true",
            "OVIS_LOG_LEVEL": "debug",
            "OVIS_DEVICE": "cuda:1",
            "OVIS_API_KEY": "first, second",
            "UNRELATED": "ignored",
        }
    )
    assert settings.model == "tiny"
    assert settings.queue_size == 3
    assert settings.request_timeout == 12.5
    assert settings.log_prompts is True
    assert settings.log_level == "DEBUG"
    assert settings.device == "cuda:1"
    assert settings.api_keys == ("first", "second")


def test_an_empty_variable_means_the_default() -> None:
    assert load_settings({"OVIS_QUEUE_SIZE": "", "OVIS_API_KEY": ""}) == Settings()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OVIS_QUEUE_SIZE": "0"}, "OVIS_QUEUE_SIZE: Expected `int` >= 1"),
        ({"OVIS_QUEUE_SIZE": "many"}, "OVIS_QUEUE_SIZE: Expected `int`, got 'many'"),
        ({"OVIS_PORT": "70000"}, "OVIS_PORT: Expected `int` <= 65535"),
        ({"OVIS_OFFLOAD": "gpu"}, "OVIS_OFFLOAD: Invalid enum value 'gpu'"),
        ({"OVIS_DEVICE": "tpu"}, "OVIS_DEVICE: Expected `str` matching regex"),
        ({"OVIS_MAX_IMAGE_SIZE": "1000"}, "OVIS_MAX_IMAGE_SIZE: Expected `int` that's a multiple"),
        ({"OVIS_DRAIN_TIMEOUT": "-1"}, "OVIS_DRAIN_TIMEOUT: Expected `float` >= 0"),
        ({"OVIS_QEUE_SIZE": "4"}, "OVIS_QEUE_SIZE is not a known setting"),
    ],
)
def test_a_bad_value_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(environ)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("environ", "hint"),
    [
        ({"OVIS_WARMUP": "maybe"}, "accepted (any case): true, false, 1, 0, yes, no, on, off"),
        ({"OVIS_LOG_LEVEL": "TRACE"}, "expected one of: DEBUG, INFO, WARNING, ERROR"),
        ({"OVIS_OFFLOAD": "gpu"}, "expected one of: auto, none, encoder, group, model, sequential"),
        ({"OVIS_DTYPE": "fp8"}, "expected one of: auto, bfloat16, float16, float32"),
        ({"OVIS_DEVICE": "tpu"}, "expected one of auto, cpu, cuda or cuda:N"),
        ({"OVIS_QEUE_SIZE": "4"}, "; did you mean OVIS_QUEUE_SIZE?"),
        ({"OVIS_LOGLEVEL": "INFO"}, "; did you mean OVIS_LOG_LEVEL?"),
    ],
)
def test_a_bad_value_says_what_is_accepted(environ: dict[str, str], hint: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(environ)
    assert str(error.value).endswith(hint)


def test_a_name_like_no_setting_lists_the_known_ones() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"OVIS_ZZZ": "1"})
    assert "known settings: OVIS_API_KEY," in str(error.value)
    assert "OVIS_QUEUE_SIZE" in str(error.value)


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("true", True), ("Yes", True), ("ON", True), ("1", True), ("off", False), ("0", False)],
)
def test_booleans_take_the_usual_spellings(spelling: str, value: bool) -> None:
    assert load_settings({"OVIS_WARMUP": spelling}).warmup is value


def test_an_error_names_the_file_the_value_came_from() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"OVIS_QUEUE_SIZE": "0"}, origins={"OVIS_QUEUE_SIZE": "/srv/ovis/.env"})
    assert str(error.value).startswith(
        "OVIS_QUEUE_SIZE (set in /srv/ovis/.env): Expected `int` >= 1"
    )
    with pytest.raises(SettingsError) as error:
        load_settings({"OVIS_QEUE_SIZE": "2"}, origins={"OVIS_QEUE_SIZE": "/srv/ovis/.env"})
    assert str(error.value).startswith("OVIS_QEUE_SIZE (set in /srv/ovis/.env) is not a known")


@pytest.mark.parametrize("raw", [",", " , ", ",,"])
def test_an_api_key_of_only_commas_is_refused_not_read_as_no_auth(raw: str) -> None:
    with pytest.raises(SettingsError, match="OVIS_API_KEY holds no key"):
        load_settings({"OVIS_API_KEY": raw})


def test_a_lower_case_name_in_the_env_file_is_refused_with_the_right_spelling() -> None:
    with pytest.raises(SettingsError, match="did you mean OVIS_QUEUE_SIZE"):
        load_settings({"ovis_queue_size": "3"}, origins={"ovis_queue_size": "/srv/app/.env"})


# -- memory and compile settings ----------------------------------------------------------------


def test_compile_is_auto_and_memory_planned_by_default() -> None:
    settings = load_settings({})
    assert (settings.compile, settings.offload, settings.gpu_memory) == ("auto", "auto", "")
    assert parse_gpu_memory(settings.gpu_memory) == (None, None)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("12GiB", (12 * 2**30, None)),
        ("12gib", (12 * 2**30, None)),
        ("12 GiB", (12 * 2**30, None)),
        ("12GB", (12 * 10**9, None)),
        ("12000MiB", (12000 * 2**20, None)),
        ("1500MB", (1500 * 10**6, None)),
        ("7.5GiB", (int(7.5 * 2**30), None)),
        ("0.5", (None, 0.5)),
        (".25", (None, 0.25)),
        ("1", (None, 1.0)),
    ],
)
def test_gpu_memory_takes_an_amount_or_a_fraction(
    raw: str, parsed: tuple[int | None, float | None]
) -> None:
    settings = load_settings({"OVIS_GPU_MEMORY": raw})
    assert parse_gpu_memory(settings.gpu_memory) == parsed


@pytest.mark.parametrize("raw", ["12", "0", "0GiB", "0.0", "1.5", "2", "12TB", "-1GiB", "half"])
def test_a_bad_gpu_memory_stops_startup_naming_the_setting_and_the_forms(raw: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"OVIS_GPU_MEMORY": raw})
    message = str(error.value)
    assert message.startswith("OVIS_GPU_MEMORY: ")
    assert f"got {raw!r}" in message
    assert message.endswith(
        "expected an amount such as 12GiB, 12GB or 12000MiB, or a fraction of each GPU such as "
        "0.5 (more than 0, at most 1)"
    )
    assert "\n" not in message


@pytest.mark.parametrize("value", ["auto", "none", "regional"])
def test_compile_takes_auto_none_or_regional(value: str) -> None:
    assert load_settings({"OVIS_COMPILE": value}).compile == value


@pytest.mark.parametrize("value", ["auto", "none", "encoder", "group", "model", "sequential"])
def test_offload_takes_each_plan(value: str) -> None:
    assert load_settings({"OVIS_OFFLOAD": value}).offload == value
