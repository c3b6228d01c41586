"""BLIP-VQA with T2I-CompBench's protocol (attribute binding: color, shape, texture).

For each noun phrase of the prompt (spaCy ``noun_chunks``, see ``mitune.prompts.phrases``) BLIP
is asked "<phrase>?"; the phrase's score is P(yes) from the answer decoder's first token,
renormalised over {yes, no} (T2I-CompBench's ``vqa_prob``: ``p_yes / (p_yes + p_no)`` after
the decoder's BOS token); the image's score is the product over the first ``max_phrases``
phrases (theirs: 8; a prompt without phrases scores 1).

T2I-CompBench runs Salesforce's original BLIP code with the ``model_base_vqa_capfilt_large``
checkpoint at 480 px; here transformers' ``BlipForQuestionAnswering`` (default
``Salesforce/blip-vqa-base``, the transformers port of BLIP's VQA checkpoint) and its processor
(384 px) are used, so absolute numbers differ slightly from published ones.
"""

from __future__ import annotations

import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric, MetricInputError
from mitune.metrics.hub import local_model
from mitune.prompts.phrases import noun_chunks

QUESTION_MAX_TOKENS = 35  # BLIP's VQA question length (T2I-CompBench truncates to it too)


def answer_token(tokenizer, word: str) -> int:
    """The single token id of an answer word; BLIP's yes/no are one WordPiece each."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise MetricInputError(f"the VQA tokenizer has no single token for {word!r} (got {ids})")
    return ids[0]


def product_by_owner(values: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Product of ``values`` grouped by ``owners`` (index per value); 1 for owners with none."""
    out = torch.ones(n, dtype=values.dtype)
    for owner, value in zip(owners.tolist(), values):
        out[owner] *= value
    return out


class BlipVQAMetric(AlignmentMetric):
    """Product over noun phrases of P(yes | image, "<phrase>?")."""

    name = "blip_vqa"

    def __init__(self, model_name_or_path: str = "Salesforce/blip-vqa-base", *, device: str = "cpu",
                 max_phrases: int = 8, use_spacy: bool = True, batch_size: int = 16, progress: bool = True) -> None:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        super().__init__(batch_size=batch_size, progress=progress)
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, self.name)
        self.processor = BlipProcessor.from_pretrained(model_name_or_path)
        self.model = BlipForQuestionAnswering.from_pretrained(model_name_or_path).to(self.device).eval()
        tokenizer = self.processor.tokenizer
        self.yes, self.no = answer_token(tokenizer, "yes"), answer_token(tokenizer, "no")
        self.max_phrases = max_phrases
        self.use_spacy = use_spacy

    def questions(self, prompt: str) -> list[str]:
        """T2I-CompBench's questions: "<noun phrase>?" for the first ``max_phrases`` phrases."""
        return [f"{phrase}?" for phrase in noun_chunks(prompt, self.use_spacy)[: self.max_phrases]]

    @torch.no_grad()
    def p_yes(self, images: list[Image.Image], questions: list[str], owners: torch.Tensor) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) of the first answer token, one per question.

        ``owners[j]`` is the index in ``images`` that question j asks about; each image goes
        through the vision tower once. Questions run in groups of equal token length, unpadded:
        transformers' BLIP text attention (5.x) drops the cross-attention padding mask, so padded
        questions would change each other's scores.
        """
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = self.model.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state
        ids = self.processor.tokenizer(questions, truncation=True, max_length=QUESTION_MAX_TOKENS)["input_ids"]
        out = torch.empty(len(questions), dtype=torch.float64)
        for length in sorted({len(i) for i in ids}):
            group = [j for j, i in enumerate(ids) if len(i) == length]
            tokens = torch.tensor([ids[j] for j in group], device=self.device)
            out[group] = self._p_yes_unpadded(image_embeds[owners[group].to(self.device)], tokens)
        return out

    def _p_yes_unpadded(self, image_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question = self.model.text_encoder(
            input_ids=input_ids, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state
        bos = torch.full((len(input_ids), 1), self.model.decoder_start_token_id, device=self.device)
        probs = self.model.text_decoder(input_ids=bos, encoder_hidden_states=question).logits[:, 0].float().softmax(-1)
        p_yes, p_no = probs[:, self.yes], probs[:, self.no]
        return (p_yes / (p_yes + p_no)).double().cpu()

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pairs = [(i, q) for i, prompt in enumerate(prompts) for q in self.questions(prompt)]
        if not pairs:
            return torch.ones(len(prompts), dtype=torch.float64)
        owners = torch.tensor([i for i, _ in pairs])
        probs = self.p_yes(images, [q for _, q in pairs], owners)
        return product_by_owner(probs, owners, len(prompts))
