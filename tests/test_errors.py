"""One user-error base and one CLI wrapper: a user error ends any CLI as `error: ...` with exit code 2,
a bug keeps its traceback, and every stage's main() goes through the wrapper."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO
from workflow_scripts.common.errors import ConfigError, DataError, GenerationError, ModelNotFoundError, TrainingError, UserError, run_stage
from workflow_scripts.common.images import BadImageError


def test_a_user_error_is_a_message_and_exit_code_2(capsys) -> None:
    @run_stage
    def main(argv: list[str] | None = None) -> int:
        raise DataError(f"data.csv line 3: no label ({argv})")

    assert main(["x"]) == 2
    assert capsys.readouterr().err == "error: data.csv line 3: no label (['x'])\n"


def test_a_bug_keeps_its_traceback_and_success_passes_through() -> None:
    @run_stage
    def broken(argv: list[str] | None = None) -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        broken([])
    assert run_stage(lambda argv=None: 0)([]) == 0


def test_every_user_error_shares_the_base_and_keeps_its_old_bases() -> None:
    for error in (ConfigError, DataError, TrainingError, ModelNotFoundError, GenerationError, BadImageError):
        assert issubclass(error, UserError), error
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError) and issubclass(TrainingError, RuntimeError)
    assert str(BadImageError("x.png", "truncated")).startswith("x.png: truncated")
    # The names stay importable where other code imported them from.
    from workflow_scripts.models.base_model import ModelNotFoundError as from_base
    from workflow_scripts.common.config import ConfigError as from_config
    from workflow_scripts.common.labels import DataError as from_labels
    from workflow_scripts.lora.train_lora import TrainingError as from_lora
    from workflow_scripts.classifier.train_classifier import TrainingError as from_classifier

    assert (from_base, from_config, from_labels, from_lora, from_classifier) == (
        ModelNotFoundError, ConfigError, DataError, TrainingError, TrainingError)


def test_every_cli_main_goes_through_run_stage() -> None:
    unwrapped, error_classes = [], []
    for path in sorted((REPO / "workflow_scripts").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: a CLI's main()
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                if not any(isinstance(d, ast.Name) and d.id == "run_stage" for d in node.decorator_list):
                    unwrapped.append(str(path.relative_to(REPO)))
                # the wrapper is the one place that turns user errors into messages
                for handler in ast.walk(node):
                    if isinstance(handler, ast.ExceptHandler):
                        unwrapped.append(f"{path.relative_to(REPO)}:{handler.lineno} catches errors in main()")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and path.name != "errors.py":
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if not bases & {"UserError", "DataError", "ConfigError"}:
                    error_classes.append(f"{path.relative_to(REPO)}: {node.name}({', '.join(bases)})")
    assert unwrapped == [] and error_classes == []
