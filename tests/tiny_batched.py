"""Tiny, random-weight diffusers pipelines that batch classifier-free guidance into one denoiser call.

Every builder returns the real diffusers pipeline class wired from miniature modules (one or two layers, a
few channels) and tokenizers made in code, so nothing is downloaded: PixArt-Sigma, Sana (with an epsilon
DPM-Solver and with the flow-prediction DPM-Solver the released checkpoints use), DiT (class-conditional),
AuraFlow (UMT5), HunyuanDiT (BERT + mT5), LTX-Video, the Kandinsky 2.2 decoder (image embeddings instead of
prompts) and Mochi. Each of these pipelines concatenates ``[uncond, cond]`` (DiT: ``[cond, uncond]``) along
the batch and calls its denoiser once per step.

``CASES`` maps a case name to ``(builder, call_kwargs)``; the kwargs hold one guided call (CFG on, smallest
size, latent output where the pipeline has one) without ``num_inference_steps`` and ``generator``.
Weights come from ``_seeded`` (``torch.manual_seed(0)`` inside ``fork_rng``), so two builds are identical.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderDC,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    KandinskyV22Pipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    PixArtSigmaPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
    UNet2DConditionModel,
    VQModel,
)
from tiny_pipelines import _seeded, _t5_encoder, _t5_tokenizer, _vae, tiny_pixart
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    UMT5EncoderModel,
)

PROMPTS = {"prompt": ["a cat", "a dog"], "negative_prompt": ["bad", "ugly"], "num_images_per_prompt": 2}
VIDEO_PROMPTS = {"prompt": ["a cat", "a dog"], "negative_prompt": ["bad", "ugly"], "num_videos_per_prompt": 2}
TEXT_WIDTH = 32  # d_model of the tiny T5 / UMT5 / BERT encoders
SHORT_TEXT = 16  # max_sequence_length where a pipeline accepts one
_CHARS = string.ascii_letters + string.digits + string.punctuation


def _done(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gemma_tokenizer() -> GemmaTokenizer:
    """A Gemma BPE tokenizer with no merges: one token per ASCII character, ``▁`` for a space, <bos> first."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {s: i for i, s in enumerate([*specials, "▁", *_CHARS])}
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, model_max_length=4096)


def _bert_tokenizer() -> BertTokenizer:
    """A lower-case WordPiece tokenizer over single characters (``x`` opens a word, ``##x`` continues it)."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    return BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, model_max_length=77)


# --- PixArt-Sigma ---------------------------------------------------------------------------------------


def tiny_pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Sigma on tiny_pixart's modules (T5, 32x32-latent DiT with learned sigma, DPM-Solver)."""
    return _done(PixArtSigmaPipeline(**tiny_pixart().components))


# --- Sana -----------------------------------------------------------------------------------------------


def tiny_sana(flow: bool = False) -> SanaPipeline:
    """Sana (linear-attention DiT, Gemma2 encoder, two-level DC-AE); ``flow``: flow-prediction DPM-Solver."""
    tokenizer = _gemma_tokenizer()
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        head_dim=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    transformer = _seeded(
        lambda: SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            num_layers=1,
            num_attention_heads=2,
            attention_head_dim=4,
            num_cross_attention_heads=2,
            cross_attention_head_dim=4,
            cross_attention_dim=8,
            caption_channels=8,
            sample_size=16,
        )
    )
    vae = _seeded(
        lambda: AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    )
    if flow:
        scheduler = DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    else:
        scheduler = DPMSolverMultistepScheduler()
    return _done(
        SanaPipeline(
            tokenizer=tokenizer,
            text_encoder=_seeded(lambda: Gemma2Model(text_config)),
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
    )


# --- DiT ------------------------------------------------------------------------------------------------


def tiny_dit() -> DiTPipeline:
    """Class-conditional DiT (adaLN-zero, 1000 classes + null class, learned sigma) on an 8x8 latent."""
    transformer = _seeded(
        lambda: DiTTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            num_embeds_ada_norm=1000,
        )
    )
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return _done(DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler))


