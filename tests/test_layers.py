"""The architecture's rules, enforced: imports point one way (pyproject.toml's import-linter
contracts), worker groups expose exactly the worker's registered methods, and the trainers'
Protocols list exactly those methods."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from verl.single_controller.dispatch import registered_methods
from verl.single_controller.local import LocalWorkerGroup
from verl.workers.contract import ActorRolloutRefGroup, SFTWorkerGroup, WorkerGroup
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.sft_worker import SFTWorker

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts from pyproject.toml, checked on the `verl` package under `tree`."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imports_keep_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check is not vacuous: an algorithm importing the trainer, a lazy import inside a
    function included, makes it fail and names the offending import."""
    shutil.copytree(ROOT / "verl", tmp_path / "verl", ignore=shutil.ignore_patterns("__pycache__"))
    algos = tmp_path / "verl" / "algorithms" / "core_algos.py"
    algos.write_text(algos.read_text() + "\n\ndef _climb():\n    from verl.trainer import main  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "verl.algorithms.core_algos -> verl.trainer.main" in result.stdout


def _protocol_methods(protocol: type) -> set[str]:
    base = {name for name, _ in inspect.getmembers(WorkerGroup, inspect.isfunction)}
    return {name for name, _ in inspect.getmembers(protocol, inspect.isfunction)} - base


@pytest.mark.parametrize(
    ("protocol", "worker_cls"), [(ActorRolloutRefGroup, ActorRolloutRefWorker), (SFTWorkerGroup, SFTWorker)]
)
def test_group_protocols_list_exactly_the_registered_methods(protocol, worker_cls):
    assert _protocol_methods(protocol) == set(registered_methods(worker_cls))


def test_local_group_exposes_only_registered_methods():
    class Worker:
        from verl.single_controller.dispatch import Dispatch, register

        @register(Dispatch.ONE_TO_ALL)
        def visible(self) -> str:
            return "called"

        def internal(self) -> str:
            return "should not be reachable"

    group = LocalWorkerGroup(Worker())
    assert group.visible() == "called"
    with pytest.raises(AttributeError, match="'internal' is not a @register'ed method"):
        group.internal()
