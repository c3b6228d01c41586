"""The toy world's image features for Fréchet distances (``make toy-features``).

FID measures image quality as the distance between Gaussians fitted to the features of generated and
real images, in the penultimate layer of a network trained to recognise what natural images show
(Inception-v3 on ImageNet). The toy world has no Inception, but it has an exact renderer: this
module trains the same kind of network on it. A small CNN learns to say which colors, shapes, sizes
and textures a rendered scene holds and whether it has one object or two; its penultimate layer
(``FEATURE_DIM`` values, before the ReLU) is the feature space of ``toy_fd`` (``mitune.toy.metric.ToyFD``),
where renderer scenes of the evaluated prompts are the "real" images. Small (``FEATURE_DIM``) so that
a category's few hundred images give a full-rank covariance. Weights: ``mitune/assets/toy-features``
(safetensors, with its training record and model card).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mitune import ASSETS
from mitune.toy import oracle
from mitune.toy.world import (
    CATEGORIES,
    COLORS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    render,
    sample_scene,
    to_tensor,
)

log = logging.getLogger(__name__)

FEATURES_DIR = ASSETS / "toy-features"
WEIGHTS_FILE = "model.safetensors"
FEATURE_DIM = 16
LABELS = (*(f"color={c}" for c in COLORS), *(f"shape={s}" for s in SHAPES), *(f"size={s}" for s in SIZES),
          *(f"texture={t}" for t in TEXTURES), "two objects")
"""What the network learns to see in a scene (multi-label): every attribute value drawn, and the count."""


class ToyFeatureNet(nn.Module):
    """Four 3x3 conv layers (32 px -> 4 px), global average pooling, a ``FEATURE_DIM`` feature layer and
    a linear multi-label head (training only)."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 64, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                   for i, (a, b) in enumerate(pairwise(widths)))
        self.features = nn.Linear(widths[-1], FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, len(LABELS))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], NCHW -> features [N, FEATURE_DIM]: the feature layer before its ReLU, so that a unit
        the ReLU silences on every image does not leave the covariance singular."""
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.features(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))


def scene_labels(scene: Scene, image: np.ndarray) -> np.ndarray:
    """The multi-hot label of a rendered scene, read by the exact oracle (so attributes the prompt left
    open and the renderer filled in are labelled too)."""
    found = oracle.detect(image)
    values = {f"{attr}={getattr(o, attr)}" for o in found for attr in ("color", "shape", "size", "texture")}
    if len(scene.objects) == 2:
        values.add("two objects")
    return np.array([label in values for label in LABELS], dtype=np.float32)


def scenes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` renderer scenes of every category (uint8 NHWC) and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = np.empty((n, 32, 32, 3), dtype=np.uint8), np.empty((n, len(LABELS)), dtype=np.float32)
    for i in range(n):
        scene = sample_scene(str(rng.choice(CATEGORIES)), rng)
        images[i] = render(scene, 32, rng)
        labels[i] = scene_labels(scene, images[i])
    return images, labels


@dataclass(frozen=True)
class FeatureTrainConfig:
    num_images: int = 20_000
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0
    test_images: int = 2000


def train(config: FeatureTrainConfig) -> tuple[ToyFeatureNet, dict]:
    """Train the network on renderer scenes; the record holds its held-out per-label accuracy."""
    torch.manual_seed(config.seed)
    start = time.time()
    images, labels = scenes(config.num_images, config.seed)
    test_images, test_labels = scenes(config.test_images, config.seed + 1)
    x, y = to_tensor(images), torch.from_numpy(labels)
    net = ToyFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        batch = torch.randint(len(x), (config.batch,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == config.steps - 1:
            log.info("step %d: loss %.4f", step, loss.item())
    net.eval()
    with torch.no_grad():
        predicted = net(to_tensor(test_images)) > 0
    accuracy = (predicted == torch.from_numpy(test_labels).bool()).float().mean(0)
    record = {"config": asdict(config), "labels": list(LABELS), "feature_dim": FEATURE_DIM,
              "final_loss": round(loss.item(), 4), "test_accuracy": {k: round(float(a), 4) for k, a in zip(LABELS, accuracy)},
              "test_exact_match": round(float((predicted == torch.from_numpy(test_labels).bool()).all(1).float().mean()), 4),
              "train_seconds": round(time.time() - start, 1)}
    return net, record


MODEL_CARD = """# mitune toy-world feature network (`toy_fd`)

The feature space of `toy_fd` (`mitune.toy.metric.ToyFD`), the toy world's Fréchet distance: FID's
recipe with the toy world's own network in place of Inception-v3. Trained from scratch by
`make toy-features` (`python -m mitune.toy.features`), {train_seconds:.0f} s on a CPU.

- **What it is**: 4 conv layers (32 px -> 4 px), global average pooling, a {feature_dim}-unit ReLU
  feature layer and a linear multi-label head used only in training. The features are that layer's
  values before the ReLU (a unit the ReLU silences on every image would make the covariance singular).
- **Trained on**: {num_images} scenes drawn by the toy renderer (`mitune.toy.world`, all five
  categories, seed {seed}), {steps} AdamW steps of batch {batch}, one-cycle lr {lr}; labels: which colors,
  shapes, sizes and textures a scene holds and whether it has two objects ({n_labels} labels).
- **Held-out accuracy** ({test_images} fresh scenes): {mean_accuracy:.3f} per label, {exact:.3f} of scenes
  with every label right.
- **Why this choice**: the toy world has an exact renderer, so the "real" distribution for a prompt is
  known: `toy_fd` compares generated images with renderer scenes of the same prompts. A network that
  has learned the world's attributes maps a well-drawn scene and a rendered one close together, and
  smudged, wrongly colored or misshapen objects away from them, as Inception does for natural images.
  {feature_dim} features keep the covariance full-rank for a category's images at the demo's size.
"""


def model_card(record: dict) -> str:
    accuracy = record["test_accuracy"]
    return MODEL_CARD.format(train_seconds=record["train_seconds"], feature_dim=record["feature_dim"],
                             n_labels=len(record["labels"]), mean_accuracy=sum(accuracy.values()) / len(accuracy),
                             exact=record["test_exact_match"], **record["config"])


def save(net: ToyFeatureNet, record: dict, out: Path = FEATURES_DIR) -> Path:
    """Weights (safetensors), training record and model card, written into a staging dir and moved in whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, staged / WEIGHTS_FILE)
        (staged / WEIGHTS_FILE).chmod(0o644)  # package data: readable by all, like the other asset files
        (staged / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        (staged / "README.md").write_text(model_card(record))
        if out.exists():
            out.rename(Path(tmp) / "old")
        staged.rename(out)
    return out


def load(folder: str | Path = FEATURES_DIR) -> ToyFeatureNet:
    """The trained network (safetensors only), in eval mode."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no toy feature network at {path}; train it with `make toy-features`")
    net = ToyFeatureNet()
    net.load_state_dict(load_file(path))
    return net.eval()


class ToyFeatures:
    """A ``FeatureExtractor`` (PIL images -> features) of the trained network; images are resized to 32 px."""

    def __init__(self, folder: str | Path = FEATURES_DIR) -> None:
        self.net = load(folder)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        arrays = [np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC) if im.size != (32, 32)
                             else im.convert("RGB")) for im in images]
        return self.net.embed(to_tensor(np.stack(arrays))).double()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FEATURES_DIR)
    for name, value in asdict(FeatureTrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    net, record = train(FeatureTrainConfig(**args))
    print(f"saved {save(net, record, out)} (held-out exact match {record['test_exact_match']:.3f})")


if __name__ == "__main__":
    main()
