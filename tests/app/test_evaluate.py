"""The evaluation CLI and its scoring functions (app/evaluate.py)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from app.cli import main
from app.evaluate import (
    EvaluationInputError,
    bleu_from_stats,
    bleu_stats,
    corpus_bleu_scores,
    evaluate_reports,
    read_reports,
    score_single,
    scored_text,
)
from data.report_format import clean_for_bleu, format_report

REPORT_A = format_report({
    "clinical_information": "Cough.", "technique": "Non-contrast CT of the chest.", "comparison": "",
    "findings": "Lungs and airways: A 9 mm solid nodule in the right upper lobe.\nPleura: No pleural effusion.",
    "impression": "Right upper lobe nodule, 9 mm.",
})
REPORT_B = format_report({
    "clinical_information": "Dyspnoea.", "technique": "CT of the chest with contrast.", "comparison": "",
    "findings": "Lungs and airways: Clear lungs.\nPleura: Large left pleural effusion.",
    "impression": "Large left pleural effusion.",
})


def test_bleu_stats_sum_to_nltk_corpus_bleu():
    rng = random.Random(0)
    words = "the heart size is normal no effusion pneumothorax lungs are clear nodule right left".split()
    hyps = [[rng.choice(words) for _ in range(rng.randint(3, 20))] for _ in range(40)]
    refs = [[rng.choice(words) for _ in range(rng.randint(3, 20))] for _ in range(40)]
    st = bleu_stats(hyps, refs)
    mine = bleu_from_stats(st.matches.sum(0), st.totals.sum(0), int(st.hyp_len.sum()), int(st.ref_len.sum()))
    ref = corpus_bleu_scores(hyps, refs)
    for k in ref:
        assert mine[k] == pytest.approx(ref[k], abs=1e-12), k
    assert 0 < ref["bleu4"] < ref["bleu1"] < 1


def test_bleu_agrees_with_pycocoevalcap_on_real_iu_xray_reports(shared_data):
    from pycocoevalcap.bleu.bleu import Bleu

    ann = json.loads((shared_data / "iu_xray_annotation.json").read_text())
    refs_txt = [r["report"] for r in ann["test"]]
    hyps_txt = refs_txt[1:] + refs_txt[:1]  # each study scored against another study's report
    R = [clean_for_bleu(t) for t in refs_txt]
    H = [clean_for_bleu(t) for t in hyps_txt]
    ours = corpus_bleu_scores(H, R)
    coco, _ = Bleu(4).compute_score({i: [" ".join(r)] for i, r in enumerate(R)},
                                    {i: [" ".join(h)] for i, h in enumerate(H)}, verbose=0)
    for k, c in zip(("bleu1", "bleu2", "bleu3", "bleu4"), coco):
        assert ours[k] == pytest.approx(c, abs=1e-6), (k, ours[k], c)
    assert 0.05 < ours["bleu4"] < ours["bleu1"]


def test_scored_text_sections():
    fi = scored_text(REPORT_A)
    assert "9 mm solid nodule" in fi and "Right upper lobe nodule" in fi
    assert "Cough" not in fi and "Non-contrast" not in fi and "Lungs and airways" not in fi
    assert "Cough" in scored_text(REPORT_A, "all")
    plain = "Heart size normal. No effusion."
    assert scored_text(plain) == plain  # no headings: scored whole
    with pytest.raises(EvaluationInputError):
        scored_text(REPORT_A, "findings,nonsense")


def test_identical_reports_score_perfectly_and_different_ones_do_not():
    ev = evaluate_reports({"a": REPORT_A, "b": REPORT_B}, {"a": REPORT_A, "b": REPORT_B}, bootstrap=50, meteor=False)
    assert ev.scores["bleu4"] == pytest.approx(1.0)
    assert ev.scores["finding_micro_f1"] == pytest.approx(1.0)
    swapped = evaluate_reports({"a": REPORT_B, "b": REPORT_A}, {"a": REPORT_A, "b": REPORT_B}, bootstrap=50, meteor=False)
    assert swapped.scores["bleu4"] < 0.5
    assert swapped.scores["finding_micro_f1"] < 0.5
    lo, hi = swapped.ci95["bleu4"]
    assert lo <= hi


def test_missing_and_extra_ids_are_reported_not_dropped():
    ev = evaluate_reports({"a": REPORT_A, "x": REPORT_B}, {"a": REPORT_A, "b": REPORT_B}, bootstrap=0, meteor=False)
    assert ev.n == 1 and ev.missing_in_hyp == ["b"] and ev.extra_in_hyp == ["x"]
    assert any("missing_in_hyp" in n for n in ev.notes)
    with pytest.raises(EvaluationInputError, match="same ids"):
        evaluate_reports({"x": REPORT_A}, {"a": REPORT_A}, bootstrap=0, meteor=False)


def test_score_single_flags_differing_findings():
    s = score_single(REPORT_B, REPORT_A)
    assert s["bleu_kind"].startswith("sentence BLEU")
    names = {d["finding"] for d in s["findings_that_differ"]}
    assert "pleural_effusion" in names and "nodule" in names
    assert score_single(REPORT_A, REPORT_A)["findings_that_differ"] == []


def test_read_reports_errors_and_folders(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "report": "x"}\nnot json\n')
    with pytest.raises(EvaluationInputError, match="line 2"):
        read_reports(bad)
    folder = tmp_path / "reports"
    (folder / "s1").mkdir(parents=True)
    (folder / "s1" / "report.txt").write_text(REPORT_A)
    (folder / "s2.txt").write_text(REPORT_B)
    got = read_reports(folder)
    assert got == {"s1": REPORT_A, "s2": REPORT_B}


def test_cli_writes_json_and_html(tmp_path, capsys):
    hyp = tmp_path / "hyp.jsonl"
    ref = tmp_path / "ref.jsonl"
    hyp.write_text("\n".join(json.dumps({"id": i, "report": r}) for i, r in [("a", REPORT_A), ("b", REPORT_A)]))
    ref.write_text("\n".join(json.dumps({"id": i, "report": r}) for i, r in [("a", REPORT_A), ("b", REPORT_B), ("c", REPORT_B)]))
    rc = main(["evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json", str(tmp_path / "s.json"),
               "--html", str(tmp_path / "s.html"), "--bootstrap", "100", "--no-meteor"])
    assert rc == 0
    out = json.loads((tmp_path / "s.json").read_text())
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "finding_micro_f1", "finding_macro_f1", "n"):
        assert k in out
    assert out["n"] == 2 and out["missing_in_hyp"] == ["c"]
    assert 0 < out["bleu4"] < 1
    html = (tmp_path / "s.html").read_text()
    assert "data:image/png;base64," in html and "finding_micro_f1" in html
    assert "2 studies scored" in capsys.readouterr().out


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    rc = main(["evaluate", "--hyp", str(tmp_path / "nope.jsonl"), "--ref", str(tmp_path / "nope.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_cli_reports_planted_facts_when_the_reference_is_a_synthetic_manifest(tmp_path, capsys):
    from data.synthetic.writer import DatasetConfig, write_dataset

    cfg = DatasetConfig(n=6, seed=21, size="tiny", history_tokens=(300, 600), audio=False, normal_fraction=0.0)
    manifest = write_dataset(tmp_path / "ds", cfg, workers=1, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    with_facts = [r for r in rows if any(f["expect_in_report"] and f["kind"] != "distractor" for f in r["facts"])]
    assert with_facts, "the generator plants facts in most histories"
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(json.dumps({"id": r["id"], "report": r["report"]}) for r in rows))
    bad.write_text("\n".join(json.dumps({"id": r["id"], "report": REPORT_B}) for r in rows))
    for hyp, want in ((good, 1.0), (bad, 0.0)):
        assert main(["evaluate", "--hyp", str(hyp), "--ref", str(manifest), "--json", str(tmp_path / "s.json"),
                     "--bootstrap", "0", "--no-meteor"]) == 0
        out = json.loads((tmp_path / "s.json").read_text())
        assert out["facts_carried"] == want and out["facts_studies_checked"] == len(with_facts)
        assert "facts_carried" in capsys.readouterr().out
    # plain report files have no facts: nothing is claimed
    assert main(["evaluate", "--hyp", str(good), "--ref", str(good), "--json", str(tmp_path / "p.json"),
                 "--bootstrap", "0", "--no-meteor"]) == 0
    assert "facts_carried" not in json.loads((tmp_path / "p.json").read_text())


def test_prior_nodule_facts_report_the_records_part_apart():
    """A prior-nodule phrase joins the record's size with today's (image) size: the strict rate
    needs both, the record part ("from 6 mm", "unchanged at 9 mm") is reported apart."""
    from types import SimpleNamespace as NS

    from app.evaluate import facts_carried

    def entry(i, phrase):
        return NS(id=i, history="h", history_text=None, facts=[NS(kind="prior_nodule", expect_in_report=phrase)])

    entries = [entry("a", "increased from 6 mm to 9 mm"), entry("b", "remained unchanged at 9 mm"),
               entry("c", "decreased from 8 mm to 5 mm")]
    hyp = {"a": "The nodule has increased from 6 mm to 8 mm.", "b": "It remained unchanged at 9 mm.",
           "c": "A 5 mm nodule."}
    out = facts_carried(hyp, entries)
    assert out["facts_carried"] == pytest.approx(1 / 3)  # only b is exact
    assert out["prior_nodule_record_part_carried"] == pytest.approx(2 / 3, abs=1e-4)  # a and b carry the record's size
    assert facts_carried({"a": "x"}, [entry("a", "remained unchanged at 9 mm")])["prior_nodule_record_part_carried"] == 0.0


def test_length_ratio_and_brevity_penalty_are_nltks():
    from nltk.translate.bleu_score import brevity_penalty

    from app.evaluate import length_scores

    rng = random.Random(1)
    words = "the heart size is normal no effusion lungs are clear".split()
    refs = [[rng.choice(words) for _ in range(rng.randint(5, 15))] for _ in range(30)]
    short = [r[: max(1, len(r) // 2)] for r in refs]  # half as long: penalised
    for hyps in (short, [r + ["x"] for r in refs]):
        h, r = sum(map(len, hyps)), sum(map(len, refs))
        got = length_scores(hyps, refs)
        assert got["length_ratio"] == pytest.approx(h / r)
        assert got["brevity_penalty"] == pytest.approx(brevity_penalty(r, h), abs=1e-12)
    assert length_scores(short, refs)["brevity_penalty"] < 0.5 < length_scores(refs, refs)["brevity_penalty"] == 1.0
    scores = evaluate_reports({"a": REPORT_A}, {"a": REPORT_A}, bootstrap=0, meteor=False).scores
    assert scores["length_ratio"] == 1.0 and scores["brevity_penalty"] == 1.0
