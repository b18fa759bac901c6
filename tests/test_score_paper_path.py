"""The paper profile's scoring code path (pipeline.evaluation, stages.prepare) on tiny random checkpoints.

The score section comes from ``profiles/paper.yaml`` with ``score.checkpoints`` pointed at tiny
randomly initialised models of the published architectures (written by the scorer tests' fixtures),
so the factories, the weights lookup and the options the stages pass are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ruamel.yaml import YAML
from test_geneval_m2f import checkpoints as m2f_checkpoints  # noqa: F401  (fixture)
from test_rewards_clip import folders  # noqa: F401  (fixture)
from test_rewards_hps_ir import TINY_HPS_ARCH, TINY_IR, hps_ckpt, ir_files  # noqa: F401  (fixtures)

from pipeline.config import load_config
from pipeline.evaluation import build_scorers
from soar.rewards import hps, image_reward
from stages.prepare import QUALITY_FUNCTIONS

ROOT = Path(__file__).resolve().parents[1]
ALL_SEVEN = ["aesthetic", "clipscore", "geneval", "hpsv21", "imagereward", "ocr", "pickscore"]


def paper_config(tmp_path: Path, **checkpoints):
    """The paper overlay ``profiles/paper.yaml`` with some ``score.checkpoints`` replaced, loaded through the typed
    config (as ``python -m pipeline.profile paper`` would, on top of the defaults)."""
    yaml = YAML()
    params = yaml.load((ROOT / "profiles" / "paper.yaml").read_text())
    params["score"]["checkpoints"].update({k: str(v) for k, v in checkpoints.items()})
    path = tmp_path / "params.yaml"
    with path.open("w") as f:
        yaml.dump(params, f)
    return load_config(path)


@pytest.fixture
def cfg(tmp_path, folders, m2f_checkpoints):  # noqa: F811
    return paper_config(tmp_path, clip_vit_l14=folders / "clip", pickscore=folders / "pick",
                        pickscore_processor=folders / "proc", aesthetic_mlp=folders / "mlp.pth",
                        mask2former=m2f_checkpoints["mask2former"])


def test_paper_profile_builds_and_runs_all_seven_scorers(cfg, hps_ckpt, ir_files, monkeypatch, tmp_path):  # noqa: F811
    assert cfg.score.geneval_backend == "mask2former"
    assert set(cfg.score.scorers["drawbench"]) == {"pickscore", "clipscore", "hpsv21", "aesthetic", "imagereward"}
    checkpoints = dict(vars(cfg.score.checkpoints))
    cfg = paper_config(tmp_path, **{**checkpoints, "hpsv21": hps_ckpt, **ir_files})
    # the published ViT-H-14 / BLIP ViT-L sizes, swapped for tiny ones of the same family only here
    monkeypatch.setitem(hps.build_hpsv21.__kwdefaults__, "arch", TINY_HPS_ARCH)
    monkeypatch.setitem(image_reward.build_imagereward.__kwdefaults__, "arch", TINY_IR)
    scorers = build_scorers(cfg.score, ALL_SEVEN)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    prompts = ['a photo of a dog with a sign that says "dog"', 'a sign that says "open"']  # OCR needs quotes
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": prompts[0]},
            {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": prompts[1]}]
    for name, scorer in scorers.items():
        records = scorer.score(images, prompts, meta)
        assert len(records) == 2 and all(np.isfinite(r.score) for r in records), name
        assert scorer.aggregate(records), name
    assert type(scorers["geneval"]).__name__ == "Mask2FormerGenEval"


@pytest.mark.parametrize(("name", "key", "path"), [
    ("hpsv21", "hpsv21", "/path/to/HPS_v2.1_compressed.pt"),
    ("imagereward", "image_reward", "/path/to/ImageReward.pt"),
])
def test_placeholder_paths_stop_with_the_key_and_the_file(cfg, name, key, path):
    with pytest.raises(FileNotFoundError, match=rf"score\.checkpoints\.{key}: {path} does not exist"):
        build_scorers(cfg.score, [name])


def test_prepare_aesthetic_filter_scores_any_image_size(cfg):
    quality = QUALITY_FUNCTIONS[cfg.data.quality](cfg.score)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 64, 3), (64, 40, 3), (32, 32, 3))]
    scores = quality(images)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    one_by_one = [quality([im])[0] for im in images]
    np.testing.assert_allclose(scores, one_by_one, rtol=0, atol=1e-5)
    aesthetic = build_scorers(cfg.score, ["aesthetic"])["aesthetic"]
    assert scores[2] == pytest.approx(aesthetic.score(images[2][None], [""], [{}])[0].score, abs=1e-6)
