"""The rule-based noun-phrase chunker and spatial parser on real T2I-CompBench validation prompts.

Expected chunks are written by hand as spaCy's ``noun_chunks`` gives them (what T2I-CompBench's
BLIP-VQA asks about), including its quirks: "on the left of" yields the chunk "the left". They
were checked against spaCy 3.8 with en_core_web_sm 3.8.0 (not installable here from PyPI).
"""

import pytest

from mitune.prompts.phrases import SpatialPrompt, find_relation, noun_chunks, parse_spatial, rule_noun_chunks
from mitune.prompts.sources import load_compbench

EXPECTED_CHUNKS = {
    "color": {
        "a green bench and a blue bowl": ["a green bench", "a blue bowl"],
        "A bathroom with green tile and a red shower curtain.": ["A bathroom", "green tile", "a red shower curtain"],
        "A man in a gray jacket standing in a kitchen next to a black dog.":
            ["A man", "a gray jacket", "a kitchen", "a black dog"],
        "A grey motorcycle is parked on black cobblestones.": ["A grey motorcycle", "black cobblestones"],
    },
    "shape": {
        "an oblong cucumber and a teardrop plum": ["an oblong cucumber", "a teardrop plum"],
        "The tall tower and the short building dominated the skyline.":
            ["The tall tower", "the short building", "the skyline"],
        "A row of cubic boxes and a pile of pyramidal stones were stacked neatly in the corner of the room.":
            ["A row", "cubic boxes", "a pile", "pyramidal stones", "the corner", "the room"],
    },
    "texture": {
        "rubber sole shoes and fluffy clouds": ["rubber sole shoes", "fluffy clouds"],
        "wooden chopsticks and a glass cup": ["wooden chopsticks", "a glass cup"],
        "The wooden crate and glass bottle hold the metallic soda on the fabric picnic blanket.":
            ["The wooden crate", "glass bottle", "the metallic soda", "the fabric picnic blanket"],
    },
    "non_spatial": {
        "A cat is lazily lounging in a sunny windowsill.": ["A cat", "a sunny windowsill"],
        "A woman is holding a camera and taking photos of a beautiful landscape.":
            ["A woman", "a camera", "photos", "a beautiful landscape"],
        "A dog is standing on its hind legs and trying to catch a frisbee.": ["A dog", "its hind legs", "a frisbee"],
    },
    "complex": {
        "The red hat was on top of the brown coat rack.": ["The red hat", "top", "the brown coat rack"],
        "The fluffy cat is on the left of the soft pillow.": ["The fluffy cat", "the left", "the soft pillow"],
    },
}
CASES = [(category, prompt, chunks) for category, cases in EXPECTED_CHUNKS.items() for prompt, chunks in cases.items()]


@pytest.mark.parametrize("category, prompt, expected", CASES, ids=[p[:40] for _, p, _ in CASES])
def test_rule_chunker_gives_spacy_noun_chunks_on_compbench_prompts(category, prompt, expected):
    assert rule_noun_chunks(prompt) == expected
    assert noun_chunks(prompt) == expected  # spaCy itself where it and en_core_web_sm are installed


def real_prompts(category):
    try:
        return load_compbench(category, "val").prompts
    except FileNotFoundError:
        pytest.skip("T2I-CompBench prompt files not available (run `make data`)")


@pytest.mark.parametrize("category", sorted(EXPECTED_CHUNKS))
def test_the_cases_are_real_compbench_validation_prompts(category):
    assert set(EXPECTED_CHUNKS[category]) <= set(real_prompts(category))


def test_the_chunker_is_deterministic_and_never_returns_empty_phrases_on_all_attribute_prompts():
    for category in ("color", "shape", "texture"):
        for prompt in real_prompts(category):
            chunks = rule_noun_chunks(prompt)
            assert chunks and all(c.strip() for c in chunks), prompt
            assert rule_noun_chunks(prompt) == chunks


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a giraffe next to a lamp", SpatialPrompt("giraffe", "next to", "lamp")),
        ("a girl on the top of a frog", SpatialPrompt("girl", "on the top of", "frog")),
        ("a mouse on side of a key", SpatialPrompt("mouse", "on side of", "key")),
        ("a bee on the right of a refrigerator", SpatialPrompt("bee", "on the right of", "refrigerator")),
        ("a bicycle on the bottom of a girl", SpatialPrompt("bicycle", "on the bottom of", "girl")),
        ("The red hat was on top of the brown coat rack.", SpatialPrompt("red hat", "on top of", "brown coat rack")),
    ],
)
def test_spatial_prompts_split_into_subject_relation_reference(prompt, expected):
    assert parse_spatial(prompt, use_spacy=False) == expected


def test_relations_are_whole_words_in_compbench_search_order():
    assert find_relation("a linear ruler and a cat") is None  # their substring test would say "near"
    assert find_relation("a cat near a dog on the left of a box") == "near"
    assert parse_spatial("a red cat and a blue dog", use_spacy=False) is None


def test_every_real_spatial_prompt_parses_into_two_objects():
    for prompt in real_prompts("spatial"):
        parsed = parse_spatial(prompt, use_spacy=False)
        assert parsed is not None, prompt
        assert parsed.relation in prompt and parsed.subject and parsed.reference
        assert prompt.endswith(parsed.reference) and parsed.subject in prompt.split(parsed.relation)[0]


class FakeSpacy:
    """Stands in for a loaded spaCy pipeline: one chunk per word, so its use is visible."""

    class Doc:
        def __init__(self, text):
            self.noun_chunks = [type("Span", (), {"text": w})() for w in text.split()]

    def __call__(self, text):
        return self.Doc(text)


def test_spacy_is_used_when_loaded_and_the_rules_stand_in_with_a_warning_otherwise(monkeypatch, caplog):
    import sys

    from mitune.prompts import phrases

    monkeypatch.setattr(phrases, "_spacy_nlp", lambda: FakeSpacy())
    assert noun_chunks("a red cat") == ["a", "red", "cat"]
    assert noun_chunks("a red cat", use_spacy=False) == ["a red cat"]
    monkeypatch.undo()

    phrases._spacy_nlp.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)
    try:
        with caplog.at_level("WARNING", logger="mitune.prompts.phrases"):
            assert noun_chunks("a red cat and a dog") == ["a red cat", "a dog"]
        assert "rule-based noun-phrase chunker" in caplog.text
    finally:
        phrases._spacy_nlp.cache_clear()
