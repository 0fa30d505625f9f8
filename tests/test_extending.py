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
from workflow_scripts import arms


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
    from workflow_scripts import train_classifier

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
