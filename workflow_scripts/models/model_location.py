"""Where `model.pretrained` points (tiny, a local folder, a hub id), without importing torch.

Snakemake reads this while it builds the DAG (the weights check, rules/weights.smk): every dry run,
and every test that runs one, would otherwise pay torch's import (seconds) through base_model.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", "\\"))
        or (len(s) > 1 and s[1] == ":")  # Windows drive
        or s.count("/") > 1
        or s.endswith("/")
    )


def pretrained_kind(pretrained: str) -> str:
    """'tiny', 'local' (an existing folder, or anything that looks like a path) or 'hub'."""
    if pretrained == "tiny":
        return "tiny"
    if Path(pretrained).expanduser().exists() or looks_like_path(pretrained) or (REPO_ROOT / pretrained).is_dir():
        return "local"
    return "hub"


def local_folder(pretrained: str) -> Path:
    """A local model.pretrained as a folder: relative to the working directory, else to the repository
    (a folder shipped in it, such as resources/demo-base, from any working directory)."""
    path = Path(pretrained).expanduser()
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path