# --- AuraFlow -------------------------------------------------------------------------------------------


def tiny_auraflow() -> AuraFlowPipeline:
    """AuraFlow (MMDiT + single-DiT blocks, UMT5 encoder, flow-matching Euler) on an 8x8 latent."""
    tokenizer = _t5_tokenizer(256)

    def transformer() -> AuraFlowTransformer2DModel:
        model = AuraFlowTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_mmdit_layers=1,
            num_single_dit_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=TEXT_WIDTH,
            pos_embed_max_size=64,
        )
        # Every block is gated by an adaLN-zero projection of the time embedding, which default init leaves
        # at ~0.15, so the gates are ~0.04 and the prompt moves the output by only ~1e-4. A larger time
        # embedding opens the gates (cond - uncond becomes O(0.1)), as in a trained model.
        with torch.no_grad():
            model.time_step_proj.linear_2.weight.mul_(10.0)
            model.time_step_proj.linear_2.bias.mul_(10.0)
        return model

    return _done(
        AuraFlowPipeline(
            tokenizer=tokenizer,
            text_encoder=_t5_encoder(len(tokenizer), TEXT_WIDTH, UMT5EncoderModel),
            vae=_vae(),
            transformer=_seeded(transformer),
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    )


# --- HunyuanDiT -----------------------------------------------------------------------------------------


def tiny_hunyuandit() -> HunyuanDiTPipeline:
    """HunyuanDiT (BERT 77 tokens + T5 256 tokens, learned sigma, v-prediction DDPM) on a 4x4 latent."""
    # The pipeline builds the rotary grid from height // 8, so the VAE must downsample by 8 (four levels).
    tokenizer = _bert_tokenizer()
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    tokenizer_2 = _t5_tokenizer(256)
    transformer = _seeded(
        lambda: HunyuanDiT2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=3,
            hidden_size=24,
            cross_attention_dim=TEXT_WIDTH,
            cross_attention_dim_t5=TEXT_WIDTH,
            pooled_projection_dim=16,
        )
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.03,
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return _done(
        HunyuanDiTPipeline(
            vae=_vae(block_out_channels=(8, 8, 8, 8)),
            text_encoder=_seeded(lambda: BertModel(bert_config, add_pooling_layer=False)),
            tokenizer=tokenizer,
            transformer=transformer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            text_encoder_2=_t5_encoder(len(tokenizer_2), TEXT_WIDTH),
            tokenizer_2=tokenizer_2,
        )
    )


# --- LTX-Video ------------------------------------------------------------------------------------------


def tiny_ltx() -> LTXPipeline:
    """LTX-Video (T5, video DiT, causal video VAE that compresses 8x in space and time) on a 2x4x4 latent."""
    tokenizer = _t5_tokenizer(128)
    transformer = _seeded(
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=1,
            caption_channels=TEXT_WIDTH,
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        )
    )
    # The released LTX-Video scheduler: resolution-dependent shift, stretched to end at sigma 0.1.
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return _done(
        LTXPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=_t5_encoder(len(tokenizer), TEXT_WIDTH),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    )


# --- Kandinsky 2.2 decoder ------------------------------------------------------------------------------

KANDINSKY_EMBED = 32  # CLIP image-embedding width that the decoder UNet projects


def tiny_kandinsky22() -> KandinskyV22Pipeline:
    """The Kandinsky 2.2 decoder (image-embedding UNet with learned variance, MoVQ, DDPM) on an 8x8 latent."""
    unet = _seeded(
        lambda: UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=8,  # mean and variance; the pipeline guides the mean only
            addition_embed_type="image",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            encoder_hid_dim=KANDINSKY_EMBED,
            encoder_hid_dim_type="image_proj",
            cross_attention_dim=16,
            attention_head_dim=4,
            resnet_time_scale_shift="scale_shift",
            class_embed_type=None,
        )
    )
    movq = _seeded(
        lambda: VQModel(
            block_out_channels=(32, 32),  # the spatial norms of its decoder use 32 groups
            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            norm_type="spatial",
            num_vq_embeddings=12,
            vq_embed_dim=4,
        )
    )
    scheduler = DDPMScheduler(
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return _done(KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq))


