from hypothesis import given, settings, strategies as st

from data.report_format import (SECTION_KEYS, clean_for_bleu, drop_repeated_items, findings_impression, format_findings, format_report,
                                parse_report, split_findings)

_text = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=" .,-"),
                min_size=1, max_size=60).map(str.strip).filter(lambda s: s and s.lower().rstrip(".") != "none")


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({k: _text for k in SECTION_KEYS}))
def test_format_parse_roundtrip(sections):
    assert parse_report(format_report(sections)) == sections


def test_empty_sections_written_as_none_and_read_back_empty():
    text = format_report({"findings": "Clear.", "impression": "Normal."})
    assert "COMPARISON:\nNone." in text
    assert parse_report(text)["comparison"] == ""


def test_parse_tolerates_missing_and_alias_headings():
    p = parse_report("INDICATION: cough\nFindings: small effusion.\nConclusion: effusion.")
    assert p["clinical_information"] == "cough" and p["findings"] == "small effusion." and p["impression"] == "effusion."
    assert parse_report("No headings at all.")["findings"] == "No headings at all."
    assert parse_report("Heart normal.\nIMPRESSION: ok")["findings"] == "Heart normal."


def test_findings_subsections():
    f = format_findings({"pleura": "No effusion.", "lungs": "Clear.", "bones": ""})
    assert f == "Lungs and airways: Clear.\nPleura: No effusion."
    assert split_findings(f) == {"lungs": "Clear.", "pleura": "No effusion."}
    fi = findings_impression({"findings": f, "impression": "Normal."})
    assert "Pleura" not in fi and fi.endswith("Normal.")
    assert "Pleura:" in findings_impression({"findings": f, "impression": ""}, keep_subheadings=True)


def test_clean_for_bleu():
    assert clean_for_bleu("No effusion. 9-mm Nodule.") == ["no", "effusion", ".", "9", "-", "mm", "nodule", "."]
    assert clean_for_bleu("  ") == []


def test_format_rejects_unknown_sections():
    import pytest

    with pytest.raises(ValueError, match="unknown report sections"):
        format_report({"findngs": "x"})


def test_drop_repeated_items_keeps_a_list_without_repeats_and_other_text_as_is():
    looped = "1. Left lower lobe atelectasis.\n2. Left lower lobe  atelectasis.\n3. Small effusion.\n4. left lower lobe atelectasis."
    assert drop_repeated_items(looped) == "1. Left lower lobe atelectasis.\n2. Small effusion."
    clean = "1. Nodule.\n2. Effusion."
    assert drop_repeated_items(clean) == clean
    prose = "No acute abnormality. No acute abnormality."  # not a numbered list: left alone
    assert drop_repeated_items(prose) == prose
    assert drop_repeated_items("") == ""
