"""A tiny random model folder laid out exactly like Stable Diffusion 3.5 Medium's diffusers folder.

``write_sd35_folder`` builds the SD3.5 components with the real diffusers/transformers classes at a tiny
size and saves them with ``StableDiffusion3Pipeline(...).save_pretrained``:

    model_index.json
    scheduler/      FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer/    SD3Transformer2DModel: qk_norm "rms_norm", a dual-attention block, patch 2, 16 channels
    vae/            AutoencoderKL: 4 blocks (factor 8), 16 latent channels, SD3.5's scaling and shift factors,
                    no quant convs
    text_encoder/   CLIP-L as CLIPTextModelWithProjection,  tokenizer/   its CLIPTokenizer (pads with EOT)
    text_encoder_2/ CLIP-G as CLIPTextModelWithProjection,  tokenizer_2/ its CLIPTokenizer (pads with "!")
    text_encoder_3/ T5EncoderModel, sharded (model.safetensors.index.json + shards), tokenizer_3/ T5TokenizerFast

Every weight is stored in float16, as in the released folder. The CLIP tokenizers carry the real 49408-entry
OpenAI CLIP BPE vocabulary (rebuilt from the BPE file inside the installed ``open_clip`` package) and
``model_max_length`` 77; the T5 tokenizer is a small Unigram vocabulary over ``T5_WORDS`` plus single letters.
``t5=False`` writes the same folder without text_encoder_3 / tokenizer_3 (model_index.json names them null),
as diffusers documents for dropping T5.

Wiring as SD3.5: each CLIP's penultimate hidden states ``[B, 77, CLIP_L_HIDDEN]`` and ``[B, 77, CLIP_G_HIDDEN]``
are concatenated and zero-padded to the T5 width ``T5_WIDTH`` (= the transformer's ``joint_attention_dim``);
the pooled embedding is both projections concatenated, ``[B, CLIP_L_PROJ + CLIP_G_PROJ]`` (= the transformer's
``pooled_projection_dim``). Images are multiples of ``VAE_FACTOR * PATCH_SIZE`` = 16 px per side, at most
``VAE_FACTOR * PATCH_SIZE * POS_EMBED_MAX_SIZE`` = 256 px (the transformer's position-embedding grid).

Sizes: transformer 2 MMDiT blocks (the first with dual attention), 2 heads x 8; VAE channels (8, 8, 16, 16), one
ResNet per block; CLIP-L 8 wide and CLIP-G 16 wide, 2 layers each, over the full 49408-token vocabulary; T5 32
wide, 2 layers, gated GELU. A prompt is ``77 + t5_max_length`` text tokens of width 32 and a pooled vector of 24.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408  # OpenAI CLIP BPE: 256 bytes, 256 bytes + "</w>", 48894 merges, 2 specials
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_L_HIDDEN, CLIP_L_PROJ = 8, 8  # SD3.5: 768, 768
CLIP_G_HIDDEN, CLIP_G_PROJ = 16, 16  # SD3.5: 1280, 1280
T5_WIDTH = 32  # SD3.5: 4096 (T5-XXL d_model); must be >= CLIP_L_HIDDEN + CLIP_G_HIDDEN
LATENT_CHANNELS = 16
VAE_FACTOR = 8  # 2 ** (4 blocks - 1)
PATCH_SIZE = 2
POS_EMBED_MAX_SIZE = 16  # SD3.5: 384 patches per side
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609  # SD3.5's VAE
SCHEDULER_SHIFT = 3.0
T5_SHARD_SIZE = "16KB"  # the tiny T5 in float16 is ~50 KB: several shards, as the released T5-XXL's two
T5_WORDS = ("a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "green", "on", "and", "with", "sign",
            "that", "says", "two", "three", "circle", "square", "table", "bench", "under", "sky")


def clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The OpenAI CLIP BPE vocabulary ``{token: id}`` (49408 entries) and its merges (pairs, by rank).

    Built as OpenAI CLIP builds it from ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside ``open_clip``): the 256
    byte-level characters in ``bytes_to_unicode`` order, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (ids 49406, 49407).
    """
    vocab, merges = _clip_bpe()
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe.is_file():
        raise FileNotFoundError(f"{bpe} not found: install open_clip_torch (the test extra) for the CLIP vocabulary")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return vocab, tuple(merges)


CLIP_PAD_TOKENS = {"tokenizer": EOS, "tokenizer_2": "!"}  # SD3.5: CLIP-L pads with EOT, CLIP-G with "!" (id 0)


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """A CLIP tokenizer folder as released: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
    vocab, merges = clip_bpe_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": CLIP_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def t5_tokenizer():
    """A T5 Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁`` + each word of ``T5_WORDS``, ``▁``,
    the letters a-z (any lower-case text tokenizes), no sentinel ids; appends ``</s>``."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in T5_WORDS] + [(chr(c), -6.0) for c in range(ord("a"), ord("z") + 1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(hidden: int, proj: int, act: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=proj, hidden_act=act, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval()  # eos_token_id 2: pooled at argmax(ids) = EOT, as released


def _t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


def _transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=PATCH_SIZE, in_channels=LATENT_CHANNELS,
                                 out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                 pooled_projection_dim=CLIP_L_PROJ + CLIP_G_PROJ, pos_embed_max_size=POS_EMBED_MAX_SIZE,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=64,
                         scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, use_quant_conv=False,
                         use_post_quant_conv=False, force_upcast=True)


def write_sd35_folder(path: str | Path, *, t5: bool = True, seed: int = 0) -> Path:
    """Write the tiny SD3.5-Medium-layout folder (random float16 weights from ``seed``) at ``path``; returns it.

    The same ``seed`` gives the same weights with or without T5 (``t5=False`` only leaves T5 out). The caller's
    global torch RNG state is left as it was.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    vocab, merges = clip_bpe_vocabulary()
    tok_l, tok_g = (CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=CLIP_MAX_LENGTH)
                    for pad in CLIP_PAD_TOKENS.values())  # saved by the pipeline, then written as released below
    t5_tok = t5_tokenizer() if t5 else None
    with torch.random.fork_rng(devices=[]):
        t5_model = _t5_encoder(len(t5_tok), seed + 4) if t5 else None
        pipe = StableDiffusion3Pipeline(
            transformer=_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
            vae=_vae(seed + 1), text_encoder=_clip_encoder(CLIP_L_HIDDEN, CLIP_L_PROJ, "quick_gelu", seed + 2),
            tokenizer=tok_l, text_encoder_2=_clip_encoder(CLIP_G_HIDDEN, CLIP_G_PROJ, "gelu", seed + 3),
            tokenizer_2=tok_g, text_encoder_3=t5_model, tokenizer_3=t5_tok)
    pipe.to(torch.float16)
    pipe.save_pretrained(path)
    for name, pad in CLIP_PAD_TOKENS.items():  # the released files, not transformers' tokenizer.json
        for file in (path / name).iterdir():
            file.unlink()
        write_clip_tokenizer(path / name, pad)
    if t5:  # the released T5-XXL is sharded: model.safetensors.index.json + model-0000k-of-0000n.safetensors
        (path / "text_encoder_3" / "model.safetensors").unlink()
        t5_model.save_pretrained(path / "text_encoder_3", max_shard_size=T5_SHARD_SIZE)
        index = json.loads((path / "text_encoder_3" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, "text_encoder_3 was not sharded"
        model_index = json.loads((path / "model_index.json").read_text())
        model_index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]  # as released (an alias in transformers 5)
        (path / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return path
