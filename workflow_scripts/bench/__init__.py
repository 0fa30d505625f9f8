"""Speed and memory benchmarks: they import the stages they measure (`train_lora`'s own step,
the classifier's data path), and no stage imports them.

    python -m workflow_scripts.bench                      # LoRA training and sampling (`bench.benchmark`)
    python -m workflow_scripts.bench --stage classifier   # the classifier's data path (`bench.classifier`)

`training` runs ours' and the reference's training loops, `generation` the sampling figures,
`machine` the machine's description and measured peaks, `report` the markdown page.
`breakdown` (python -m workflow_scripts.bench.breakdown) says where a finished run's time went.
"""
