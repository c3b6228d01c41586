"""Prompt parsing for T2I-CompBench's protocols: noun phrases (BLIP-VQA) and spatial relations.

T2I-CompBench splits prompts with spaCy (``en_core_web_sm``): ``noun_chunks`` for BLIP-VQA's
questions, first/last NOUN for the 2D-spatial objects. spaCy is used when it and the model are
installed; otherwise a deterministic rule-based chunker stands in. Without a part-of-speech
lexicon it matches spaCy's chunk lists on 86-90% of T2I-CompBench's color/shape/texture
validation prompts and 71-77% of the complex/non-spatial ones (docs/metrics.md): it splits
"black and white cat" at "and", keeps unknown verbs ("the scissors cut") in their phrase, and
does not reproduce spaCy's own parse errors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm"

# Words that start a noun phrase and belong to it (spaCy keeps determiners, possessives and
# numerals inside the chunk).
DETERMINERS = frozenset(
    "a an the this that these those its his her their my your our some any each every no "
    "two three four five six seven eight nine ten several many few".split()
)
# Words that end a phrase and are not part of any: prepositions, particles, conjunctions, pronouns.
# "top", "left", "side"... are not here: spaCy makes them noun phrases ("on the left of" -> "the left").
BOUNDARIES = frozenset(
    "and or but nor while whereas as than with without of in on at by for from to into onto upon "
    "over under above below beneath behind beside besides between among amongst around across "
    "along against through near inside outside within toward towards during after before about "
    "like via next up down out off away past it they them he she him we us you i which who "
    "whom whose where when there here very too also not so then".split()
)
# Auxiliaries and common verbs without a regular -ed/-ing/-ly ending. A verb starts a verb group:
# the verb-like words after it are skipped up to the next phrase.
VERBS = frozenset(
    "is are was were be been being am has have had do does did can could will would shall should "
    "may might must sits sit sat stands stand stood lies lie lay rests rest hangs hang hung holds "
    "hold held looks look makes make made keeps keep kept provides provide displays display shone "
    "fell wrote sped ran flew grew ate rode swam sang slept spread built caught brought threw drew "
    "went came gave took saw wore drove lit spun".split()
)
_TOKEN = re.compile(r"[\w'’-]+|[^\w\s]")


def _is_word(token: str) -> bool:
    return bool(re.fullmatch(r"[\w'’-]+", token))


def _is_content(token: str) -> bool:
    return _is_word(token) and token.lower() not in DETERMINERS | BOUNDARIES | VERBS


def _verb_like(word: str) -> bool:
    """Regular verb and adverb forms: "standing", "stacked", "neatly"."""
    low = word.lower()
    return low in VERBS or len(low) >= 5 and low.endswith(("ed", "ing", "ly"))


def _ends_phrase(word: str, chunk: list[str], previous: str | None, following: str | None) -> bool:
    """A verb-like word that is not part of a noun phrase.

    After a phrase's words (or opening one) and before a determiner or preposition: "a man
    standing in ...", "the building dominated the ...", "... and heading to ...". Opening a
    phrase after "and", "," or "while": "... and taking photos", "... while fishing". After "to":
    "to catch a frisbee". Not "a rectangular painting", "a metallic earring and ...", "a
    triangular building set".
    """
    if previous is not None and previous.lower() == "to":
        return True
    if not _verb_like(word):
        return False
    if not chunk and word.lower().endswith("ing") and previous is not None and previous.lower() in ("and", ",", "while"):
        return True
    if following is None or following.lower() not in (DETERMINERS | BOUNDARIES) - {"and", "or"}:
        return False
    return not chunk or any(w.lower() not in DETERMINERS for w in chunk)


def rule_noun_chunks(prompt: str) -> list[str]:
    """spaCy-like base noun phrases without a tagger (see the module docstring for its limits)."""
    tokens = _TOKEN.findall(prompt)
    chunks: list[list[str]] = []
    current: list[str] = []
    in_verb_group = False

    def close() -> None:
        if any(_is_content(w) for w in current):
            chunks.append(list(current))
        current.clear()

    for i, token in enumerate(tokens):
        low = token.lower()
        previous = tokens[i - 1] if i else None
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if low in DETERMINERS:
            close()
            current.append(token)
            in_verb_group = False
        elif low in VERBS:
            close()
            in_verb_group = True
        elif not _is_content(token):
            close()
            in_verb_group = False
        elif in_verb_group and _verb_like(token):
            continue
        elif _ends_phrase(token, current, previous, following):
            close()
            in_verb_group = True
        else:
            current.append(token)
            in_verb_group = False
    close()
    return [" ".join(chunk) for chunk in chunks]


@lru_cache(maxsize=1)
def _spacy_nlp():
    """spaCy's small English pipeline, or None (logged once) when spaCy or the model is missing."""
    try:
        import spacy

        return spacy.load(SPACY_MODEL)
    except (ImportError, OSError) as err:
        log.warning("spaCy %s unavailable (%s); using mitune's rule-based noun-phrase chunker", SPACY_MODEL, err)
        return None


def noun_chunks(prompt: str, use_spacy: bool = True) -> list[str]:
    """Noun phrases of a prompt, as T2I-CompBench's BLIP-VQA asks about them."""
    nlp = _spacy_nlp() if use_spacy else None
    if nlp is None:
        return rule_noun_chunks(prompt)
    return [chunk.text for chunk in nlp(prompt).noun_chunks]


# ----------------------------------------------------------------------------- spatial relations

# T2I-CompBench's relation words, in the order they are searched for.
SPATIAL_RELATIONS = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)


@dataclass(frozen=True)
class SpatialPrompt:
    """``subject`` is ``relation`` ``reference``: "a cat on the left of a dog"."""

    subject: str
    relation: str
    reference: str


def _relation_match(prompt: str, relation: str) -> re.Match | None:
    return re.search(rf"\b{relation}\b", prompt, flags=re.IGNORECASE)


def find_relation(prompt: str) -> str | None:
    """The first of T2I-CompBench's relation words in the prompt, in their search order.

    They test substrings; whole words are matched here so that e.g. "linear" is not "near".
    """
    return next((r for r in SPATIAL_RELATIONS if _relation_match(prompt, r)), None)


def _without_determiner(phrase: str) -> str:
    words = phrase.split()
    while words and words[0].lower() in DETERMINERS:
        words = words[1:]
    return " ".join(words)


def parse_spatial(prompt: str, use_spacy: bool = True) -> SpatialPrompt | None:
    """The noun phrases just before and after the relation; None without a relation or phrases.

    T2I-CompBench takes the first and last NOUN of the prompt; on its "a X <rel> a Y" prompts
    these are the heads of the phrases before and after the relation. The whole phrase (minus
    its determiner) is kept, as an open-vocabulary detector's text query.
    """
    relation = find_relation(prompt)
    if relation is None:
        return None
    match = _relation_match(prompt, relation)
    before, after = noun_chunks(prompt[: match.start()], use_spacy), noun_chunks(prompt[match.end():], use_spacy)
    if not before or not after:
        return None
    return SpatialPrompt(_without_determiner(before[-1]), relation, _without_determiner(after[0]))
