"""Image sizes a model folder can take, read from its config files (no weights are loaded).

A latent is the image downscaled by the codec's factor (SD3.5's VAE: 2 ** (len(block_out_channels) - 1) = 8,
as diffusers computes ``vae_scale_factor``; the tiny pixel codec: 1), and the transformer cuts it into
``patch_size`` x ``patch_size`` patches (SD3.5: 2). Every training bucket side and sampling resolution must
therefore be a multiple of factor x patch (SD3.5: 16 px), else the first forward fails with a tensor-size error.
"""

from __future__ import annotations

import json
from pathlib import Path

from soar.models.codec import PIXEL_CODEC_TYPE


def _config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"model folder {path.parent.parent} has no {path.parent.name}/config.json "
                                f"(expected {path})")
    return json.loads(path.read_text())


def codec_downscale(model_dir: str | Path) -> int:
    """Pixels per latent pixel of the folder's codec (``codec/`` = the pixel codec, else ``vae/``)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    if (root / "codec" / "config.json").is_file():
        kind = _config(root / "codec" / "config.json").get("type")
        if kind != PIXEL_CODEC_TYPE:
            raise ValueError(f"{root / 'codec' / 'config.json'}: unknown codec type {kind!r}")
        return 1
    return 2 ** (len(_config(root / "vae" / "config.json")["block_out_channels"]) - 1)


def pixel_multiple(model_dir: str | Path) -> int:
    """The side multiple, in pixels, of every image the folder's model trains on or samples: downscale x patch."""
    return codec_downscale(model_dir) * int(_config(Path(model_dir) / "transformer" / "config.json")["patch_size"])


def check_side(side: int, multiple: int, key: str, model_dir: str | Path) -> None:
    """Raise ``ValueError`` naming ``key`` when the image side ``side`` (pixels) is not a multiple of ``multiple``."""
    if side % multiple:
        lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
        raise ValueError(f"{key} is {side} px, not a multiple of {multiple} px (codec factor x patch size of "
                         f"{model_dir}); use {lower or upper} or {upper}")
