"""Failpoints for the fault tests: make a stage kill itself at an exact point, as a crash would.

    CXR_SYNTH_FAULT=checkpoint_save:2:KILL snakemake ...   # SIGKILL the 2nd time a checkpoint is being saved

Format `<point>:<n>[:TERM|KILL]` (default KILL). Unset, `maybe_fail` does nothing. Points:
`train_step` (after an optimizer step), `checkpoint_save` (files of a checkpoint half written),
`validation` (during validation sampling), `image_saved` (after a synthetic image is written),
`classifier_validation` (after a classifier validation point).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CXR_SYNTH_FAULT"
_reached: Counter[str] = Counter()


def maybe_fail(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, count, *rest = spec.split(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGTERM if rest and rest[0].upper() == "TERM" else signal.SIGKILL)
