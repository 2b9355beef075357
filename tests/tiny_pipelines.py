"""Tiny, random-weight Hugging Face diffusers pipelines that build fully offline, for tests.

Each builder returns a real diffusers pipeline class (Stable Diffusion 1.5, SDXL, SD3, PixArt-Alpha) wired
from miniature modules: a few channels, one or two layers, and tokenizers made in code (a byte-level CLIP
BPE with no merges, a character-level T5 Unigram), so nothing is downloaded or read from disk. The weights
are random and the images are noise: the pipelines exist to exercise plumbing (classifier-free guidance
batching, callbacks, schedulers, save/reload) in tens of milliseconds.

SD, SDXL and SD3 sample an 8x8 latent that decodes to 16x16 pixels. PixArt-Alpha samples a 32x32 latent
(256x256 pixels), the smallest size its default ``use_resolution_binning=True`` accepts.

Every module is built right after ``torch.manual_seed(0)`` inside ``torch.random.fork_rng``, so two builds
give identical weights and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5Tokenizer,
)

TEXT_MAX_LENGTH = 77  # CLIP context length; tokenizer padding and text-encoder positions agree on it
CLIP_HIDDEN = 32
PIXART_T5_MAX_LENGTH = 120  # PixArt-Alpha pads T5 prompts to 120 tokens
SD3_T5_MAX_LENGTH = 256  # SD3 pads T5 prompts to max_sequence_length=256
M = TypeVar("M", bound=torch.nn.Module)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _seeded(build: Callable[[], M]) -> M:
    """Run ``build()`` right after ``torch.manual_seed(0)``, without disturbing the caller's RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()  # as from_pretrained would leave it (T5 has dropout)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every word is spelled out one byte per token."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({BOS: 512, EOS: 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_MAX_LENGTH)


def _clip_config(projection_dim: int = CLIP_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8, 16), **kwargs) -> AutoencoderKL:
    """An AutoencoderKL whose vae_scale_factor is 2 per extra level (two levels: 8x8 latent -> 16x16 pixels)."""
    levels = len(block_out_channels)
    return _seeded(
        lambda: AutoencoderKL(
            block_out_channels=block_out_channels,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            latent_channels=latent_channels,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=8 * 2 ** (levels - 1),
            **kwargs,
        )
    )


def _unet(cross_attention_dim: int, **kwargs) -> UNet2DConditionModel:
    return _seeded(
        lambda: UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=2,
            cross_attention_dim=cross_attention_dim,
            **kwargs,
        )
    )


def tiny_sd(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A Stable Diffusion 1.5-layout pipeline (UNet, VAE, CLIP, DDIM) with random weights."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    scheduler = DDIMScheduler(
        **_SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_config())),
        tokenizer=_clip_tokenizer(),
        unet=_unet(cross_attention_dim=CLIP_HIDDEN),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """An SDXL-layout pipeline (two CLIP encoders, text_time UNet, Euler) with random weights."""
    time_embed_dim = 8
    pooled_dim = CLIP_HIDDEN  # projection_dim of text_encoder_2, fed to the UNet as text_embeds
    unet = _unet(
        cross_attention_dim=2 * CLIP_HIDDEN,  # both encoders' hidden states are concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,  # 6 time ids + pooled text
        use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_config())),
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(_clip_config(projection_dim=pooled_dim))),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_tokenizer(max_length: int) -> T5Tokenizer:
    """A Unigram T5 tokenizer over single ASCII characters; any other character maps to <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(vocab_size: int, d_model: int, model_class: type = T5EncoderModel) -> T5EncoderModel:
    """A two-layer T5 encoder (``model_class=UMT5EncoderModel`` for the UMT5 of Wan and AuraFlow)."""
    config = model_class.config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return _seeded(lambda: model_class(config))


def tiny_sd3(with_t5: bool = False) -> StableDiffusion3Pipeline:
    """An SD3-layout pipeline (MMDiT, two projected CLIP encoders, optional T5, flow matching), random weights."""
    joint_dim = 2 * CLIP_HIDDEN  # the two CLIP hidden states, concatenated channel-wise (and the T5 width)
    transformer = _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=joint_dim,
            caption_projection_dim=16,  # must equal num_attention_heads * attention_head_dim
            pooled_projection_dim=2 * CLIP_HIDDEN,  # the two CLIP text_embeds, concatenated
            pos_embed_max_size=16,
        )
    )
    encoder = _clip_config(projection_dim=CLIP_HIDDEN)
    tokenizer_3 = _t5_tokenizer(SD3_T5_MAX_LENGTH) if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_seeded(lambda: CLIPTextModelWithProjection(encoder)),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(encoder)),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(tokenizer_3), joint_dim) if with_t5 else None,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart() -> PixArtAlphaPipeline:
    """A PixArt-Alpha-layout pipeline (DiT, T5 encoder, DPM-Solver) with random weights."""
    # The pipeline's default use_resolution_binning=True only accepts sample_size 32/64/128 and then snaps
    # the image to 256x256 (for 32); a four-level VAE (scale 8) keeps that a 32x32 latent, and patch_size 4
    # keeps the transformer at 64 tokens.
    tokenizer = _t5_tokenizer(PIXART_T5_MAX_LENGTH)
    transformer = _seeded(
        lambda: PixArtTransformer2DModel(
            sample_size=32,
            patch_size=4,
            in_channels=4,
            out_channels=8,  # learned sigma: the pipeline keeps the first 4 channels
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            cross_attention_dim=16,
            caption_channels=CLIP_HIDDEN,
        )
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(len(tokenizer), CLIP_HIDDEN),
        vae=_vae(block_out_channels=(8, 8, 8, 8)),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_fashion():
    """The fashion model's pipeline class with a one-block, width-16 DiT (seeded random weights)."""
    from diffguide.models.pipeline import (
        ClassConditionalTransformerPipeline,
        fashion_scheduler,
        fashion_transformer,
    )

    transformer = _seeded(
        lambda: fashion_transformer(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    )
    pipe = ClassConditionalTransformerPipeline(transformer=transformer, scheduler=fashion_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
