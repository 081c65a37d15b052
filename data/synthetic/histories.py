"""Synthetic patient records (clinic notes, medication lists, labs, other imaging, discharge
summaries) of a chosen length, with the study's facts planted at random depths.

Length is counted in *approximate tokens*: words and punctuation marks (``TOKEN_RE``), which is
close to BPE counts on this text (``bench.data`` reports the real tokenizer count). Generation is
string assembly from template banks, about 10 ms per 10K tokens.
"""
from __future__ import annotations

import re

import numpy as np

from data.synthetic.findings import Case, Fact
from data.synthetic.reports import lobectomy_phrase, nodule_change_phrase

TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


_DOCTORS = ("Alder", "Birch", "Cedar", "Dunmore", "Ellery", "Fenwick", "Garrow", "Hale", "Ingram", "Juniper", "Kestrel", "Lowry")
_SPECIALTIES = ("internal medicine", "family medicine", "cardiology", "pulmonology", "endocrinology", "rheumatology",
                "nephrology", "gastroenterology", "orthopedics", "oncology", "dermatology", "urology")
_REASONS = ("hypertension follow-up", "diabetes management", "annual physical", "medication review", "knee pain",
            "fatigue", "low back pain", "dizziness", "rash on the forearm", "heartburn", "insomnia", "routine follow-up",
            "blood pressure check", "lipid management", "preoperative evaluation", "urinary frequency")
_HPI = (
    "Reports good adherence to the current medications.",
    "Denies fever, chills or night sweats.",
    "Appetite is stable and weight is unchanged since the last visit.",
    "Sleeps about six hours per night.",
    "Walks thirty minutes most days without limitation.",
    "Home blood pressure readings have been in the 130s systolic.",
    "Occasional heartburn after large meals, relieved by antacids.",
    "No chest pain at rest.",
    "Mild intermittent knee pain after exercise.",
    "Stopped smoking several years ago.",
    "Drinks alcohol socially, one to two drinks per week.",
    "Reports seasonal allergies controlled with antihistamines.",
    "No recent travel or sick contacts.",
    "Mood is good; no depressive symptoms reported.",
    "Occasional constipation managed with diet.",
    "Glucose logs show fasting values between 110 and 140.",
    "Works as a teacher and is independent in all activities of daily living.",
    "Lives with spouse; two adult children.",
)
_PLAN = (
    "Continue current antihypertensive regimen.",
    "Repeat basic metabolic panel in three months.",
    "Counseled on diet and exercise.",
    "Refilled medications for ninety days.",
    "Influenza vaccine administered today.",
    "Referred to physical therapy for knee strengthening.",
    "Check hemoglobin A1c at next visit.",
    "Increase metformin to 1000 mg twice daily.",
    "Return to clinic in six months or sooner as needed.",
    "Discussed colorectal cancer screening options.",
    "Start atorvastatin 20 mg nightly.",
    "Advised home blood pressure monitoring.",
    "Ordered lipid panel and thyroid function tests.",
    "Patient verbalized understanding of the plan.",
)
_DRUGS = (("lisinopril", "10 mg", "daily"), ("metformin", "500 mg", "twice daily"), ("atorvastatin", "40 mg", "nightly"),
          ("amlodipine", "5 mg", "daily"), ("omeprazole", "20 mg", "daily"), ("levothyroxine", "75 mcg", "daily"),
          ("aspirin", "81 mg", "daily"), ("metoprolol succinate", "25 mg", "daily"), ("sertraline", "50 mg", "daily"),
          ("hydrochlorothiazide", "12.5 mg", "daily"), ("gabapentin", "300 mg", "at bedtime"),
          ("albuterol inhaler", "2 puffs", "as needed"), ("tiotropium", "18 mcg", "daily"), ("furosemide", "20 mg", "daily"),
          ("apixaban", "5 mg", "twice daily"), ("vitamin D3", "1000 units", "daily"), ("tamsulosin", "0.4 mg", "daily"))
