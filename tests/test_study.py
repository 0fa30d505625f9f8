"""The study design: arms, matched step budgets, stratified draws, and the controls' mirrors (pure, fast)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import make_config
from workflow_scripts.common.errors import ConfigError, DataError
from workflow_scripts.common.config import stage_config
from workflow_scripts.study import arms
from workflow_scripts.study.arms import arm_names, arm_training_set, composition, controls, parse_arm, phase_steps, references, table_order
from workflow_scripts.study.design import (
    allocate,
    batch_schedule,
    drop_excluded,
    pool_size_needed,
    reserve_patients,
    stratified_draw,
    study_hash,
    synthetic_count,
    train_steps,
    validation_points,
)

VOCAB = ["Effusion", "Mass", "Nodule", "No Finding"]
ARMS = ["ratio0", "ratio10", "ratio50", "rebalanced", "noise", "pretrain"]


def config(**classifier) -> dict:
    base = make_config(None, "classifier.ratios=[0, 10, 50]", "classifier.batch_size=8", "classifier.epochs=3",
                       "classifier.train_steps=null", "classifier.validation_every=null")
    base["classifier"].update(classifier)
    base["dataset"]["labels"] = VOCAB
    return base


def real_split(n: int = 60) -> pd.DataFrame:
    cells = ["Effusion", "Mass", "No Finding", "Effusion|Mass", "No Finding", "Nodule"]
    return pd.DataFrame({"path": [f"real/{i}.png" for i in range(n)], "labels": [cells[i % len(cells)] for i in range(n)]})


def generated_pool(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"results/synthetic/{key}/{key}_{i:04d}.png", key.replace("+", "|").replace("_", " "))
            for key, n in counts.items() for i in range(n)]
    return pd.DataFrame({"file": [r[0] for r in rows], "path": [r[0] for r in rows], "labels": [r[1] for r in rows]})


def noise_mirror(pool: pd.DataFrame) -> pd.DataFrame:
    files = pool["file"].str.replace("results/synthetic/", "results/synthetic_noise/")
    return pd.DataFrame({"file": files, "path": files, "labels": pool["labels"], "source_file": pool["file"]})


POOL = generated_pool({"Effusion": 30, "Mass": 21, "Nodule": 9, "No_Finding": 40, "Effusion+Mass": 20})


# ----------------------------------------------------------------------------- arms


def test_arms_from_config_and_their_kinds() -> None:
    cfg = config(controls=["rebalanced", "noise", "pretrain"])
    assert arm_names(cfg) == ARMS
    kinds = {name: parse_arm(name, cfg) for name in ARMS}
    assert [kinds[name].kind.value for name in ARMS] == ["real", "synthetic", "synthetic", "control_rebalanced",
                                                         "control_noise", "control_pretrain"]
    assert kinds["noise"].kind is arms.NOISE and arms.kind_of("control_noise") is arms.NOISE  # metrics.json's arm_kind
    assert kinds["noise"].ratio == 50 and kinds["noise"].pool is arms.NOISE_IMAGES  # the largest arm, with noise
    assert kinds["rebalanced"].ratio == 0 and kinds["rebalanced"].draw_ratio == 50
    assert kinds["ratio0"].pool is None
    assert arm_names(config(controls=[])) == ["ratio0", "ratio10", "ratio50"]
    with pytest.raises(ConfigError, match="classifier.controls"):
        parse_arm("noise", config(ratios=[0]))
    with pytest.raises(ConfigError, match="expected ratio"):
        parse_arm("ratio_x", config())


def test_the_vocabulary_lives_in_one_registry() -> None:
    # table order, display name, control name and references all come from arms.KINDS
    cfg = config(controls=["more_real", "noise", "rebalanced", "pretrain"])
    cfg["split"]["more_real_ratio"] = 10
    parsed = [parse_arm(name, cfg) for name in arm_names(cfg)]
    assert [arm.name for arm in sorted(parsed, key=table_order)] == ["ratio0", "ratio10", "ratio50", "rebalanced", "noise",
                                                                   "pretrain", "more_real"]
    assert set(controls()) == {"rebalanced", "duplicate_real", "noise", "pretrain", "more_real"}
    assert references() == ("ratio0", "noise", "rebalanced", "duplicate_real")
    more_real = parse_arm("more_real", cfg)
    assert (more_real.kind, more_real.ratio, more_real.pool, more_real.compared_with) == (
        arms.MORE_REAL, 10, arms.RESERVE, ("ratio0",))
    assert more_real.kind.is_control and not arms.SYNTHETIC.is_control and arms.kind_of("control_more_real") is arms.MORE_REAL
    assert parse_arm("ratio50", cfg).compared_with == ("ratio0", "noise", "rebalanced", "duplicate_real")
    cfg["split"]["more_real_ratio"] = None
    with pytest.raises(ConfigError, match="split.more_real_ratio"):
        parse_arm("more_real", cfg)


def test_the_reserve_takes_whole_training_patients_and_about_the_mirrored_share() -> None:
    train = pd.DataFrame({"path": [f"r/{i}.png" for i in range(300)], "labels": ["Effusion", "No Finding", "Mass"] * 100,
                          "patient": [f"p{i // 3 if i < 150 else i}" for i in range(300)], "split": "train"})
    kept, reserve = reserve_patients(train, 10, seed=3)
    assert len(kept) + len(reserve) == 300 and set(kept["patient"]).isdisjoint(reserve["patient"])
    assert (reserve["split"] == "reserve").all() and (kept["split"] == "train").all()
    # enough images for the ratio10 draw of what is left, and not a patient more than needed
    assert len(reserve) >= synthetic_count(len(kept), 10) and len(reserve) <= synthetic_count(len(kept), 10) + 3
    again, _ = reserve_patients(train, 10, seed=3)
    assert again.equals(kept) and not reserve_patients(train, 10, seed=4)[1]["patient"].equals(reserve["patient"])
    half, spare = reserve_patients(train, 50, seed=0)
    assert abs(len(spare) - 150) <= 3
    # the last training image of a label never goes to the reserve
    rare = pd.concat([train, train.head(1).assign(path="r/rare.png", labels="Nodule|Mass", patient="rare")], ignore_index=True)
    for seed in range(5):
        assert "rare" in set(reserve_patients(rare, 50, seed)[0]["patient"])
    none_kept, none = reserve_patients(train, None, seed=0)
    assert none_kept.equals(train) and none.empty


def test_more_real_adds_reserved_real_images_stratified_and_seeded() -> None:
    cfg, real = config(), real_split(60)
    cfg["split"]["more_real_ratio"] = 50
    reserve = real_split(80).assign(path=lambda f: f["path"].str.replace("real/", "reserve/"))
    arm = parse_arm("more_real", cfg)
    mix, info = arm_training_set(arm, real, reserve, seed=0)
    added = mix[mix["path"].str.startswith("reserve/")]
    assert info["n_drawn"] == len(added) == synthetic_count(60, 50) and (mix["source"] == "real").all()
    assert added["labels"].value_counts().to_dict() == reserve.iloc[stratified_draw(reserve, 60, 0)]["labels"].value_counts().to_dict()
    assert not arm_training_set(arm, real, reserve, seed=1)[0]["path"].equals(mix["path"])
    short, info = arm_training_set(arm, real, reserve.head(10), seed=0)  # a small dataset's reserve: all of it
    assert len(short) == 70 and info["more_real_shortfall"] == 50 and info["n_drawn"] == 10
    with pytest.raises(DataError, match=r"needs 60 reserved real.*more_real_ratio"):
        arm_training_set(arm, real, reserve.head(0), seed=0)


def test_an_empty_reserve_is_refused_naming_the_setting(tmp_path) -> None:
    from workflow_scripts.study.design import read_reserve

    path = tmp_path / "reserve.csv"
    path.write_text("path,labels,prompt,patient,split\n")
    with pytest.raises(DataError, match=r"reserve.csv: no reserved patients.*split.more_real_ratio"):
        read_reserve(path)
    path.write_text("path,labels,prompt,patient,split\nr/1.png,Mass,p,7,reserve\n")
    assert read_reserve(path)["path"].tolist() == ["r/1.png"]


def test_the_study_hash_is_one_per_study() -> None:
    cfg = config()
    assert study_hash(cfg) == study_hash(config(seeds=[0, 1, 2, 3, 4, 5], controls=["pretrain"], num_workers=7))
    assert study_hash(cfg) != study_hash(config(train_steps=17))
    assert study_hash(cfg) != study_hash(config(ratios=[0, 25]))
    # The plan (and so every synthetic arm) is not redone for a new seed or control: its rule
    # re-runs only when the part of the configuration it declares changes.
    plan = "plan_generation"
    assert stage_config(config(seeds=[0, 1, 2, 3, 4, 5], controls=["pretrain"]), plan) == stage_config(cfg, plan)
    assert stage_config(config(pool_headroom=3.0), plan) != stage_config(cfg, plan)


# ----------------------------------------------------------------------------- budgets


def test_every_arm_takes_the_same_optimizer_steps_and_validates_at_the_same_points() -> None:
    cfg = config(controls=["rebalanced", "noise", "pretrain"])
    real = real_split(60)
    total = train_steps(cfg, len(real))
    assert total == 3 * math.ceil(60 / 8)  # epochs x steps per real-only epoch
    assert validation_points(cfg, len(real)) == [8, 16, 24]
    pools = {arms.GENERATED: POOL, arms.NOISE_IMAGES: noise_mirror(POOL), None: None}
    sizes = set()
    for name in ARMS:
        arm = parse_arm(name, cfg)
        mix, _ = arm_training_set(arm, real, pools[arm.pool], seed=3)
        sizes.add(len(mix))
        schedule = batch_schedule(mix["phase"].tolist(), phase_steps(arm, cfg, total), 8, seed=3)
        assert len(schedule) == total, name
        assert all(len(batch) == 8 for batch in schedule)  # full batches: never a lone image for BatchNorm
    assert len(sizes) > 2  # the arms' mixes differ in size, their budgets do not
    assert train_steps(config(train_steps=11), 60) == 11
    assert validation_points(config(train_steps=11, validation_every=4), 60) == [4, 8, 11]


def test_a_pass_covers_every_row_once_and_pretrain_phases_are_ordered() -> None:
    cfg = config(pretrain_fraction=0.25)
    phases = ["finetune"] * 10 + ["pretrain"] * 6
    plan = phase_steps(parse_arm("pretrain", cfg), cfg, 8)
    assert plan == [("pretrain", 2), ("finetune", 6)]
    schedule = batch_schedule(phases, plan, 3, seed=0)
    assert all(i >= 10 for batch in schedule[:2] for i in batch)  # synthetic first
    assert all(i < 10 for batch in schedule[2:] for i in batch)   # then real only
    flat = [i for batch in schedule[2:] for i in batch]
    assert sorted(flat[:10]) == list(range(10))  # one full pass before any repeat
    assert batch_schedule(phases, plan, 3, seed=0) == schedule
    assert batch_schedule(phases, plan, 3, seed=1) != schedule


# ----------------------------------------------------------------------------- draws


def test_largest_remainders() -> None:
    assert allocate({"a": 30, "b": 21, "c": 9}, 20) == {"a": 10, "b": 7, "c": 3}
    assert allocate({"a": 5, "b": 5, "c": 5}, 4) == {"a": 2, "b": 1, "c": 1}
    counts = allocate({"a": 7, "b": 11, "c": 2, "d": 1}, 13)
    assert sum(counts.values()) == 13
    assert all(abs(counts[k] - 13 * s / 21) < 1 for k, s in {"a": 7, "b": 11, "c": 2, "d": 1}.items())


def test_stratified_draws_control_the_composition_and_differ_by_seed() -> None:
    n = 60  # the pool holds 120: headroom 2
    expected = allocate(POOL["labels"].value_counts(sort=False).sort_index().to_dict(), n)
    subsets = []
    for seed in range(5):
        chosen = stratified_draw(POOL, n, seed)
        assert len(set(chosen)) == n  # without replacement
        assert POOL["labels"].iloc[chosen].value_counts().to_dict() == {k: v for k, v in expected.items() if v}
        subsets.append(frozenset(chosen))
    assert len(set(subsets)) == 5  # every seed its own subset
    assert np.array_equal(stratified_draw(POOL, n, 2), stratified_draw(POOL, n, 2))


def test_synthetic_arm_keeps_the_real_part_and_draws_its_share() -> None:
    real = real_split(60)
    mix, info = arm_training_set(parse_arm("ratio10", config()), real, POOL, seed=0)
    assert synthetic_count(60, 10) == 7 == info["n_drawn"]
    assert mix[mix["source"] == "real"]["path"].tolist() == real["path"].tolist()
    assert (mix["source"] == "synthetic").sum() == 7 and list(mix.columns) == ["path", "labels", "source", "phase"]
    with pytest.raises(DataError, match=r"needs 60 synthetic.*only 10.*pool_headroom"):
        arm_training_set(parse_arm("ratio50", config()), real, POOL.head(10), seed=0)


def test_noise_arm_mirrors_the_largest_arm_row_for_row() -> None:
    cfg, real = config(), real_split(60)
    for seed in (0, 1):
        largest, _ = arm_training_set(parse_arm("ratio50", cfg), real, POOL, seed)
        noise, _ = arm_training_set(parse_arm("noise", cfg), real, noise_mirror(POOL), seed)
        syn, fake = largest[largest["source"] == "synthetic"], noise[noise["source"] == "noise"]
        assert len(fake) == len(syn) == 60
        assert fake["labels"].tolist() == syn["labels"].tolist()
        assert fake["path"].str.replace("synthetic_noise", "synthetic").tolist() == syn["path"].tolist()
        assert composition(noise, VOCAB).drop(columns="label").equals(composition(largest, VOCAB).drop(columns="label"))


def test_rebalanced_matches_the_largest_arms_positives_with_real_images() -> None:
    cfg, real = config(), real_split(60)
    largest, _ = arm_training_set(parse_arm("ratio50", cfg), real, POOL, seed=4)
    rebalanced, info = arm_training_set(parse_arm("rebalanced", cfg), real, POOL, seed=4)
    assert info["rebalance_shortfall"] == 0
    assert set(rebalanced["source"]) == {"real", "oversampled"}
    assert set(rebalanced["path"]) == set(real["path"])  # duplicates of real images only
    ours, theirs = composition(rebalanced, VOCAB), composition(largest, VOCAB)
    assert ours["effective_positives"].tolist() == theirs["effective_positives"].tolist()
    assert ours["synthetic_positives"].sum() == 0 and ours["real_positives"].tolist() == theirs["real_positives"].tolist()
    assert len(rebalanced) == len(largest)  # so the prevalence matches too
    # Each duplicated real image is used as evenly as possible.
    repeats = rebalanced[rebalanced["source"] == "oversampled"].groupby("labels")["path"].value_counts()
    assert all(group.max() - group.min() <= 1 for _, group in repeats.groupby(level=0))


def test_rebalanced_without_an_exact_real_match_uses_a_superset_or_reports_the_shortfall() -> None:
    real = pd.DataFrame({"path": ["a", "b", "c"], "labels": ["Effusion|Mass", "No Finding", "Effusion"]})
    pool = generated_pool({"Mass": 4, "Nodule": 4})
    rebalanced, info = arm_training_set(parse_arm("rebalanced", config(ratios=[0, 50])), real, pool, seed=0)
    duplicates = rebalanced[rebalanced["source"] == "oversampled"]
    assert set(duplicates["labels"]) == {"Effusion|Mass"}  # holds Mass; no real image holds Nodule
    assert info["rebalance_shortfall"] == len(real) - len(duplicates) > 0


def test_excluded_images_leave_both_the_generated_and_the_noise_pool() -> None:
    flagged = POOL["file"].iloc[[0, 5, 50]].tolist()
    kept, dropped = drop_excluded(POOL, flagged + ["results/synthetic/never/listed.png"])
    assert dropped == 3 and len(kept) == len(POOL) - 3 and not set(flagged) & set(kept["file"])
    noise_kept, noise_dropped = drop_excluded(noise_mirror(POOL), flagged)
    assert noise_dropped == 3 and noise_kept["source_file"].tolist() == kept["file"].tolist()
    assert drop_excluded(POOL, [])[1] == 0


def test_plan_headroom() -> None:
    cfg = config(pool_headroom=2.0)
    assert pool_size_needed(cfg, 60) == 2 * synthetic_count(60, 50) == 120
    assert pool_size_needed(config(pool_headroom=1.5), 61) == math.ceil(1.5 * synthetic_count(61, 50))


def test_duplicate_real_matches_the_largest_arms_count_with_real_duplicates_at_real_prevalence() -> None:
    cfg = config(controls=["duplicate_real"])
    arm = parse_arm("duplicate_real", cfg)
    assert (arm.kind, arm.ratio, arm.draw_ratio, arm.pool) == (arms.DUPLICATE_REAL, 0, 50, None)  # no pool: no generation
    assert "duplicate_real" in arms.BASELINES and "duplicate_real" in parse_arm("ratio50", cfg).compared_with
    real = real_split(60)
    largest, _ = arm_training_set(parse_arm("ratio50", cfg), real, POOL, seed=2)
    duplicated, info = arm_training_set(arm, real, None, seed=2)
    added = duplicated[duplicated["source"] == "oversampled"]
    assert len(duplicated) == len(largest) and len(added) == info["n_drawn"] == synthetic_count(60, 50) == 60
    assert set(added["path"]) == set(real["path"]) and (added["path"].value_counts() == 1).all()  # each real image once
    ours, real_only = composition(duplicated, VOCAB), composition(real.assign(source="real", phase="train"), VOCAB)
    assert ours["effective_positives"].tolist() == [2 * n for n in real_only["real_positives"]]  # the real prevalence
    assert ours["synthetic_positives"].sum() == 0
    smaller, _ = arm_training_set(parse_arm("duplicate_real", config(ratios=[0, 25])), real, None, seed=2)
    counts = smaller[smaller["source"] == "oversampled"]["path"].value_counts()
    assert len(counts) == synthetic_count(60, 25) == 20 and counts.max() == 1  # drawn without repeats while it can be
    again, other = (arm_training_set(parse_arm("duplicate_real", config(ratios=[0, 25])), real, None, seed)[0]
                    for seed in (2, 3))
    assert again.equals(smaller) and not other["path"].equals(smaller["path"])  # seeded: each seed its own draw
    big, _ = arm_training_set(parse_arm("duplicate_real", config(ratios=[0, 80])), real.head(10), None, seed=0)
    repeats = big[big["source"] == "oversampled"]["path"].value_counts()
    assert repeats.sum() == synthetic_count(10, 80) == 40 and (repeats == 4).all()  # as evenly as possible
