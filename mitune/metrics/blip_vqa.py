"""BLIP-VQA as T2I-CompBench computes it (attribute binding: color, shape, texture).

For each noun phrase of the prompt (spaCy ``noun_chunks``, see ``mitune.prompts.phrases``;
"top", "the side", "the left", "the right" dropped as their ``BLIP_vqa.py`` does) BLIP is asked
"<phrase>?"; the phrase's score is P(yes) of the answer decoder's first token after its BOS
(``[DEC]``), renormalised over {yes, no} (their ``vqa_prob``: ``p_yes / (p_yes + p_no)``); the
image's score is the product over the first ``max_phrases`` phrases (theirs: 8; a prompt
without phrases scores 1).

The official scorer runs Salesforce's BLIP code with ``model_base_vqa_capfilt_large`` at 480 px.
Here transformers' port of that checkpoint (``Salesforce/blip-vqa-capfilt-large``) runs with the
official input: PIL bicubic resize to 480 x 480, ``/255``, CLIP mean/std; the question as BLIP's
``pre_question`` leaves it, its first token ([CLS]) replaced by ``[ENC]``; BLIP's ViT layer-norm
epsilon (1e-6) and 12 text attention heads, whatever an older port's config says. The port's
position embeddings are for 384 px (it was converted at 384, so the 480-px checkpoint's grid was
interpolated 30 -> 24); at 480 they are interpolated back 24 -> 30 (``interpolate_pos_encoding``),
which is closer to the official scorer than running at 384 (measured in docs/metrics.md).
``image_size=384`` runs the port at its own size.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from mitune.metrics.base import AlignmentMetric, MetricInputError
from mitune.metrics.hub import local_model
from mitune.prompts.phrases import noun_chunks

QUESTION_MAX_TOKENS = 35  # BLIP's VQA question length (T2I-CompBench truncates to it too)
QUESTION_MAX_WORDS = 50  # BLIP's pre_question cuts longer questions to their first 50 words
IMAGE_SIZE = 480  # T2I-CompBench's BLIPvqa_eval/configs/vqa.yaml
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT; transformers' BlipVisionConfig defaults to 1e-5
# BLIP's text transformer is BERT-base (configs/med_config.json): 768 wide, 12 heads.
# transformers' BlipTextConfig defaults to 8 heads, and the hub ports' configs said 8 until 2023.
BERT_BASE_WIDTH, BERT_BASE_HEADS = 768, 12
# Noun chunks T2I-CompBench's BLIP_vqa.py never asks about (parts of relation phrases).
SKIPPED_PHRASES = frozenset({"top", "the side", "the left", "the right"})
_STRIPPED = re.compile(r"[.!\"()*#:;~]")  # the characters BLIP's pre_question deletes


def pre_question(question: str) -> str:
    """BLIP's ``pre_question``: lower case, ``.!"()*#:;~`` deleted, at most 50 words ("?" stays)."""
    question = _STRIPPED.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:QUESTION_MAX_WORDS]) if len(words) > QUESTION_MAX_WORDS else question


def compbench_questions(prompt: str, use_spacy: bool = True, max_phrases: int = 8) -> list[str]:
    """T2I-CompBench's questions: "<noun phrase>?" for the first ``max_phrases`` phrases they keep,
    after ``pre_question``."""
    phrases = [p for p in noun_chunks(prompt, use_spacy) if p not in SKIPPED_PHRASES]
    return [pre_question(f"{phrase}?") for phrase in phrases[:max_phrases]]


def blip_pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """BLIP's test transform: ``Resize((size, size), BICUBIC)`` on the PIL image, ``ToTensor``, ``Normalize``.

    Written out rather than taken from transformers' image processor, whose torchvision backend
    (chosen whenever torchvision is installed) resizes tensors, not PIL images.
    """
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels - mean) / std