_LABS = (("Hemoglobin", "g/dL", 11.0, 16.5, "12.0-16.0"), ("White blood cells", "10^9/L", 3.5, 12.0, "4.0-11.0"),
         ("Platelets", "10^9/L", 140, 420, "150-400"), ("Sodium", "mmol/L", 132, 146, "135-145"),
         ("Potassium", "mmol/L", 3.3, 5.3, "3.5-5.1"), ("Creatinine", "mg/dL", 0.6, 1.6, "0.6-1.2"),
         ("Glucose", "mg/dL", 80, 190, "70-99"), ("Hemoglobin A1c", "%", 5.2, 8.9, "4.0-5.6"),
         ("ALT", "U/L", 10, 65, "7-56"), ("TSH", "mIU/L", 0.5, 5.5, "0.4-4.0"), ("LDL cholesterol", "mg/dL", 60, 180, "<100"),
         ("C-reactive protein", "mg/L", 0.5, 40, "<5"))
_OTHER_IMAGING = (
    ("Ultrasound abdomen", "The liver is normal in size and echotexture. The gallbladder contains no stones. The kidneys are normal in size without hydronephrosis.",
     "Unremarkable abdominal ultrasound."),
    ("MRI lumbar spine", "Mild disc desiccation at L4-L5 with a small broad-based disc bulge. No significant canal stenosis.",
     "Mild degenerative disc disease at L4-L5."),
    ("Echocardiogram", "Left ventricular ejection fraction estimated at 55 to 60 percent. Normal valve function.",
     "Normal left ventricular systolic function."),
    ("Screening mammogram", "Scattered fibroglandular densities. No suspicious mass or calcification.", "BI-RADS 1, negative."),
    ("CT head without contrast", "No acute intracranial hemorrhage or mass effect. Mild chronic small vessel ischemic change.",
     "No acute intracranial abnormality."),
    ("Radiograph right hand", "No acute osseous abnormality. Mild degenerative change at the first carpometacarpal joint.",
     "Mild osteoarthritis."),
    ("Bone densitometry", "Lumbar spine T-score -1.4. Femoral neck T-score -1.7.", "Osteopenia."),
)
_DX = ("community-acquired urinary tract infection", "cellulitis of the left lower leg", "acute gastroenteritis with dehydration",
       "hyperglycemia", "syncope, likely vasovagal", "acute kidney injury, resolved", "diverticulitis treated with antibiotics",
       "atrial fibrillation with rapid ventricular response")
_COURSE = (
    "The patient was admitted for intravenous fluids and monitoring.",
    "Symptoms improved steadily over the hospital stay.",
    "Antibiotics were narrowed according to culture results.",
    "Renal function returned to baseline before discharge.",
    "Physical therapy evaluated the patient and cleared for home discharge.",
    "Telemetry showed no significant arrhythmia.",
    "Home medications were resumed at discharge.",
    "The patient tolerated a regular diet on hospital day two.",
)

_DISTRACTORS = (
    ("MRI left knee: complex tear of the posterior horn of the medial meniscus.", "meniscus"),
    ("Thyroid ultrasound: 14 mm thyroid nodule in the right lobe, TI-RADS 3.", "thyroid"),
    ("Remote history of a left ankle fracture treated with casting.", "ankle"),
    ("Family history: brother treated for pneumonia last winter.", "brother"),
    ("Ophthalmology: bilateral cataract surgery, uncomplicated.", "cataract"),
    ("Renal ultrasound: 6 mm nonobstructing kidney stone on the left.", "kidney stone"),
    ("Dermatology: basal cell carcinoma of the nose excised with clear margins.", "basal cell"),
    ("History of carpal tunnel syndrome of the right wrist, released surgically.", "carpal tunnel"),
    ("Family history: mother had a pulmonary embolism after hip surgery.", "embolism"),
    ("Podiatry: gout flare of the first metatarsophalangeal joint.", "gout"),
)


def _date(rng: np.random.Generator, lo: int = 2012, hi: int = 2025) -> str:
    return f"{int(rng.integers(lo, hi + 1)):04d}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"


