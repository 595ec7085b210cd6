"""Speed levers, each a setting applied once at load time: attention backend, fp8, step cache,
regional compile. `check` refuses at startup what cannot run here; `apply` changes the modules.

Guidance batching (`cfg_batch`) is not applied to a module: the denoising loop reads it.
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
from diffusers import (
    FirstBlockCacheConfig,
    OvisImagePipeline,
    OvisImageTransformer2DModel,
    TaylorSeerCacheConfig,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)
from diffusers.models.transformers.transformer_ovis_image import (
    OvisImageSingleTransformerBlock,
    OvisImageTransformerBlock,
)

from ovis_service.config import Settings, SettingsError
from ovis_service.pipeline.memory import Plan
from ovis_service.pipeline.offload import is_streamed

# Our names for diffusers' backends; `auto` keeps diffusers' default (PyTorch SDPA, which picks
# flash, cuDNN or memory-efficient kernels by itself). Hub backends download kernels at run
# time, which a self-hosted service must not do, so they are not offered.
ATTENTION_BACKENDS: dict[str, str | None] = {
    "auto": None,
    "native": AttentionBackendName.NATIVE.value,
    "cudnn": AttentionBackendName._NATIVE_CUDNN.value,
    "efficient": AttentionBackendName._NATIVE_EFFICIENT.value,
    "torch_flash": AttentionBackendName._NATIVE_FLASH.value,
    "math": AttentionBackendName._NATIVE_MATH.value,
    "flex": AttentionBackendName.FLEX.value,
    "flash": AttentionBackendName.FLASH.value,
    "flash_3": AttentionBackendName._FLASH_3.value,
    "sage": AttentionBackendName.SAGE.value,
    "xformers": AttentionBackendName.XFORMERS.value,
}
FP8_MIN_CAPABILITY = (8, 9)  # float8 matrix units: Ada and Hopper onwards


@dataclass(frozen=True)
class Levers:
    cfg_batch: bool = True
    compile: str = "none"
    compile_cache_dir: str = ""
    attention: str = "auto"
    step_cache: str = "none"
    step_cache_threshold: float = 0.05
    quantize: str = "none"

    @classmethod
    def from_settings(cls, settings: Settings) -> "Levers":
        return cls(
            cfg_batch=settings.cfg_batch,
            compile=settings.compile,
            compile_cache_dir=settings.compile_cache_dir,
            attention=settings.attention,
            step_cache=settings.step_cache,
            step_cache_threshold=settings.step_cache_threshold,
            quantize=settings.quantize,
        )

    def describe(self) -> dict[str, str]:
        """The levers in force, for logs, /health and image metadata."""
        cache = self.step_cache
        if cache == "first_block":
            cache = f"first_block(threshold={self.step_cache_threshold:g})"
        return {
            "cfg_batch": "true" if self.cfg_batch else "false",
            "compile": self.compile,
            "attention": self.attention,
            "step_cache": cache,
            "quantize": self.quantize,
        }


def check(levers: Levers, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with a message naming the setting, a lever that cannot run on this machine."""
    if levers.quantize == "fp8":
        _check_fp8(device)
    if levers.compile == "regional" and levers.step_cache == "first_block":
        # The cache decides per step, from a tensor value, whether to run the remaining blocks:
        # a data-dependent branch that a full-graph compile of those blocks cannot hold.
        raise SettingsError(
            "OVIS_STEP_CACHE=first_block cannot be combined with OVIS_COMPILE=regional; "
            "use OVIS_STEP_CACHE=taylorseer or OVIS_COMPILE=none"
        )
    backend = ATTENTION_BACKENDS[levers.attention]
    if backend is not None:
        _check_attention(levers.attention, AttentionBackendName(backend), device, dtype)


def resolve_compile(
    levers: Levers, device: torch.device, plan: Plan, blocks: int
) -> tuple[str, str]:
    """`OVIS_COMPILE` once the memory plan is known: (none or regional, why). `auto` compiles
    where it was measured to pay and the transformer stays on the GPU; an explicit `regional`
    that cannot work with the plan stops startup. `blocks` counts the transformer's blocks."""
    if levers.compile == "none":
        return "none", "OVIS_COMPILE=none"
    if levers.compile == "regional":
        _check_regional(plan)
        return "regional", "OVIS_COMPILE=regional"
    refusal = _auto_refusal(levers, device, plan)
    if refusal:
        return "none", f"auto: {refusal}"
    if plan.offload == "group":
        return "regional", f"auto: the {plan.resident_blocks}/{blocks} resident blocks"
    return "regional", f"auto: CUDA, transformer resident (OVIS_OFFLOAD={plan.offload})"


