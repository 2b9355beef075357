"""Tiny, random-weight flow-matching pipelines that run classifier-free guidance as two denoiser calls per step.

Each builder returns a real diffusers pipeline class wired from miniature modules, made fully offline (nothing
is downloaded): FLUX.1 (true CFG with a negative prompt, CLIP + T5), FLUX.2 [klein] (undistilled, Qwen3),
Qwen-Image and Qwen-Image-Edit (Qwen2.5-VL), CogView4 (GLM) and Lumina-Image-2.0 (Gemma2). All of them call
the transformer once with the prompt and once with the negative prompt at every step (batch 4 each: two
prompts times two images per prompt) instead of one batch of 8.

The tokenizers are made in code. The Qwen, GLM and Gemma ones are "word-level" BPEs: the vocabulary holds
every byte (or byte-fallback piece) plus each pre-tokenized word of the pipelines' prompt templates and of the
test prompts, and ``ignore_merges`` turns a known word into one token, so the templates split into about as
many tokens as with the real tokenizers. That matters for Qwen-Image, which drops the first 34 (Edit: 64)
template tokens of the encoder output. Unknown words are spelled out byte by byte.

Sizes: every generated latent packs into a 2x2 grid of transformer tokens. Qwen-Image-Edit always resizes its
input image to about 1024x1024 pixels for the VAE (there is no way around it), so its VAE downsamples by 32
(256 packed image tokens) and has no full-resolution residual blocks; its Qwen2-VL image processor caps the
vision input at 56x56 pixels (4 image tokens). It takes one image per prompt, a list of two.

Speed: a 4-step call takes 0.03-0.07 s single-threaded (Qwen-Image-Edit 0.3 s, mostly the 1024x1024 VAE
encode). On a loaded machine torch's default intra-op threads can make that 10-30x slower.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np
import PIL.Image
from diffusers import (
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tiny_pipelines import (
    _byte_symbols,
    _clip_config,
    _clip_tokenizer,
    _seeded,
    _t5_encoder,
    _t5_tokenizer,
    _vae,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    CLIPTextModel,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    GlmConfig,
    GlmModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

try:  # the torchvision-free image processor; Qwen2VLImageProcessor falls back to it without torchvision
    from transformers import Qwen2VLImageProcessorPil as _Qwen2VLImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import Qwen2VLImageProcessor as _Qwen2VLImageProcessor

PROMPTS = ["a cat", "a dog"]
NEGATIVE_PROMPTS = ["bad", "ugly"]
# Plain text (special tokens left out) that the prompt templates wrap around a prompt; each pre-tokenized
# word of it becomes one token.
_CORPUS = (
    "system",
    "user",
    "assistant",
    "\n",
    "\n\n",
    *PROMPTS,
    *NEGATIVE_PROMPTS,
    # Qwen-Image
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of"
    " the objects and background:",
    # Qwen-Image-Edit
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then"
    " explain how the user's text instruction should alter or modify the image. Generate a new image that meets"
    " the user's requirements while maintaining consistency with the original input where appropriate.",
    # Lumina-Image-2.0
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment"
    " based on textual prompts or user prompts. <Prompt Start> a cat",
)
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
# Qwen3's chat template, reduced to what Flux2KleinPipeline uses (user turns, generation prompt, no thinking).
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's (and GLM-4's) pre-tokenizer: the GPT-4-style word regex, then bytes to printable symbols."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level_vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """The 256 byte symbols, then every pre-tokenized word of ``_CORPUS``, then ``specials``."""
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    pre_tokenizer = _byte_level_pre_tokenizer()
    for text in _CORPUS:
        for piece, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    for token in specials:
        vocab.setdefault(token, len(vocab))
    return vocab


def _qwen_tokenizer(chat_template: str | None = None) -> Qwen2TokenizerFast:
    """A Qwen2 byte-level BPE tokenizer with the chat and vision special tokens and word-level vocabulary."""
    tokenizer = Qwen2TokenizerFast(
        vocab=_byte_level_vocab(_QWEN_SPECIALS),
        merges=[],
        model_max_length=32768,
        chat_template=chat_template,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS[1:]])
    tokenizer.backend_tokenizer.model.ignore_merges = True  # a word in the vocabulary is one token
    return tokenizer


def _glm_tokenizer() -> PreTrainedTokenizerFast:
    """A GLM-4-style byte-level BPE: prompts start with ``[gMASK]<sop>`` and pad on the left."""
    specials = ("<|endoftext|>", "[gMASK]", "<sop>")
    vocab = _byte_level_vocab(specials)
    backend = Tokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = _byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=128000,
    )


def _gemma_tokenizer() -> GemmaTokenizerFast:
    """A Gemma BPE with byte fallback whose vocabulary holds whole ``▁word`` pieces; prompts start with <bos>."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for symbol in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(symbol, len(vocab))
    split = pre_tokenizers.Split("▁", behavior="merged_with_next")
    for text in _CORPUS:
        for piece, _ in split.pre_tokenize_str(text.replace(" ", "▁")):
            vocab.setdefault(piece, len(vocab))
    tokenizer = GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True, model_max_length=8192)
    tokenizer.backend_tokenizer.pre_tokenizer = split  # words, each with its leading "▁"
    tokenizer.backend_tokenizer.model.ignore_merges = True
    return tokenizer


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------- FLUX.1


