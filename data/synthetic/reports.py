"""Reference reports written from the truth, with varied phrasing.

Every statement has several paraphrases. A third of them (every third variant, for statements
with three or more) are *reserved*: only studies of the ``test`` split use them, and train/val
studies only use the others, so test scores measure wording the model never saw.

Planted history facts change the report: the indication -> Clinical information; a prior nodule
-> "increased from 6 mm to 9 mm" (+ Comparison); a known malignancy -> Impression wording;
a lobectomy -> Findings; a contrast allergy -> Technique "without intravenous contrast".
"""
from __future__ import annotations

import numpy as np

from data.report_format import format_findings
from data.synthetic.findings import Case
from data.vocab import Label

# Statement key -> paraphrases. Slots: {lobe} {side} {size} {density} {amount} {station} {level}
# {severity} {prior} {change} {date} {indication} {cancer} {thk} {Thing} (capitalised variants).
T: dict[str, list[str]] = {
    # ---- clinical information / technique / comparison
    "clinical": ["{Indication}.", "{Indication}.", "Clinical concern: {indication}.", "{Indication}, per referral."],
    "clinical_cancer": ["{Indication}. Known {cancer}.", "{Indication}; history of {cancer}.",
                        "{Indication} in a patient with known {cancer}."],
    "technique_contrast": [
        "Contrast-enhanced CT of the chest with {thk} mm axial reconstructions.",
        "CT of the chest following intravenous contrast administration. Axial images at {thk} mm.",
        "Axial CT images of the chest were obtained after intravenous contrast, {thk} mm slices.",
        "CT chest with IV contrast; {thk} mm axial images.",
    ],
    "technique_noncontrast": [
        "CT of the chest without intravenous contrast because of a reported contrast allergy. Axial images at {thk} mm.",
        "Axial CT of the chest without intravenous contrast ({thk} mm), given the documented contrast allergy.",
        "Non-enhanced CT of the chest was performed without intravenous contrast due to contrast allergy; {thk} mm slices.",
    ],
    "comparison_prior": ["CT chest dated {date}.", "Prior CT of the chest from {date}.", "Comparison is made with CT chest of {date}."],
    "comparison_none": ["None.", "None available.", "No prior imaging available."],
    # ---- normal system statements
    "lungs_normal": [
        "The lungs are clear. No consolidation or suspicious pulmonary nodule.",
        "No focal consolidation, mass or suspicious nodule.",
        "Clear lungs without pulmonary nodules or airspace consolidation.",
        "No pulmonary nodule, mass or consolidation is identified.",
        "The lungs are clear without focal consolidation or nodule.",
        "There is no consolidation, mass or nodule in either lung.",
    ],
    "airways": ["The central airways are patent.", "Central airways are clear.", "The trachea and main bronchi are patent."],
    "pleura_normal": [
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pneumothorax or pleural effusion is seen.",
        "Pleural spaces are clear without effusion or pneumothorax.",
        "No effusion or pneumothorax.",
        "Neither pleural effusion nor pneumothorax is present.",
    ],
    "no_effusion": ["No pleural effusion.", "There is no pleural effusion.", "No pleural effusion is seen."],
    "no_ptx": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is identified."],
    "heart_normal": [
        "The heart is normal in size. No pericardial effusion.",
        "Heart size is normal without pericardial effusion.",
        "Normal heart size. No pericardial effusion.",
        "The heart is not enlarged and there is no pericardial effusion.",
        "Normal cardiac size without pericardial effusion.",
        "No cardiomegaly or pericardial effusion.",
    ],
    "heart_size_normal": ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly."],
    "no_pericardial": ["No pericardial effusion.", "There is no pericardial effusion.", "No pericardial effusion is seen."],
    "nodes_normal": [
        "No mediastinal or hilar lymphadenopathy.",
        "No enlarged mediastinal or hilar lymph nodes.",
        "There is no mediastinal or hilar lymphadenopathy.",
        "No thoracic lymphadenopathy.",
        "Mediastinal and hilar lymph nodes are not enlarged.",
        "No lymphadenopathy in the mediastinum or hila.",
    ],
    "bones_normal": [
        "No acute osseous abnormality.",
        "No fracture or suspicious bone lesion.",
        "No acute fracture or destructive osseous lesion.",
        "No fracture or aggressive bone lesion.",
        "The osseous structures show no fracture or suspicious lesion.",
        "No fracture. No suspicious osseous lesion.",
    ],
    "abdomen_normal": [
        "The visualized upper abdomen is unremarkable.",
        "Limited images of the upper abdomen are unremarkable.",
        "Unremarkable imaged upper abdomen.",
        "The included upper abdominal organs are unremarkable.",
        "No abnormality in the imaged upper abdomen.",
        "Imaged portions of the upper abdomen are within normal limits.",
    ],
    # ---- positive findings
    "nodule": [
        "There is a {size} mm {density} nodule in the {lobe}.",
        "A {size} mm {density} nodule is seen in the {lobe}.",
        "{Lobe} {density} nodule measuring {size} mm.",
        "{Size} mm {density} pulmonary nodule in the {lobe}.",
        "A {density} pulmonary nodule in the {lobe} measures {size} mm.",
        "In the {lobe} there is a {density} nodule of {size} mm.",
    ],
    "nodule_prior": [
        "The {density} nodule in the {lobe} has {change_phrase} since {date}.",
        "{Lobe} {density} nodule, {change_phrase} compared with {date}.",
        "The known {lobe} {density} nodule has {change_phrase} since the prior CT.",
        "The {density} nodule in the {lobe} has {change_phrase} on comparison with the prior study.",
    ],
    "mass": [
        "There is a {size} mm mass in the {lobe}.",
        "A {size} mm spiculated mass is present in the {lobe}.",
        "{Lobe} mass measuring {size} mm.",
        "A lobulated mass in the {lobe} measures {size} mm.",
        "There is a spiculated {lobe} mass of {size} mm.",
        "{Size} mm soft tissue mass in the {lobe}.",
    ],
    "consolidation": [
        "There is consolidation in the {lobe}.",
        "Airspace consolidation with air bronchograms in the {lobe}.",
        "Focal consolidation is present in the {lobe}.",
        "Dense consolidation of the {lobe}.",
        "The {lobe} shows airspace consolidation.",
        "Consolidation involving the {lobe} with air bronchograms.",
    ],
    "ground_glass_opacity": [
        "There is patchy ground-glass opacity in the {lobe}.",
        "Ground-glass opacity in the {lobe}.",
        "Hazy ground-glass opacity involves the {lobe}.",
        "Patchy ground-glass opacification of the {lobe}.",
        "The {lobe} shows ground-glass opacity.",
        "Focal ground-glass opacity in the {lobe}.",
    ],
    "atelectasis": [
        "Dependent atelectasis in the {lobe}.",
        "Subsegmental atelectasis of the {lobe}.",
        "There is mild atelectasis in the {lobe}.",
        "Linear atelectasis in the {lobe}.",
        "Atelectasis of the posterior {lobe}.",
        "Bandlike atelectasis in the {lobe}.",
    ],
    "emphysema": [
        "{Severity} centrilobular emphysema, upper lobe predominant.",
        "There is {severity} emphysema, predominantly in the upper lobes.",
        "{Severity} emphysematous changes in both upper lobes.",
        "Upper lobe predominant {severity} emphysema.",
        "Both lungs show {severity} centrilobular emphysema.",
        "{Severity} emphysema in both lungs.",
    ],
    "lobectomy": [
        "Postsurgical changes of {procedure} with a surgical staple line.",
        "Status post {procedure}, with staple line at the hilum.",
        "Changes of prior {procedure}; the remaining lung is expanded.",
        "The patient is status post {procedure}.",
    ],
    "pleural_effusion": [
        "There is a {amount} {side} pleural effusion.",
        "{Amount} {side} pleural effusion.",
        "A {amount} {side} pleural effusion is present.",
        "{Amount} free-flowing {side} pleural effusion.",
        "Simple {amount} {side} pleural effusion.",
        "A {side} pleural effusion is present, {amount} in size.",
    ],
    "pleural_effusion_bilateral": [
        "There are {amount} bilateral pleural effusions.",
        "{Amount} bilateral pleural effusions.",
        "Bilateral {amount} pleural effusions are present.",
        "{Amount} pleural effusions on both sides.",
        "Bilateral pleural effusions, {amount}.",
        "There are {amount} pleural effusions bilaterally.",
    ],
    "pneumothorax": [
        "There is a {amount} {side} pneumothorax.",
        "{Amount} {side} pneumothorax.",
        "A {amount} {side} pneumothorax is present.",
        "{Amount} anterior {side} pneumothorax.",
        "A {side} pneumothorax is seen, {amount} in size.",
        "There is a {amount} {side}-sided pneumothorax.",
    ],
    "cardiomegaly": [
        "The heart is enlarged.",
        "Cardiomegaly.",
        "There is cardiomegaly.",
        "The heart is enlarged in size.",
        "Cardiac enlargement.",
        "Moderate cardiomegaly.",
    ],
    "pericardial_effusion": [
        "There is a {amount} pericardial effusion.",
        "{Amount} pericardial effusion.",
        "A {amount} pericardial effusion is present.",
        "{Amount} pericardial fluid collection (pericardial effusion).",
        "A pericardial effusion is seen, {amount} in size.",
        "There is a {amount} effusion in the pericardium, consistent with pericardial effusion.",
    ],
    "lymphadenopathy": [
        "Enlarged {station} lymph node measuring {size} mm in short axis.",
        "{Station} lymphadenopathy measuring {size} mm.",
        "There is {station} lymphadenopathy, {size} mm in short axis.",
        "An enlarged {station} lymph node measures {size} mm.",
        "{Station} lymph node enlargement to {size} mm.",
        "A {size} mm {station} lymph node is enlarged.",
    ],
    "hiatal_hernia": [
        "There is a {amount} hiatal hernia.",
        "{Amount} hiatal hernia.",
        "A {amount} hiatal hernia is present.",
        "{Amount} sliding hiatal hernia.",
        "A hiatal hernia is seen, {amount} in size.",
        "The stomach herniates through the hiatus: {amount} hiatal hernia.",
    ],
    "fracture": [
        "Compression fracture of the {level} vertebral body.",
        "There is a {level} vertebral compression fracture.",
        "Anterior wedge compression fracture of {level}.",
        "{Level} compression fracture with loss of vertebral body height.",
        "A compression fracture deforms the {level} vertebral body.",
        "Vertebral compression fracture at {level}.",
    ],
    "bone_lesion": [
        "There is a {size} mm lytic lesion in the {level} vertebral body.",
        "Lytic lesion in the {level} vertebral body measuring {size} mm.",
        "A {size} mm lytic bone lesion is seen in {level}.",
        "{Size} mm lytic lesion of the {level} vertebra.",
        "The {level} vertebral body contains a lytic lesion of {size} mm.",
        "Lytic osseous lesion in {level}, {size} mm.",
    ],
    # ---- impression
    "imp_normal": [
        "No acute cardiopulmonary abnormality.",
        "Normal CT of the chest.",
        "No acute intrathoracic abnormality.",
        "No significant abnormality in the chest.",
        "Unremarkable CT of the chest.",
        "No acute findings in the chest.",
    ],
    "imp_cancer_clear": [
        "No evidence of intrathoracic metastatic disease from the known {cancer}.",
        "No CT evidence of metastatic disease in this patient with known {cancer}.",
        "No thoracic metastases from the known {cancer} are identified.",
    ],
    "imp_cancer_suspicious": [
        "Given the known {cancer}, findings are suspicious for metastatic disease.",
        "In this patient with known {cancer}, the findings are concerning for metastatic disease.",
        "Metastatic disease from the known {cancer} is suspected.",
    ],
}