def _check_regional(plan: Plan) -> None:
    if plan.offload == "sequential":
        # Its hooks move each layer's weights inside the blocks, which a full-graph compile of
        # those blocks cannot trace.
        raise SettingsError(
            "OVIS_COMPILE=regional cannot be combined with OVIS_OFFLOAD=sequential (its hooks "
            "run inside the compiled blocks); set OVIS_COMPILE=none or OVIS_COMPILE=auto, or "
            "raise OVIS_GPU_MEMORY so that another plan fits"
        )
    if plan.offload == "group" and plan.resident_blocks == 0:
        raise SettingsError(
            "OVIS_COMPILE=regional with OVIS_OFFLOAD=group compiles the transformer blocks that "
            "stay on the GPU, and this budget keeps none there; set OVIS_COMPILE=auto or none, "
            "or raise OVIS_GPU_MEMORY"
        )


def _auto_refusal(levers: Levers, device: torch.device, plan: Plan) -> str:
    """Why `auto` leaves compile off here, or "" when it compiles."""
    if device.type != "cuda":
        return "no GPU (on the CPU a compile costs more start-up than it saves)"
    if levers.step_cache == "first_block":
        return "OVIS_STEP_CACHE=first_block cannot run compiled"
    if plan.offload in ("model", "sequential"):
        return f"untested with OVIS_OFFLOAD={plan.offload}, whose hooks move the transformer"
    if plan.offload == "group" and plan.resident_blocks == 0:
        return "every transformer block streams, none stays on the GPU to compile"
    return ""


def _check_fp8(device: torch.device) -> None:
    wanted = "OVIS_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer"
    if device.type != "cuda":
        raise SettingsError(f"{wanted}; this service runs on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        found = ".".join(map(str, capability))
        raise SettingsError(f"{wanted}; {torch.cuda.get_device_name(device)} is {found}")
    if importlib.util.find_spec("torchao") is None:
        raise SettingsError(
            "OVIS_QUANTIZE=fp8 needs torchao: install the extra (uv sync --extra fp8)"
        )


def _check_attention(
    name: str, backend: AttentionBackendName, device: torch.device, dtype: torch.dtype
) -> None:
    """Run one small attention call with the backend, so that a missing package or a kernel
    this device or dtype lacks stops startup rather than the first request."""
    try:
        _check_attention_backend_requirements(backend)
        # diffusers' layout: (batch, tokens, heads, head_dim).
        query = torch.randn(1, 16, 2, 64, device=device, dtype=dtype)
        dispatch_attention_fn(query, query, query, backend=backend)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SettingsError(
            f"OVIS_ATTENTION={name} cannot run on {device.type} in {dtype}: {reason}"
        ) from None


def register_ovis_blocks() -> None:
    """Tell diffusers' block registry where Ovis blocks keep their outputs, which the
    first-block cache needs: both return `(encoder_hidden_states, hidden_states)`."""
    metadata = {"return_hidden_states_index": 1, "return_encoder_hidden_states_index": 0}
    for block in (OvisImageTransformerBlock, OvisImageSingleTransformerBlock):
        TransformerBlockRegistry.register(
            model_class=block, metadata=TransformerBlockMetadata(**metadata)
        )


def apply(pipe: OvisImagePipeline, levers: Levers) -> None:
    """Change the transformer in place. Order matters: quantise the weights before compiling,
    and install the cache hooks before compile traces the blocks."""
    transformer: OvisImageTransformer2DModel = pipe.transformer
    if levers.quantize == "fp8":
        quantize_fp8(transformer)
    backend = ATTENTION_BACKENDS[levers.attention]
    if backend is not None:
        transformer.set_attention_backend(backend)
    if levers.step_cache == "taylorseer":
        transformer.enable_cache(TaylorSeerCacheConfig(taylor_factors_dtype=transformer.dtype))
    elif levers.step_cache == "first_block":
        register_ovis_blocks()
        transformer.enable_cache(FirstBlockCacheConfig(threshold=levers.step_cache_threshold))
    if levers.compile == "regional":
        if levers.compile_cache_dir:
            # inductor reads this when it first writes a kernel, so setting it here is in time.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = levers.compile_cache_dir
        compile_blocks(transformer)


def compile_blocks(
    transformer: OvisImageTransformer2DModel, *, dynamic: bool = True, mode: str | None = None
) -> int:
    """Regional compile: each repeated block on its own, except blocks streamed by a memory
    plan (their hooks move weights, which a full-graph compile cannot hold). Returns how many
    blocks were compiled. The service compiles with dynamic shapes, so that one graph serves
    every image size; the speed benchmark also times static shapes and CUDA graphs (`mode`)."""
    repeated = set(transformer._repeated_blocks)
    blocks = [m for m in transformer.modules() if m.__class__.__name__ in repeated]
    kept = [block for block in blocks if not is_streamed(block)]
    for block in kept:
        block.compile(fullgraph=True, dynamic=dynamic, mode=mode)
    return len(kept)


def quantize_fp8(transformer: OvisImageTransformer2DModel) -> None:
    # Imported here: torchao is an optional extra, and importing it has side effects.
    from torchao.quantization import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def compiled_graph_count() -> int:
    """How many distinct graphs dynamo has compiled in this process; a rise after warm-up means
    a request triggered a recompile."""
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"])
