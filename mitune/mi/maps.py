"""Pictures of MI maps: where in the image the prompt mattered.

An MI map (``sample_with_mi(..., return_map=True)``) has the latents' shape [C, h, w]; its
channels are summed and the result, at latent resolution, is upsampled to the image and laid
over it as a heat map. Colours are scaled per image (its own maximum), so maps show where, not
how much: compare amounts with the MI values themselves.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OVERLAY_ALPHA = 0.7


def heat(mi_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[C, h, w] map -> [H, W] in [0, 1] at image ``size`` (width, height), bilinear."""
    if mi_map.ndim != 3:
        raise ValueError(f"an MI map is [C, h, w], got shape {tuple(mi_map.shape)}")
    spatial = mi_map.float().sum(0)[None, None]
    width, height = size
    up = F.interpolate(spatial, size=(height, width), mode="bilinear", align_corners=False)[0, 0].clamp(min=0)
    peak = up.max()
    return (up / peak if peak > 0 else up).cpu().numpy()


def overlay(image: Image.Image, mi_map: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image with its MI map as an ``inferno`` heat map on top (alpha grows with MI)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    level = heat(mi_map, image.size)
    colour = matplotlib.colormaps["inferno"](level)[..., :3]
    weight = alpha * level[..., None]
    blended = (1 - weight) * rgb + weight * colour
    return Image.fromarray((blended * 255).round().astype(np.uint8))
