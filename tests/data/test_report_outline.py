"""OutlineVeto: a generated report keeps the product's outline (sections, organ-system headings,
numbered impression items)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report_ids import EXAMPLES, TwoScripts, examples_tokenizer, report_ids as _ids  # noqa: E402

from core.generate import GenerationConfig, generate  # noqa: E402
from data.datasets import read_manifest  # noqa: E402
from data.report_format import SECTION_KEYS, format_report, parse_report  # noqa: E402
from data.report_outline import OutlineVeto  # noqa: E402

FINDINGS = ("Lungs and airways: Clear lungs.\nPleura: No effusion.\nHeart and mediastinum: Normal heart size.\n"
            "Bones: No fracture.\nUpper abdomen: Unremarkable.")


@pytest.fixture(scope="module")
def tok():
    return examples_tokenizer()


def _first_refusal(tok, ids):
    """Index of the first token the veto refuses when the ids are written one by one (None: none)."""
    veto = OutlineVeto(tok)
    return next((i for i in range(1, len(ids) + 1) if veto(ids[:i])), None)


def test_the_bundled_reference_reports_pass_token_by_token(tok):
    """No token of a well-formed report is refused (every bundled example's reference)."""
    for e in read_manifest(EXAMPLES / "manifest.jsonl"):
        ids = tok.encode_report(parse_report(e.report)) + [tok.eos_id]
        assert _first_refusal(tok, ids) is None, e.id


@pytest.mark.parametrize("sections, refused_at", [
    # a Findings line without its heading ("Heart enlarged ..."): refused at "enlarged"
    ({"findings": "Lungs and airways: Clear lungs.\nPleura: No effusion.\nHeart enlarged"}, "Heart enlarged"),
    # headings out of order, repeated, or inside a line
    ({"findings": "Lungs and airways: Clear lungs.\nBones:"}, "Bones"),
    ({"findings": "Lungs and airways: Clear lungs.\nLungs and airways:"}, "Lungs"),
    ({"findings": "Lungs and airways: Clear lungs. Pleura:"}, ":"),
    # an organ-system heading in another section
    ({"comparison": "None available. Pleura:"}, ":"),
    ({"impression": "1. Cardiomegaly.\n2. Bones:"}, "2. Bones:"),
    # a second line in a one-line section
    ({"technique": "CT chest.\nAxial"}, "\n"),  # at its line break
    # impression items out of order, repeated, or an unnumbered line among them
    ({"impression": "1. Cardiomegaly.\n2. Emphysema.\n4"}, "4"),
    ({"impression": "1. Cardiomegaly.\n1"}, "1"),
    ({"impression": "1. Cardiomegaly.\nEmphysema"}, "Emphysema"),
    ({"impression": "1.Cardiomegaly.\n2.Emphysema.\n2"}, "2"),  # items without the space after the number
    ({"impression": "1.5 cm nodule.\n2"}, "\n"),  # "1.5 cm" is no item: an unnumbered one-line impression
    ({"impression": "2"}, None),  # the first line starting with 2 may be "2 cm mass": judged at "2. "
    ({"impression": "2. Emphysema"}, "Emphysema"),
    # a one-line impression stays one line
    ({"impression": "No acute abnormality.\nEmphysema"}, "\n"),
])
def test_breaks_are_refused_at_the_token_that_makes_them(tok, sections, refused_at):
    ids = _ids(tok, **sections)
    at = _first_refusal(tok, ids)
    if refused_at is None:
        assert at is None
        return
    assert at is not None, sections
    if refused_at == "\n":  # refused at the line break
        assert tok.decode(ids[:at]).endswith("\n") and "\n" not in tok.decode(ids[: at - 1]).split(":")[-1]
        return
    # the refused token is a piece of the last word of ``refused_at`` (tokens may split words)
    full, word = tok.decode(ids), refused_at.split()[-1]
    start = full.rindex(refused_at) + len(refused_at) - len(word)
    before, text = tok.decode(ids[: at - 1]), tok.decode(ids[:at])
    assert len(text) > start and len(before.rstrip()) < start + len(word), (text, refused_at)


def test_items_need_text_and_the_findings_every_heading(tok):
    veto = OutlineVeto(tok)
    nl = tok.encode("\n")
    # "4." then a new line or the end: an item without text
    assert veto(_ids(tok, impression="1. Cardiomegaly.\n2.") + nl)
    assert veto(_ids(tok, impression="1. Cardiomegaly.\n2.") + [tok.eos_id])
    assert not veto(_ids(tok, impression="1. Cardiomegaly.\n2. Emphysema.") + [tok.eos_id])
    # the impression may not open before the Findings gave each heading ...
    short = _ids(tok, findings="Lungs and airways: Clear lungs.\nPleura: No effusion.")
    assert veto(short + [tok.section_ids[SECTION_KEYS.index("impression")]])
    whole = _ids(tok, findings=FINDINGS)
    assert not veto(whole + [tok.section_ids[SECTION_KEYS.index("impression")]])
    assert veto(whole + tok.encode("\nLungs"))  # ... nor a line follow the last one
    assert veto(whole + tok.encode("\n"))  # not even its line break
    # one-line sections and a one-line impression: no line break after the line
    assert veto(_ids(tok, technique="CT chest.") + tok.encode("\n"))
    assert veto(_ids(tok, impression="No acute abnormality.") + tok.encode("\n"))
    assert not veto(_ids(tok, impression="1. Cardiomegaly.") + tok.encode("\n"))
    # ... unless the outline is any subset of the headings, in order
    some = OutlineVeto(tok, every_heading=False)
    assert not some(short + [tok.section_ids[SECTION_KEYS.index("impression")]])
    assert not some(_ids(tok, findings="Lungs and airways: Clear lungs.\nBones: No fracture."))
    assert some(_ids(tok, findings="Bones: No fracture.\nPleura:"))
    assert veto.refused == 7
    with pytest.raises(ValueError, match="heading"):
        OutlineVeto(tok, headings=())


def test_greedy_decoding_with_the_veto_writes_the_outline(tok):
    """Through core.generate: the decoder's first choice skips an organ system (the Bones line
    after the Pleura), its second keeps the outline; with the veto the report comes out whole,
    without it with a system missing."""
    good = {"technique": "CT chest.", "findings": FINDINGS, "impression": "1. Cardiomegaly.\n2. Emphysema."}
    bad = {**good, "findings": FINDINGS.replace("Heart and mediastinum: Normal heart size.\n", "")}
    g = tok.encode_report(good) + [tok.eos_id]
    b = tok.encode_report(bad) + [tok.eos_id]
    cfg = GenerationConfig(max_new_tokens=len(g) + 5, eos_id=tok.eos_id)
    dec = TwoScripts(tok.vocab_size, b, g)
    assert generate(dec, [[tok.bos_id]], None, None, cfg) == [b]
    assert generate(dec, [[tok.bos_id]], None, None, cfg, vetoes=[OutlineVeto(tok)]) == [g]
    text = format_report(tok.decode_report(g))
    assert "Heart and mediastinum: Normal heart size." in text
