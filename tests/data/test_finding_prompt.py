"""The finding prompt: calls in report words, vocabulary order, location / side rules."""
from __future__ import annotations

from data.finding_prompt import finding_phrase, finding_prompt


def test_phrases_use_location_then_side_where_the_finding_takes_them():
    assert finding_phrase("nodule", "right", "right lower lobe") == "right lower lobe nodule"
    assert finding_phrase("nodule", "right", "unspecified") == "right nodule"
    assert finding_phrase("pleural_effusion", "left", "right lower lobe") == "left pleural effusion"  # no location
    assert finding_phrase("cardiomegaly", "left", "subcarinal") == "cardiomegaly"  # neither
    assert finding_phrase("emphysema", "left", None) == "emphysema"  # side not allowed for it
    assert finding_phrase("ground_glass_opacity", "none", "left upper lobe") == "left upper lobe ground-glass opacity"
    assert finding_phrase("fracture", "none", "lower thoracic spine") == "lower thoracic spine fracture"
    assert finding_phrase("not_in_vocabulary", "left", "subcarinal") == "not in vocabulary"


def test_prompt_orders_calls_as_the_vocabulary_and_says_none():
    calls = [("cardiomegaly", "none", "unspecified"), ("nodule", "right", "right middle lobe")]
    assert finding_prompt(calls) == "Calls: right middle lobe nodule; cardiomegaly."
    assert finding_prompt(list(reversed(calls))) == finding_prompt(calls)
    assert finding_prompt([]) == "Calls: none."
