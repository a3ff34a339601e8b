"""scripts/gpu_check.py's part 3 (the shipped GPU script for 2 steps) needs a GPU; its `--dry-run`
runs the exact command through the script's own --check-config, which must pass."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a full trainer --check-config in a fresh process: 165 s on two shared cores
def test_dry_run_checks_the_shipped_scripts_exact_command(tiny_world):
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--world", str(tiny_world)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "command: bash train_examples/2-3b_selfReward_train.sh trainer.max_steps=2" in result.stdout
    # The shipped rollout settings survive the scaling down: vLLM, 8 samples, the original's 15000 tokens.
    assert "config OK" in result.stdout, result.stdout[-4000:]
    assert "rollout vllm, n=8, tp=1, max_num_batched_tokens=15000, prompt+response=12800+512" in result.stdout
