"""Build the embedded tiny SD3-family model from scratch and save it as a diffusers folder.

Same classes as SD3.5-Medium (SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, two
CLIPTextModelWithProjection encoders with CLIP BPE tokenizers), at a size that trains on a
laptop CPU. No T5 and no VAE: the tiny profile uses the explicit pixel codec
(``soar.models.codec.PixelCodec``), and the transformer works on RGB pixels in [-1, 1].

The tokenizer vocabulary is built from the training captions: every byte-level character
(so any text, e.g. a quoted word for OCR, is spelled out) plus whole-word BPE merges for the
caption words outside quotes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from soar.schema import at_least, check, positive

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

# diffusers, transformers and torch load inside the builders: every stage reads TinyModelConfig (pipeline.config)
# and most never build a model, so importing them here would cost each stage's start-up seconds

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_SUFFIX = "</w>"  # CLIP BPE end-of-word marker
_QUOTED = re.compile(r'"[^"]*"')
_WORD = re.compile(r"[a-z]+")
NUM_TRAIN_TIMESTEPS = 1000  # SD3 scheduler training steps


@dataclass(frozen=True)
class TinyModelConfig:
    """The ``model.tiny`` section: the architecture the pretrain stage builds from scratch."""

    sample_size: int = 32  # latent side; with the pixel codec equal to the image side, pixels
    patch_size: int = 4  # transformer patch side, latent pixels (4: 8 x 8 tokens, 3.6x cheaper per step than 2)
    num_layers: int = 4  # MMDiT blocks
    num_attention_heads: int = 4  # attention heads per block
    attention_head_dim: int = 32  # width of one head
    joint_attention_dim: int = 64  # width of the text tokens fed to the transformer
    pooled_projection_dim: int = 64  # width of the pooled text embedding (sum of both CLIP projections)
    caption_projection_dim: int = 128  # transformer width (= heads x head_dim in SD3)
    qk_norm: str | None = "rms_norm"  # "rms_norm" as in SD3.5, or null
    text_hidden_size: int = 32  # width of each tiny CLIP text encoder
    text_layers: int = 2  # layers of each tiny CLIP text encoder
    text_max_length: int = 24  # tokens per prompt for the CLIP tokenizers
    shift: float = 1.0  # scheduler shift (SD3.5: 3.0 for 128 x 128 latents; 1.0 suits 32 px pixels)

    def __post_init__(self) -> None:
        at_least(self, 1, "sample_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim",
                 "joint_attention_dim", "pooled_projection_dim", "caption_projection_dim", "text_hidden_size",
                 "text_layers", "text_max_length")
        positive(self, "shift")
        check(self.sample_size % self.patch_size == 0, "sample_size", "must divide by patch_size")
        check(self.caption_projection_dim == self.num_attention_heads * self.attention_head_dim,
              "caption_projection_dim", "must equal num_attention_heads * attention_head_dim")
        check(self.pooled_projection_dim == 2 * self.text_hidden_size, "pooled_projection_dim",
              "must be 2 * text_hidden_size (two CLIP encoders)")


def caption_words(captions: Iterable[str]) -> list[str]:
    """Sorted lower-case words of the captions, ignoring quoted text (which stays spelled out)."""
    words: set[str] = set()
    for caption in captions:
        words.update(_WORD.findall(_QUOTED.sub(" ", caption.lower())))
    return sorted(words)


def build_clip_tokenizer(words: Iterable[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer: all byte-level characters plus whole-word merges for ``words``."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + WORD_SUFFIX for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + WORD_SUFFIX if i == len(word) - 1 else ch
            pair = (prefix, right)
            prefix = prefix + right
            if prefix not in vocab:
                merges.append(pair)
                vocab[prefix] = len(vocab)
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_text_encoder(tokenizer: CLIPTokenizer, arch: TinyModelConfig, seed: int) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text encoder with projection (frozen during post-training)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden_size,
        intermediate_size=4 * arch.text_hidden_size,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=max(1, arch.text_hidden_size // 32),
        max_position_embeddings=arch.text_max_length,
        projection_dim=arch.text_hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def build_transformer(arch: TinyModelConfig, seed: int) -> SD3Transformer2DModel:
    """A randomly initialised SD3 MMDiT on 3-channel pixel latents."""
    import torch
    from diffusers import SD3Transformer2DModel

    from soar.models.codec import PixelCodec

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=arch.sample_size,
        patch_size=arch.patch_size,
        in_channels=PixelCodec.channels,
        out_channels=PixelCodec.channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=arch.joint_attention_dim,
        caption_projection_dim=arch.caption_projection_dim,
        pooled_projection_dim=arch.pooled_projection_dim,
        pos_embed_max_size=arch.sample_size // arch.patch_size,
        qk_norm=arch.qk_norm,
        dual_attention_layers=(),
    )


def write_tiny_model(out_dir: Path, arch: TinyModelConfig, captions: Iterable[str], seed: int) -> None:
    """Write a complete tiny model folder (random weights) that ``load_bundle`` opens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from soar.models.codec import PixelCodec

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(caption_words(captions), arch.text_max_length)
    for i, sub in enumerate(("", "_2")):
        tokenizer.save_pretrained(out_dir / f"tokenizer{sub}")
        build_text_encoder(tokenizer, arch, seed + 1 + i).save_pretrained(out_dir / f"text_encoder{sub}")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=arch.shift).save_pretrained(
        out_dir / "scheduler"
    )
    PixelCodec().save(out_dir / "codec")
    build_transformer(arch, seed).save_pretrained(out_dir / "transformer")
