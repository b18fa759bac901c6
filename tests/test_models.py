"""The tiny SD3 bundle (real diffusers/transformers classes), prompt sets and deterministic sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from helpers import TINY_ARCH

from soar.data.prompts import read_prompt_set
from soar.euler import image_seed, sample, sampling_sigmas
from soar.models.bundle import load_bundle
from soar.models.tiny import TinyModelConfig, build_clip_tokenizer, caption_words, write_tiny_model

ARCH = TinyModelConfig(**TINY_ARCH)
CAPTIONS = ["a photo of a red circle", 'a sign that says "CAT"', "a photo of two blue squares"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    write_tiny_model(out, ARCH, CAPTIONS, seed=0)
    return out


def test_tokenizer_merges_caption_words_and_spells_quoted_text():
    assert caption_words(CAPTIONS) == ["a", "blue", "circle", "of", "photo", "red", "says", "sign", "squares",
                                       "that", "two"]
    tok = build_clip_tokenizer(caption_words(CAPTIONS), 12)
    assert tok.tokenize('a red circle "cat"') == ["a</w>", "red</w>", "circle</w>", '"</w>', "c", "a", "t</w>",
                                                  '"</w>']
    ids = tok(["a red"], padding="max_length", max_length=12).input_ids[0]
    assert ids[0] == tok.bos_token_id and ids[3] == tok.eos_token_id and len(ids) == 12


def test_bundle_round_trip_uses_real_classes(folder):
    bundle = load_bundle(folder)
    assert isinstance(bundle.transformer, SD3Transformer2DModel)
    assert bundle.scheduler.config.shift == 3.0 and bundle.t5_encoder is None
    embeds, pooled = bundle.encode_prompts(["a photo of a red circle", ""])
    assert embeds.shape == (2, 12, 32) and pooled.shape == (2, 32)  # a tiny pixel model: its 12 CLIP tokens only
    assert not torch.allclose(embeds[0], embeds[1])
    again = load_bundle(folder)
    for a, b in zip(bundle.transformer.parameters(), again.transformer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_missing_folders_are_named(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="other_transformer"):
        load_bundle(folder, transformer_path=tmp_path / "other_transformer")


def test_sampling_is_a_function_of_prompt_and_seed(folder):
    bundle = load_bundle(folder)
    prompts = ["a photo of a red circle", "a photo of two blue squares", 'a sign that says "CAT"']
    seeds = [image_seed(7, i, 0) for i in range(3)]
    together = sample(bundle, prompts, seeds, steps=3, guidance_scale=4.5, resolution=16)
    assert together.shape == (3, 16, 16, 3) and together.dtype == np.uint8
    alone = sample(bundle, prompts[1:2], seeds[1:2], steps=3, guidance_scale=4.5, resolution=16)
    assert np.abs(alone[0].astype(int) - together[1].astype(int)).max() <= 1  # batch composition: rounding only
    other_seed = sample(bundle, prompts[1:2], [image_seed(8, 1, 0)], steps=3, guidance_scale=4.5, resolution=16)
    assert not np.array_equal(other_seed[0], together[1])
    assert len({image_seed(0, i, j) for i in range(50) for j in range(4)}) == 200


def test_sampling_sigmas_run_from_one_to_zero(folder):
    sigmas = sampling_sigmas(load_bundle(folder), 40)
    assert sigmas.shape == (41,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_prompt_sets_read_and_errors_name_the_line(tmp_path):
    gen = tmp_path / "g.jsonl"
    gen.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                               "prompt": "a photo of a circle"}) + "\n")
    items = read_prompt_set(gen, "geneval")
    assert items[0].prompt == "a photo of a circle" and items[0].metadata["tag"] == "single_object"
    txt = tmp_path / "p.txt"
    txt.write_text('a sign that says "A"\na sign that says "B"')  # no trailing newline, like Flow-GRPO's files
    assert [i.prompt for i in read_prompt_set(txt, "text")] == ['a sign that says "A"', 'a sign that says "B"']
    txt.write_text("one\n\nthree\n")
    with pytest.raises(ValueError, match=r"p.txt:2: empty line"):
        read_prompt_set(txt, "text")
    gen.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"g.jsonl:2: invalid JSON"):
        read_prompt_set(gen, "geneval")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_set(tmp_path / "missing.txt", "text")


def test_weights_with_nan_are_refused_at_load(folder, tmp_path):
    """A file that loads (valid header, right shapes) but holds a NaN: an error naming the folder and tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "model"
    shutil.copytree(folder, bad)
    weights = next((bad / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model/transformer: 1 weight tensor\(s\) hold NaN or infinity, first "
                                         rf"{name.replace('.', r'[.]')}"):
        load_bundle(bad)


def test_a_non_finite_image_stops_sampling_naming_the_prompt(folder):
    """NaN in the weights after loading (a diverged run's state, say): no image is returned for the batch."""
    bundle = load_bundle(folder)
    with torch.no_grad():
        bundle.transformer.proj_out.weight[0, 0] = float("inf") * 0  # NaN in the output projection
    prompts = ["a photo of a red circle", 'a sign that says "CAT"']
    with pytest.raises(FloatingPointError, match=r"2 of 2 image\(s\) came out NaN or infinite, first for prompt "
                                                 r"'a photo of a red circle' \(seed 11\); nothing of this batch"):
        sample(bundle, prompts, [11, 12], steps=2, guidance_scale=4.5, resolution=16)
