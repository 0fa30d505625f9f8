"""docs/extending.md, checked: each "add X here" is done in that one place with a dummy X, which then
reaches the table (or report) without any other edit. Pure functions and fixture runs: fast."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, make_config
from tests.test_compare import run_compare
from workflow_scripts.study import arms


def dummy_build(arm: arms.Arm, real: pd.DataFrame, pool: pd.DataFrame | None, n: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """The dummy control's training set: the first `n` real images again."""
    return real.head(n).assign(source="oversampled", phase="train")[arms.MIX_COLUMNS], {"dummy_rows": n}


@pytest.fixture
def dummy_kind(monkeypatch: pytest.MonkeyPatch) -> arms.ArmKind:
    """A control kind registered in arms.KINDS, and nowhere else."""
    kind = arms.ArmKind("control_dummy", "control: the dummy", "dummy", None, (arms.REFERENCE,), ("v", "tab:olive"),
                        dummy_build, mirror=lambda name, config: arms.largest_ratio(config), shows_share=False)
    monkeypatch.setitem(arms.KINDS, kind.value, kind)  # undone after the test
    return kind


def test_every_control_of_the_registry_is_in_the_schema() -> None:
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    controls = schema["properties"]["classifier"]["properties"]["controls"]
    assert controls["items"]["enum"] == list(arms.controls())
    assert all(name in controls["description"] for name in arms.controls())


def test_an_arm_kind_defined_in_one_place_is_an_arm_with_a_training_set(dummy_kind: arms.ArmKind) -> None:
    config = make_config(None, "classifier.ratios=[0, 50]")
    config["classifier"]["controls"] = ["noise", "dummy"]
    assert arms.arm_names(config) == ["ratio0", "ratio50", "noise", "dummy"]
    assert re.fullmatch(arms.arm_pattern(), "dummy") and "dummy" in arms.controls()  # the {arm} wildcard, its target
    arm = arms.parse_arm("dummy", config)
    assert (arm.kind, arm.ratio, arm.draw_ratio, arm.pool) == (dummy_kind, 0, 50, None)
    real = pd.DataFrame({"path": [f"r{i}.png" for i in range(10)], "labels": ["Mass", "No Finding"] * 5})
    mix, info = arms.arm_training_set(arm, real, None, seed=0)
    assert len(mix) == 20 and (mix["source"] == "oversampled").sum() == 10 and info == {"n_drawn": 10, "dummy_rows": 10}
    assert arms.read_pool(arm, None, None) == (None, 0)  # no pool: nothing to read
    assert [a.name for a in sorted(arms.study_arms(config), key=arms.table_order)][-1] == "dummy"


def test_the_classifier_help_names_every_control(dummy_kind: arms.ArmKind, capsys: pytest.CaptureFixture) -> None:
    from workflow_scripts.classifier import train_classifier

    with pytest.raises(SystemExit):
        train_classifier.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name in [*arms.controls(), "more_real", "dummy"])


def test_a_dummy_arm_kind_reaches_the_table_the_page_and_the_plot(dummy_kind: arms.ArmKind, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, *args, **kwargs: drawn.append(kwargs) or original(self, *args, **kwargs))
    study = {"ratio0": ("real", 0), "ratio50": ("synthetic", 50), "noise": ("control_noise", 50), "dummy": ("control_dummy", 0)}
    table, page, out = run_compare(tmp_path, arms=study)
    assert table["arm"].tolist() == ["ratio0", "ratio50", "noise", "dummy"]  # table order: registration order
    row = table.set_index("arm").loc["dummy"]
    assert row["verdict_vs_ratio0"] in ("gain", "loss", "no measurable difference") and pd.isna(row["delta_vs_noise"])
    assert "| dummy | control: the dummy |" in page
    assert any(kwargs.get("marker") == "v" and kwargs.get("color") == "tab:olive" for kwargs in drawn)
    assert (out / "plots" / "auroc_vs_ratio.png").is_file()


# ----------------------------------------------------------------------------- a set metric


def test_a_set_metric_registered_in_one_place_reaches_fidelity_csv_the_table_and_the_plot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import numpy as np

    from workflow_scripts.fidelity import FLOOR, SYNTHETIC, distances, evaluate, report

    dummy = distances.SetMetric("mean_gap", ("mean_gap",),
                                lambda real, synthetic, evaluation: {"mean_gap": float(abs(real.mean() - synthetic.mean()))},
                                plot=("mean_gap", None, "mean gap"))
    monkeypatch.setattr(distances, "SET_METRICS", (*distances.SET_METRICS, dummy))
    assert evaluate.fidelity_columns()[-2:] == ["mean_gap", "notes"]
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 8))
    evaluation = {"kid_subset_size": 10, "kid_subsets": 5, "prdc_k": 3, "seed": 0}
    rows = [evaluate._distance_row("pixels", "Mass", comparison, real, rng.normal(shift, size=(40, 8)), evaluation, 0)
            for comparison, shift in ((SYNTHETIC, 2.0), (FLOOR, 0.0))]
    assert rows[0]["mean_gap"] > 1.5 > 0.5 > rows[1]["mean_gap"] and np.isfinite(rows[0]["fid"])  # beside FID and KID
    settings = {"extractors": {"pixels": {"status": "ok: test", "description": "raw pixels", "input_size": 8}}}
    table = report._fidelity_tables({"rows": rows, "settings": settings})
    header = next(line for line in table if line.startswith("| label"))
    assert header.split(" | ")[2:4] == ["KID", "FID"] and header.endswith("| mean_gap |")
    row = next(line for line in table if line.startswith("| Mass"))
    assert row.count("|") == header.count("|") and f"{rows[0]['mean_gap']:.3g} ({rows[1]['mean_gap']:.3g})" in row
    diversity = pd.DataFrame(columns=evaluate.DIVERSITY_COLUMNS)
    adherence = pd.DataFrame(columns=evaluate.ADHERENCE_COLUMNS)
    written = report.make_plots(pd.DataFrame(rows, columns=evaluate.fidelity_columns()), diversity, adherence, tmp_path)
    assert [path.name for path in written][:1] == ["fidelity_pixels.png"]


# ----------------------------------------------------------------------------- a label-file format


def test_a_label_format_registered_in_one_place_is_read_into_the_splits(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    from conftest import VOCAB, make_nih_dataset
    from workflow_scripts.common import labels
    from workflow_scripts.data.prepare_dataset import prepare

    csv, images = make_nih_dataset(tmp_path / "nih")  # 30 patients, 2 films each
    table = pd.read_csv(csv).rename(columns={"Image Index": "file", "Finding Labels": "findings", "Patient ID": "pid"})
    semicolon = tmp_path / "labels.ssv"
    table.to_csv(semicolon, sep=";", index=False)

    def read_semicolon(path: Path, dataset: dict, notes: list | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        frame = pd.read_csv(path, sep=";", dtype=str)
        return (pd.DataFrame({"row": range(2, len(frame) + 2), "image": frame["file"],
                              "labels": frame["findings"].str.split("|"), "patient": frame["pid"]}),
                labels.skip_frame(path, []))

    monkeypatch.setitem(labels.FORMATS, "semicolon", labels.LabelFormat(read_semicolon))
    config = make_config({"csv": str(semicolon), "images": str(images), "labels": VOCAB})
    config["dataset"]["format"] = "semicolon"  # the schema's enum would list it
    summary = prepare(config, tmp_path / "out")
    assert sum(summary["images"].values()) == 60 and summary["skipped"] == 0
