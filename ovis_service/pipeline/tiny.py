"""A tiny, randomly initialised but real OvisImagePipeline, built in memory.

It uses the same diffusers and transformers classes as Ovis-Image-7B, scaled down so that the
whole service runs on a laptop CPU in seconds and tests need no download. Every component is
built under a fixed seed, so the same request seed gives the same image on every run.
"""

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    OvisImagePipeline,
    OvisImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

TINY_MODEL_ID = "tiny"
_SEED = 0
_HIDDEN = 32

# Mirrors the Qwen3 template's two switches the pipeline passes: the generation prompt and
# `enable_thinking=False`, which appends an empty think block.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "<think>\n\n</think>\n\n"
    "{%- endif -%}{%- endif -%}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_TRAINING_TEXT = [
    "Describe the image by detailing the color, quantity, text, shape, size, texture, "
    "spatial relationships of the objects and background: ",
    "a red fox in the snow, a lighthouse at dusk, a bowl of ramen, an astronaut riding a horse",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "user assistant system",
]


def build_tokenizer() -> Qwen2TokenizerFast:
    """A byte-level BPE trained in memory: it can encode any text, like Qwen's."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_tiny_pipeline() -> OvisImagePipeline:
    """Build the pipeline on the CPU in float32."""
    tokenizer = build_tokenizer()
    torch.manual_seed(_SEED)
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(_SEED)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    )
    torch.manual_seed(_SEED)
    # Four blocks give the real VAE's 8x downsampling. With one block a 1024x1024 request becomes
    # 262,144 latent tokens and takes minutes on a CPU.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=4,
        # Self-attention over 128x128 latents would dominate a 1024x1024 run on a CPU.
        mid_block_add_attention=False,
        sample_size=32,
        scaling_factor=1.5035,
        shift_factor=0.0609,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return OvisImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
