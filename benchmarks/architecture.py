"""Ovis-Image-7B's full-size architecture with random weights, built from the configs shipped in
`ovis_service/pipeline/configs/`: the real shapes, so the real speed, with no download.

Weights are created directly on the target device in the target dtype (initialising 9 B
parameters on a CPU takes minutes; on a GPU, seconds).
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    OvisImagePipeline,
    OvisImageTransformer2DModel,
)
from transformers import Qwen3Config, Qwen3Model

from ovis_service.pipeline.tiny import build_tokenizer


def load_config(name: str) -> dict[str, Any]:
    text = resources.files("ovis_service.pipeline").joinpath("configs", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@contextmanager
def _created_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_full_size_pipeline(device: torch.device, dtype: torch.dtype) -> OvisImagePipeline:
    torch.manual_seed(0)
    with _created_on(device, dtype):
        transformer = OvisImageTransformer2DModel(**load_config("transformer"))
        text_encoder = Qwen3Model(Qwen3Config(**load_config("text_encoder"), dtype=dtype))
        vae = AutoencoderKL(**load_config("vae"))
    # The tokenizer only has to produce ids; every prompt is padded to the same 256+28 tokens,
    # so the text encoder's cost is the real one.
    return OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**load_config("scheduler")),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        transformer=transformer,
    )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