# Impression phrasing per finding (shorter).
IMP: dict[str, list[str]] = {
    "nodule": ["{Size} mm {density} nodule in the {lobe}.", "{Lobe} {density} nodule, {size} mm.",
               "{Density} {lobe} nodule measuring {size} mm.", "{Size} mm {lobe} {density} nodule."],
    "mass": ["{Size} mm {lobe} mass, suspicious for malignancy.", "{Lobe} mass ({size} mm), concerning for malignancy.",
             "{Size} mm mass in the {lobe}, suspicious for primary lung malignancy."],
    "consolidation": ["{Lobe} consolidation, likely pneumonia in the appropriate clinical setting.",
                      "Consolidation in the {lobe}, compatible with pneumonia.",
                      "{Lobe} airspace consolidation, suggestive of pneumonia."],
    "ground_glass_opacity": ["Ground-glass opacity in the {lobe}, likely infectious or inflammatory.",
                             "{Lobe} ground-glass opacity, nonspecific.",
                             "Nonspecific ground-glass opacity in the {lobe}."],
    "atelectasis": ["{Lobe} atelectasis.", "Atelectasis in the {lobe}.", "Mild {lobe} atelectasis."],
    "emphysema": ["{Severity} emphysema.", "{Severity} centrilobular emphysema.", "Emphysema, {severity}."],
    "lobectomy": ["Postsurgical changes of {procedure}.", "Status post {procedure}.", "Expected appearance after {procedure}."],
    "pleural_effusion": ["{Amount} {side} pleural effusion.", "{Side} pleural effusion, {amount}.", "{Amount} {side} pleural effusion."],
    "pleural_effusion_bilateral": ["{Amount} bilateral pleural effusions.", "Bilateral pleural effusions, {amount}.",
                                   "{Amount} pleural effusions bilaterally."],
    "pneumothorax": ["{Amount} {side} pneumothorax.", "{Side} pneumothorax, {amount}.", "{Amount} {side}-sided pneumothorax."],
    "cardiomegaly": ["Cardiomegaly.", "Enlarged heart.", "Cardiac enlargement."],
    "pericardial_effusion": ["{Amount} pericardial effusion.", "Pericardial effusion, {amount}.", "{Amount} pericardial effusion."],
    "lymphadenopathy": ["{Station} lymphadenopathy ({size} mm).", "Enlarged {station} lymph node, {size} mm.",
                        "{Station} lymph node enlargement, {size} mm."],
    "hiatal_hernia": ["{Amount} hiatal hernia.", "Hiatal hernia, {amount}.", "{Amount} sliding hiatal hernia."],
    "fracture": ["{Level} vertebral compression fracture.", "Compression fracture of {level}.", "{Level} compression fracture, age indeterminate."],
    "bone_lesion": ["{Size} mm lytic lesion in {level}.", "Lytic lesion of the {level} vertebral body.", "Lytic {level} vertebral lesion."],
}

