"""Typed settings, read once from `OVIS_*` environment variables.

msgspec does the parsing and the range checks, so a bad value stops startup with a message that
names the variable and the rule it broke.
"""

import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

ENV_PREFIX = "OVIS_"
DEFAULT_MODEL = "AIDC-AI/Ovis-Image-7B"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
DEVICES_PATTERN = r"^(auto|(cpu|cuda(:\d+)?)(,(cpu|cuda(:\d+)?))*)$"


class SettingsError(ValueError):
    """A setting has a value the service cannot start with."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the service; the field `queue_size` is read from `OVIS_QUEUE_SIZE`."""

    model: Annotated[str, msgspec.Meta(min_length=1)] = DEFAULT_MODEL
    # OVIS_DEVICE names one device; OVIS_DEVICES a comma list (repeats allowed) or `auto`.
    device: Annotated[str, msgspec.Meta(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    devices: Annotated[str, msgspec.Meta(pattern=DEVICES_PATTERN)] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    offload: Literal["auto", "none", "model", "sequential"] = "auto"
    warmup: bool = True

    # Speed levers (ovis_service/pipeline/levers.py; measured in docs/performance.md).
    cfg_batch: bool = True
    compile: Literal["none", "regional"] = "none"
    compile_cache_dir: str = ""
    attention: Literal[
        "auto",
        "native",
        "cudnn",
        "efficient",
        "torch_flash",
        "math",
        "flex",
        "flash",
        "flash_3",
        "sage",
        "xformers",
    ] = "auto"
    step_cache: Literal["none", "taylorseer", "first_block"] = "none"
    step_cache_threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    quantize: Literal["none", "fp8"] = "none"

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 4201
    workers: PositiveInt = 1  # inference threads (pipelines) per listed device

    queue_size: PositiveInt = 8
    request_timeout: PositiveSeconds = 600.0
    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0

    max_prompt_chars: PositiveInt = 2000
    max_steps: PositiveInt = 100
    max_image_size: Annotated[int, msgspec.Meta(ge=256, multiple_of=16)] = 2048
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 65536
    max_images_per_request: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    jpeg_quality: Annotated[int, msgspec.Meta(ge=1, le=100)] = 90
    webp_quality: Annotated[int, msgspec.Meta(ge=1, le=100)] = 90

    api_keys: tuple[str, ...] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = False
    metrics_public: bool = False  # /metrics without an API key, for a scraper on a private network


# Settings that are not a plain field of the same name.
_ALIASES = {"API_KEY": "api_keys", "API_KEYS": "api_keys"}
_FIELDS = set(Settings.__struct_fields__)


def env_name(field: str) -> str:
    """The variable that sets `field`, e.g. `queue_size` -> `OVIS_QUEUE_SIZE`."""
    if field == "api_keys":
        return "OVIS_API_KEY"
    return ENV_PREFIX + field.upper()


def _normalise(name: str, raw: str) -> str | list[str]:
    if name == "api_keys":
        # Several comma-separated keys let an operator rotate them without downtime.
        return [key.strip() for key in raw.split(",") if key.strip()]
    if name == "devices":
        return ",".join(part.strip() for part in raw.split(","))
    if name in {"log_level"}:
        return raw.strip().upper()
    return raw.strip()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment; unknown `OVIS_*` names are refused, not ignored."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        suffix = key[len(ENV_PREFIX) :]
        name = _ALIASES.get(suffix, suffix.lower())
        if name not in _FIELDS:
            raise SettingsError(f"{key} is not a known setting")
        if raw.strip() == "":
            continue  # An empty variable means "use the default", as in most .env files.
        values[name] = _normalise(name, raw)
    try:
        # strict=False lets msgspec turn "8" into 8 and "true" into True.
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(str(exc))) from None


def _explain(message: str) -> str:
    """Replace msgspec's `$.queue_size` path with the variable the operator actually set."""
    text, _, path = message.rpartition(" - at `$.")
    if not path:
        return message
    field = path.rstrip("`").split("[")[0]
    return f"{env_name(field)}: {text}"
