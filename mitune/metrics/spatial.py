"""2D-spatial alignment with T2I-CompBench's (UniDet_eval/2D_spatial_eval.py) scoring rule.

The prompt "A <relation> B" is parsed (``mitune.prompts.phrases.parse_spatial``), each object's
highest-confidence box is detected, and::

    both found:  score = 0.25 * conf_A + 0.25 * conf_B + position(relation, box_A, box_B) / 2
    one found:   score = 0.25 * conf
    score < 0.5 -> 0

``position`` compares box centres (image coordinates, y down; dx, dy = centre_B - centre_A):
left of / right of / on the top of / on the bottom of need the right sign on the relation's
axis and that axis to dominate (|dx| > |dy| or the reverse), then give 1 if IoU < 0.1 else
0.1 / IoU; next to / near / on side of give 1 if |dx| or |dy| < 150 px, else 150 / max(|dx|, |dy|).

T2I-CompBench detects with UniDet (closed vocabulary; "girl", "boy", "man", "woman" become
"person"); here an open-vocabulary OWL-ViT (transformers) is queried with the two object
phrases, so no class mapping is needed, but its confidences are calibrated differently from
UniDet's, which moves the 0.5 cut-off. Their rule gives "on top of" no branch (always 0); it is
scored as "on the top of" here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric, MetricInputError
from mitune.metrics.hub import local_model
from mitune.prompts.phrases import SpatialPrompt, parse_spatial

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels
NEAR_RELATIONS = ("next to", "near", "on side of")


@dataclass(frozen=True)
class Detection:
    box: Box
    confidence: float


def iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def position_score(relation: str, box_a: Box, box_b: Box, iou_threshold: float = 0.1,
                   distance_threshold: float = 150.0) -> float:
    """How well A's box stands in ``relation`` to B's: T2I-CompBench's soft centroid rule."""
    (ax, ay), (bx, by) = _centre(box_a), _centre(box_b)
    dx, dy = bx - ax, by - ay
    if relation in NEAR_RELATIONS:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    direction = {
        "on the left of": dx > 0 and abs(dx) > abs(dy),
        "on the right of": dx < 0 and abs(dx) > abs(dy),
        "on the top of": dy > 0 and abs(dy) > abs(dx),
        "on top of": dy > 0 and abs(dy) > abs(dx),
        "on the bottom of": dy < 0 and abs(dy) > abs(dx),
    }
    if relation not in direction:
        raise MetricInputError(f"unknown spatial relation {relation!r}; known: {', '.join(direction)}, "
                               f"{', '.join(NEAR_RELATIONS)}")
    if not direction[relation]:
        return 0.0
    overlap = iou(box_a, box_b)
    return 1.0 if overlap < iou_threshold else iou_threshold / overlap


def spatial_score(relation: str, a: Detection | None, b: Detection | None) -> float:
    """T2I-CompBench's image score from the two objects' best detections (None: not found)."""
    if a is not None and b is not None:
        score = 0.25 * a.confidence + 0.25 * b.confidence + position_score(relation, a.box, b.box) / 2
    elif a is not None or b is not None:
        score = 0.25 * (a or b).confidence
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


class SpatialMetric(AlignmentMetric):
    """Detect both objects of "A <relation> B" with OWL-ViT and apply ``spatial_score``.

    ``threshold``: the lowest OWL-ViT confidence that counts as "detected" (its usual 0.1).
    """

    name = "spatial"

    def __init__(self, model_name_or_path: str = "google/owlvit-base-patch32", *, device: str = "cpu",
                 threshold: float = 0.1, use_spacy: bool = True, batch_size: int = 8, progress: bool = True) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        super().__init__(batch_size=batch_size, progress=progress)
        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, self.name)
        self.processor = AutoProcessor.from_pretrained(model_name_or_path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model_name_or_path).to(self.device).eval()
        self.threshold = threshold
        self.use_spacy = use_spacy

    def parse(self, prompt: str) -> SpatialPrompt:
        parsed = parse_spatial(prompt, self.use_spacy)
        if parsed is None:
            raise MetricInputError(f"prompt {prompt!r} has no 'A <relation> B' spatial relation")
        return parsed

    def check_prompts(self, prompts) -> None:
        for prompt in prompts:
            self.parse(prompt)

    @torch.no_grad()
    def detect(self, images: list[Image.Image], queries: list[list[str]]) -> list[list[Detection | None]]:
        """Best box per text query per image, in the image's pixels (None below ``threshold``)."""
        inputs = self.processor(text=queries, images=images, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        n_queries = len(queries[0])
        conf = out.logits.float().sigmoid().view(len(images), -1, n_queries)  # [B, patches, queries]
        best, where = conf.max(1)
        results = []
        for i, image in enumerate(images):
            boxes = out.pred_boxes[i, where[i]].float().cpu()  # [queries, 4] cx, cy, w, h in [0, 1]
            results.append([self._detection(box, float(c), image.size) for box, c in zip(boxes, best[i].tolist())])
        return results

    def _detection(self, box: torch.Tensor, confidence: float, size: tuple[int, int]) -> Detection | None:
        if confidence < self.threshold:
            return None
        # OWLv2 pads images to a square before resizing; OWL-ViT stretches them.
        width, height = size if self.model.config.model_type == "owlvit" else (max(size),) * 2
        cx, cy, w, h = box.tolist()
        return Detection(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height),
                         confidence)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        parsed = [self.parse(p) for p in prompts]
        found = self.detect(images, [[p.subject, p.reference] for p in parsed])
        scores = [spatial_score(p.relation, a, b) for p, (a, b) in zip(parsed, found)]
        return torch.tensor(scores, dtype=torch.float64)
