"""Request and response bodies. The limits live in `Meta`, so the OpenAPI schema shows them."""

import difflib
import math
import re
from typing import Annotated, Any

import msgspec

MAX_SEED = 2**63 - 1  # what both torch generators and msgspec integer bounds accept
MIN_IMAGE_SIZE = 256
IMAGE_SIZE_STEP = 16
MAX_CFG_SCALE = 20.0
DEFAULT_STEPS = 50
DEFAULT_IMAGE_SIZE = 1024
DEFAULT_CFG_SCALE = 5.0
# One character that `str.strip()` keeps. The whitespace is spelled out because `\s` means less
# in a JSON Schema (ECMA) regex than in Python's: it lacks U+001C-U+001F and U+0085.
NOT_BLANK_PATTERN = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


MAX_WEBHOOK_URL_CHARS = 2048
WebhookUrl = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description="With `Prefer: respond-async`: an http(s) URL that gets the finished job "
        "POSTed to it, signed as Standard Webhooks says (see docs/jobs.md).",
    ),
]


class GenerateRequestBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Checks that `Meta` cannot express; the fields come from `generate_request_type`."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    cfg_scale: float
    image_size: int
    width: int | None
    height: int | None
    seed: int | None
    webhook: str | None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height); each side defaults to `image_size`, the square shorthand."""
        return (self.width or self.image_size, self.height or self.image_size)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("prompt must contain at least one non-whitespace character")
        if not math.isfinite(self.cfg_scale):
            raise ValueError("cfg_scale must be a finite number")


def generate_request_type(
    *, max_prompt_chars: int, max_steps: int, max_image_size: int
) -> type[GenerateRequestBase]:
    """Build the request struct with the configured limits baked into its schema."""
    prompt_text = Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=max_prompt_chars,
            description="What to draw. Must not be blank.",
            # Schema only (Litestar's `extra` key); __post_init__ gives the clearer message.
            extra_json_schema={"extra": {"pattern": NOT_BLANK_PATTERN}},
        ),
    ]
    negative_text = Annotated[
        str,
        msgspec.Meta(max_length=max_prompt_chars, description="What to steer away from."),
    ]
    fields: list[tuple[str, Any, Any]] = [
        ("prompt", prompt_text, msgspec.NODEFAULT),
        ("negative_prompt", negative_text, ""),
        (
            "num_inference_steps",
            Annotated[int, msgspec.Meta(ge=1, le=max_steps, description="Denoising steps.")],
            # A default above the configured limit would let an omitted field bypass it.
            min(DEFAULT_STEPS, max_steps),
        ),
        (
            "cfg_scale",
            Annotated[
                float,
                msgspec.Meta(
                    ge=0.0,
                    le=MAX_CFG_SCALE,
                    description="Classifier-free guidance scale; 1 or less turns guidance off "
                    "and halves the work per step.",
                ),
            ],
            DEFAULT_CFG_SCALE,
        ),
        (
            "image_size",
            Annotated[
                int,
                msgspec.Meta(
                    ge=MIN_IMAGE_SIZE,
                    le=max_image_size,
                    multiple_of=IMAGE_SIZE_STEP,
                    description="Width and height of the square image, in pixels.",
                ),
            ],
            min(DEFAULT_IMAGE_SIZE, max_image_size),
        ),
        ("width", _side(max_image_size, "Width in pixels; defaults to `image_size`.") | None, None),
        (
            "height",
            _side(max_image_size, "Height in pixels; defaults to `image_size`.") | None,
            None,
        ),
        (
            "seed",
            Annotated[
                int,
                msgspec.Meta(
                    ge=0,
                    le=MAX_SEED,
                    description="Noise seed. Omit it and the server picks one; "
                    "the X-Seed response header always says which.",
                    # Litestar drops a bound of 0 on an optional field (it tests truthiness).
                    extra_json_schema={"extra": {"minimum": 0}},
                ),
            ]
            | None,
            None,
        ),
        ("webhook", WebhookUrl | None, None),
    ]
    request_type: type[GenerateRequestBase] = msgspec.defstruct(  # type: ignore[assignment]
        "GenerateRequest",
        fields,
        bases=(GenerateRequestBase,),
        kw_only=True,
        forbid_unknown_fields=True,
    )
    return request_type


def _side(max_image_size: int, description: str) -> Any:
    return Annotated[
        int,
        msgspec.Meta(
            ge=MIN_IMAGE_SIZE,
            le=max_image_size,
            multiple_of=IMAGE_SIZE_STEP,
            description=description,
            # Litestar drops bounds on an optional field; keep them in the schema.
            extra_json_schema={
                "extra": {
                    "minimum": MIN_IMAGE_SIZE,
                    "maximum": max_image_size,
                    "multipleOf": IMAGE_SIZE_STEP,
                }
            },
        ),
    ]


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `?([^`]*)`?")


def hint_unknown_field(message: str) -> str:
    """`Object contains unknown field steps` gains `; did you mean num_inference_steps?`."""
    match = _UNKNOWN_FIELD.search(message)
    if match is None:
        return message
    name = match[1].lower()
    known = GenerateRequestBase.__struct_fields__
    close = [field for field in known if name and (name in field or field in name)]
    close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean {close[0]}?"
    return f"{message}; the fields are {', '.join(known)}"


def describe_validation_error(error: msgspec.ValidationError) -> str:
    """`Expected `int` >= 1 - at `$.num_inference_steps`` becomes
    `num_inference_steps: Expected int >= 1`: the field first, then the rule."""
    field, message = split_validation_error(error)
    return f"{field}: {message}" if field else hint_unknown_field(message)


def split_validation_error(error: msgspec.ValidationError) -> tuple[str | None, str]:
    """(the field at fault, msgspec's rule without its markup)."""
    message, _, path = str(error).partition(" - at `$.")
    message = message.replace("`", "")
    if not path:
        return None, message
    return path.rstrip("`"), message


def decode_generate_request(
    body: bytes, request_type: type[GenerateRequestBase]
) -> GenerateRequestBase:
    """Strict decoding: `"seed": "5"` is a wrong type, not a number to guess at."""
    return msgspec.json.decode(body, type=request_type)


class GenerationParams(msgspec.Struct, frozen=True, kw_only=True):
    """One validated job, with the seed already chosen; the defaults are the API's."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    width: int = DEFAULT_IMAGE_SIZE
    height: int = DEFAULT_IMAGE_SIZE
    seed: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


class DeviceHealth(msgspec.Struct, kw_only=True):
    """One inference thread: its device, its state, and the job it runs (`busy`)."""

    thread: int
    device: str
    state: str  # loading, ready, busy, draining, stopped, failed or dead
    request_id: str | None = None
    steps_done: int | None = None
    total_steps: int | None = None


class HealthResponse(msgspec.Struct, kw_only=True):
    status: str
    model_loaded: bool
    queue_depth: int
    queue_capacity: int
    running: int  # jobs running, over every device
    device: str | None
    model: str
    offload: str | None
    detail: str | None = None
    devices: list[DeviceHealth] = msgspec.field(default_factory=list)
    # The speed levers in force (compile, attention, step cache, fp8, guidance batching).
    levers: dict[str, str] = msgspec.field(default_factory=dict)


class ErrorResponse(msgspec.Struct, kw_only=True):
    detail: str
    request_id: str