def tiny_flux() -> FluxPipeline:
    """A FLUX.1 [dev]-layout pipeline (MMDiT with guidance embedding, CLIP pooled + T5), random weights."""
    t5_tokenizer = _t5_tokenizer(512)
    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 width
            pooled_projection_dim=32,  # CLIP pooled width
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_config())),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(t5_tokenizer), 32),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------- FLUX.2 klein

_FLUX2_OUT_LAYERS = (1, 2)  # hidden states stacked as the prompt embedding (the real model takes 9, 18, 27)
_QWEN3_HIDDEN = 16


def tiny_flux2_klein() -> Flux2KleinPipeline:
    """A FLUX.2 [klein] (base, not step-distilled) pipeline: Flux2 MMDiT, Qwen3 text encoder, random weights."""
    tokenizer = _qwen_tokenizer(chat_template=_QWEN3_CHAT_TEMPLATE)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_QWEN3_HIDDEN,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    transformer = _seeded(
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels patchified 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_QWEN3_HIDDEN * len(_FLUX2_OUT_LAYERS),
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLFlux2(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=_seeded(lambda: Qwen3ForCausalLM(config)),
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------- Qwen-Image

_QWEN_VL_HIDDEN = 16


def _qwen_vl_encoder(tokenizer: Qwen2TokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _QWEN_VL_HIDDEN,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _QWEN_VL_HIDDEN,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config))


def _qwen_image_transformer() -> QwenImageTransformer2DModel:
    return _seeded(
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,  # 4 latent channels packed 2x2
            out_channels=4,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_QWEN_VL_HIDDEN,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
    )


def _qwen_image_vae(levels: int, res_blocks: int = 1) -> AutoencoderKLQwenImage:
    """A Qwen-Image (Wan-style causal 3D) VAE that downsamples by ``2**levels`` in space and never in time."""
    return _seeded(
        lambda: AutoencoderKLQwenImage(
            base_dim=8 if res_blocks else 4,
            z_dim=4,
            dim_mult=[1] * (levels + 1),
            num_res_blocks=res_blocks,
            temperal_downsample=[False] * levels,
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    )


def tiny_qwenimage() -> QwenImagePipeline:
    """A Qwen-Image-layout pipeline (MMDiT, Qwen2.5-VL text encoder, Qwen-Image VAE), random weights."""
    tokenizer = _qwen_tokenizer()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_qwen_image_vae(levels=2),
        text_encoder=_qwen_vl_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_qwen_image_transformer(),
    )
    return _finish(pipe)


class _ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """A Qwen2.5-VL processor without a video processor (video processors need torchvision; images do not)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def tiny_qwenimage_edit() -> QwenImageEditPipeline:
    """A Qwen-Image-Edit-layout pipeline (the input image is both VAE-encoded and seen by Qwen2.5-VL)."""
    # The pipeline resizes the VAE's input image to ~1024x1024 whatever its size: a 32x VAE keeps its latent
    # at 32x32 (256 packed tokens); max_pixels caps what the vision tower sees at 56x56 (4x4 patches).
    tokenizer = _qwen_tokenizer()
    image_processor = _Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_qwen_image_vae(levels=5, res_blocks=0),  # no full-resolution residual blocks: ~5x faster
        text_encoder=_qwen_vl_encoder(tokenizer),
        tokenizer=tokenizer,
        processor=_ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer),
        transformer=_qwen_image_transformer(),
    )
    return _finish(pipe)


def _edit_images() -> list[PIL.Image.Image]:
    """One 56x56 RGB gradient per prompt (a single image fails the processor's one-image-per-prompt check).

    The two are identical: the pipeline pairs the text rows ``[p0, p0, p1, p1]`` with the image latents
    ``[i0, i1, i0, i1]``. The processor sees 56x56 (4 image tokens); the VAE sees it resized to 1024x1024.
    """
    ramp = np.linspace(0, 255, 56, dtype=np.float32)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    image = PIL.Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    return [image, image.copy()]


# ----------------------------------------------------------------------------------------------- CogView4


def tiny_cogview4() -> CogView4Pipeline:
    """A CogView4-layout pipeline (CogView4 DiT, GLM text encoder, 4x VAE), random weights."""
    tokenizer = _glm_tokenizer()
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformer = _seeded(
        lambda: CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=4,
            num_attention_heads=4,
            text_embed_dim=32,
            time_embed_dim=8,
            condition_dim=4,
            sample_size=4,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    pipe = CogView4Pipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(lambda: GlmModel(config)),
        vae=_vae(block_out_channels=(8, 8, 8)),
        transformer=transformer,
        scheduler=scheduler,
    )
    return _finish(pipe)


# ----------------------------------------------------------------------------------------------- Lumina2


def tiny_lumina2() -> Lumina2Pipeline:
    """A Lumina-Image-2.0-layout pipeline (NextDiT, Gemma2 text encoder, 8x VAE), random weights."""
    tokenizer = _gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    transformer = _seeded(
        lambda: Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=8,
            num_layers=1,
            num_refiner_layers=1,
            num_attention_heads=1,
            num_kv_heads=1,
            multiple_of=16,
            norm_eps=1e-5,
            scaling_factor=1.0,
            axes_dim_rope=(4, 2, 2),
            cap_feat_dim=8,
        )
    )
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(block_out_channels=(8, 8, 8, 8)),  # the pipeline assumes an 8x VAE
        text_encoder=_seeded(lambda: Gemma2Model(config)),
        tokenizer=tokenizer,
    )
    return _finish(pipe)


# ------------------------------------------------------------------------------------------------- cases

_BATCH = {"prompt": PROMPTS, "num_images_per_prompt": 2, "output_type": "latent"}
_NEGATIVE = {"negative_prompt": NEGATIVE_PROMPTS}

CASES: dict[str, tuple[Callable[[], DiffusionPipeline], dict]] = {
    # guidance_scale (3.5 by default) is FLUX.1 [dev]'s distilled guidance embedding; CFG is true_cfg_scale.
    "flux": (
        tiny_flux,
        {**_BATCH, **_NEGATIVE, "true_cfg_scale": 5.0, "height": 8, "width": 8, "max_sequence_length": 16},
    ),
    # Flux2KleinPipeline has no negative_prompt: its unconditional branch always encodes "".
    "flux2-klein": (
        tiny_flux2_klein,
        {
            **_BATCH,
            "guidance_scale": 5.0,
            "height": 8,
            "width": 8,
            "max_sequence_length": 16,
            "text_encoder_out_layers": _FLUX2_OUT_LAYERS,
        },
    ),
    "qwenimage": (
        tiny_qwenimage,
        {**_BATCH, **_NEGATIVE, "true_cfg_scale": 5.0, "height": 16, "width": 16, "max_sequence_length": 16},
    ),
    "qwenimage-edit": (
        tiny_qwenimage_edit,
        {
            **_BATCH,
            **_NEGATIVE,
            "image": _edit_images(),
            "true_cfg_scale": 5.0,
            "height": 128,
            "width": 128,
            "max_sequence_length": 32,
        },
    ),
    "cogview4": (
        tiny_cogview4,
        {**_BATCH, **_NEGATIVE, "guidance_scale": 5.0, "height": 16, "width": 16, "max_sequence_length": 16},
    ),
    "lumina2": (
        tiny_lumina2,
        {**_BATCH, **_NEGATIVE, "guidance_scale": 5.0, "height": 32, "width": 32, "max_sequence_length": 32},
    ),
}
