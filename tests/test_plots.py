"""Every plot of the table and the fidelity page is drawn and checked as a reader sees it: no text
outside the figure (clipped), no legend over a data point, bar or error bar, error bars not cut by the
axis, and each control at its own place with the real-only reference drawn."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from conftest import write_png  # noqa: E402
from workflow_scripts.study import compare_report  # noqa: E402
from workflow_scripts.fidelity import FLOOR, SYNTHETIC  # noqa: E402
from workflow_scripts.fidelity import BASE_PROMPTED, PROMPTED, REAL_VAL  # noqa: E402
from workflow_scripts.fidelity import report as fidelity_report  # noqa: E402
from workflow_scripts.study import arms  # noqa: E402

LABELS = ["Cardiomegaly", "Effusion", "Pleural_Thickening", "Pneumothorax"]


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> dict[str, matplotlib.figure.Figure]:
    """Every figure at the moment it is saved (laid out and drawn), by file name."""
    figures: dict[str, matplotlib.figure.Figure] = {}
    original = matplotlib.figure.Figure.savefig

    def record(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        # Checked now, while the saved layout and its renderer exist (plt.close drops them).
        self.problems = text_outside_figure(self) + data_under_legends(self)
        figures[Path(path).name] = self

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def text_outside_figure(figure: matplotlib.figure.Figure) -> list[str]:
    """Empty when matplotlib's tight bounding box of everything drawn lies inside the figure; else
    the texts that reach outside it (tick labels of ticks out of view are not drawn: not counted)."""
    renderer = figure.canvas.get_renderer()
    tight, size = figure.get_tightbbox(renderer), figure.bbox_inches
    if tight.x0 >= -0.01 and tight.y0 >= -0.01 and tight.x1 <= size.x1 + 0.01 and tight.y1 <= size.y1 + 0.01:
        return []
    box = figure.bbox
    extents = [(text.get_text(), text.get_window_extent(renderer)) for text in figure.findobj(Text)
               if text.get_visible() and text.get_text().strip()]
    cut = [name for name, extent in extents if not (box.contains(*extent.min) and box.contains(*extent.max))]
    return [f"drawing reaches outside the figure ({tight} vs {size}); texts: {cut}"]


def data_under_legends(figure: matplotlib.figure.Figure) -> list[str]:
    """Data points, bars and error-bar segments that lie under a legend."""
    renderer = figure.canvas.get_renderer()
    legends = [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend())]
    hidden = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in figure.axes:
            points = [line.get_transform().transform(line.get_xydata()) for line in ax.lines if len(line.get_xydata())]
            for collection in ax.collections:
                points += [collection.get_transform().transform(path.vertices) for path in collection.get_paths()]
            for xy in points:
                inside = (xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0) & (xy[:, 1] < box.y1)
                if inside.any():
                    hidden.append(f"point under legend in '{ax.get_title()}'")
            for patch in ax.patches:
                if patch.get_height() and patch.get_window_extent(renderer).overlaps(box):
                    hidden.append(f"bar under legend in '{ax.get_title()}'")
    return hidden


def check_readable(figures: dict[str, matplotlib.figure.Figure], names: list[str]) -> None:
    assert sorted(figures) == sorted(names)
    for name, figure in figures.items():
        assert not figure.problems, (name, figure.problems)


def test_auroc_vs_ratio_shows_every_arm_apart_with_the_reference(tmp_path: Path, saved) -> None:
    rows = [("ratio0", arms.REAL, 0, 0.80), ("ratio10", arms.SYNTHETIC, 10, 0.79), ("ratio25", arms.SYNTHETIC, 25, 0.78),
            ("ratio50", arms.SYNTHETIC, 50, 0.76), ("rebalanced", arms.REBALANCED, 50, 0.80),
            ("duplicate_real", arms.DUPLICATE_REAL, 0, 0.79),
            ("noise", arms.NOISE, 50, 0.77), ("pretrain", arms.PRETRAIN, 50, 0.79), ("more_real", arms.MORE_REAL, 50, 0.85)]
    table = pd.DataFrame([{"arm": arm, "arm_kind": str(kind), "ratio": ratio, "macro_auroc_mean": value,
                           "macro_auroc_ci_low": value - 0.03, "macro_auroc_ci_high": value + 0.03}
                          for arm, kind, ratio, value in rows])
    train = pd.DataFrame({"path": [str(write_png(tmp_path / f"{i}.png", i)) for i in range(4)], "labels": LABELS})
    compare_report.make_plots(table, LABELS, [], train, None, tmp_path / "plots")
    check_readable(saved, ["auroc_vs_ratio.png", "real_vs_synthetic.png"])
    ax = saved["auroc_vs_ratio.png"].axes[0]
    ticks = dict(zip((label.get_text() for label in ax.get_xticklabels()), ax.get_xticks()))
    controls = ["rebalanced", "duplicate_real", "noise", "pretrain", "more_real"]
    assert len({ticks[name] for name in controls}) == 5 and min(ticks[name] for name in controls) > 50
    assert any("ratio0" in str(line.get_label()) for line in ax.lines)  # the real-only reference line
    legend = [str(container.get_label()) for container in ax.containers]
    assert "noise (mirrors 50%)" in legend and "duplicate_real" in legend  # no "mirrors 0%": it adds no synthetic image


def test_fidelity_plots_keep_labels_legends_and_error_bars_readable(tmp_path: Path, saved) -> None:
    fidelity = pd.DataFrame([{"extractor": "pixels", "comparison": comparison, "label": label, "n": 40,
                              "kid_mean": 0.02 * (k + 1), "kid_std": 0.005, "fid": 30.0 + k}
                             for comparison in (SYNTHETIC, FLOOR) for k, label in enumerate(LABELS)])
    diversity = pd.DataFrame([{"label": label, "set": kind, "images": 20, "pairs": 100, "ms_ssim": 0.3 + 0.05 * k, "notes": ""}
                              for kind in ("synthetic", "real val") for k, label in enumerate(LABELS)])
    # Intervals that reach 1.0: their caps must stay inside the axes.
    adherence = pd.DataFrame([{"label": label, "set": kind, "positives": 10, "negatives": 30, "auroc": value,
                               "ci_low": value - 0.1, "ci_high": min(1.0, value + 0.1), "notes": ""}
                              for kind, value in ((PROMPTED, 0.97), (BASE_PROMPTED, 0.55), (REAL_VAL, 0.93)) for label in LABELS])
    written = fidelity_report.make_plots(fidelity, diversity, adherence, tmp_path / "plots")
    assert [path.name for path in written] == ["fidelity_pixels.png", "diversity_ms_ssim.png", "prompt_adherence.png"]
    check_readable(saved, [path.name for path in written])
    adherence_axis = saved["prompt_adherence.png"].axes[0]
    assert adherence_axis.get_ylim()[1] > 1.0
    caps = np.concatenate([line.get_ydata() for line in adherence_axis.lines if line.get_marker() == "_"])
    assert caps.max() <= adherence_axis.get_ylim()[1]
    assert "MS-SSIM" in saved["diversity_ms_ssim.png"].axes[0].get_ylabel()


def test_training_curves_draw_every_seed_of_an_arm(tmp_path: Path, saved) -> None:
    from workflow_scripts.report import curves

    for seed in (0, 1, 2):
        run = tmp_path / f"ratio50_seed{seed}"
        run.mkdir()
        pd.DataFrame({"step": [25, 50, 75], "train_loss": [0.6, 0.4, 0.3], "val_loss": [0.62, 0.5, 0.45],
                      "val_macro_auroc": [0.6, 0.7, 0.75 + seed / 100]}).to_csv(run / "train_log.csv", index=False)
    assert curves.main(["--runs", *map(str, sorted(tmp_path.glob("*_seed*"))), "--out-dir", str(tmp_path / "plots")]) == 0
    check_readable(saved, ["curves_ratio50.png"])
    loss_axis, auroc_axis = saved["curves_ratio50.png"].axes
    assert len(auroc_axis.lines) == 3 and len(loss_axis.lines) == 6  # every seed: train and val loss, val AUROC
    assert curves.main(["--runs", str(tmp_path / "nowhere_seed0"), "--out-dir", str(tmp_path)]) == 2  # a clear error
