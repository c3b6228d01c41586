"""CLIP embeddings through transformers, shared by CLIPScore, HPS and CMMD."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mitune.metrics.hub import local_model


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings (transformers 5 returns an output object, 4.x a tensor)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected CLIP text embeddings (see ``image_features``)."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def openai_clip_pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """OpenAI CLIP's ``preprocess`` (T2I-CompBench's CLIPScore_eval): on the PIL image, bicubic
    resize of the short side to ``size`` (long side ``int(size * long / short)``), centre crop
    (offsets ``round((side - size) / 2)``), ``ToTensor``, ``Normalize``.

    transformers' processor resizes tensors instead when torchvision is installed.
    """
    arrays = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = image.size
        left, top = round((w - size) / 2.0), round((h - size) / 2.0)
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


class CLIPEmbedder:
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` (hub id or local dir) that embeds pairs.

    ``openai_preprocess`` replaces the processor's image pipeline by OpenAI CLIP's own
    (``openai_clip_pixels`` at the processor's crop size, mean and std).
    """

    def __init__(self, model_name_or_path: str, device: str = "cpu", openai_preprocess: bool = False) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, "CLIP")
        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(self.device).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.openai_preprocess = openai_preprocess

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Pixel values for the vision tower (see the class docstring)."""
        if not self.openai_preprocess:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        processor = self.processor.image_processor
        return openai_clip_pixels(images, processor.crop_size["height"], processor.image_mean, processor.image_std)

    @torch.no_grad()
    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """cos(image embedding, text embedding) per pair; prompts over CLIP's window are truncated."""
        pixels = self.pixels(images).to(self.device)
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt").to(self.device)
        img = image_features(self.model, pixels).float()
        txt = text_features(self.model, text["input_ids"], text["attention_mask"]).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)
