"""HPSv2 (Wu et al., 2023): human-preference score of a fine-tuned OpenCLIP ViT-H/14.

HPSv2's ``hpsv2.score`` is ``image_features @ text_features.T`` of L2-normalised embeddings,
i.e. the plain cosine (papers print it x100). Two backbones give it:

* ``checkpoint`` (default: ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2``) loaded
  into ``open_clip``'s ViT-H-14 with its validation transform; needs ``pip install open_clip_torch``.
* ``model_name_or_path``: any transformers ``CLIPModel`` dir (e.g. an HPSv2 conversion), which
  needs nothing beyond transformers.
"""

from __future__ import annotations

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric
from mitune.metrics.clip import CLIPEmbedder
from mitune.metrics.hub import local_model

HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


class OpenCLIPEmbedder:
    """HPSv2's own stack: open_clip ViT-H-14 with the HPSv2 state dict."""

    def __init__(self, checkpoint: str | None, device: str = "cpu") -> None:
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(
                "HPSv2 from its checkpoint needs open_clip: `pip install open_clip_torch`, "
                "or pass model_name_or_path=<a transformers CLIPModel dir>"
            ) from err
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            local_model(HPS_REPO, "hps")  # one line instead of the hub's retries when it is unreachable
            checkpoint = hf_hub_download(HPS_REPO, HPS_FILE)
        self.device = torch.device(device)
        model, _, self.preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return (img * txt).sum(-1)


class HPSMetric(AlignmentMetric):
    """HPSv2 score per image (cosine in [-1, 1]; higher is preferred by people)."""

    name = "hps"

    def __init__(self, model_name_or_path: str | None = None, *, checkpoint: str | None = None,
                 device: str = "cpu", batch_size: int = 16, progress: bool = True) -> None:
        super().__init__(batch_size=batch_size, progress=progress)
        if model_name_or_path is not None and checkpoint is not None:
            raise ValueError("give model_name_or_path (transformers) or checkpoint (open_clip), not both")
        if model_name_or_path is not None:
            self.embedder = CLIPEmbedder(model_name_or_path, device=device)
        else:
            self.embedder = OpenCLIPEmbedder(checkpoint, device=device)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.embedder.cosine(images, prompts).double()
