"""The tiny OvisImagePipeline that every CPU test and `OVIS_MODEL=tiny` run: its tokenizer takes
any prompt and speaks the chat template the pipeline calls, and it is built the same way every
time, so a request seed gives the same image on every run."""

import pytest
import torch
from transformers import Qwen2TokenizerFast

from ovis_service.model_source import TINY_MODEL_ID
from ovis_service.pipeline import tiny
from ovis_service.pipeline.tiny import build_tiny_pipeline, build_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PROMPT = [{"role": "user", "content": "a fox in the snow"}]


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2TokenizerFast:
    return build_tokenizer()


def test_the_tiny_id_is_the_one_the_pipeline_builds() -> None:
    # model_source picks the tiny model without importing torch, so it keeps its own copy.
    assert TINY_MODEL_ID == tiny.TINY_MODEL_ID


@pytest.mark.parametrize(
    "text",
    [
        "a red fox in the snow",
        "zebra quartz vexing jumbled wyverns",  # words the tokenizer never saw
        "café, naïve, 東京の夜, 🦊🌨️",
        "tabs\tand\nnewlines  and double  spaces",
    ],
)
def test_the_tokenizer_takes_any_prompt_and_gives_it_back(
    tokenizer: Qwen2TokenizerFast, text: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens_and_end_and_pad_are_qwens(
    tokenizer: Qwen2TokenizerFast,
) -> None:
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(token)
        ], token
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_the_chat_template_closes_the_think_block_only_when_thinking_is_off(
    tokenizer: Qwen2TokenizerFast,
) -> None:
    # How the pipeline calls it: a generation prompt, thinking off.
    as_the_pipeline_asks = tokenizer.apply_chat_template(
        PROMPT, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert as_the_pipeline_asks.startswith("<|im_start|>user\na fox in the snow<|im_end|>")
    assert as_the_pipeline_asks.endswith("<|im_start|>assistant<think>\n\n</think>")
    thinking_left_on = tokenizer.apply_chat_template(
        PROMPT, tokenize=False, add_generation_prompt=True
    )
    assert thinking_left_on.endswith("<|im_start|>assistant")
    no_generation_prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False)
    assert no_generation_prompt.endswith("<|im_end|>")


def test_every_build_has_the_same_weights_whatever_ran_before() -> None:
    torch.manual_seed(1)
    first = build_tiny_pipeline()
    torch.manual_seed(2)
    torch.rand(1000)  # other work moved the global generator on
    second = build_tiny_pipeline()
    for name in ("transformer", "text_encoder", "vae"):
        ours = getattr(first, name).state_dict()
        theirs = getattr(second, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key, tensor in ours.items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key}"


def test_it_is_built_on_the_cpu_in_float32_with_the_real_models_8x_vae() -> None:
    pipe = build_tiny_pipeline()
    # 8x, as in Ovis-Image-7B: with less, a 1024x1024 request has 64x the latent tokens.
    assert pipe.vae_scale_factor == 8
    for name in ("transformer", "text_encoder", "vae"):
        parameters = list(getattr(pipe, name).parameters())
        assert {p.device.type for p in parameters} == {"cpu"}, name
        assert {p.dtype for p in parameters} == {torch.float32}, name
