"""Model bundle of the SD3 family, loaded from a local diffusers folder.

The same loader opens the tiny folder written by ``soar.models.tiny.write_tiny_model`` and a
local Stable Diffusion 3.5 Medium folder (transformer, scheduler, vae, text_encoder[_2,_3],
tokenizer[_2,_3]). Nothing is fetched from a hub: a missing folder is an error naming it.

Prompt encoding follows SD3 (diffusers ``StableDiffusion3Pipeline.encode_prompt``): both CLIP
encoders' penultimate hidden states concatenated on channels, zero-padded to the T5 width and
concatenated on the sequence axis with the T5 states (when a T5 encoder is present); the pooled
embedding is the concatenation of both CLIP projections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from soar.models.codec import PIXEL_CODEC_TYPE, PixelCodec, VaeCodec


@dataclass
class SD3Bundle:
    """Everything needed to train and sample one SD3-family model."""

    transformer: SD3Transformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    codec: PixelCodec | VaeCodec
    clip_encoders: list = field(default_factory=list)  # two CLIPTextModelWithProjection
    clip_tokenizers: list = field(default_factory=list)  # their CLIP tokenizers
    t5_encoder: object | None = None  # T5EncoderModel or None (tiny profile)
    t5_tokenizer: object | None = None
    t5_max_length: int = 77  # T5 tokens per prompt

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device: torch.device | str) -> SD3Bundle:
        """Move every module to ``device``."""
        for module in (self.transformer, *self.clip_encoders, self.t5_encoder):
            if module is not None:
                module.to(device)
        self.codec.to(device)
        return self

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (training reads embeddings from a text table only)."""
        for module in (*self.clip_encoders, self.t5_encoder):
            if module is not None:
                module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (``prompt_embeds [B, L, joint_attention_dim]``, ``pooled [B, pooled_dim]``)."""
        if not self.clip_encoders:
            raise RuntimeError("this bundle has no text encoders (loaded with text_encoders=False or freed after "
                               "the text cache was read); prompts must come from the text-embedding cache")
        device = self.clip_encoders[0].device
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders, strict=True):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        width = self.transformer.config.joint_attention_dim
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        if self.t5_encoder is not None:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.t5_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(self.t5_encoder.device)
            clip = torch.cat([clip, self.t5_encoder(ids)[0].to(clip.dtype)], dim=1)
        return clip.float(), torch.cat(pooled, dim=-1).float()


def _require(folder: Path, what: str) -> Path:
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} has no {what} (expected {folder})")
    return folder


def load_transformer(path: str | Path) -> SD3Transformer2DModel:
    """Load an ``SD3Transformer2DModel`` saved with ``save_pretrained`` at ``path``."""
    path = _require(Path(path), "transformer")
    return SD3Transformer2DModel.from_pretrained(path, local_files_only=True)


def load_bundle(path: str | Path, *, transformer_path: str | Path | None = None,
                t5_max_length: int = 77, text_encoders: bool = True) -> SD3Bundle:
    """Load the SD3 bundle in diffusers folder ``path`` (optionally another transformer).

    ``text_encoders=False`` leaves the tokenizers and text encoders unloaded (training from a text cache:
    SD3.5-Medium's T5 alone is ~19 GB in float32); ``encode_prompts`` then raises.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    transformer = load_transformer(transformer_path or root / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(_require(root / "scheduler", "scheduler"))
    if (root / "codec" / "config.json").exists():
        kind = json.loads((root / "codec" / "config.json").read_text()).get("type")
        if kind != PIXEL_CODEC_TYPE:
            raise ValueError(f"{root / 'codec' / 'config.json'}: unknown codec type {kind!r}")
        codec = PixelCodec()
    else:
        from diffusers import AutoencoderKL

        codec = VaeCodec(AutoencoderKL.from_pretrained(_require(root / "vae", "vae or codec"), local_files_only=True))
    encoders, tokenizers = [], []
    if not text_encoders:
        return SD3Bundle(transformer, scheduler, codec, t5_max_length=t5_max_length)
    for sub in ("", "_2"):
        tokenizers.append(CLIPTokenizer.from_pretrained(_require(root / f"tokenizer{sub}", f"tokenizer{sub}")))
        enc = CLIPTextModelWithProjection.from_pretrained(
            _require(root / f"text_encoder{sub}", f"text_encoder{sub}"), local_files_only=True)
        encoders.append(enc.eval().requires_grad_(False))
    t5, t5_tok = None, None
    if (root / "text_encoder_3").exists():
        from transformers import T5EncoderModel, T5TokenizerFast

        t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3", local_files_only=True).eval().requires_grad_(False)
        t5_tok = T5TokenizerFast.from_pretrained(_require(root / "tokenizer_3", "tokenizer_3"))
    return SD3Bundle(transformer, scheduler, codec, encoders, tokenizers, t5, t5_tok, t5_max_length)
