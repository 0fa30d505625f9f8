"""The stage breakdown: seconds and jobs per rule from benchmarks/, the startup part from the logs'
first line, which every stage CLI writes through errors.run_stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO
from workflow_scripts.bench import breakdown
from workflow_scripts.bench import benchmark
from workflow_scripts.common.errors import STARTUP_PREFIX

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _job(root: Path, rule: str, name: str, seconds: float, startup: float | None) -> None:
    (root / "benchmarks" / rule).mkdir(parents=True, exist_ok=True)
    (root / "benchmarks" / rule / f"{name}.tsv").write_text(HEADER + f"{seconds}\t0:00:01\t1\t1\t1\t1\t0\t0\t0\t1\n")
    if startup is not None:
        (root / "logs" / rule).mkdir(parents=True, exist_ok=True)
        (root / "logs" / rule / f"{name}.log").write_text(f"{STARTUP_PREFIX}{startup:.2f} s (...)\nwork\n")


def test_seconds_jobs_and_startup_per_rule(tmp_path: Path, capsys) -> None:
    _job(tmp_path, "train_classifier", "ratio0", 100.0, 8.0)
    _job(tmp_path, "train_classifier", "noise", 50.5, 7.0)
    _job(tmp_path, "generate_label", "Mass", 30.0, 12.5)
    _job(tmp_path, "write_stage_config", "compare", 0.5, None)  # runs inside Snakemake: no startup line
    rows = breakdown.breakdown(tmp_path / "benchmarks", tmp_path / "logs")
    assert [(r.rule, r.jobs, r.seconds, r.startup_seconds, r.jobs_with_startup) for r in rows] == [
        ("train_classifier", 2, 150.5, 15.0, 2), ("generate_label", 1, 30.0, 12.5, 1), ("write_stage_config", 1, 0.5, 0.0, 0)]
    argv = ["--demo-breakdown", "--benchmarks", str(tmp_path / "benchmarks"), "--logs", str(tmp_path / "logs")]
    assert benchmark.main(argv) == 0
    table = capsys.readouterr().out
    assert "| train_classifier | 2 | 150.5 | 15.0 (2) | 10% |" in table
    assert "| write_stage_config | 1 | 0.5 | 0.0 (0) | n/a |" in table
    assert "| **all jobs** | 4 | 181.0 | 27.5 | 15% |" in table


def test_no_run_and_a_foreign_tsv_are_named(tmp_path: Path, capsys) -> None:
    assert breakdown.main(["--benchmarks", str(tmp_path / "none")]) == 2
    assert "none: no benchmark folder" in capsys.readouterr().err
    (tmp_path / "benchmarks" / "x").mkdir(parents=True)
    (tmp_path / "benchmarks" / "x" / "a.tsv").write_text("seconds\n3\n")
    assert breakdown.main(["--benchmarks", str(tmp_path / "benchmarks")]) == 2
    assert "a.tsv: not a Snakemake benchmark file" in capsys.readouterr().err


def test_a_stage_cli_writes_its_startup_first() -> None:
    # What the breakdown reads: a real command line's first stderr line; a test's main([...]) prints none.
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.bench.breakdown", "--benchmarks", "/nonexistent"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    first = result.stderr.splitlines()[0]
    assert result.returncode == 2 and first.startswith(STARTUP_PREFIX)
    assert 0 < float(first[len(STARTUP_PREFIX):].split()[0]) < 120
