"""How a number is written in a report cell: the one home of the formats the reports share.

Each report keeps one style, so a figure reads the same wherever it appears:
- fidelity tables: :func:`significant` (3 significant digits; KID and FID span decades);
- the comparison table: :func:`fixed` and :func:`with_ci` (AUROC, Δ and p to fixed decimals);
- benchmarks: :func:`quantity` (throughputs with thousands separators).
A value that is not a finite number is a status ("unavailable: ...", "n/a (n < d)") and is shown as
text, never as a number.
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> float | None:
    """*value* as a float, or None when it is text, missing, NaN or infinite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def significant(value: Any, digits: int = 3) -> str:
    """A number to *digits* significant digits (whole above 1000); a status text as it is; else n/a."""
    number = finite(value)
    if number is None:
        return str(value) if isinstance(value, str) and value else "n/a"
    return f"{number:.{digits}g}" if abs(number) < 1000 else f"{number:.0f}"


def fixed(value: Any, digits: int = 2) -> str:
    """A number to *digits* decimals ("–" for NaN), or a status text shortened for a table cell."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        text = str(value)
        return "unavailable (see note)" if text.startswith("unavailable") else text  # the reason is given once, above
    return "–" if math.isnan(number) else f"{number:.{digits}f}"


def with_ci(value: float, low: float, high: float, signed: bool = False) -> str:
    """``0.812 [0.790, 0.835]`` (``+0.012 [...]`` when *signed*); "–" when there is no value."""
    if not math.isfinite(value):
        return "–"
    form = "+.3f" if signed else ".3f"
    return f"{value:{form}} [{low:{form}}, {high:{form}}]"


def quantity(value: float) -> str:
    """A measured quantity: 3 significant digits below 100, one decimal above, thousands separated."""
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.1f}"
