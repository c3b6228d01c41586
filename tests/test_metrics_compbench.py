"""mitune's T2I-CompBench scorers against numbers measured from the official code.

Every expected value here was printed by T2I-CompBench's own code (BLIPvqa_eval's
``create_dataset('vqa')`` test transform and ``pre_question``, CLIPScore_eval's
``clip._transform(224)``, ``3_in_1_eval/3_in_1.py``, ``BLIP_vqa.py`` through the official BLIP
model) run by benchmarks/compbench_equivalence/official_side.py; see docs/metrics.md. Nothing
here needs the network or the official code.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from mitune.metrics.base import MetricInputError
from mitune.metrics.blip_vqa import (
    SKIPPED_PHRASES,
    as_blip,
    blip_pixels,
    compbench_questions,
    encoder_token,
    pre_question,
    question_ids,
)
from mitune.metrics.clip import openai_clip_pixels
from mitune.metrics.three_in_one import combine

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POSITIONS = [(0, 0, 0), (1, 100, 37), (2, -1, -1)]


def noise_image(width: int, height: int, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def summary(pixels: torch.Tensor) -> tuple[float, float, list[float]]:
    x = pixels.double()
    return x.sum().item(), x.abs().sum().item(), [float(x[c, i, j]) for c, i, j in POSITIONS]


# (width, height) -> sum, sum of |x|, values at POSITIONS of the official tensor (float32 -> float64)
BLIP_480 = {
    (512, 512): (129667.90695166495, 487085.9755700268, [0.36830464005470276, 0.2739516794681549, -0.5701355338096619]),
    (640, 480): (129681.99877202301, 499785.24429591163, [0.806257426738739, 1.2194410562515259, -1.2669187784194946]),
}
CLIP_224 = {
    (512, 512): (28233.081990545965, 53525.87491008139, [0.20772196352481842, -0.26632803678512573, 0.49636951088905334]),
    (640, 480): (28288.28702763701, 56233.62794376165, [-0.6827820539474487, 0.25894391536712646, 0.08398749679327011]),
    (333, 500): (28195.59754086414, 77095.93739024748, [-0.2886245846748352, -0.8816465735435486, 0.8945313096046448]),
}


@pytest.mark.parametrize("size", sorted(BLIP_480))
def test_blip_pixels_are_the_official_test_transform(size):
    pixels = blip_pixels([noise_image(*size)], 480, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (1, 3, 480, 480) and pixels.dtype == torch.float32
    total, magnitude, values = summary(pixels[0])
    expected = BLIP_480[size]
    assert total == pytest.approx(expected[0], rel=1e-12) and magnitude == pytest.approx(expected[1], rel=1e-12)
    assert values == expected[2]  # bit-identical float32 values


@pytest.mark.parametrize("size", sorted(CLIP_224))
def test_openai_clip_pixels_are_the_official_preprocess(size):
    pixels = openai_clip_pixels([noise_image(*size)], 224, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (1, 3, 224, 224)
    total, magnitude, values = summary(pixels[0])
    expected = CLIP_224[size]
    assert total == pytest.approx(expected[0], rel=1e-12) and magnitude == pytest.approx(expected[1], rel=1e-12)
    assert values == expected[2]


def test_pre_question_is_blips():
    assert pre_question("a red (metallic) car: the left!?") == "a red metallic car the left?"
    assert pre_question("The Sun's #1 fan; ~ok.  ?") == "the sun's 1 fan ok  ?"
    assert pre_question("a" + " b" * 60 + "?") == "a" + " b" * 49


def test_questions_skip_relation_chunks_as_blip_vqa_py_does():
    # Official BLIP_vqa.py with the same chunks (mitune's rule chunker on both sides): "top" is not asked.
    prompt = "The red hat was on top of the brown coat rack."
    assert compbench_questions(prompt, use_spacy=False) == ["the red hat?", "the brown coat rack?"]
    assert {"top", "the side", "the left", "the right"} == SKIPPED_PHRASES
    assert compbench_questions("a cat on the left of a dog", use_spacy=False) == ["a cat?", "a dog?"]
    assert len(compbench_questions(" and ".join(f"a {c} cat" for c in "abcdefghij"), use_spacy=False)) == 8


def tokenizer_for(tmp_path, words: dict[str, int], extra: tuple[str, ...] = ()):
    """WordPiece on a 30522-entry vocabulary with bert-base-uncased's special ids, ``words`` at their ids."""
    from transformers import BertTokenizer

    table = [f"[unused{i}]" for i in range(30522)]
    for i, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}.items():
        table[i] = token
    for word, i in words.items():
        table[i] = word
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(table + list(extra)) + "\n")
    return BertTokenizer.from_pretrained(tmp_path)


