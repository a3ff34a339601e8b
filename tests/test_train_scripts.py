"""The GPU training scripts pass their arguments to a config that loads and validates on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "train_examples").glob("[123]-*.sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_config_is_valid(script):
    env = {**os.environ, "PYTHON": str(ROOT / "tests/tools/check_config_python.sh"), "CHECK_PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", f"train_examples/{script}"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["worker"]["actor"]["optim"]["lr"] == 1e-6
    assert config["data"]["rollout_batch_size"] == 512 and config["worker"]["actor"]["global_batch_size"] == 128
    assert config["worker"]["actor"]["clip_ratio_high"] == 0.3 and config["algorithm"]["kl_penalty"] == "low_var_kl"
    reward = config["worker"]["reward"]["reward_function"]
    expected = {"1": "cot.py", "2": "see_think_self_reward.py", "3": "see_think.py"}[script[0]]
    assert reward.split(":")[0].endswith(expected)
    size = "3B" if "-3b_" in script else "7B"
    assert f"Qwen-2.5VL-{size}-Cold-Start" in config["worker"]["actor"]["model"]["model_path"]
