"""Do the synthetic X-rays look real, show what they were asked to show, and copy no patient?

features.py (Inception, torchxrayvision DenseNet, RAD-DINO behind one interface), distances.py
(FID, KID, PRDC, MS-SSIM), evaluate.py (held-out reference, real-vs-real floor, equal n, prompt
adherence), report.py (fidelity.md and plots), audit.py (calibrated memorization audit, with its
own CLI) and audit_search.py (its blocked nearest-image search, and that search's cost). The stage's CLI is evaluate_fidelity.py.
"""

# The two comparisons of every fidelity row: synthetic images against the held-out real reference,
# and the real-vs-real floor at the same n. Read by evaluate.py (which computes) and report.py (which shows).
SYNTHETIC, FLOOR = "synthetic vs real val", "real train vs real val (floor)"
# The LoRA-off control: the same prompts and seeds drawn by the base model alone (what the LoRA adds).
BASE = "base without LoRA vs real val"
# The `set` column of adherence.csv: who drew the images, and which label their score is read against.
PROMPTED, BASE_PROMPTED, REAL_VAL = "synthetic (prompted label)", "base without LoRA", "real val (true label)"
#: adherence.csv's `label` of the mean over labels (with its bootstrap interval).
MACRO = "macro"
