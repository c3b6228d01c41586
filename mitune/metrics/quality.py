"""Image-set quality: Fréchet distances (FID, FD-DINOv2) and CMMD, with pluggable extractors.

The distance math is here and tested on closed forms; the default extractors load real models:

* FID: clean-fid's Inception-v3 (the TF-FID torchscript weights, "clean" PIL bicubic resize to
  299). Only ``cleanfid.inception_torchscript`` and ``cleanfid.resize`` are imported; they need
  no torchvision, but ``pip install clean-fid`` pulls torchvision, so install it where torch is
  the CUDA wheel (``pip install -e '.[eval]'``) or with ``--no-deps``.
* FD-DINO: DINOv2 ViT-L/14 CLS token after the final layer norm (``Dinov2Model.pooler_output``),
  as dgm-eval (Stein et al., 2023) uses it.
* CMMD: CLIP ViT-L/14@336 image embeddings (L2-normalised) and an RBF-kernel MMD with
  sigma = 10, scaled by 1000, as google-research/cmmd (Jayasumana et al., 2024).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from mitune.metrics.base import FeatureExtractor, QualityMetric
from mitune.metrics.clip import image_features
from mitune.metrics.hub import MissingModelError, local_model

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


# ----------------------------------------------------------------------------- math


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features [N, D] (N > 1)."""
    x = features.double().numpy()
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the 2-Wasserstein distance of two Gaussians.

    When the product is singular (fewer samples than dimensions), ``eps`` is added to both
    diagonals, as in clean-fid and pytorch-fid.
    """
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FloatingPointError(f"sqrtm has an imaginary part up to {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def rbf_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), k = exp(-||a - b||^2 / (2 sigma^2)).

    The biased (V-statistic) estimate over all pairs, diagonals included, as CMMD computes it.
    """
    x, y = x.double(), y.double()
    gamma = 1.0 / (2 * sigma**2)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).pow(2)).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)))


# ----------------------------------------------------------------------------- metrics


class FrechetDistance(QualityMetric):
    """Fréchet distance between Gaussians fitted to two feature sets.

    Needs at least 2 images per set (a covariance). With fewer images than feature dimensions
    the covariance is singular and the estimate is biased upwards and noisy: this warns, as
    FID is normally reported on thousands of images (50k for the standard protocol).
    """

    name = "fd"
    min_samples = 2

    def compare(self, features: torch.Tensor, reference: torch.Tensor) -> float:
        dim = features.shape[1]
        smallest = min(len(features), len(reference))
        if smallest <= dim:
            warnings.warn(
                f"{self.name}: {smallest} images for {dim}-dim features gives a singular covariance; "
                "the distance is biased and only comparable at equal set sizes", stacklevel=3,
            )
        return frechet_distance(*gaussian_stats(features), *gaussian_stats(reference))


class FID(FrechetDistance):
    """FID with clean-fid's Inception features (``extractor`` replaces them, e.g. in tests)."""

    name = "fid"

    def __init__(self, extractor: FeatureExtractor | None = None, *, device: str = "cpu",
                 weights_dir: str | os.PathLike | None = None, batch_size: int = 32, progress: bool = True) -> None:
        if extractor is None:
            extractor = CleanFIDInception(device=device, weights_dir=weights_dir)
        super().__init__(extractor, batch_size=batch_size, progress=progress)


class FDDino(FrechetDistance):
    """Fréchet distance on DINOv2 CLS features (FD_DINOv2)."""

    name = "fd_dino"

    def __init__(self, extractor: FeatureExtractor | None = None, *, model_name_or_path: str = "facebook/dinov2-large",
                 device: str = "cpu", batch_size: int = 32, progress: bool = True) -> None:
        if extractor is None:
            extractor = DinoV2Features(model_name_or_path, device=device)
        super().__init__(extractor, batch_size=batch_size, progress=progress)


class CMMD(QualityMetric):
    """CLIP-embedding MMD (CMMD): unlike FID it assumes no Gaussian and needs only one image per set."""

    name = "cmmd"
    min_samples = 1

    def __init__(self, extractor: FeatureExtractor | None = None, *,
                 model_name_or_path: str = "openai/clip-vit-large-patch14-336", device: str = "cpu",
                 batch_size: int = 32, progress: bool = True) -> None:
        if extractor is None:
            extractor = CLIPImageFeatures(model_name_or_path, device=device)
        super().__init__(extractor, batch_size=batch_size, progress=progress)

    def compare(self, features: torch.Tensor, reference: torch.Tensor) -> float:
        return rbf_mmd(features, reference)


# ----------------------------------------------------------------------------- extractors


class CleanFIDInception:
    """clean-fid's "clean" mode: PIL bicubic resize to 299 in float, then TF-Inception pool3 (2048)."""

    def __init__(self, device: str = "cpu", weights_dir: str | os.PathLike | None = None) -> None:
        try:
            from cleanfid.downloads_helper import check_download_inception, inception_url
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError as err:
            raise ImportError(
                "FID needs clean-fid: `pip install -e '.[eval]'` (pulls torchvision; on a CPU-only torch "
                "use `pip install clean-fid --no-deps`), or pass your own `extractor`"
            ) from err
        self.device = torch.device(device)
        folder = _weights_dir(weights_dir)
        try:
            check_download_inception(fpath=folder)
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise MissingModelError(
                f"fid needs clean-fid's Inception weights: {folder}/inception-2015-12-05.pt is missing and "
                f"downloading {inception_url} failed ({getattr(err, 'reason', err)}); download that file into "
                f"{folder}, or point the FID metric's weights_dir at a folder holding it "
                "(mitune.evaluate: eval.metric_kwargs.fid.weights_dir=<folder>)"
            ) from None
        self.model = InceptionV3W(folder, download=False, resize_inside=False).to(self.device).eval()
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = [self.resize(np.asarray(image.convert("RGB"))) for image in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().to(self.device)
        return self.model(batch).cpu()


def _weights_dir(weights_dir: str | os.PathLike | None) -> str:
    """Where clean-fid's Inception weights live (downloaded once): given dir or ~/.cache/mitune."""
    folder = os.path.expanduser(weights_dir or os.path.join("~", ".cache", "mitune", "clean-fid"))
    os.makedirs(folder, exist_ok=True)
    return folder


class DinoV2Features:
    """DINOv2 CLS token after the last layer norm, with the model's own preprocessing."""

    def __init__(self, model_name_or_path: str, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, "fd_dino")
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.model = Dinov2Model.from_pretrained(model_name_or_path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).pooler_output.cpu()


class CLIPImageFeatures:
    """L2-normalised CLIP image embeddings (CMMD's features)."""

    def __init__(self, model_name_or_path: str, device: str = "cpu") -> None:
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, "cmmd")
        self.processor = CLIPImageProcessor.from_pretrained(model_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        features = image_features(self.model, pixels)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