def _pick(rng: np.random.Generator, seq, k: int = 1):
    idx = rng.choice(len(seq), size=min(k, len(seq)), replace=False)
    return [seq[int(i)] for i in idx]


def _clinic_note(rng, age, sex) -> str:
    doc = _pick(rng, _DOCTORS)[0]
    spec = _pick(rng, _SPECIALTIES)[0]
    reason = _pick(rng, _REASONS)[0]
    hpi = " ".join(_pick(rng, _HPI, int(rng.integers(3, 8))))
    plan = "\n".join(f"- {p}" for p in _pick(rng, _PLAN, int(rng.integers(2, 6))))
    return (f"CLINIC NOTE ({_date(rng)})\nProvider: Dr. {doc}, {spec}\n"
            f"Subjective: {age}-year-old {sex} seen for {reason}. {hpi}\n"
            f"Vitals: BP {int(rng.integers(105, 165))}/{int(rng.integers(60, 98))} mmHg, HR {int(rng.integers(55, 105))}, "
            f"RR {int(rng.integers(12, 22))}, SpO2 {int(rng.integers(91, 100))}% on room air, T {rng.uniform(36.1, 37.8):.1f} C.\n"
            f"Assessment and plan:\n{plan}\n")


def _med_list(rng) -> str:
    meds = _pick(rng, _DRUGS, int(rng.integers(3, 10)))
    return f"MEDICATION LIST ({_date(rng)})\n" + "\n".join(f"- {d} {dose} {f}" for d, dose, f in meds) + "\n"


def _labs(rng) -> str:
    rows = _pick(rng, _LABS, int(rng.integers(4, 11)))
    lines = [f"{n}: {rng.uniform(lo, hi):.1f} {u} (ref {ref})" for n, u, lo, hi, ref in rows]
    return f"LABORATORY RESULTS ({_date(rng)})\n" + "\n".join(lines) + "\n"


def _imaging(rng) -> str:
    exam, findings, imp = _pick(rng, _OTHER_IMAGING)[0]
    return f"RADIOLOGY REPORT ({_date(rng)}): {exam}\nFindings: {findings}\nImpression: {imp}\n"


def _discharge(rng, age, sex) -> str:
    dx = _pick(rng, _DX)[0]
    course = " ".join(_pick(rng, _COURSE, int(rng.integers(3, 7))))
    return (f"DISCHARGE SUMMARY\nAdmitted: {_date(rng)}. Length of stay {int(rng.integers(1, 9))} days.\n"
            f"Principal diagnosis: {dx}.\nHospital course: {age}-year-old {sex}. {course}\n"
            f"Discharge medications: see medication list. Follow-up with primary care in 1-2 weeks.\n")


def _phone(rng) -> str:
    return (f"TELEPHONE ENCOUNTER ({_date(rng)})\nPatient called regarding "
            f"{_pick(rng, ('a medication refill', 'lab results', 'an appointment change', 'insurance paperwork'))[0]}. "
            f"{_pick(rng, ('Message routed to the provider.', 'Questions answered.', 'Refill sent to pharmacy.'))[0]}\n")


