"""The data stage: patient-disjoint splits with prompts (prepare_dataset), their check
(verify_dataset), and the phantom films of the demo (demo_dataset)."""
