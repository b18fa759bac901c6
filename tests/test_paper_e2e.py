"""End to end on the paper profile: `python -m pipeline.profile paper` in a copy of the repo, its paths pointed at
a tiny random folder in Stable Diffusion 3.5 Medium's layout (tests/sd35_layout.py) and at a JSONL with bad
lines and three aspect buckets, sizes reduced; then `dvc repro` and `dvc exp run -S soar.lambda_aux=0.5`.

Checks what a paper user meets: the tiny-only pretrain stage stays out of the way, prepare drops the bad
lines, the trained weights, checkpoints and snapshots stay out of DVC's cache and out of git, and an image
of the sample stage equals diffusers' own ``StableDiffusion3Pipeline`` for the same prompt, noise, steps
and CFG (text encoders in bf16 as the paper profile sets, the rest float32).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet_layout import random_mask2former, save_checkpoint
from PIL import Image
from repo_copy import commit_all, copy_checkout, ran_stages, run
from ruamel.yaml import YAML
from sd35_layout import write_sd35_folder
from test_rewards_clip import folders  # noqa: F401  (fixture)

from pipeline.config import parse_config, read_params
from soar.rewards.geneval_m2f import MMDET_CHECKPOINT

pytestmark = pytest.mark.slow  # `dvc repro` in subprocesses: minutes

BUCKETS = [(64, 64), (80, 48), (48, 80)]  # (bw, bh), multiples of 16 = VAE factor 8 x patch 2
WORDS = ["SOAR", "OPEN", "CAT", "SUN"]
COLORS = ["red", "blue", "green"]
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"}]
OCR = ['a storefront sign that says "SOAR"', 'a poster that says "OPEN"']
DRAWBENCH = ["a watercolor painting of a lighthouse at dusk", "a red apple on a table"]
SETTINGS = {  # seconds-scale sizes on top of the paper profile; everything else is profiles/paper.yaml
    "data": {"quality_threshold": -1.0e9, "dataloader_num_workers": 0},  # random aesthetic MLP: keep every image
    "train": {"max_train_steps": 2, "train_batch_size": 2, "checkpointing_steps": 1, "snapshot_steps": 1,
              "mixed_precision": "no", "log_every": 1, "validation_steps": 2, "validation_num_inference_steps": 2,
              "validation_resolution": 64},
    "soar": {"trajectory_length": 2},
    "grpo": {"max_train_steps": 2, "prompts_per_iteration": 2, "num_image_per_prompt": 2, "num_steps": 2,
             "sample_batch_size": 2, "train_batch_size": 2, "resolution": 64, "checkpointing_steps": 2,
             "snapshot_steps": 1, "mixed_precision": "no", "log_every": 1, "validation_steps": 2,
             "validation_num_inference_steps": 2, "validation_resolution": 64},
    "prompt_files": {"files": []},  # nothing downloaded: the sets below are local files
    "sample": {"resolution": 64, "num_inference_steps": 2, "batch_size": 1, "grid_prompts": 2},
    "dynamics": {"max_prompts_per_set": 1},
    "launch": {"config_file": "pipeline/launch/cpu.yaml", "num_processes": 1},
}


def write_dataset(root: Path) -> tuple[Path, Path]:
    """18 captioned JPEGs in three aspect buckets, plus a malformed line, a missing image and an empty caption."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(18):
        bw, bh = BUCKETS[i % len(BUCKETS)]
        pixels = rng.integers(0, 256, (bh + 8, bw + 6, 3), dtype=np.uint8)  # resized and cropped to the bucket
        md5 = hashlib.md5(pixels.tobytes()).hexdigest()
        Image.fromarray(pixels).save(images / f"{md5}.jpg", quality=95)
        caption = f'a photo of a {COLORS[i % 3]} cat with a sign that says "{WORDS[i % 4]}"'
        lines.append(json.dumps({"md5": md5, "caption_en": caption, "bw": bw, "bh": bh}))
    lines.insert(3, '{"md5": "broken", "caption_en": ')
    lines.insert(7, json.dumps({"md5": "0" * 32, "caption_en": "a photo of a dog", "bw": 64, "bh": 64}))
    lines.insert(11, json.dumps({"md5": md5, "caption_en": " ", "bw": 64, "bh": 64}))
    jsonl = root / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, images


