"""Report cells: a status is shown as text, never as a number; each style rounds as its table needs."""

import math

from workflow_scripts.common.cells import finite, fixed, quantity, significant, with_ci


def test_text_nan_and_infinity_are_not_numbers() -> None:
    assert finite("0.25") == 0.25 and finite(3) == 3.0
    assert finite("unavailable: no weights") is None and finite(None) is None
    assert finite(math.nan) is None and finite(math.inf) is None


def test_fidelity_cells_keep_three_significant_digits_and_show_the_status() -> None:
    assert significant(0.0012345) == "0.00123" and significant(1234.6) == "1235"
    assert significant("n/a (n < d: 17 < 256)") == "n/a (n < d: 17 < 256)"
    assert significant(None) == "n/a" and significant(math.nan) == "n/a"


def test_comparison_cells_round_to_fixed_decimals_and_shorten_unavailable() -> None:
    assert fixed(0.8374, 3) == "0.837" and fixed(math.nan) == "–"
    assert fixed("unavailable: Inception weights not found at ...") == "unavailable (see note)"
    assert with_ci(0.0241, -0.001, 0.049, signed=True) == "+0.024 [-0.001, +0.049]"
    assert with_ci(math.nan, 0.1, 0.2) == "–"


def test_benchmark_quantities_separate_thousands() -> None:
    assert quantity(12.71) == "12.7" and quantity(18412.3) == "18,412.3"