RESERVE_EVERY = 3  # variant i is reserved for the test split when i % 3 == 2 (lists of >= 3)

# Findings whose presence makes a known malignancy's impression "suspicious".
_SUSPICIOUS = {"nodule", "mass", "lymphadenopathy", "bone_lesion", "pleural_effusion"}


def pool_of(split: str) -> str:
    """The template pool a split draws from: ``"test"`` (reserved) or ``"train"`` (the rest)."""
    return "test" if split == "test" else "train"


def variants(options: list[str], pool: str) -> list[str]:
    """The paraphrases of one statement available to ``pool``."""
    if len(options) < RESERVE_EVERY:
        return options
    reserved = [o for i, o in enumerate(options) if i % RESERVE_EVERY == RESERVE_EVERY - 1]
    if pool == "test":
        return reserved
    if pool == "any":
        return options
    return [o for i, o in enumerate(options) if i % RESERVE_EVERY != RESERVE_EVERY - 1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fmt_size(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:g}"


def _slots(lab: Label | None, extra: dict) -> dict:
    s = dict(extra)
    if lab is not None:
        s.update(
            lobe=lab.location or "", side=lab.side or "", size=_fmt_size(lab.size_mm),
            density=lab.attributes.get("density", ""), amount=lab.attributes.get("amount", ""),
            station=lab.location or "", level=lab.location or "", severity=lab.attributes.get("severity", ""),
        )
        if lab.finding == "lobectomy" and lab.location:
            side, part, _ = lab.location.split()
            s["procedure"] = f"{side} {part} lobectomy"
    for k in list(s):
        if isinstance(s[k], str):
            s[_cap(k)] = _cap(s[k])
    return s


class _Writer:
    def __init__(self, rng: np.random.Generator, pool: str):
        self.rng, self.pool = rng, pool

    def say(self, key: str, lab: Label | None = None, table: dict = T, **extra) -> str:
        opts = variants(table[key], self.pool)
        text = opts[int(self.rng.integers(len(opts)))]
        return text.format(**_slots(lab, extra))


def nodule_change_phrase(prior_mm: float, size_mm: float) -> str:
    """The exact phrase a prior-nodule fact must produce (also ``expect_in_report``)."""
    if size_mm > prior_mm:
        return f"increased from {prior_mm:g} mm to {size_mm:g} mm"
    if size_mm < prior_mm:
        return f"decreased from {prior_mm:g} mm to {size_mm:g} mm"
    return f"remained unchanged at {size_mm:g} mm"


def lobectomy_phrase(lobe: str) -> str:
    side, part, _ = lobe.split()
    return f"{side} {part} lobectomy"


def write_sections(case: Case, rng: np.random.Generator, pool: str | None = None,
                   history_known: bool | None = None) -> dict[str, str]:
    """The report sections for ``case`` (labels as rendered). ``pool`` defaults to the case's
    split pool; ``history_known`` (default: the case has a history) controls whether facts that
    only the history carries (prior, malignancy, allergy reason) are written."""
    w = _Writer(rng, pool or pool_of(case.split))
    known = case.has_history if history_known is None else history_known
    labs = {lab.finding: lab for lab in case.labels if lab.present}
    cancer = case.cancer if known else None

    # Clinical information: from the history and/or the dictation.
    if case.has_history or case.has_audio:
        ind = case.indication
        clinical = w.say("clinical_cancer", indication=ind, cancer=cancer) if cancer else w.say("clinical", indication=ind)
    else:
        clinical = ""
    thk = f"{case.acquisition['slice_thickness']:g}"
    technique = w.say("technique_contrast" if case.contrast else "technique_noncontrast", thk=thk)
    prior = known and case.prior_nodule_mm is not None and "nodule" in labs
    comparison = w.say("comparison_prior", date=case.prior_date) if prior else w.say("comparison_none")
    if comparison == "None.":
        comparison = ""

    systems: dict[str, list[str]] = {k: [] for k in ("lungs", "pleura", "heart_mediastinum", "bones", "upper_abdomen")}
    impression: list[str] = []
    order = ["lobectomy", "mass", "nodule", "consolidation", "ground_glass_opacity", "atelectasis", "emphysema",
             "pleural_effusion", "pneumothorax", "cardiomegaly", "pericardial_effusion", "lymphadenopathy",
             "fracture", "bone_lesion", "hiatal_hernia"]
    imp_order = ["mass", "nodule", "lymphadenopathy", "pneumothorax", "consolidation", "pleural_effusion",
                 "pericardial_effusion", "bone_lesion", "fracture", "ground_glass_opacity", "cardiomegaly",
                 "emphysema", "hiatal_hernia", "atelectasis", "lobectomy"]
    sys_of = {"lobectomy": "lungs", "mass": "lungs", "nodule": "lungs", "consolidation": "lungs",
              "ground_glass_opacity": "lungs", "atelectasis": "lungs", "emphysema": "lungs",
              "pleural_effusion": "pleura", "pneumothorax": "pleura", "cardiomegaly": "heart_mediastinum",
              "pericardial_effusion": "heart_mediastinum", "lymphadenopathy": "heart_mediastinum",
              "fracture": "bones", "bone_lesion": "bones", "hiatal_hernia": "upper_abdomen"}
    change = ""
    if prior:
        change = nodule_change_phrase(case.prior_nodule_mm, labs["nodule"].size_mm)
    for name in order:
        lab = labs.get(name)
        if lab is None:
            continue
        if name == "nodule" and prior:
            text = w.say("nodule_prior", lab, change_phrase=change, date=case.prior_date)
        elif name == "pleural_effusion" and lab.side == "bilateral":
            text = w.say("pleural_effusion_bilateral", lab)
        else:
            text = w.say(name, lab)
        systems[sys_of[name]].append(text)

    # Pertinent negatives and normal statements per system.
    lung_pos = [n for n in ("mass", "nodule", "consolidation", "ground_glass_opacity", "atelectasis", "emphysema", "lobectomy") if n in labs]
    if not lung_pos:
        systems["lungs"].append(w.say("lungs_normal"))
    if rng.random() < 0.5:
        systems["lungs"].append(w.say("airways"))
    has_eff, has_ptx = "pleural_effusion" in labs, "pneumothorax" in labs
    if not has_eff and not has_ptx:
        systems["pleura"].append(w.say("pleura_normal"))
    elif has_eff and not has_ptx:
        systems["pleura"].append(w.say("no_ptx"))
    elif has_ptx and not has_eff:
        systems["pleura"].append(w.say("no_effusion"))
    hm = systems["heart_mediastinum"]
    if "cardiomegaly" not in labs and "pericardial_effusion" not in labs:
        hm.insert(0, w.say("heart_normal"))
    elif "cardiomegaly" not in labs:
        hm.insert(0, w.say("heart_size_normal"))
    elif "pericardial_effusion" not in labs:
        hm.append(w.say("no_pericardial"))
    if "lymphadenopathy" not in labs:
        hm.append(w.say("nodes_normal"))
    if not systems["bones"]:
        systems["bones"].append(w.say("bones_normal"))
    if not systems["upper_abdomen"]:
        systems["upper_abdomen"].append(w.say("abdomen_normal"))

    for name in imp_order:
        lab = labs.get(name)
        if lab is None:
            continue
        key = "pleural_effusion_bilateral" if name == "pleural_effusion" and lab.side == "bilateral" else name
        text = w.say(key, lab, table=IMP)
        if name == "nodule" and prior:
            text = text.rstrip(".") + f", {change}."
        impression.append(text)
    if cancer:
        suspicious = any(n in labs for n in _SUSPICIOUS)
        impression.append(w.say("imp_cancer_suspicious" if suspicious else "imp_cancer_clear", cancer=cancer))
    if not impression:
        impression.append(w.say("imp_normal"))
    if len(impression) == 1:
        imp_text = impression[0]
    else:
        imp_text = "\n".join(f"{i}. {s}" for i, s in enumerate(impression, 1))

    return {
        "clinical_information": clinical,
        "technique": technique,
        "comparison": comparison,
        "findings": format_findings({k: " ".join(v) for k, v in systems.items()}),
        "impression": imp_text,
    }