def answer_token(tokenizer, word: str) -> int:
    """The single token id of an answer word; BLIP's yes/no are one WordPiece each."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise MetricInputError(f"the VQA tokenizer has no single token for {word!r} (got {ids})")
    return ids[0]


def encoder_token(tokenizer, decoder_start: int, vocab_size: int) -> int:
    """BLIP's ``[ENC]`` id: the tokenizer's own when it has one, else the id after ``[DEC]``.

    BLIP adds ``[DEC]`` (30522) and then ``[ENC]`` (30523) to bert-base-uncased's vocabulary;
    transformers' ports keep both embeddings but their tokenizers may list neither.
    """
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc is None or enc == tokenizer.unk_token_id:
        enc = decoder_start + 1
    if not 0 <= enc < vocab_size:
        raise MetricInputError(f"the VQA model has no [ENC] token (id {enc}, vocabulary of {vocab_size})")
    return enc


def as_blip(config):
    """A transformers ``BlipConfig`` with BLIP's own ViT layer-norm epsilon and, for a BERT-base
    text side, its 12 attention heads (see the constants)."""
    config.vision_config.layer_norm_eps = VIT_LAYER_NORM_EPS
    if config.text_config.hidden_size == BERT_BASE_WIDTH:
        config.text_config.num_attention_heads = BERT_BASE_HEADS
    return config


def question_ids(tokenizer, questions: list[str], enc: int) -> list[list[int]]:
    """Token ids as BLIP's VQA model sees a question: truncated to 35 tokens, ``[ENC]`` in place of ``[CLS]``."""
    ids = tokenizer(questions, truncation=True, max_length=QUESTION_MAX_TOKENS)["input_ids"]
    return [[enc, *i[1:]] for i in ids]


def product_by_owner(values: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """Product of ``values`` grouped by ``owners`` (index per value); 1 for owners with none."""
    out = torch.ones(n, dtype=values.dtype)
    for owner, value in zip(owners.tolist(), values):
        out[owner] *= value
    return out


class BlipVQAMetric(AlignmentMetric):
    """Product over noun phrases of P(yes | image, "<phrase>?")."""

    name = "blip_vqa"

    def __init__(self, model_name_or_path: str = "Salesforce/blip-vqa-capfilt-large", *, image_size: int = IMAGE_SIZE,
                 device: str = "cpu", max_phrases: int = 8, use_spacy: bool = True, batch_size: int = 16,
                 progress: bool = True) -> None:
        from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

        super().__init__(batch_size=batch_size, progress=progress)
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.device = torch.device(device)
        model_name_or_path = local_model(model_name_or_path, self.name)
        self.processor = BlipProcessor.from_pretrained(model_name_or_path)
        config = BlipConfig.from_pretrained(model_name_or_path)
        model = BlipForQuestionAnswering.from_pretrained(model_name_or_path, config=as_blip(config))
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        # Position embeddings are interpolated (bicubic, as BLIP's own loader does) to another grid.
        self.interpolate = image_size != config.vision_config.image_size
        tokenizer = self.processor.tokenizer
        self.yes, self.no = answer_token(tokenizer, "yes"), answer_token(tokenizer, "no")
        self.enc = encoder_token(tokenizer, self.model.decoder_start_token_id, config.text_config.vocab_size)
        self.max_phrases = max_phrases
        self.use_spacy = use_spacy

    def questions(self, prompt: str) -> list[str]:
        """The questions asked about an image of ``prompt`` (``compbench_questions``)."""
        return compbench_questions(prompt, self.use_spacy, self.max_phrases)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The official test transform at ``image_size`` with the processor's mean and std."""
        processor = self.processor.image_processor
        return blip_pixels(images, self.image_size, processor.image_mean, processor.image_std)

    @torch.no_grad()
    def p_yes(self, images: list[Image.Image], questions: list[str], owners: torch.Tensor) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) of the first answer token, one per question.

        ``owners[j]`` is the index in ``images`` that question j asks about; each image goes
        through the vision tower once. Questions run in groups of equal token length, unpadded:
        transformers' BLIP text attention (5.x) drops the cross-attention padding mask, so padded
        questions would change each other's scores.
        """
        pixels = self.pixels(images).to(self.device)
        image_embeds = self.model.vision_model(pixel_values=pixels,
                                               interpolate_pos_encoding=self.interpolate).last_hidden_state
        ids = question_ids(self.processor.tokenizer, questions, self.enc)
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
