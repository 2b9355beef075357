"""Tiny, random-weight diffusers pipelines whose denoising loop makes two denoiser calls per step, for tests.

Every pipeline here runs classifier-free guidance as two separate forward passes (conditional, then
unconditional) instead of one batch-doubled pass:

- ``wan``: Wan 2.1 text-to-video (``WanPipeline``: UMT5 encoder, ``AutoencoderKLWan``,
  ``WanTransformer3DModel``) with the flow-matching Euler scheduler diffusers' own fast tests use;
- ``wan-unipc``: the same pipeline with the flow-prediction ``UniPCMultistepScheduler`` the Wan docs use;
- ``wan22``: the Wan 2.2 A14B layout, two experts (``transformer`` for high noise, ``transformer_2`` for low
  noise, different weights) switched at ``boundary_ratio``, each with its own guidance scale;
- ``hunyuanvideo``: ``HunyuanVideoPipeline`` (Llama + CLIP text encoders, guidance-distilled transformer) with
  true CFG (``true_cfg_scale``) on top of the distilled guidance embedding;
- ``chroma``: ``ChromaPipeline`` (T5 only, Flux-like transformer with a distilled modulation approximator);
- ``kandinsky5``: ``Kandinsky5T2IPipeline`` (Qwen2.5-VL + CLIP, channels-last latents);
- ``cosmos2``: ``Cosmos2TextToImagePipeline`` (T5, EDM-preconditioned DiT, pass-through safety checker).

Tokenizers are made in code (the character-level T5 Unigram and byte-level CLIP BPE of ``tiny_pipelines``, and
here a character-level Llama BPE with byte fallback and a byte-level Qwen2 BPE), so nothing is downloaded. The
pipelines sample one latent frame at the smallest size they accept (16x16 pixels; Chroma 8x8);
``output_type="latent"`` skips the VAE, which only contributes its config (compression factors). ``CASES``
maps a case name to ``(builder, call_kwargs)``; the call kwargs leave out ``num_inference_steps`` and
``generator``.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    Cosmos2TextToImagePipeline,
    CosmosTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    Kandinsky5T2IPipeline,
    Kandinsky5Transformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from tiny_pipelines import (
    _byte_symbols,
    _clip_config,
    _clip_tokenizer,
    _seeded,
    _t5_encoder,
    _t5_tokenizer,
    _vae,
)
from transformers import (
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    UMT5EncoderModel,
)

MAX_SEQUENCE_LENGTH = 16  # text tokens per prompt; "a cat" / "bad" fit in it with room to spare
TEXT_DIM = 32  # width of the T5 / UMT5 hidden states the transformers read
LLAMA_HIDDEN = 16
PROMPTS = {"prompt": ["a cat", "a dog"], "negative_prompt": ["bad", "ugly"]}


# -------------------------------------------------------------------------------------------------------- Wan


def _umt5_encoder(vocab_size: int) -> UMT5EncoderModel:
    return _t5_encoder(vocab_size, TEXT_DIM, UMT5EncoderModel)


def _wan_vae() -> AutoencoderKLWan:
    """Wan 2.1 VAE layout: 16 latent channels, 8x spatial and 4x temporal compression."""
    return _seeded(
        lambda: AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    )


def _wan_transformer(seed: int = 0) -> WanTransformer3DModel:
    def build() -> WanTransformer3DModel:
        torch.manual_seed(seed)  # inside _seeded's fork_rng: the caller's RNG is still untouched
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    return _seeded(build)


def _wan(scheduler, **kwargs) -> WanPipeline:
    tokenizer = _t5_tokenizer(MAX_SEQUENCE_LENGTH)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_umt5_encoder(len(tokenizer)),
        vae=_wan_vae(),
        scheduler=scheduler,
        transformer=_wan_transformer(),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan() -> WanPipeline:
    """Wan 2.1 T2V layout with the FlowMatchEulerDiscreteScheduler(shift=7.0) of diffusers' fast tests."""
    return _wan(FlowMatchEulerDiscreteScheduler(shift=7.0))


def _flow_unipc() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_wan_unipc() -> WanPipeline:
    """Wan 2.1 T2V layout with the flow-prediction UniPC scheduler the Wan docs use."""
    return _wan(_flow_unipc())


def tiny_wan22() -> WanPipeline:
    """Wan 2.2 A14B layout: a high-noise ``transformer``, a low-noise ``transformer_2`` (different weights).

    ``transformer`` denoises the steps with ``t >= boundary_ratio * 1000``, ``transformer_2`` the rest; with
    the flow UniPC scheduler at 4 steps (t = 999, 900, 750, 500) the A14B ratio 0.875 gives two steps to each.
    """
    return _wan(_flow_unipc(), transformer_2=_wan_transformer(seed=1), boundary_ratio=0.875)