def test_encoder_token_is_blips_enc(tmp_path):
    plain = tokenizer_for(tmp_path, {"yes": 2748, "no": 2053})
    assert encoder_token(plain, decoder_start=30522, vocab_size=30524) == 30523  # BLIP: [DEC] 30522, [ENC] 30523
    listed = tokenizer_for(tmp_path, {"yes": 2748}, extra=("[ENC]", "[DEC]"))
    assert encoder_token(listed, decoder_start=30523, vocab_size=30524) == 30522  # the tokenizer's own [ENC]
    with pytest.raises(MetricInputError, match=r"\[ENC\]"):
        encoder_token(plain, decoder_start=30522, vocab_size=30523)


def test_question_ids_are_what_the_official_model_gets(tmp_path):
    # Recorded at the official text encoder's input, on the equivalence check's vocabulary
    # (bert-base-uncased's special ids; these words at these ids; "?" not in it, so [UNK] = 100).
    words = {"a": 1000, "green": 1001, "bench": 1002, "the": 1052, "red": 1072, "hat": 1073, "brown": 1076,
             "coat": 1077, "rack": 1078}
    tokenizer = tokenizer_for(tmp_path, words)
    questions = ["a green bench?", "the red hat?", "the brown coat rack?", ""]
    assert question_ids(tokenizer, questions, 30523) == [
        [30523, 1000, 1001, 1002, 100, 102],
        [30523, 1052, 1072, 1073, 100, 102],
        [30523, 1052, 1076, 1077, 1078, 100, 102],
        [30523, 102],
    ]
    long = question_ids(tokenizer, ["a " * 40 + "bench?"], 30523)[0]
    assert len(long) == 35 and long[0] == 30523 and long[-1] == 102  # BLIP truncates to 35 tokens


def test_the_port_config_gets_blips_heads_and_vit_epsilon():
    # BLIP's med_config.json: 12 heads; its ViT: LayerNorm(eps=1e-6). transformers' defaults (8, 1e-5)
    # were in the hub ports' configs (heads corrected there in 2023).
    from transformers import BlipConfig

    config = as_blip(BlipConfig())
    assert config.text_config.num_attention_heads == 12 and config.vision_config.layer_norm_eps == 1e-6
    tiny = as_blip(BlipConfig(text_config={"hidden_size": 32, "num_attention_heads": 4}))
    assert tiny.text_config.num_attention_heads == 4  # only BERT-base-wide text sides are BLIP's


# Rows of the official 3_in_1.py output: (attribute, spatial, action, its score) for a prompt listed
# in complex_val_spatial.txt, one in complex_val_action.txt, and two in neither.
THREE_IN_ONE = [
    ("spatial", 0.0341, 0.5527904332972032, 0.7938321839046621, 0.2934452166486016),
    ("action", 0.1865, 0.6803768923656894, 0.5023326306871129, 0.34441631534355643),
    ("both", 0.6594, 0.13304369153361095, 0.3640643280468031, 0.38550267319347137),
    ("both", 0.8604, 0.15337797438277456, 0.6212578394972647, 0.545011937960013),
]


@pytest.mark.parametrize("kind, attribute, spatial, action, official", THREE_IN_ONE)
def test_three_in_one_combination_is_the_official_one(kind, attribute, spatial, action, official):
    parts = {"spatial": (spatial, None), "action": (None, action), "both": (spatial, action)}[kind]
    assert combine(attribute, *parts) == official  # bit-identical
