"""Where a finished run's time went: seconds and jobs per rule, and the part spent starting up.

    python -m workflow_scripts.bench.breakdown           # after `snakemake --cores 1 --resources gpu=1`
    python -m workflow_scripts.bench --demo-breakdown  # the same table
    python -m workflow_scripts.bench.breakdown --benchmarks benchmarks --logs logs --json breakdown.json

Reads what every rule already writes: `benchmarks/<rule>/<job>.tsv` (Snakemake's wall seconds `s`
of the job) and the first line of `logs/<rule>/<job>.log`, where every stage CLI writes
`startup: X s` (errors.run_stage: from process start to the stage's own work, i.e. the
interpreter and the module imports). A library a stage imports later (timm at its first model,
diffusers at its first pipeline) counts in the job's work, not its startup. Rules run inside
Snakemake (no CLI, no log line) show no startup. Prints a markdown table, slowest rule first.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from workflow_scripts.common.errors import STARTUP_PREFIX, DataError, run_stage


@dataclass(frozen=True)
class RuleTime:
    rule: str
    jobs: int
    seconds: float
    startup_seconds: float  # summed over the jobs whose log has a startup line
    jobs_with_startup: int


def job_seconds(tsv: Path) -> float:
    """The wall seconds (`s` column) of one Snakemake benchmark file (the mean over its repeats)."""
    with tsv.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    try:
        return sum(float(row["s"]) for row in rows) / len(rows)
    except (KeyError, ValueError, ZeroDivisionError) as error:
        raise DataError(f"{tsv}: not a Snakemake benchmark file (no `s` column with seconds): {error}") from None


def startup_seconds(log: Path) -> float | None:
    """The `startup: X s` line a stage CLI writes first to its log; None without one."""
    if not log.is_file():
        return None
    with log.open(errors="replace") as handle:
        for line in handle:
            if line.startswith(STARTUP_PREFIX):
                try:
                    return float(line[len(STARTUP_PREFIX):].split()[0])
                except (IndexError, ValueError):
                    return None
    return None


def breakdown(benchmarks: Path, logs: Path) -> list[RuleTime]:
    """One RuleTime per folder of `benchmarks`, slowest first; each job's log is the same name under `logs`."""
    if not benchmarks.is_dir():
        raise DataError(f"{benchmarks}: no benchmark folder; run the workflow first (snakemake --cores 1 --resources gpu=1)")
    rows = []
    for folder in sorted(path for path in benchmarks.iterdir() if path.is_dir()):
        tsvs = sorted(folder.rglob("*.tsv"))
        if not tsvs:
            continue
        starts = [startup_seconds(logs / folder.name / tsv.relative_to(folder).with_suffix(".log")) for tsv in tsvs]
        known = [value for value in starts if value is not None]
        rows.append(RuleTime(folder.name, len(tsvs), round(sum(job_seconds(tsv) for tsv in tsvs), 2),
                             round(sum(known), 2), len(known)))
    return sorted(rows, key=lambda row: (-row.seconds, row.rule))


def render(rows: Iterable[RuleTime]) -> str:
    """A markdown table with a total line."""
    rows = list(rows)
    lines = ["| rule | jobs | seconds | startup s (jobs) | startup share |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        share = f"{row.startup_seconds / row.seconds:.0%}" if row.seconds > 0 and row.jobs_with_startup else "n/a"
        lines.append(f"| {row.rule} | {row.jobs} | {row.seconds:.1f} | {row.startup_seconds:.1f} ({row.jobs_with_startup}) "
                     f"| {share} |")
    total = sum(row.seconds for row in rows)
    startup = sum(row.startup_seconds for row in rows)
    share = f"{startup / total:.0%}" if total > 0 else "n/a"
    lines.append(f"| **all jobs** | {sum(row.jobs for row in rows)} | {total:.1f} | {startup:.1f} | {share} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmarks", type=Path, default=Path("benchmarks"), help="Snakemake's benchmark folder")
    parser.add_argument("--logs", type=Path, default=Path("logs"), help="the rules' log folder")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")


def run(args: argparse.Namespace) -> int:
    rows = breakdown(args.benchmarks, args.logs)
    if not rows:
        raise DataError(f"{args.benchmarks}: no benchmark files; run the workflow first")
    print(render(rows), end="")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


@run_stage
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
