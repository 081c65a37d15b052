"""The finding prompt: the finding calls as a short line of text that the decoder reads right
before it writes the report (``ModelConfig.finding_prompt``).

The decoder sequence becomes ``[BOS] history (digest) prompt [REPORT] report``. The prompt is the
calls of the finding heads at inference and the study's labels in training, written in report
words ("Calls: cardiomegaly; right lower lobe nodule."), so that the decoder's self-attention
and its copy head (the prompt is a copy source, like the digest) carry the findings table into
the text. This follows PromptMRG's diagnosis-driven prompts (Jin et al., AAAI 2024). The report
is still written token by token by the decoder; the prompt is never shown as report text.

Pure functions over finding names, sides and locations; no model code.
"""
from __future__ import annotations

from typing import Sequence

from data.vocab import BY_NAME, FINDING_NAMES

LEAD = "Calls:"
NONE = "none"
# report words for the machine names where they differ from "name with spaces"
_WORDS = {"ground_glass_opacity": "ground-glass opacity"}


def finding_phrase(name: str, side: str | None = None, location: str | None = None) -> str:
    """One call in report words: the location for findings that take one (a lobe, nodal
    station or spine region), else the side for findings that take one, then the finding."""
    fd = BY_NAME.get(name)  # None: a finding outside the vocabulary (no side or location then)
    word = _WORDS.get(name, name.replace("_", " "))
    if fd is not None and fd.locations and location and location != "unspecified":
        return f"{location} {word}"
    if fd is not None and fd.sides and side in fd.sides:
        return f"{side} {word}"
    return word


def finding_prompt(calls: Sequence[tuple[str, str | None, str | None]]) -> str:
    """``[(name, side, location), ...]`` (findings called present) -> the prompt line, findings
    in vocabulary order: "Calls: cardiomegaly; right lower lobe nodule." / "Calls: none."."""
    order = {n: i for i, n in enumerate(FINDING_NAMES)}
    phrases = [finding_phrase(*c) for c in sorted(calls, key=lambda c: order.get(c[0], len(order)))]
    return f"{LEAD} {'; '.join(phrases) if phrases else NONE}."
