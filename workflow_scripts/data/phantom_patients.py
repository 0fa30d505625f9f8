"""Which findings each phantom patient has: a long-tailed main finding, sometimes a second or third,
and No Finding for the rest (the demo dataset's and the demo base's patients).

THESE ARE PHANTOMS FOR TRYING THE PIPELINE, NOT MEDICAL DATA.
"""

from __future__ import annotations

import numpy as np

from workflow_scripts.data.phantom import LABELS, NO_FINDING

# Relative frequency of each finding as a patient's main finding (long tail).
FINDING_WEIGHTS: dict[str, float] = {
    "Effusion": 0.26,
    "Nodule": 0.22,
    "Cardiomegaly": 0.16,
    "Mass": 0.12,
    "Fibrosis": 0.10,
    "Pneumonia": 0.08,
    "Pneumothorax": 0.06,
}
ABNORMAL_FRACTION = 0.6  # share of patients with at least one finding
SECOND_LABEL_P = 0.32  # chance an abnormal patient has a second finding
THIRD_LABEL_P = 0.06  # ... and a third


def plan_patients(num_patients: int, rng: np.random.Generator) -> list[list[str]]:
    """Findings per patient: quota-based main findings (long tail) plus random extras."""
    names = list(FINDING_WEIGHTS)
    weights = np.array([FINDING_WEIGHTS[n] for n in names])
    weights = weights / weights.sum()
    min_each = max(1, round(0.04 * num_patients))
    n_abnormal = round(ABNORMAL_FRACTION * num_patients)
    quotas = {n: max(min_each, round(w * n_abnormal)) for n, w in zip(names, weights)}
    n_abnormal = min(max(n_abnormal, sum(quotas.values())), num_patients - 1)
    while sum(quotas.values()) > n_abnormal:  # only possible for tiny datasets
        biggest = max(quotas, key=quotas.get)
        quotas[biggest] -= 1
    while sum(quotas.values()) < n_abnormal:
        quotas[names[int(rng.choice(len(names), p=weights))]] += 1
    main_findings = [n for n in names for _ in range(quotas[n])]
    rng.shuffle(main_findings)
    abnormal_ids = set(rng.choice(num_patients, size=n_abnormal, replace=False).tolist())
    plan: list[list[str]] = []
    it = iter(main_findings)
    for patient in range(num_patients):
        if patient not in abnormal_ids:
            plan.append([NO_FINDING])
            continue
        found = [next(it)]
        for p in (SECOND_LABEL_P, THIRD_LABEL_P):
            if rng.random() < p:
                options = [n for n in names if n not in found]
                w = np.array([FINDING_WEIGHTS[n] for n in options]) ** 1.5  # extras keep the tail long
                found.append(options[int(rng.choice(len(options), p=w / w.sum()))])
            else:
                break
        plan.append([label for label in LABELS if label in found])
    return plan
