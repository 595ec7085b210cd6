"""Typed settings, read once from `OVIS_*` environment variables.

msgspec does the parsing and the range checks, so a bad value stops startup with a message that
names the variable and the rule it broke.
"""

import difflib
import os
import typing
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

ENV_PREFIX = "OVIS_"
DEFAULT_MODEL = "AIDC-AI/Ovis-Image-7B"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
DEVICES_PATTERN = r"^(auto|(cpu|cuda(:\d+)?)(,(cpu|cuda(:\d+)?))*)$"
# An amount with a unit (1024-based GiB/MiB, 1000-based GB/MB, any case) or a fraction in (0, 1];
# the lookahead refuses zero.
GPU_MEMORY_PATTERN = r"^((?=[^1-9]*[1-9])(?i:\d+(\.\d+)? ?(gib|gb|mib|mb)|0?\.\d+|1(\.0+)?))?$"
DATABASE_URL_PATTERN = r"^((postgres|postgresql)(\+psycopg)?://\S+)?$"
# Settings whose values are never repeated in an error message.
SECRET_FIELDS = frozenset({"api_keys", "webhook_secret", "database_url"})


class SettingsError(ValueError):
    """A setting has a value the service cannot start with."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the service; the field `queue_size` is read from `OVIS_QUEUE_SIZE`."""

    model: Annotated[str, msgspec.Meta(min_length=1)] = DEFAULT_MODEL
    # OVIS_DEVICE names one device; OVIS_DEVICES a comma list (repeats allowed) or `auto`.
    device: Annotated[str, msgspec.Meta(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    devices: Annotated[str, msgspec.Meta(pattern=DEVICES_PATTERN)] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Memory plans, fastest first (ovis_service/pipeline/memory.py); `auto` picks the fastest that
    # fits `gpu_memory`.
    offload: Literal["auto", "none", "encoder", "group", "model", "sequential"] = "auto"
    # The most each GPU may use: `12GiB`, `12GB`, `12000MiB` or a fraction such as `0.5`; empty
    # means what is free at startup.
    gpu_memory: Annotated[str, msgspec.Meta(pattern=GPU_MEMORY_PATTERN)] = ""
    warmup: bool = True

    # Speed levers (ovis_service/pipeline/levers.py; measured in docs/performance.md).
    cfg_batch: bool = True
    # `auto`: regional on CUDA when the transformer stays on the GPU, else none.
    compile: Literal["auto", "none", "regional"] = "auto"
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

    # Jobs that outlive their connection (docs/jobs.md).
    data_dir: Annotated[str, msgspec.Meta(min_length=1)] = "data"  # SQLite store and its lock
    # PostgreSQL shared by replicas; empty means SQLite in `data_dir`.
    database_url: Annotated[str, msgspec.Meta(pattern=DATABASE_URL_PATTERN)] = ""
    public_url: Annotated[str, msgspec.Meta(pattern=r"^(https?://[^\s/?#]+(/[^\s?#]*)?)?$")] = ""
    job_ttl: PositiveInt = 86400  # seconds a finished job and its images are kept
    max_pending_jobs: PositiveInt = 1000
    # Seconds a replica sharing PostgreSQL may go without renewing its claim on a running job
    # (it does every 2 s) before another replica runs the job again.
    job_lease: Annotated[int, msgspec.Meta(ge=6)] = 30
    webhook_secret: Annotated[str, msgspec.Meta(pattern=r"^(whsec_[A-Za-z0-9+/=]{16,})?$")] = ""
    webhook_allowed_hosts: tuple[str, ...] = ()  # host or host:port that may be private

    def quality_for(self, image_format: str) -> int:
        """The quality an image format is written with when a request names none (PNG has
        none, so it takes the JPEG figure, which its encoder ignores)."""
        return self.webp_quality if image_format == "webp" else self.jpeg_quality


# Settings that are not a plain field of the same name.
_ALIASES = {"API_KEY": "api_keys", "API_KEYS": "api_keys"}
_FIELDS = set(Settings.__struct_fields__)
# What a boolean setting accepts, in any case; compose files and shells spell them all.
_BOOL_SPELLINGS = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
    "on": True,
    "off": False,
}
# The rule behind each regex, in words an operator can act on.
_PATTERN_HINTS = {
    "device": "one of auto, cpu, cuda or cuda:N",
    "devices": "auto, or a comma list of cpu, cuda and cuda:N (e.g. cuda:0,cuda:1)",
    "gpu_memory": "an amount such as 12GiB, 12GB or 12000MiB, or a fraction of each GPU such "
    "as 0.5 (more than 0, at most 1)",
    "database_url": "a PostgreSQL URL such as postgresql://user:password@host:5432/ovis",
    "public_url": "the service's address as clients reach it, e.g. https://images.example.com",
    "webhook_secret": "whsec_ followed by the base64 of at least 12 random bytes",
}


_MEMORY_UNITS = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6}


