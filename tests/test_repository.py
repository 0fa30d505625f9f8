"""The repository keeps its promises: README commands match CI, pins agree, nothing heavy is versioned,
no stage imports another."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO


def _pins(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "-r"))]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = "pip install -r envs/requirements-test.txt && python -m pytest"
    assert test_command in readme and test_command in ci
    assert "pip install -r envs/requirements.txt && snakemake --cores 1 --resources gpu=1" in readme


def test_conda_env_pins_equal_the_pip_requirements() -> None:
    pip_pins = _pins((REPO / "envs" / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((REPO / "envs" / "cxr-synth.yaml").read_text())
    conda_pins = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert conda_pins == pip_pins
    assert "torch==2.14.1" in pip_pins and "torchvision==0.29.1" in pip_pins
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", pin) for pin in pip_pins), "every dependency pinned exactly"


def test_no_weights_data_or_results_are_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    heavy = [f for f in tracked if f.endswith((".safetensors", ".ckpt", ".pth", ".bin", ".png", ".jpg", ".dcm"))]
    # the one exception: the demo's pretrained base (resources/demo-base, at most 10 MB, its files fingerprinted)
    shipped = [f for f in heavy if f.startswith("resources/demo-base/") and f.endswith(".safetensors")]
    assert heavy == shipped and len(shipped) == 3
    assert sum((REPO / f).stat().st_size for f in tracked if f.startswith("resources/")) <= 10 * 2**20
    assert [f for f in tracked if f.startswith("results/")] in ([], ["results/.gitkeep"])


def test_code_passes_ruff_and_snakefmt() -> None:
    # Settings in pyproject.toml; fix with `ruff check --fix .` and `snakefmt Snakefile rules`.
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    snakefmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", "Snakefile", "rules"],
                              cwd=REPO, capture_output=True, text=True)
    assert snakefmt.returncode == 0, snakefmt.stdout + snakefmt.stderr


def stage_modules() -> set[str]:
    """The modules a rule runs (`python -m workflow_scripts.X`)."""
    rules = "\n".join(path.read_text() for path in sorted((REPO / "rules").glob("*.smk")))
    return set(re.findall(r"-m (workflow_scripts(?:\.\w+)+)", rules))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at top level or inside a function; `from pkg import mod`
    is reported as `pkg.mod` too, so importing a module by name counts."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_no_stage_module_imports_another_stage_module() -> None:
    # Shared concepts live in library modules (tables, labels, classifier_model, base_model, ...) that
    # stages import; a stage imported by any other module would tie two stages together. The
    # benchmarks (workflow_scripts/bench/) are the one exception: they time a stage's own code (e.g.
    # train_lora's step), so they import it, and nothing imports them.
    stages = stage_modules()
    assert {"workflow_scripts.data.prepare_dataset", "workflow_scripts.fidelity.audit", "workflow_scripts.models.build_tiny_model",
            "workflow_scripts.lora.train_lora"} <= stages
    offending = []
    for path in sorted((REPO / "workflow_scripts").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        in_bench = module.startswith("workflow_scripts.bench.") or module == "workflow_scripts.bench"
        offending += [f"{path.relative_to(REPO)}:{line} imports the stage {name}"
                      for line, name in imported_modules(path) if name in stages and name != module and not in_bench]
        offending += [f"{path.relative_to(REPO)}:{line} imports the benchmark {name}" for line, name in imported_modules(path)
                      if name.startswith("workflow_scripts.bench") and not in_bench]
    assert offending == [], "\n".join(offending)


def _path_literals(source: str) -> list[tuple[int, str]]:
    """String constants that are paths under results/ (docstrings, which document, are left out)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and node.value.startswith("results/")]


def test_every_results_path_has_one_home() -> None:
    """workflow_scripts/common/paths.py names the folders and files under results/; no other module spells
    one out, and no rule rebuilds a folder by hand (dirname): common.smk's folder_of is the one place."""
    found = [f"{path.relative_to(REPO)}:{line}: {value!r}"
             for path in sorted((REPO / "workflow_scripts").rglob("*.py")) if path.name != "paths.py"
             for line, value in _path_literals(path.read_text())]
    assert not found, "results/ paths outside workflow_scripts/common/paths.py:\n" + "\n".join(found)
    rules = [f"{path.name}:{number}" for path in sorted((REPO / "rules").glob("*.smk"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if "dirname" in line]
    assert not rules, f"folders rebuilt with dirname in rules/: {rules}"
    planted = 'HOME = "x"\nCACHE = "results/classifier_cache"\n'
    assert _path_literals(planted) == [(2, "results/classifier_cache")]  # the check sees one


def test_layout_packages_stay_small_and_import_nothing() -> None:
    # workflow_scripts/ is one package per concern (README, Layout): no module left at its top, none over
    # 500 lines, no package over 12 modules, and no __init__ that imports (the dry run reads
    # models.model_location and common.* without torch).
    root = REPO / "workflow_scripts"
    assert [path.name for path in root.glob("*.py")] == ["__init__.py"]
    packages = [path for path in sorted(root.iterdir()) if (path / "__init__.py").is_file()]
    crowded = {path.name: n for path in packages if (n := len(list(path.glob("*.py")))) > 12}
    long = [str(path.relative_to(REPO)) for path in root.rglob("*.py") if len(path.read_text().splitlines()) > 500]
    importing = [str(path.relative_to(REPO)) for path in root.rglob("__init__.py")
                 if any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(ast.parse(path.read_text())))]
    assert (crowded, long, importing) == ({}, [], [])
