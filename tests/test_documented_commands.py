"""Every command the README and docs print runs as printed: each `python -m workflow_scripts...` answers
--help, and each `snakemake ...` plans its jobs in a dry run on a fresh working directory (the demo, or
the real-data config pointed at a small NIH-format dataset, its weights faked in an empty cache)."""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_nih_dataset
from test_weights import fake_hf_file
from workflow_scripts.models import weights

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = ("…", "...", "<", "[")  # an elided command ("the same command as before") is not a command


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every `snakemake ...` and `python -m workflow_scripts...` in a code block or an
    inline code span of the docs, comments cut, continuation lines joined."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        lines += re.findall(r"`((?:snakemake|python -m workflow_scripts)[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in lines:
            for part in line.split("&&"):
                part = part.strip()
                if not (part == "snakemake" or part.startswith(("snakemake ", "python -m workflow_scripts"))):
                    continue
                argv = shlex.split(part, comments=True)
                if argv[0] == "snakemake" and any(marker in word for word in argv for marker in PLACEHOLDERS):
                    continue
                found.append((f"{doc.relative_to(REPO)}: {part}", argv))
    return found


COMMANDS = documented_commands()
MODULES = sorted({argv[2] for _, argv in COMMANDS if argv[:2] == ["python", "-m"]})
SNAKEMAKE = {" ".join(argv): (where, argv) for where, argv in COMMANDS if argv[0] == "snakemake"}


def test_the_docs_print_the_commands_this_test_runs() -> None:
    assert "workflow_scripts.lora.train_lora" in MODULES and len(MODULES) >= 15
    assert "snakemake estimate_cost" in SNAKEMAKE and "snakemake --cores 1 plan_power" in SNAKEMAKE
    assert not [where for where, argv in COMMANDS if "huggingface-cli" in argv]  # the pinned hub installs only `hf`


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module", MODULES)
def test_each_documented_module_answers_help(module: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0, module
    assert "usage:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A working directory as a user has it: the NIH layout of config/nih_chestxray14.yaml holding a
    small dataset, and the weights of the real configs in an otherwise empty Hugging Face cache."""
    workdir = tmp_path_factory.mktemp("fresh")
    for folder in ("config", "profiles"):  # what a clone holds beside the Snakefile (given with -s)
        (workdir / folder).symlink_to(REPO / folder)
    make_nih_dataset(workdir / "data" / "nih", num_patients=12)
    cache = workdir / "hf" / "hub"
    fake_hf_file(cache, weights.SD15_ID, "model_index.json")
    fake_hf_file(cache, weights.classifier_weight("densenet121", True, False).source, "model.safetensors")
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "TORCH_HOME": str(workdir / "torch"), "HF_HUB_OFFLINE": "1"}
    return workdir, env


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SNAKEMAKE))
def test_each_documented_snakemake_command_runs_as_printed(command: str, fresh_clone) -> None:
    where, argv = SNAKEMAKE[command]
    workdir, env = fresh_clone
    args = argv[1:]
    if "--report" in args:
        pytest.skip("the report is built and opened in a browser by test_workflow.py")
    if "--unlock" not in args:
        args = [*args, "--dry-run"]
    # As printed, in the fresh clone's root (nothing of the repository's own results/ is read or written).
    result = subprocess.run([sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile")],
                            cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