def parse_gpu_memory(text: str) -> tuple[int | None, float | None]:
    """`OVIS_GPU_MEMORY` as (bytes, fraction), one of them set; (None, None) when empty. The
    text has already passed `GPU_MEMORY_PATTERN`."""
    text = text.strip().lower()
    if not text:
        return None, None
    for unit, size in _MEMORY_UNITS.items():
        if text.endswith(unit):
            return int(float(text.removesuffix(unit).strip()) * size), None
    return None, float(text)


def env_name(field: str) -> str:
    """The variable that sets `field`, e.g. `queue_size` -> `OVIS_QUEUE_SIZE`."""
    if field == "api_keys":
        return "OVIS_API_KEY"
    return ENV_PREFIX + field.upper()


def _normalise(name: str, raw: str) -> str | bool | list[str]:
    if name in _BOOL_FIELDS:
        # Unknown spellings stay strings, so msgspec refuses them and _explain lists these.
        return _BOOL_SPELLINGS.get(raw.strip().lower(), raw.strip())
    if name == "api_keys":
        # Several comma-separated keys let an operator rotate them without downtime.
        return [key.strip() for key in raw.split(",") if key.strip()]
    if name == "devices":
        return ",".join(part.strip() for part in raw.split(","))
    if name == "webhook_allowed_hosts":
        return [host.strip().lower() for host in raw.split(",") if host.strip()]
    if name in {"log_level"}:
        return raw.strip().upper()
    return raw.strip()


def load_settings(
    environ: Mapping[str, str] | None = None, *, origins: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from the environment; unknown `OVIS_*` names are refused, not ignored.

    `origins` maps a variable to the file its value came from (`.env`), for the error message.
    """
    environ = os.environ if environ is None else environ
    origins = origins or {}
    values: dict[str, object] = {}
    names: dict[str, str] = {}  # field -> the variable that set it
    raw_values: dict[str, str] = {}  # field -> the text it was given, for the error message
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            if key.upper().startswith(ENV_PREFIX) and key in origins:
                # Names are case-sensitive; in a .env file a lower-case one is a slip, not
                # another program's variable.
                raise SettingsError(
                    f"{_where(key, origins)} is not a known setting{_suggest(key.upper())}"
                )
            continue
        suffix = key[len(ENV_PREFIX) :]
        name = _ALIASES.get(suffix, suffix.lower())
        if name not in _FIELDS:
            raise SettingsError(f"{_where(key, origins)} is not a known setting{_suggest(key)}")
        if raw.strip() == "":
            continue  # An empty variable means "use the default", as in most .env files.
        values[name] = _normalise(name, raw)
        names[name] = key
        raw_values[name] = raw.strip()
        if name == "api_keys" and not values[name]:
            # "," or " , " would otherwise turn authentication off without a word.
            raise SettingsError(
                f"{_where(key, origins)} holds no key (only commas and spaces); leave it empty "
                "to run without authentication"
            )
    try:
        # strict=False lets msgspec turn "8" into 8.
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(str(exc), names, origins, raw_values)) from None


def _where(key: str, origins: Mapping[str, str]) -> str:
    origin = origins.get(key)
    return f"{key} (set in {origin})" if origin else key


def _suggest(key: str) -> str:
    known = sorted({env_name(field) for field in _FIELDS} | {ENV_PREFIX + a for a in _ALIASES})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; known settings: {', '.join(known)}"


def _explain(
    message: str,
    names: Mapping[str, str],
    origins: Mapping[str, str],
    raw_values: Mapping[str, str] | None = None,
) -> str:
    """Replace msgspec's `$.queue_size` path with the variable the operator actually set, show
    the value it was given, and add what the setting accepts where msgspec's rule alone does
    not say."""
    text, _, path = message.rpartition(" - at `$.")
    if not path:
        return message
    field = path.rstrip("`").split("[")[0]
    raw = (raw_values or {}).get(field)
    if raw is not None and field not in SECRET_FIELDS and repr(raw) not in text:
        # Every variable is text, so msgspec's "got `str`" says nothing: show the text instead.
        text = text.removesuffix(", got `str`") + f", got {raw!r}"
    return f"{_where(names.get(field, env_name(field)), origins)}: {text}{_accepted(field)}"


def _accepted(field: str) -> str:
    if field in _BOOL_FIELDS:
        return "; accepted (any case): " + ", ".join(_BOOL_SPELLINGS)
    if field in _ENUM_VALUES:
        return "; expected one of: " + ", ".join(_ENUM_VALUES[field])
    if field in _PATTERN_HINTS:
        return "; expected " + _PATTERN_HINTS[field]
    return ""


def _field_kinds() -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
    """The boolean fields and the allowed values of each enum field, read off `Settings`."""
    booleans: set[str] = set()
    enums: dict[str, tuple[str, ...]] = {}
    for name, hint in typing.get_type_hints(Settings).items():
        if hint is bool:
            booleans.add(name)
        elif typing.get_origin(hint) is Literal:
            enums[name] = tuple(str(value) for value in typing.get_args(hint))
    return frozenset(booleans), enums


_BOOL_FIELDS, _ENUM_VALUES = _field_kinds()
