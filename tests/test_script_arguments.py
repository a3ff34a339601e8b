"""The scripts a user runs by hand, run as a user runs them: with no arguments, the ones whose defaults
alone would start work (a build, hours of training, files written at a default place) print their
usage and exit 2 (`EXIT_NO_ARGUMENTS`, as the trainer commands do); `--help` prints the usage and
exits 0, and neither starts anything. A script whose documented run takes no arguments (the GPU check,
the benchmarks of a few minutes, get_eval_result.sh) keeps it; its --help is checked here too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from verl.utils.cli_help import EXIT_HELP, EXIT_NO_ARGUMENTS

ROOT = Path(__file__).resolve().parent.parent

# (script, a line its --help must show)
NEEDS_ARGUMENTS = [
    ("scripts/make_tiny_world.py", "--out OUT"),
    ("scripts/tiny_experiment.py", "--report_name"),
    ("scripts/kill_trials.py", "--trials"),
    ("scripts/benchmark_grpo.py", "--variant"),
    ("Evaluation/convert_original_outputs.py", "--original_dir"),
]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(("script", "option"), NEEDS_ARGUMENTS)
def test_no_arguments_prints_usage_and_starts_nothing(script, option, tmp_path):
    # Run from an empty folder: any default output there (or a build) would show as a new entry.
    result = run([sys.executable, str(ROOT / script)], tmp_path)
    assert result.returncode == EXIT_NO_ARGUMENTS, result.stderr
    assert result.stderr.startswith("usage: ") and "nothing started" in result.stderr
    assert option.split()[0] in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("script", "option"), NEEDS_ARGUMENTS)
def test_help_prints_usage_and_starts_nothing(script, option, tmp_path):
    result = run([sys.executable, str(ROOT / script), "--help"], tmp_path)
    assert result.returncode == EXIT_HELP, result.stderr
    assert result.stdout.startswith("usage: ") and option in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_world_needs_out_even_with_other_options(tmp_path):
    """--out has no default any more: `--seed 1` alone must not rebuild the repository's tiny_world/."""
    result = run([sys.executable, str(ROOT / "scripts/make_tiny_world.py"), "--seed", "1"], tmp_path)
    assert result.returncode == 2
    assert "the following arguments are required: --out" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_make_tiny_world_call_passes_out():
    """Every caller in the repository (CI, scripts, tests, docs) names the folder to build."""
    folders = ["docs", "scripts", "train_examples", "validation_examples", "Evaluation", "LLaMA-Factory-Cold-Start"]
    callers = [ROOT / ".ci" / "run", ROOT / "README.md", *(ROOT / "verl" / "tiny_world").glob("*.py")]
    callers += [
        path for folder in folders for path in (ROOT / folder).rglob("*") if path.suffix in (".sh", ".py", ".md")
    ]
    callers += [path for path in (ROOT / "tests").glob("*.py") if path.name != Path(__file__).name]
    calls = []
    for path in filter(Path.is_file, callers):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if "make_tiny_world.py" in line and ("python" in line.lower() or "sys.executable" in line):
                calls.append((path.relative_to(ROOT), line.strip()))
    assert calls, "no caller found: the search is broken"
    assert [call for call in calls if "--out" not in call[1]] == []


def test_get_eval_result_help_prints_usage_and_tabulates_nothing(tmp_path):
    env = {**os.environ, "EVAL_OUT_DIR": str(tmp_path / "LLM-Eval-out"), "RESULTS_DIR": str(tmp_path / "tables")}
    script = str(ROOT / "Evaluation" / "get_eval_result.sh")
    for flag in ("--help", "-h"):
        result = subprocess.run(["bash", script, flag], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "EVAL_OUT_DIR" in result.stdout and "./get_eval_result.sh --help" in result.stdout
        assert result.stderr == ""
    # Settings are environment variables: an argument is refused rather than ignored.
    result = subprocess.run(["bash", script, "model-a"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "takes no arguments" in result.stderr
    assert list(tmp_path.iterdir()) == []


# (script, a line its --help must show) for scripts whose documented run takes no arguments.
RUNS_WITHOUT_ARGUMENTS = [
    ("scripts/gpu_check.py", "--skip-qwen3-vl"),
]


@pytest.mark.parametrize(("script", "option"), RUNS_WITHOUT_ARGUMENTS)
def test_help_of_a_script_that_runs_without_arguments_starts_nothing(script, option, tmp_path):
    """--help prints the usage (the GPU check's: its parts and options, the Qwen3-VL shape's
    included) and exits 0 without building a tiny world or touching a device."""
    result = run([sys.executable, str(ROOT / script), "--help"], tmp_path)
    assert result.returncode == EXIT_HELP, result.stderr
    assert result.stdout.startswith("usage: ") and option in result.stdout
    assert list(tmp_path.iterdir()) == []