def plan_facts(case: Case, rng: np.random.Generator) -> list[tuple[Fact, str]]:
    """The facts of ``case`` as (Fact, document containing Fact.text)."""
    out: list[tuple[Fact, str]] = []
    ind_text = f"Reason for exam: {case.indication}."
    out.append((Fact("indication", ind_text, expect_in_report=case.indication, section="clinical_information"),
                f"IMAGING ORDER ({_date(rng, 2025, 2026)}): CT chest.\n{ind_text}\nOrdering provider: Dr. {_pick(rng, _DOCTORS)[0]}.\n"))
    nod = case.present("nodule")
    if case.prior_nodule_mm is not None and nod is not None:
        text = f"There is a {case.prior_nodule_mm:g} mm solid nodule in the {nod.location}."
        doc = (f"RADIOLOGY REPORT ({case.prior_date}): CT chest\nFindings: {text} No pleural effusion. "
               f"Heart size is normal.\nImpression: {case.prior_nodule_mm:g} mm {nod.location} nodule. Follow-up CT recommended.\n")
        out.append((Fact("prior_nodule", text, expect_in_report=nodule_change_phrase(case.prior_nodule_mm, nod.size_mm),
                         section="findings"), doc))
    if case.cancer:
        text = f"Past medical history: {case.cancer}, diagnosed in {int(rng.integers(2015, 2025))}."
        out.append((Fact("malignancy", text, expect_in_report=f"known {case.cancer}", section="impression"),
                    f"ONCOLOGY NOTE ({_date(rng, 2020, 2025)})\n{text} Currently under surveillance.\n"))
    if case.lobectomy_lobe:
        proc = lobectomy_phrase(case.lobectomy_lobe)
        text = f"Surgical history: {proc} in {int(rng.integers(2010, 2024))}."
        out.append((Fact("lobectomy", text, expect_in_report=proc, section="findings"),
                    f"SURGICAL HISTORY\n{text} Recovery uncomplicated.\n"))
    if not case.contrast:
        text = "ALLERGIES: iodinated contrast media (hives)."
        out.append((Fact("contrast_allergy", text, expect_in_report="without intravenous contrast", section="technique"),
                    f"{text}\n"))
    for text, bad in _pick(rng, _DISTRACTORS, int(rng.integers(1, 4))):
        out.append((Fact("distractor", text, expect_in_report="", section="", must_not_appear=bad), f"NOTE ({_date(rng)})\n{text}\n"))
    return out


def write_history(case: Case, rng: np.random.Generator, target_tokens: int | None = None) -> tuple[str, list[Fact]]:
    """The record text (about ``target_tokens`` approximate tokens) and its facts with offsets."""
    target = case.history_tokens if target_tokens is None else target_tokens
    sex = "man" if case.sex == "M" else "woman"
    header = f"PATIENT RECORD (synthetic, not a real person)\nAge: {case.age}. Sex: {case.sex}.\n\n"
    facts = plan_facts(case, rng)
    fact_tokens = sum(approx_tokens(d) for _, d in facts) + approx_tokens(header)
    docs: list[str] = []
    total = fact_tokens
    makers = (lambda: _clinic_note(rng, case.age, sex), lambda: _med_list(rng), lambda: _labs(rng),
              lambda: _imaging(rng), lambda: _discharge(rng, case.age, sex), lambda: _phone(rng))
    weights = np.array([0.35, 0.15, 0.2, 0.1, 0.1, 0.1])
    kinds = rng.choice(len(makers), size=max(4, target // 40), p=weights)
    i = 0
    while total < target:
        d = makers[int(kinds[i % len(kinds)])]()
        i += 1
        docs.append(d)
        total += approx_tokens(d)
    # Insert each fact document at a random depth.
    slots = sorted(int(s) for s in rng.integers(0, len(docs) + 1, size=len(facts)))
    order = rng.permutation(len(facts))
    pieces: list[str] = [header]
    placed: list[Fact] = []
    offset = len(header)
    j = 0
    for pos in range(len(docs) + 1):
        while j < len(slots) and slots[j] == pos:
            fact, doc = facts[int(order[j])]
            fact.char_offset = offset + doc.index(fact.text)
            placed.append(fact)
            pieces.append(doc + "\n")
            offset += len(doc) + 1
            j += 1
        if pos < len(docs):
            pieces.append(docs[pos] + "\n")
            offset += len(docs[pos]) + 1
    text = "".join(pieces)
    placed.sort(key=lambda f: f.char_offset)
    return text, placed


def dictation_text(case: Case, rng: np.random.Generator) -> str:
    """What the referring clinician says: age, sex and the indication."""
    who = "man" if case.sex == "M" else "woman"
    lead = str(rng.choice(["", "CT chest. ", "Chest CT request. "]))
    tail = str(rng.choice(["", " Please evaluate.", " Thank you."]))
    return f"{lead}{case.age} year old {who} with {case.indication}.{tail}"
