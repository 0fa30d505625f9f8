"""Do the synthetic X-rays look real, show what they were asked to show, and copy no patient?

features.py (Inception, torchxrayvision DenseNet, RAD-DINO behind one interface), distances.py
(FID, KID, PRDC, MS-SSIM), evaluate.py (held-out reference, real-vs-real floor, equal n, prompt
adherence), report.py (fidelity.md and plots), audit.py (calibrated memorization audit, with its
own CLI) and audit_search.py (its blocked nearest-image search, and that search's cost). The stage's CLI is workflow_scripts/evaluate_fidelity.py.
"""
