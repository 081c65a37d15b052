import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from data.errors import MedreportError
from data.report_format import SECTION_KEYS, format_report
from data.synthetic.findings import sample_case
from data.synthetic.histories import write_history
from data.synthetic.reports import write_sections
from data.tokenizer import ReportTokenizer


@pytest.fixture(scope="module")
def corpus():
    texts = []
    for i in range(60):
        case = sample_case(np.random.default_rng(i), "k", i, "train", "tiny")
        texts.append(format_report(write_sections(case, np.random.default_rng(i))))
        if i < 5:
            texts.append(write_history(case, np.random.default_rng(i), 2000)[0])
    return texts


@pytest.fixture(scope="module")
def tok(corpus):
    return ReportTokenizer.train(corpus, vocab_size=1500)


def test_special_ids_distinct(tok):
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.report_id, tok.unk_id, *tok.section_ids]
    assert len(set(ids)) == len(ids) == 5 + len(SECTION_KEYS)
    assert tok.vocab_size <= 1500


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_roundtrip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_report_roundtrip_and_sequence(tok, corpus):
    case = sample_case(np.random.default_rng(99), "k", 99, "test", "tiny")
    sections = write_sections(case, np.random.default_rng(1))
    ids = tok.encode_report(sections)
    assert [i for i in ids if i in tok.section_ids] == list(tok.section_ids)
    assert tok.decode_report(ids) == sections
    seq = tok.encode_sequence("History text.", sections)
    assert seq[0] == tok.bos_id and seq[-1] == tok.eos_id and tok.report_id in seq
    assert tok.decode_report(seq[seq.index(tok.report_id):] + [tok.section_ids[0], 42]) == sections  # stops at EOS
    assert "[SEC_" not in tok.decode(ids)
    # Special-token text inside a report is not turned into a marker by accident.
    assert tok.decode(tok.encode("a [BOS] b")) == "a [BOS] b"
    # A looping decoder's repeated impression item is dropped, the list renumbered.
    looped = dict(sections, impression="1. Mild atelectasis.\n2. Mild atelectasis.\n3. No effusion.")
    assert tok.decode_report(tok.encode_report(looped))["impression"] == "1. Mild atelectasis.\n2. No effusion."


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "t")
    tok2 = ReportTokenizer.load(tmp_path / "t")
    text = "Small right pleural effusion, 9 mm nodule."
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.section_ids == tok.section_ids and tok2.eos_id == tok.eos_id
    with pytest.raises(MedreportError, match="no tokenizer"):
        ReportTokenizer.load(tmp_path / "missing")


def test_history_tokens_are_compact(tok, corpus):
    history = corpus[1]
    ids = tok.encode(history)
    assert len(ids) < len(history) / 2  # BPE merges, not bytes


def test_copy_vocab_maps_line_start_forms(tok):
    """The case-aware copy maps: " lungs" <-> "Lungs" where both are tokens; word pieces without a
    leading space keep themselves (no mid-word piece becomes a space-led word)."""
    variant, canon = tok.copy_vocab()
    assert len(variant) == len(canon) == tok.vocab_size
    vocab = tok.tk.get_vocab()
    pairs = [(vocab["\u0120" + w.lower()], vocab[w]) for w in ("Lungs", "Heart", "No") if w in vocab and "\u0120" + w.lower() in vocab]
    assert pairs, "the corpus should give common words in both forms"
    for low, up in pairs:
        assert variant[low] == up and canon[up] == low and canon[low] == low
    for s, i in vocab.items():
        if not s.startswith("\u0120") and s[:1].islower():
            assert canon[i] == i and variant[i] == i, s


def test_item_constraints_name_the_enumerators_at_line_and_section_starts(tok):
    c = tok.item_constraints()
    nl, two = tuple(tok.encode("\n")), tuple(tok.encode("2."))
    assert nl + two in c["no_end_after"]
    assert (tok.section_ids[-1],) + tuple(tok.encode("1.")) in c["no_end_after"]
    assert c["line_end_ids"] == nl and len(nl) == 1
    seq = tok.encode_report({"impression": "1. Small effusion.\n2. Emphysema."})
    # the constrained suffixes occur in a real numbered impression
    assert any(tuple(seq[i: i + len(s)]) == s for s in c["no_end_after"] for i in range(len(seq)))


def test_complete_constraints_name_whitespace_enumerators_and_the_findings(tok):
    from data.report_format import SECTION_KEYS

    c = tok.complete_constraints()
    assert c["complete_sections"] and c["line_start_section"] == SECTION_KEYS.index("findings")
    nl = tok.encode("\n")
    assert set(nl) <= set(c["line_end_ids"])
    assert all(not tok.tk.decode([i]).strip() for i in c["line_end_ids"])
    assert not set(c["line_end_ids"]) & set(tok.section_ids)
    digits = set(c["line_start_banned"])
    assert tok.encode("2.")[0] in digits and tok.encode("Lungs")[0] not in digits
    assert all(tok.tk.decode([i])[:1].isdigit() for i in digits)  # " 9" (mid-line) stays allowed
    both = tok.report_constraints(nonempty_items=True, complete_sections=True)
    assert both["no_end_after"] == tok.item_constraints()["no_end_after"] and both["complete_sections"]
    assert set(tok.item_constraints()["line_end_ids"]) <= set(both["line_end_ids"])
    assert tok.report_constraints() == {}
