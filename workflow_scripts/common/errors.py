"""The errors a user can fix, and the one wrapper that turns them into a message for every CLI.

A stage raises a `UserError` subclass whose message names the file, row or key at fault and what to
do; `run_stage` prints it as `error: ...` and exits 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix (config, data, a missing model or file); the message says how."""


class ConfigError(UserError, ValueError):
    """A configuration key or command-line value that cannot be used."""


class DataError(UserError, ValueError):
    """The dataset (or one of our own tables) cannot be used as it is; the message names the file and row."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on as configured (a diverged loss, a foreign checkpoint, a missing GPU feature)."""


class ModelNotFoundError(UserError, RuntimeError):
    """The base model cannot be loaded; the message says what to set or install."""


class GenerationError(UserError, RuntimeError):
    """Generation cannot run as asked; the message says what to change."""


Main = Callable[[list[str] | None], int]


def run_stage(main: Main) -> Main:
    """Decorate a CLI's `main(argv) -> int`: a UserError becomes `error: <message>` on stderr and exit
    code 2; other exceptions (bugs) propagate with their traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        # A real command line writing to a log (not a terminal, not a test's main([...]) call).
        started = process_seconds() if argv is None and not sys.stderr.isatty() else None
        if started is not None:  # read by workflow_scripts.bench.breakdown: the job's fixed cost
            print(f"{STARTUP_PREFIX}{started:.2f} s (interpreter and imports, before the stage's work)",
                  file=sys.stderr, flush=True)
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped


STARTUP_PREFIX = "startup: "  # the first line of every stage's log


def process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc; None where it cannot be read)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
