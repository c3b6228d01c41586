"""CLIP embeddings through transformers, shared by CLIPScore, HPS and CMMD."""

from __future__ import annotations

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


class CLIPEmbedder:
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` (hub id or local dir) that embeds pairs."""

    def __init__(self, model_name_or_path: str, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, "CLIP")
        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(self.device).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """cos(image embedding, text embedding) per pair; prompts over CLIP's window are truncated."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt").to(self.device)
        img = image_features(self.model, pixels).float()
        txt = text_features(self.model, text["input_ids"], text["attention_mask"]).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)