_VIDEO_KWARGS = {
    **PROMPTS,
    "num_videos_per_prompt": 2,
    "height": 16,  # the pipelines require multiples of 16
    "width": 16,
    "num_frames": 1,  # 4k + 1 frames; one frame is one latent frame
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
    "output_type": "latent",
}

# ----------------------------------------------------------------------------------------------- HunyuanVideo

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def _llama_tokenizer() -> LlamaTokenizer:
    """A Llama BPE with no merges: one token per printable ASCII character, other bytes by byte fallback.

    Like HunyuanVideo's own tokenizer it prepends BOS and pads on the right.
    """
    symbols = [*LLAMA_SPECIALS, "▁", *(string.ascii_letters + string.digits + string.punctuation)]
    symbols += [f"<0x{b:02X}>" for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    return LlamaTokenizer(
        vocab=vocab,
        merges=[],
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="right",
        model_max_length=256,
    )


def _hunyuan_transformer() -> HunyuanVideoTransformer3DModel:
    return _seeded(
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,  # HunyuanVideo is guidance-distilled: guidance_scale is an embedding input
            text_embed_dim=LLAMA_HIDDEN,
            pooled_projection_dim=_clip_config().hidden_size,  # CLIP pooler_output
            rope_axes_dim=(2, 4, 4),
        )
    )


def _hunyuan_vae() -> AutoencoderKLHunyuanVideo:
    return _seeded(
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    )


def tiny_hunyuanvideo() -> HunyuanVideoPipeline:
    """HunyuanVideo layout (Llama + CLIP, dual/single-stream DiT with guidance embedding), random weights."""
    tokenizer = _llama_tokenizer()
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-3], i.e. the output of the first layer here
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=_seeded(lambda: LlamaModel(llama)),
        tokenizer=tokenizer,
        transformer=_hunyuan_transformer(),
        vae=_hunyuan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_seeded(lambda: CLIPTextModel(_clip_config())),
        tokenizer_2=_clip_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------- Chroma


def tiny_chroma() -> ChromaPipeline:
    """Chroma layout (T5 only, Flux-style MMDiT with a modulation approximator), random weights."""
    tokenizer = _t5_tokenizer(MAX_SEQUENCE_LENGTH)
    transformer = _seeded(
        lambda: ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4,  # 1 latent channel, packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=[4, 4, 8],
            approximator_hidden_dim=32,
            approximator_layers=1,
            approximator_num_channels=16,
        )
    )
    vae = (
        _seeded(  # one level: vae_scale_factor 1, so an 8x8 image is a 4x4 grid of packed 2x2 latent patches
            lambda: AutoencoderKL(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                block_out_channels=(4,),
                layers_per_block=1,
                latent_channels=1,
                norm_num_groups=1,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.0609,
                scaling_factor=1.5035,
            )
        )
    )
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(len(tokenizer), TEXT_DIM),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ Kandinsky 5

