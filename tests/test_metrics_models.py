"""Model-backed metrics on tiny random-init models of the real classes, saved and reloaded offline."""

import numpy as np
import pytest
import torch
from PIL import Image

from mitune.metrics import MetricInputError, build_alignment_metric, build_quality_metric
from mitune.models.builders import tiny_tokenizer

WORDS = ("a an the red blue green yellow cat dog bench bowl cake horse vase on left right of top bottom "
         "side next to near and yes no").split()
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)


def text_config(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def random_images(n, seed=0, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_tokenizer(WORDS, 16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text_config(tok), vision_config=VISION, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def blip_path(tmp_path_factory):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tok = tiny_tokenizer(WORDS, 16)
    text = text_config(tok, encoder_hidden_size=32, sep_token_id=tok.eos_token_id)
    text["max_position_embeddings"] = 32
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=VISION))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    path = tmp_path_factory.mktemp("tiny-blip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def owl_path(tmp_path_factory):
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tok = tiny_tokenizer(WORDS, 16)
    torch.manual_seed(0)
    # OWL-ViT's class head compares projected text embeddings with vision-width patch embeddings.
    model = OwlViTForObjectDetection(OwlViTConfig(text_config=text_config(tok), vision_config=VISION, projection_dim=32))
    size = {"height": 32, "width": 32}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok)
    path = tmp_path_factory.mktemp("tiny-owlvit")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- CLIP family


def direct_cosine(path, images, prompts):
    """cos of the model's projected embeddings, computed by hand from the saved model."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        ids = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        img = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        txt = model.text_model(**ids).pooler_output @ model.text_projection.weight.T
    return (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1).double()


def test_clip_score_is_100_max_cos_0_per_image_and_batch_independent(clip_path):
    images = random_images(5)
    prompts = ["a red cat", "a blue dog", "the green bench", "a cake", "a yellow horse and a vase"]
    cos = direct_cosine(clip_path, images, prompts)
    for batch_size in (1, 2, 5):
        metric = build_alignment_metric("clip_score", model_name_or_path=clip_path, batch_size=batch_size,
                                        progress=False)
        torch.testing.assert_close(metric.score(images, prompts), 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5)
    raw = build_alignment_metric("compbench_clip", model_name_or_path=clip_path, progress=False)
    torch.testing.assert_close(raw.score(images, prompts), cos, atol=1e-6, rtol=1e-5)
    hps = build_alignment_metric("hps", model_name_or_path=clip_path, progress=False)
    torch.testing.assert_close(hps.score(images, prompts), cos, atol=1e-6, rtol=1e-5)


class TensorCLIP(torch.nn.Module):
    """transformers 5 returns output objects from get_*_features; torchmetrics 1.9 expects tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_agrees_with_torchmetrics_per_pair(clip_path):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    model = TensorCLIP(CLIPModel.from_pretrained(clip_path).eval())
    processor = CLIPProcessor.from_pretrained(clip_path)
    images, prompts = random_images(4, seed=3), ["a red cat", "a dog", "the blue bowl", "a green cake"]
    ours = build_alignment_metric("clip_score", model_name_or_path=clip_path, progress=False).score(images, prompts)
    for image, prompt, score in zip(images, prompts, ours):
        chw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        with torch.no_grad():
            reference = clip_score(chw, prompt, lambda: (model, processor))
        assert float(score) == pytest.approx(float(reference), abs=1e-3)


# ----------------------------------------------------------------------------- BLIP-VQA


def test_blip_vqa_is_the_product_of_per_phrase_yes_probabilities(blip_path):
    metric = build_alignment_metric("blip_vqa", model_name_or_path=blip_path, image_size=32, use_spacy=False,
                                    batch_size=2, progress=False)
    images = random_images(3, seed=1)
    prompts = ["a red cat and a blue dog", "the green bench", "a yellow horse and a blue vase and a cake"]
    scores = metric.score(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float64
    assert ((scores > 0) & (scores < 1)).all()
    for image, prompt, score in zip(images, prompts, scores):
        questions = metric.questions(prompt)
        singles = [metric.p_yes([image], [q], torch.tensor([0])) for q in questions]
        assert float(score) == pytest.approx(float(torch.cat(singles).prod()), rel=1e-5)
    assert metric.questions(prompts[0]) == ["a red cat?", "a blue dog?"]
    torch.testing.assert_close(metric.score(images, prompts), scores)  # deterministic


@pytest.mark.parametrize("image_size", [32, 48])
def test_blip_vqa_yes_probability_is_renormalised_over_yes_and_no(blip_path, image_size):
    """The model's own forward pieces with BLIP's inputs: the question's [CLS] replaced by [ENC]
    (the id after [DEC] when the tokenizer has none), ViT layer norms at BLIP's 1e-6, and at
    another size than the model's (48 vs 32) position embeddings interpolated."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

    metric = build_alignment_metric("blip_vqa", model_name_or_path=blip_path, image_size=image_size, progress=False)
    assert metric.interpolate == (image_size != 32)
    norms = [m for m in metric.model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    config = BlipConfig.from_pretrained(blip_path)
    config.vision_config.layer_norm_eps = 1e-6
    model = BlipForQuestionAnswering.from_pretrained(blip_path, config=config).eval()
    processor = BlipProcessor.from_pretrained(blip_path)
    image = random_images(1, seed=2)
    inputs = processor(images=image, text=["a red cat?"], size={"height": image_size, "width": image_size},
                       return_tensors="pt")
    bos = torch.tensor([[model.config.text_config.bos_token_id]])
    enc = model.config.text_config.bos_token_id + 1
    assert metric.enc == enc
    input_ids = inputs["input_ids"].clone()
    input_ids[:, 0] = enc
    with torch.no_grad():  # the decoder's first-token distribution through the model's own forward pieces
        image_embeds = model.vision_model(pixel_values=inputs["pixel_values"],
                                          interpolate_pos_encoding=image_size != 32)[0]
        question = model.text_encoder(input_ids=input_ids, attention_mask=inputs["attention_mask"],
                                      encoder_hidden_states=image_embeds)[0]
        probs = model.text_decoder(input_ids=bos, encoder_hidden_states=question,
                                   encoder_attention_mask=inputs["attention_mask"]).logits[0, 0].softmax(-1)
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    expected = probs[yes] / (probs[yes] + probs[no])
    assert float(metric.p_yes(image, ["a red cat?"], torch.tensor([0]))) == pytest.approx(float(expected), rel=1e-5)


def test_blip_vqa_caps_phrases_and_scores_phraseless_prompts_one(blip_path):
    capped = build_alignment_metric("blip_vqa", model_name_or_path=blip_path, image_size=32, max_phrases=1,
                                    use_spacy=False, progress=False)
    full = build_alignment_metric("blip_vqa", model_name_or_path=blip_path, image_size=32, use_spacy=False,
                                  progress=False)
    images = random_images(2, seed=4)
    first_only = capped.score(images, ["a red cat and a blue dog", "a red cat"])
    assert float(first_only[0]) == pytest.approx(float(first_only[1]), rel=1e-6)
    assert float(full.score(images[:1], ["a red cat and a blue dog"])) < float(first_only[0])
    assert full.score(images[:1], ["and of to"]).tolist() == [1.0]


# ----------------------------------------------------------------------------- spatial


def test_spatial_detects_each_query_at_its_best_patch_in_image_pixels(owl_path):
    from transformers import OwlViTForObjectDetection, OwlViTProcessor
    from transformers.image_transforms import center_to_corners_format

    metric = build_alignment_metric("spatial", model_name_or_path=owl_path, threshold=0.0, progress=False)
    images = random_images(2, seed=5, size=(48, 32))
    queries = [["red cat", "blue dog"], ["bench", "green bowl"]]
    found = metric.detect(images, queries)
    model, processor = OwlViTForObjectDetection.from_pretrained(owl_path).eval(), OwlViTProcessor.from_pretrained(owl_path)
    with torch.no_grad():
        out = model(**processor(text=queries, images=images, return_tensors="pt"))
    conf = out.logits.sigmoid()
    for i in range(2):
        for q in range(2):
            best = int(conf[i, :, q].argmax())
            box = center_to_corners_format(out.pred_boxes[i, best]) * torch.tensor([48, 32, 48, 32])
            assert found[i][q].confidence == pytest.approx(float(conf[i, best, q]), rel=1e-5)
            np.testing.assert_allclose(found[i][q].box, box.tolist(), rtol=1e-5, atol=1e-4)
    never = build_alignment_metric("spatial", model_name_or_path=owl_path, threshold=1.01, progress=False)
    assert never.detect(images, queries) == [[None, None], [None, None]]
    assert never.score(images, ["a cat on the left of a dog", "a bench near a bowl"]).tolist() == [0.0, 0.0]


def test_spatial_scores_follow_the_rule_on_the_detections(owl_path):
    from mitune.metrics.spatial import spatial_score

    metric = build_alignment_metric("spatial", model_name_or_path=owl_path, threshold=0.0, batch_size=1,
                                    progress=False)
    images = random_images(3, seed=6)
    prompts = ["a red cat on the left of a blue dog", "a cake on the top of a bench", "a horse near a vase"]
    relations = ["on the left of", "on the top of", "near"]
    found = metric.detect(images, [["red cat", "blue dog"], ["cake", "bench"], ["horse", "vase"]])
    expected = [spatial_score(r, a, b) for r, (a, b) in zip(relations, found)]
    assert metric.score(images, prompts).tolist() == pytest.approx(expected)
    with pytest.raises(MetricInputError, match="no 'A <relation> B'"):
        metric.score(images[:2], ["a red cat on the left of a blue dog", "a red cat and a dog"])


# ----------------------------------------------------------------------------- MI


def test_mi_metric_is_zero_without_a_prompt_and_independent_of_batch_and_order(tiny_sd_path):
    metric = build_alignment_metric("mi", pipeline=str(tiny_sd_path), n_draws=3, batch_size=2, progress=False)
    images = random_images(3, seed=7)
    prompts = ["a red circle", "a blue square", "a big green triangle"]
    scores = metric.score(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores > 0).all()
    # The empty prompt is the CFG null prompt: cond and uncond eps coincide, so MI is exactly 0.
    assert metric.score(images, [""] * 3).tolist() == [0.0, 0.0, 0.0]
    other = build_alignment_metric("mi", pipeline=metric.pipe, n_draws=3, batch_size=3, progress=False)
    # Equal up to float32 rounding: another batch size takes other kernel paths.
    torch.testing.assert_close(other.score(images[::-1], prompts[::-1]), scores.flip(0), rtol=1e-5, atol=0)
    reseeded = build_alignment_metric("mi", pipeline=metric.pipe, n_draws=3, seed=1, progress=False)
    assert not torch.equal(reseeded.score(images, prompts), scores)
    # The "mean" reduction (as a config dict, as Hydra passes it) is T x the mean over the kept t:
    # the sum when every t is kept, twice the sum over t >= 500 when half of them are.
    def with_config(config: dict) -> torch.Tensor:
        return build_alignment_metric("mi", pipeline=metric.pipe, n_draws=3, config=config, progress=False).score(
            images, prompts)

    torch.testing.assert_close(with_config({"reduction": "mean"}), scores, rtol=1e-5, atol=0)
    late = with_config({"min_timestep": 500})
    torch.testing.assert_close(with_config({"reduction": "mean", "min_timestep": 500}), 2 * late, rtol=1e-5, atol=0)


def test_mi_of_latents_uses_the_vae_latents_of_the_pipeline_size(tiny_sd_path):
    metric = build_alignment_metric("mi", pipeline=str(tiny_sd_path), n_draws=2, progress=False)
    images = random_images(2, seed=8, size=(40, 24))  # resized to the pipeline's 32 px
    latents = metric.encode(images)
    assert latents.shape == (2, 4, 16, 16)
    scores = metric.score_latents(latents, ["a red circle", "a blue square"])
    assert scores.shape == (2,) and (scores > 0).all()
    torch.testing.assert_close(metric.score_latents(latents, ["a red circle", "a blue square"]), scores)
    with pytest.raises(MetricInputError, match="N = 3 prompts"):
        metric.score_latents(latents, ["a", "b", "c"])


def test_mi_metric_loads_its_pipeline_at_the_first_score_and_checks_the_path_at_once(tiny_sd_path, tmp_path):
    """evaluate builds the metrics before generating: the model loads only once the evaluation's own
    pipeline is gone (one full-size model in memory, not two), but a wrong path fails up front."""
    metric = build_alignment_metric("mi", pipeline=str(tiny_sd_path), n_draws=2, progress=False)
    assert "pipe" not in vars(metric)
    metric.score(random_images(1, seed=9), ["a red circle"])
    assert "pipe" in vars(metric)
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        build_alignment_metric("mi", pipeline=str(tmp_path))


# ----------------------------------------------------------------------------- quality extractors


def test_cmmd_and_fd_dino_default_extractors_load_local_models(clip_path, tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                    num_hidden_layers=2, num_attention_heads=4))
    dino.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path)
    images, others = random_images(4, seed=9), random_images(4, seed=10)

    cmmd = build_quality_metric("cmmd", model_name_or_path=clip_path, progress=False)
    features = cmmd.features(images, "images")
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert cmmd.distance(images, images) == pytest.approx(0, abs=1e-9)
    assert cmmd.distance(images, others) > 0

    fd = build_quality_metric("fd_dino", model_name_or_path=str(tmp_path), batch_size=3, progress=False)
    with torch.no_grad():
        pixels = BitImageProcessor.from_pretrained(tmp_path)(images=images, return_tensors="pt")["pixel_values"]
        expected = Dinov2Model.from_pretrained(tmp_path).eval()(pixel_values=pixels).pooler_output.double()
    torch.testing.assert_close(fd.features(images, "images"), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 3-in-1


def test_three_in_one_averages_the_parts_each_prompt_has(blip_path, owl_path, clip_path):
    from mitune.metrics.blip_vqa import BlipVQAMetric
    from mitune.metrics.clip_score import CompBenchCLIPMetric
    from mitune.metrics.spatial import SpatialMetric

    parts = dict(blip=BlipVQAMetric(blip_path, image_size=32, use_spacy=False, progress=False),
                 spatial=SpatialMetric(owl_path, threshold=0.0, use_spacy=False, progress=False),
                 clip=CompBenchCLIPMetric(clip_path, progress=False))
    images = random_images(3, seed=11)
    prompts = ["The red cat is on the left of the blue dog.", "A green horse is eating a cake.",
               "The dog on the top of the bench is eating a cake."]
    attribute = parts["blip"].score(images, prompts)
    spatial = parts["spatial"].score([images[0], images[2]], [prompts[0], prompts[2]])
    action = parts["clip"].score(images, prompts)

    listed = build_alignment_metric("three_in_one", **parts, spatial_prompts=[prompts[0]],
                                    action_prompts=[prompts[1]], batch_size=2, progress=False)
    expected = [(attribute[0] + spatial[0]) / 2, (attribute[1] + action[1]) / 2,
                (attribute[2] + spatial[1] + action[2]) / 3]
    torch.testing.assert_close(listed.score(images, prompts), torch.stack(expected))

    # Without T2I-CompBench's lists, a relation word makes a prompt spatial, anything else action.
    guessed = build_alignment_metric("three_in_one", **parts, progress=False)
    assert [guessed.kinds(p) for p in prompts] == [(True, False), (False, True), (True, False)]
    torch.testing.assert_close(guessed.score(images, prompts)[1], (attribute[1] + action[1]) / 2)