def _kandinsky_embeds() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "image_embeds": torch.randn(2, KANDINSKY_EMBED, generator=gen),
        "negative_image_embeds": torch.randn(2, KANDINSKY_EMBED, generator=gen),
    }


# --- Mochi ----------------------------------------------------------------------------------------------


def tiny_mochi() -> MochiPipeline:
    """Mochi (asymmetric DiT, T5, Mochi VAE, inverted-sigma flow matching) on a 2x2x2 latent."""
    tokenizer = _t5_tokenizer(256)
    transformer = _seeded(
        lambda: MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=12,
            text_embed_dim=TEXT_WIDTH,
            time_embed_dim=4,
            max_sequence_length=SHORT_TEXT,
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLMochi(
            latent_channels=12,
            out_channels=3,
            encoder_block_out_channels=(32, 32, 32, 32),  # its group norms use 32 groups
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
        )
    )
    # The released Mochi scheduler runs sigma from 0 up to 1 (invert_sigmas) with timesteps 1000 * (1 - sigma).
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    return _done(
        MochiPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=_t5_encoder(len(tokenizer), TEXT_WIDTH),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    )


# --- Cases ----------------------------------------------------------------------------------------------

_SANA_CALL: dict[str, Any] = {
    **PROMPTS,
    "guidance_scale": 5.0,
    "height": 32,
    "width": 32,
    "use_resolution_binning": False,
    "max_sequence_length": SHORT_TEXT,
    # The default prepends a ~1500-character instruction to each prompt (not to the negative one): it works
    # here too, but the character-level tokenizer makes Gemma read ~1500 tokens, about 0.2 s per call.
    "complex_human_instruction": None,
    "output_type": "latent",
}

CASES: dict[str, tuple[Callable[[], DiffusionPipeline], dict[str, Any]]] = {
    "pixart-sigma": (
        tiny_pixart_sigma,
        {
            **PROMPTS,
            "guidance_scale": 5.0,
            "max_sequence_length": SHORT_TEXT,
            "clean_caption": False,  # the default True needs beautifulsoup4 and ftfy, and warns without them
            "output_type": "latent",
        },
    ),
    "sana": (tiny_sana, dict(_SANA_CALL)),
    "sana-flow": (lambda: tiny_sana(flow=True), dict(_SANA_CALL)),
    "dit": (tiny_dit, {"class_labels": [1, 2, 3, 4], "guidance_scale": 5.0, "output_type": "pt"}),
    "auraflow": (
        tiny_auraflow,
        {
            **PROMPTS,
            "guidance_scale": 5.0,
            "height": 16,
            "width": 16,
            "max_sequence_length": SHORT_TEXT,
            "output_type": "latent",
        },
    ),
    "hunyuandit": (
        tiny_hunyuandit,
        {
            **PROMPTS,
            "guidance_scale": 5.0,
            "height": 32,
            "width": 32,
            "use_resolution_binning": False,
            "output_type": "latent",
        },
    ),
    "ltx": (
        tiny_ltx,
        {
            **VIDEO_PROMPTS,
            "guidance_scale": 5.0,
            "height": 32,
            "width": 32,
            "num_frames": 9,
            "max_sequence_length": SHORT_TEXT,
            "output_type": "latent",
        },
    ),
    "kandinsky22": (
        tiny_kandinsky22,
        {
            **_kandinsky_embeds(),
            "num_images_per_prompt": 2,
            "guidance_scale": 5.0,
            "height": 16,
            "width": 16,
            "output_type": "latent",
        },
    ),
    "mochi": (
        tiny_mochi,
        {
            **VIDEO_PROMPTS,
            "guidance_scale": 5.0,
            "height": 16,
            "width": 16,
            "num_frames": 7,
            "max_sequence_length": SHORT_TEXT,
            "output_type": "latent",
        },
    ),
}