QWEN_HIDDEN = 32
M = TypeVar("M", bound=torch.nn.Module)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 BPE with no merges (one token per byte) plus the chat-template special tokens."""
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024)  # <|endoftext|> (pad) is added
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _unzero_modulation(model: M) -> M:
    """Give the zero-initialised adaLN modulation layers random weights (still under the caller's seed).

    Kandinsky 5 initialises every modulation ``out_layer`` to zero, which zeroes all attention / MLP gates:
    the text would then never reach the visual stream, and the conditional and unconditional predictions
    would be equal.
    """
    for name, param in model.named_parameters():
        if "modulation.out_layer" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def tiny_kandinsky5_t2i() -> Kandinsky5T2IPipeline:
    """Kandinsky 5.0 T2I layout (Qwen2.5-VL + CLIP text encoders, Kandinsky5 DiT), random weights.

    Two departures from the released pipeline, both on the text side: the ``tokenizer`` slot holds the bare
    Qwen2 tokenizer instead of a ``Qwen2VLProcessor`` (the processor cannot be built without torchvision,
    and the pipeline only passes it text, with ``images=None, videos=None``, which the tokenizer accepts),
    and the pipeline's ``prompt_template_encode_start_idx`` (40, the template length in real Qwen tokens) is
    set to the template length in this byte-level tokenizer, so the crop still leaves exactly the prompt.
    ``resolutions`` is narrowed to 16x16 (a 2x2 latent, one transformer token) as diffusers' own tests do.
    """
    tokenizer = _qwen_tokenizer()
    qwen = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": QWEN_HIDDEN,
            "intermediate_size": QWEN_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
        },
        vision_config={
            "depth": 1,
            "hidden_size": QWEN_HIDDEN,
            "intermediate_size": QWEN_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": QWEN_HIDDEN,
        },
        hidden_size=QWEN_HIDDEN,
        vocab_size=len(tokenizer),
    )
    clip = _clip_config()
    transformer = _seeded(
        lambda: _unzero_modulation(
            Kandinsky5Transformer3DModel(
                in_visual_dim=16,
                in_text_dim=QWEN_HIDDEN,
                in_text_dim2=clip.hidden_size,  # CLIP pooler_output
                time_dim=16,
                out_visual_dim=16,
                patch_size=(1, 2, 2),
                model_dim=16,
                ff_dim=32,
                num_text_blocks=1,
                num_visual_blocks=2,
                axes_dims=(1, 1, 2),
                visual_cond=False,
                attention_type="regular",
            )
        )
    )
    pipe = Kandinsky5T2IPipeline(
        transformer=transformer,
        # four levels: the 8x spatial factor the pipeline hard-codes; 16 latent channels as in the Flux VAE
        vae=_vae(
            latent_channels=16,
            block_out_channels=(8, 8, 8, 8),
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_seeded(lambda: Qwen2_5_VLForConditionalGeneration(qwen)),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(lambda: CLIPTextModel(clip)),
        tokenizer_2=_clip_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    prefix = pipe.prompt_template.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix)["input_ids"])
    pipe.resolutions = [(16, 16)]
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------- Cosmos 2


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker`` (a large download): passes every prompt, frame.

    The Cosmos pipelines build the real guardrail when given ``safety_checker=None``, so one must be passed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


def tiny_cosmos2_t2i() -> Cosmos2TextToImagePipeline:
    """Cosmos-Predict2 T2I layout (T5, Cosmos DiT, Wan VAE, EDM-preconditioned flow Euler), random weights."""
    tokenizer = _t5_tokenizer(MAX_SEQUENCE_LENGTH)
    transformer = _seeded(
        lambda: CosmosTransformer3DModel(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            mlp_ratio=2,
            text_embed_dim=TEXT_DIM,
            adaln_lora_dim=4,
            max_size=(4, 32, 32),
            patch_size=(1, 2, 2),
            rope_scale=(2.0, 1.0, 1.0),
            # True (the released config) needs torchvision to resize the mask; the pipeline's mask is all
            # zeros, so the extra input channel would only ever carry zeros.
            concat_padding_mask=False,
            extra_pos_embed_type="learnable",
        )
    )
    pipe = Cosmos2TextToImagePipeline(
        text_encoder=_t5_encoder(len(tokenizer), TEXT_DIM),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=PassThroughSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES: dict[str, tuple[Callable[[], DiffusionPipeline], dict]] = {
    "wan": (tiny_wan, {**_VIDEO_KWARGS, "guidance_scale": 5.0}),
    "wan-unipc": (tiny_wan_unipc, {**_VIDEO_KWARGS, "guidance_scale": 5.0}),
    "wan22": (tiny_wan22, {**_VIDEO_KWARGS, "guidance_scale": 5.0, "guidance_scale_2": 3.0}),
    "hunyuanvideo": (
        tiny_hunyuanvideo,
        {
            **_VIDEO_KWARGS,
            "true_cfg_scale": 5.0,  # guidance_scale stays at its default 6.0: the distilled embedding input
            # The default template is a Llama-3 chat prompt whose first 95 tokens (crop_start) are dropped;
            # with a character-level tokenizer that crop keeps only template text, so use the bare prompt.
            "prompt_template": {"template": "{}", "crop_start": 0},
        },
    ),
    "chroma": (
        tiny_chroma,
        {
            **PROMPTS,
            "num_images_per_prompt": 2,
            "guidance_scale": 5.0,
            "height": 8,
            "width": 8,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "output_type": "latent",
        },
    ),
    "kandinsky5": (
        tiny_kandinsky5_t2i,
        {
            **PROMPTS,
            "num_images_per_prompt": 2,
            "guidance_scale": 5.0,
            "height": 16,
            "width": 16,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "output_type": "latent",
        },
    ),
    "cosmos2": (
        tiny_cosmos2_t2i,
        {
            **PROMPTS,
            "num_images_per_prompt": 2,
            "guidance_scale": 5.0,
            "height": 16,  # multiples of 16
            "width": 16,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "output_type": "latent",
        },
    ),
}
