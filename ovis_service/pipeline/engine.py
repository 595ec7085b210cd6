"""The diffusers engine: loads OvisImagePipeline and turns job parameters into a PIL image."""

import gc
from typing import Any

import structlog
import torch
from diffusers import OvisImagePipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ovis_service.config import Settings
from ovis_service.engine import EngineInfo, GenerationResult, StepHooks
from ovis_service.pipeline.device import describe_device, resolve_device, resolve_dtype
from ovis_service.pipeline.memory import activation_headroom, choose_offload
from ovis_service.pipeline.tiny import TINY_MODEL_ID, build_tiny_pipeline
from ovis_service.schemas import GenerationParams

logger = structlog.get_logger(__name__)

# diffusers and transformers print to stderr by default; send them through our JSON logs.
for _library_logging in (diffusers_logging, transformers_logging):
    _library_logging.disable_default_handler()
    _library_logging.enable_propagation()

MAX_SEQUENCE_LENGTH = 256  # the pipeline's hard limit on prompt tokens


class DiffusersEngine:
    """Construct it on any thread (it only checks the device); everything else runs on the
    inference thread."""

    def __init__(self, settings: Settings) -> None:
        self.model_id = settings.model
        self._settings = settings
        self._device = resolve_device(settings.device, settings.model)
        self._dtype = resolve_dtype(settings.dtype, self._device)
        self._pipe: OvisImagePipeline | None = None

    @property
    def pipeline(self) -> OvisImagePipeline | None:
        """The loaded pipeline, for inspection; only the inference thread may call it."""
        return self._pipe

    def load(self) -> EngineInfo:
        if self.model_id == TINY_MODEL_ID:
            pipe = build_tiny_pipeline()
            if self._dtype != torch.float32:
                pipe = pipe.to(dtype=self._dtype)
        else:
            # Loads to the CPU first: the memory mode decides how the weights reach the GPU.
            pipe = OvisImagePipeline.from_pretrained(self.model_id, dtype=self._dtype)
        pipe.set_progress_bar_config(disable=True)
        offload = self._place(pipe)
        self._pipe = pipe
        return EngineInfo(
            model=self.model_id,
            device=describe_device(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            offload=offload,
        )

    def _place(self, pipe: OvisImagePipeline) -> str:
        on_cuda = self._device.type == "cuda"
        sizes = [_component_bytes(component) for component in pipe.components.values()]
        free_bytes = torch.cuda.mem_get_info(self._device)[0] if on_cuda else 0
        offload = choose_offload(
            self._settings.offload,
            on_cuda=on_cuda,
            free_bytes=free_bytes,
            weights_bytes=sum(sizes),
            largest_component_bytes=max(sizes),
            headroom_bytes=activation_headroom(self._settings.max_image_size),
        )
        logger.info(
            "memory_mode_chosen",
            requested=self._settings.offload,
            chosen=offload,
            free_vram_gib=round(free_bytes / 2**30, 2),
            weights_gib=round(sum(sizes) / 2**30, 2),
        )
        if offload == "model":
            pipe.enable_model_cpu_offload(device=self._device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self._device)
        else:
            pipe.to(self._device)
        return offload

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        pipe = self._require_pipe()

        def on_step_end(
            _pipe: OvisImagePipeline, step: int, _timestep: Any, _tensors: dict[str, Any]
        ) -> dict[str, Any]:
            # Raising here ends the call at once; `pipe._interrupt` would still run the VAE.
            hooks.stop_check()
            hooks.on_progress(step + 1, params.num_inference_steps)
            return {}

        # A CPU generator makes a seed mean the same noise on every GPU model and driver.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with torch.inference_mode():
            output = pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.cfg_scale,
                height=params.height,
                width=params.width,
                generator=generator,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        return GenerationResult(
            image=output.images[0], prompt_truncated=self._is_truncated(pipe, params.prompt)
        )

    @staticmethod
    def _is_truncated(pipe: OvisImagePipeline, prompt: str) -> bool:
        """Tokenise the way the pipeline does and compare with its cut-off."""
        text = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": pipe.system_prompt + prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        token_count = len(pipe.tokenizer(text, add_special_tokens=False).input_ids)
        return bool(token_count > MAX_SEQUENCE_LENGTH + pipe.user_prompt_begin_id)

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError)

    def recover_from_oom(self) -> None:
        if self._pipe is not None:
            self._pipe.maybe_free_model_hooks()
        self._free_cache()

    def release(self) -> None:
        self._pipe = None
        self._free_cache()

    def _free_cache(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _require_pipe(self) -> OvisImagePipeline:
        if self._pipe is None:
            raise RuntimeError("generate() called before load()")
        return self._pipe


def _component_bytes(component: object) -> int:
    if not isinstance(component, torch.nn.Module):
        return 0  # tokenizer, scheduler
    return sum(p.numel() * p.element_size() for p in component.parameters())
