"""The diffusers engine: loads OvisImagePipeline and turns job parameters into a PIL image."""

import gc
import threading
import time

import structlog
import torch
from diffusers import OvisImagePipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ovis_service.config import Settings
from ovis_service.engine import EngineInfo, GenerationResult, StepHooks
from ovis_service.pipeline import levers as levers_module
from ovis_service.pipeline.device import describe_device, resolve_device, resolve_dtype
from ovis_service.pipeline.levers import Levers
from ovis_service.pipeline.loading import load_pretrained
from ovis_service.pipeline.loop import MAX_SEQUENCE_LENGTH
from ovis_service.pipeline.loop import generate as run_loop
from ovis_service.pipeline.prepare import prepare
from ovis_service.pipeline.tiny import TINY_MODEL_ID, build_tiny_pipeline
from ovis_service.schemas import DEFAULT_CFG_SCALE, GenerationParams

logger = structlog.get_logger(__name__)

# diffusers and transformers print to stderr by default; send them through our JSON logs.
for _library_logging in (diffusers_logging, transformers_logging):
    _library_logging.disable_default_handler()
    _library_logging.enable_propagation()

# Compile warm-up: with and without guidance, since batch 2 and batch 1 are separate graphs
# (torch specialises size-1 dimensions). One size serves all others (dynamic shapes), but not
# 256x256: its 256 image tokens equal the 256 text tokens, and torch would specialise the graph
# on that equality, so the next size would recompile.
_COMPILE_WARMUP_SIZE = (384, 256)
_COMPILE_WARMUP_GUIDANCE = (DEFAULT_CFG_SCALE, 1.0)
# torch.compile is not safe to run from two threads at once; a pool loads engines side by side.
_COMPILE_LOCK = threading.Lock()


class DiffusersEngine:
    """Construct it on any thread (it checks the device and the levers); everything else runs
    on the inference thread. `device` overrides `settings.device`, so that a pool can build one
    engine per GPU."""

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        self.model_id = settings.model
        self._settings = settings
        self._device = resolve_device(device or settings.device, settings.model)
        self._dtype = resolve_dtype(settings.dtype, self._device)
        self._levers = Levers.from_settings(settings)
        levers_module.check(self._levers, self._device, self._dtype)
        self._pipe: OvisImagePipeline | None = None
        self._graphs_after_warmup: int | None = None

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
            pipe = load_pretrained(self.model_id, self._dtype)
        pipe.set_progress_bar_config(disable=True)
        prepared = prepare(pipe, self._settings, self._device)
        self._levers = prepared.levers
        self._pipe = pipe
        if self._levers.compile != "none":
            with _COMPILE_LOCK:
                self._warm_up_compile()
        logger.info("levers_in_force", **self._levers.describe())
        return EngineInfo(
            model=self.model_id,
            device=describe_device(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            offload=prepared.placement.describe(),
            levers=self._levers.describe(),
        )

    def _warm_up_compile(self) -> None:
        started = time.perf_counter()
        width, height = _COMPILE_WARMUP_SIZE
        for guidance in _COMPILE_WARMUP_GUIDANCE:
            params = GenerationParams(
                prompt="warm-up",
                num_inference_steps=2,
                cfg_scale=guidance,
                width=width,
                height=height,
            )
            self.generate(params, StepHooks(stop_check=lambda: None))
        self._graphs_after_warmup = levers_module.compiled_graph_count()
        logger.info(
            "compile_warmup_done",
            seconds=round(time.perf_counter() - started, 3),
            graphs=self._graphs_after_warmup,
        )

    def generate(self, params: GenerationParams, hooks: StepHooks) -> GenerationResult:
        pipe = self._require_pipe()
        try:
            with torch.inference_mode():
                image = run_loop(pipe, params, hooks, cfg_batch=self._levers.cfg_batch)
        finally:
            # Offloads the last component and resets step-cache state, also after a cancel.
            pipe.maybe_free_model_hooks()
        self._note_recompiles(params)
        return GenerationResult(
            image=image, prompt_truncated=self._is_truncated(pipe, params.prompt)
        )

    def _note_recompiles(self, params: GenerationParams) -> None:
        """After warm-up, a new compiled graph means a request paid a compile: say which."""
        if self._graphs_after_warmup is None:
            return
        graphs = levers_module.compiled_graph_count()
        if graphs > self._graphs_after_warmup:
            logger.warning(
                "torch_recompiled",
                width=params.width,
                height=params.height,
                guided=params.cfg_scale > 1,
                graphs=graphs,
            )
            self._graphs_after_warmup = graphs

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
        if self._device.type == "cuda":
            # Each inference thread's cuBLAS handle keeps a workspace (32 MiB on Hopper) in the
            # caching allocator; measured on an H200, two threads left 66 MiB behind without this.
            torch._C._cuda_clearCublasWorkspaces()
        self._free_cache()

    def _free_cache(self) -> None:
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _require_pipe(self) -> OvisImagePipeline:
        if self._pipe is None:
            raise RuntimeError("generate() called before load()")
        return self._pipe
