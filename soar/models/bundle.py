"""Model bundle of the SD3 family, loaded from a local diffusers folder.

The same loader opens the tiny folder written by ``soar.models.tiny.write_tiny_model`` and a
local Stable Diffusion 3.5 Medium folder (transformer, scheduler, vae, text_encoder[_2,_3],
tokenizer[_2,_3]). Nothing is fetched from a hub: a missing folder is an error naming it.

Prompt encoding is diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (no CLIP skip, one image per
prompt): each CLIP tokenizer pads and truncates to the first CLIP tokenizer's ``model_max_length``
(77 in SD3.5); both CLIP encoders' penultimate hidden states are concatenated on channels, zero-padded
to the T5 width (the transformer's ``joint_attention_dim``) and followed on the sequence axis by ``t5_max_length``
tokens: the T5 states (its tokenizer pads and truncates to that length) or, in an SD3 folder without T5
(diffusers' ``text_encoder_3=None``, SD3's documented memory saver), zeros. The pooled embedding is both
CLIP projections concatenated. The tiny pixel-codec models (``soar.models.tiny``) are not diffusers
pipelines and have no T5 slot: they are conditioned on their CLIP tokens alone.
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
    t5_slot: bool = True  # append t5_max_length zero tokens when there is no T5 encoder (False: tiny pixel models)

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
        """Prompts -> float32 (``prompt_embeds [B, L_clip + t5_max_length, joint_attention_dim]``, ``pooled [B, P]``).

        ``L_clip`` is the first CLIP tokenizer's ``model_max_length``; ``P`` the sum of both CLIP projection
        widths. Without a T5 encoder the last ``t5_max_length`` tokens are zeros, and a tiny pixel model
        (``t5_slot`` False) has none: ``[B, L_clip, joint_attention_dim]`` (module doc).
        """
        if not self.clip_encoders:
            raise RuntimeError("this bundle has no text encoders (loaded with text_encoders=False or freed after "
                               "the text cache was read); prompts must come from the text-embedding cache")
        device = self.clip_encoders[0].device
        clip_length = self.clip_tokenizers[0].model_max_length  # diffusers' tokenizer_max_length, for both CLIPs
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders, strict=True):
            ids = tokenizer(prompts, padding="max_length", max_length=clip_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(device))
            pooled.append(out.text_embeds.to(device))
        clip = torch.cat(hidden, dim=-1)
        width = self.transformer.config.joint_attention_dim
        tokens = [F.pad(clip, (0, width - clip.shape[-1])).float()]  # CLIP-L ⊕ CLIP-G, zero-padded to the T5 width
        if self.t5_encoder is not None:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                    return_tensors="pt").input_ids.to(self.t5_encoder.device)
            tokens.append(self.t5_encoder(ids)[0].to(device).float())
        elif self.t5_slot:  # an SD3 folder without T5: zeros in its place, as diffusers
            tokens.append(torch.zeros(len(prompts), self.t5_max_length, width, device=device))
        return torch.cat(tokens, dim=1), torch.cat(pooled, dim=-1).float()


def _require(folder: Path, what: str) -> Path:
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder not found: {folder} (a diffusers model folder needs it)")
    return folder


def _dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or its name ``"float32"`` (the config's spelling) -> the floating ``torch.dtype``."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"text_encoder_dtype {value!r} is not a floating dtype: use float32, bfloat16 or float16")
    return dtype


def check_finite(model: torch.nn.Module, path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` and the first tensor of ``model`` holding NaN or infinity
    (weights that load fine but would sample black or noise images)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinity, first {bad[0]}; the file is "
                         "damaged or the run that wrote it diverged: restore or retrain it")


def load_transformer(path: str | Path) -> SD3Transformer2DModel:
    """Load the ``SD3Transformer2DModel`` saved with ``save_pretrained`` at ``path``, in float32 whatever its
    stored dtype (SD3.5 Medium stores float16); weights that are not finite are an error naming ``path``."""
    path = _require(Path(path), "transformer")
    model = SD3Transformer2DModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    check_finite(model, path)
    return model


def load_bundle(path: str | Path, *, transformer_path: str | Path | None = None, t5_max_length: int = 77,
                text_encoders: bool = True, text_encoder_dtype: torch.dtype | str = torch.float32) -> SD3Bundle:
    """Load the SD3 bundle in diffusers folder ``path`` (optionally another transformer) on the CPU.

    Dtypes are set explicitly, never taken from the stored weights (SD3.5 Medium stores every weight in
    float16): the transformer and the VAE load in float32, the CLIP and T5 text encoders in
    ``text_encoder_dtype`` (a dtype or its name); ``encode_prompts`` returns float32 either way.
    ``t5_max_length``: T5 tokens per prompt, zeros in a folder without T5 (module doc).
    ``text_encoders=False`` leaves the tokenizers and text encoders unloaded (training from a text cache:
    SD3.5-Medium's T5 alone is ~19 GB in float32); ``encode_prompts`` then raises.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    text_dtype = _dtype(text_encoder_dtype)
    transformer = load_transformer(transformer_path or root / "transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(_require(root / "scheduler", "scheduler"))
    if (root / "codec" / "config.json").exists():
        kind = json.loads((root / "codec" / "config.json").read_text()).get("type")
        if kind != PIXEL_CODEC_TYPE:
            raise ValueError(f"{root / 'codec' / 'config.json'}: unknown codec type {kind!r}")
        codec = PixelCodec()
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(_require(root / "vae", "vae (or a codec folder)"), local_files_only=True,
                                            torch_dtype=torch.float32)
        check_finite(vae, root / "vae")
        codec = VaeCodec(vae)
    t5_slot = not isinstance(codec, PixelCodec)
    encoders, tokenizers = [], []
    if not text_encoders:
        return SD3Bundle(transformer, scheduler, codec, t5_max_length=t5_max_length, t5_slot=t5_slot)
    for sub in ("", "_2"):
        tokenizers.append(CLIPTokenizer.from_pretrained(_require(root / f"tokenizer{sub}", f"tokenizer{sub}")))
        enc = CLIPTextModelWithProjection.from_pretrained(
            _require(root / f"text_encoder{sub}", f"text_encoder{sub}"), local_files_only=True, dtype=text_dtype)
        encoders.append(enc.eval().requires_grad_(False))
    t5, t5_tok = None, None
    if (root / "text_encoder_3").exists():
        from transformers import T5EncoderModel, T5TokenizerFast

        t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3", local_files_only=True, dtype=text_dtype)
        t5 = t5.eval().requires_grad_(False)
        t5_tok = T5TokenizerFast.from_pretrained(_require(root / "tokenizer_3", "tokenizer_3"))
    return SD3Bundle(transformer, scheduler, codec, encoders, tokenizers, t5, t5_tok, t5_max_length, t5_slot)