@pytest.fixture(scope="module")
def paper_repo(tmp_path_factory, folders) -> tuple[Path, dict]:  # noqa: F811
    dest = copy_checkout(tmp_path_factory.mktemp("paper") / "repo")
    outside = dest.parent
    write_sd35_folder(outside / "sd35", t5=True, seed=0)
    detector = save_checkpoint(outside / MMDET_CHECKPOINT, random_mask2former().state_dict())  # GenEval's format
    jsonl, images = write_dataset(outside / "dataset")
    sets = outside / "prompts"
    sets.mkdir()
    (sets / "geneval.jsonl").write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    (sets / "ocr.txt").write_text("\n".join(OCR) + "\n")
    (sets / "drawbench.txt").write_text("\n".join(DRAWBENCH) + "\n")
    env = commit_all(dest, "checkout")
    run([sys.executable, "-m", "pipeline.profile", "paper"], dest, env)
    params = read_params(dest / "params.yaml")
    for section, values in SETTINGS.items():
        params[section].update(values)
    params["data"].update(jsonl_path=str(jsonl), image_dir=str(images))
    params["model"]["base_path"] = str(outside / "sd35")
    params["grpo"]["prompts"] = str(sets / "geneval.jsonl")  # stands for Flow-GRPO's GenEval training prompts
    params["sample"]["prompt_sets"] = {
        "geneval": {"path": str(sets / "geneval.jsonl"), "format": "geneval", "images_per_prompt": 1},
        "ocr": {"path": str(sets / "ocr.txt"), "format": "text", "images_per_prompt": 1},
        "drawbench": {"path": str(sets / "drawbench.txt"), "format": "text", "images_per_prompt": 1}}
    # the reference rows (SD-XL, SD3.5-L, FLUX.1-dev) need their public weights; tests/test_pipeline_e2e.py runs one
    # tiny model of each family through the same stages
    params["references"] = {}
    # HPSv2.1 and ImageReward exist only at their published sizes (ViT-H-14, BLIP ViT-L): too big for a test run
    params["score"]["scorers"]["drawbench"] = ["pickscore", "clipscore", "aesthetic"]
    params["score"]["checkpoints"].update(
        clip_vit_l14=str(folders / "clip"), pickscore=str(folders / "pick"), pickscore_processor=str(folders / "proc"),
        aesthetic_mlp=str(folders / "mlp.pth"), mask2former=str(detector))
    parse_config(params)  # the edited profile is still a valid configuration
    with (dest / "params.yaml").open("w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    run(["git", "commit", "-qam", "paper profile, reduced"], dest, env)
    return dest, env


@pytest.fixture(scope="module")
def paper_repro(paper_repo) -> str:
    dest, env = paper_repo
    return run([sys.executable, "-m", "dvc", "repro"], dest, env, timeout=1500)


def test_plain_dvc_repro_runs_the_paper_graph(paper_repo, paper_repro):
    dest, _ = paper_repo
    assert {"synth", "prepare", "pretrain", "embed", "train@sft", "train@soar", "train@grpo", "sample@base",
            "sample@sft", "sample@soar", "sample@grpo", "score@base", "score@sft", "score@soar", "score@grpo",
            "dynamics@sft", "dynamics@soar", "dynamics@grpo", "report"} <= ran_stages(paper_repro)
    tiny_base = dest / "data/models/tiny_base"
    assert (tiny_base / "NOT_BUILT.md").is_file() and not (tiny_base / "transformer").exists()
    report = json.loads((dest / "data/prepared/report.json").read_text())
    assert report["lines"] == 21 and report["kept"] == 18
    assert {k: v for k, v in report["dropped"].items() if v} == {"malformed": 1, "missing_image": 1,
                                                                   "empty_caption": 1}
    md = (dest / "data/report/results.md").read_text()
    assert md.startswith("# Results, each with its 95 % interval\n")  # not labelled as tiny-world metrics
    for row in ("| base |", "| + SFT | ", "| + SOAR | ", "| + GRPO | "):
        assert row in md
    metrics = json.loads((dest / "data/scores/soar/metrics.json").read_text())
    assert {"geneval", "ocr", "clipscore", "pickscore", "aesthetic"} <= set(metrics)
    meta = json.loads((dest / "data/cache/text_embeddings/meta.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["text_encoder_dtype"] == "bfloat16"
    settings = json.loads((dest / "data/samples/base/ocr/sampling.json").read_text())
    assert settings["t5_max_length"] == 256 and settings["text_encoder_dtype"] == "bfloat16"


def test_weights_checkpoints_and_snapshots_stay_out_of_dvc_cache_and_git(paper_repo, paper_repro):
    dest, env = paper_repo
    soar = dest / "data/models/soar"
    assert (soar / "transformer").is_dir() and (soar / "snapshots/step-000002").is_dir()
    assert sorted(p.name for p in (soar / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    weights = {hashlib.md5(p.read_bytes()).hexdigest() for p in soar.rglob("*.safetensors")}
    cached = {p.parent.name + p.name for p in (dest / ".dvc/cache/files/md5").rglob("*") if p.is_file()}
    assert weights and not weights & cached  # no weights file was copied into the cache
    lock = YAML(typ="safe").load((dest / "dvc.lock").read_text())
    out = lock["stages"]["train@soar"]["outs"][0]
    assert out["path"] == "data/models/soar" and out["md5"].endswith(".dir")  # hashed, so downstream tracks it
    status = run(["git", "status", "--porcelain", "--ignored", "data/models"], dest, env)
    assert "data/models/soar" in status and all(line.startswith("!!") for line in status.splitlines())


def test_sampled_image_equals_diffusers_pipeline(paper_repo, paper_repro):
    from diffusers import StableDiffusion3Pipeline

    from soar.euler import initial_noise

    dest, _ = paper_repo
    folder = dest.parent / "sd35"
    entry = json.loads((dest / "data/samples/base/ocr/index.jsonl").read_text().splitlines()[0])
    ours = np.asarray(Image.open(dest / "data/samples/base/ocr" / entry["path"]).convert("RGB"))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.to(torch.bfloat16)  # model.text_encoder_dtype of the paper profile
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            entry["prompt"], None, None, negative_prompt="", do_classifier_free_guidance=True,
            max_sequence_length=256)
        noise = initial_noise([entry["seed"]], (16, 8, 8))
        latents = pipe(prompt_embeds=embeds.float(), negative_prompt_embeds=negative.float(),
                       pooled_prompt_embeds=pooled.float(), negative_pooled_prompt_embeds=negative_pooled.float(),
                       latents=noise, num_inference_steps=2, guidance_scale=4.5, height=64, width=64,
                       output_type="latent").images
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    theirs = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, theirs), np.abs(ours.astype(int) - theirs).max()


def test_exp_run_reruns_only_soar_on_the_paper_profile(paper_repo, paper_repro):
    dest, env = paper_repo
    again = run([sys.executable, "-m", "dvc", "repro"], dest, env)
    assert ran_stages(again) == set(), again
    exp = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "soar.lambda_aux=0.5"], dest, env, timeout=1500)
    assert ran_stages(exp) == {"train@soar", "sample@soar", "score@soar", "dynamics@soar", "report"}, exp
