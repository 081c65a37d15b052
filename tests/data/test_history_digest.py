"""data.history_digest: the relevant-history digest of a patient record."""
import numpy as np

from data.history_digest import HEADER, category_of, digest, relevant_sentences, words

RECORD = """PATIENT RECORD (synthetic, not a real person)
Age: 71. Sex: F.

CLINIC NOTE (2019-04-02)
Subjective: 71-year-old woman seen for knee pain. Denies fever, chills or night sweats. Stopped smoking several years ago.
Assessment and plan:
- Discussed colorectal cancer screening options.
- Return to clinic in six months or sooner as needed.

LABORATORY RESULTS (2020-01-05)
Sodium: 139.0 mmol/L (ref 135-145)

ONCOLOGY NOTE (2021-06-07)
Past medical history: lung adenocarcinoma, diagnosed in 2020. Currently under surveillance.

CLINIC NOTE (2022-04-02)
Subjective: 72-year-old woman seen for fatigue. Stopped smoking several years ago.

IMAGING ORDER (2025-03-01): CT chest.
Reason for exam: restaging after chemotherapy.
Ordering provider: Dr. Hale.

ALLERGIES: iodinated contrast media (hives).
"""


def test_keeps_the_clinically_relevant_sentences_with_their_note_heading():
    d = digest(RECORD)
    lines = d.splitlines()
    assert lines[0] == HEADER
    for want in ("Reason for exam: restaging after chemotherapy.",
                 "Past medical history: lung adenocarcinoma, diagnosed in 2020.",
                 "ALLERGIES: iodinated contrast media (hives).",
                 "ONCOLOGY NOTE (2021-06-07)"):
        assert want in lines, want
    # noise is left out: labs, vitals-free HPI sentences, the provider line
    assert "Sodium" not in d and "Denies fever" not in d and "Dr. Hale" not in d and "knee pain" not in d
    # copy-forward text appears once, at its last occurrence (2022 note, not 2019)
    assert d.count("Stopped smoking several years ago.") == 1
    i = lines.index("Stopped smoking several years ago.")
    assert lines[i - 1] == "CLINIC NOTE (2022-04-02)"
    # record order is kept
    assert d.index("lung adenocarcinoma") < d.index("Reason for exam") < d.index("ALLERGIES")


def test_budget_drops_lower_priority_categories_first():
    small = digest(RECORD, max_words=30)
    assert words(small) <= 30
    assert "Reason for exam: restaging after chemotherapy." in small  # indication first
    assert "smoking" not in small  # the lowest category goes first
    assert digest(RECORD, 0) == "" and digest("", 100) == "" and digest(None, 100) == ""
    assert digest("Sodium 139 mmol/L.\nPotassium 4.1.\n", 100) == ""  # nothing relevant


def test_categories():
    assert category_of("Reason for exam: hemoptysis.") == "indication"
    assert category_of("Surgical history: right upper lobe lobectomy in 2015.") == "surgery"
    assert category_of("There is a 6 mm solid nodule in the left lower lobe.") == "chest_imaging"
    assert category_of("Past medical history: small cell carcinoma.") == "oncology"
    assert category_of("Hemoglobin 12.1 g/dL.") is None


def test_every_planted_fact_of_a_synthetic_record_reaches_the_digest_even_at_100k():
    from data.synthetic.findings import sample_case
    from data.synthetic.histories import write_history

    rng = np.random.default_rng(7)
    missed, n = [], 0
    for i in range(12):
        case = sample_case(rng, f"t{i}", i, "test", "tiny", force={"has_history": True})
        target = 100_000 if i < 2 else int(rng.integers(500, 16_000))
        text, facts = write_history(case, rng, target)
        d = digest(text, 224)
        assert words(d) <= 224
        for f in facts:
            if f.kind != "distractor":
                n += 1
                if f.text not in d:
                    missed.append((f.kind, f.text))
    assert n >= 12 and not missed, missed


def test_sentences_are_split_and_deduplicated():
    s = relevant_sentences("NOTE\nNo pneumothorax. Heart size normal. No pneumothorax.\n")
    assert [x.text for x in s] == ["No pneumothorax."] and s[0].heading == "NOTE"


def test_record_facts_name_the_known_malignancies_and_lung_resections():
    from data.history_digest import record_facts

    record = ("ONCOLOGY NOTE (2021-03-02)\nPast medical history: prostate cancer, diagnosed in 2019. Currently under surveillance.\n\n"
              "SURGICAL HISTORY\nSurgical history: right upper lobectomy in 2015. Recovery uncomplicated.\n\n"
              "NOTE (2020-01-01)\nDermatology: basal cell carcinoma of the nose excised with clear margins.\n\n"
              "CLINIC NOTE (2022-02-02)\nDiscussed colorectal cancer screening options.\n"
              "Family history: mother had breast cancer.\nHistory of renal cell carcinoma, resected.\n"
              "Ophthalmology: bilateral cataract surgery, uncomplicated.\n")
    assert record_facts(record) == ("prostate cancer", "right upper lobectomy", "cell carcinoma")
    assert record_facts("Known metastatic melanoma.") == ("melanoma",)
    assert record_facts(None) == () and record_facts("Cough for two weeks.") == ()


def test_record_facts_of_synthetic_records_cover_their_planted_malignancy_and_lobectomy():
    """On generated records: every planted malignancy / lobectomy fact is matched by a record fact;
    a distractor (skin cancer, other surgery) never is."""
    from data.history_digest import record_facts
    from data.synthetic.findings import sample_case
    from data.synthetic.histories import write_history

    rng = np.random.default_rng(3)
    seen = 0
    for i in range(60):
        case = sample_case(rng, f"r{i}", i, "test", "tiny", force={"has_history": True})
        text, facts = write_history(case, rng, target_tokens=600)
        got = record_facts(text)
        for f in facts:
            if f.kind in ("malignancy", "lobectomy"):
                seen += 1
                assert any(t in f.expect_in_report.lower() for t in got), (f.expect_in_report, got)
        assert not any("basal" in t or "cataract" in t for t in got)
    assert seen >= 10
