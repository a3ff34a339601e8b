"""Every command answers --help with its usage and config reference, and with no arguments prints
its usage instead of starting a run; the console entry points name real functions."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

from verl.trainer import generate, main, sft

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command, reference, sections",
    [
        (main.main, "examples/config.yaml", ["  data: train_files", "  worker: actor.{", "  trainer: "]),
        (sft.main, "examples/sft_config.yaml", ["  model: ", "  optim: ", "  trainer: "]),
        (generate.main, "examples/generate_config.yaml", ["  model_path: ", "  benchmarks: "]),
    ],
)
def test_help_prints_usage_and_config_reference(command, reference, sections, capsys):
    with pytest.raises(SystemExit) as exit_:
        command(["worker.rollout.n=2", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m verl.trainer.")
    assert f"Config reference (every key with its default and meaning: {reference}" in out
    for section in sections:
        assert section in out


@pytest.mark.parametrize("command", [main.main, sft.main, generate.main])
def test_no_arguments_prints_usage_and_starts_nothing(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        command([])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: ") and "nothing started" in captured.err
    assert list(tmp_path.iterdir()) == []  # no checkpoint or output folder was created


@pytest.mark.parametrize(
    "command, schema",
    [(main.main, main.PPOConfig), (sft.main, sft.SFTConfig), (generate.main, generate.GenerateConfig)],
)
def test_the_config_the_usage_suggests_loads(command, schema, capsys):
    """The no-arguments usage names a `config=FILE` to start from: that file exists and loads."""
    from verl.utils.config import load_config

    with pytest.raises(SystemExit):
        command([])
    suggested = re.search(r"`(config=\S+)`", capsys.readouterr().err)
    assert suggested, "the usage suggests no config file"
    path = ROOT / suggested.group(1).removeprefix("config=")
    assert path.is_file(), f"the usage suggests {suggested.group(1)}, which does not exist"
    load_config([f"config={path}"], schema)


def test_console_entry_points_name_real_functions():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {"vision-sr1-train", "vision-sr1-sft", "vision-sr1-generate"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
