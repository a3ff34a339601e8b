"""The update's logged metrics are whole-batch values: they do not move with the micro-batch split,
dynamic batching or the number of data-parallel ranks (only the summation order changes).

Token-means (`actor/ppo_kl`, `actor/pg_clipfrac_*`, `actor/entropy`) are means over every valid
response token of a mini-batch; losses follow `loss_agg_mode`; each is then averaged over the
update's mini-batches. One update of the tiny text worker, plain SGD, fp32 on CPU: the variants
agree within 1e-5 relative (summation order only).
"""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from verl.models.loading import load_model, load_tokenizer_and_processor
from verl.protocol import DataProto
from verl.single_controller.dispatch import split_by_dp
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.utils.network import free_port
from verl.workers.actor.micro_batches import micro_batches
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.rollout.base import rollout_output

RTOL = 1e-5
ROWS = 64
WIDTH = 12


def worker_config(tiny_world: Path, **actor) -> WorkerConfig:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_text")
    config.actor.micro_batch_size_per_device_for_update = 64
    config.actor.micro_batch_size_per_device_for_experience = 64
    config.actor.entropy_coeff = 1e-2
    config.actor.logprob_chunk_size = 0
    config.actor.shared_prompt = False  # micro-batches of plain rows: the splits below are as asserted
    for key, value in actor.items():
        setattr(config.actor, key, value)
    return config


def make_worker(config: WorkerConfig) -> ActorRolloutRefWorker:
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    # Plain SGD: the second mini-batch sees the same weights in every variant up to summation noise.
    worker.actor.optimizer = torch.optim.SGD(worker.model.parameters(), lr=0.1)
    return worker


@pytest.fixture(scope="module")
def batch_and_current(tiny_world) -> tuple[DataProto, DataProto]:
    """16 text prompts x 4 samples with responses of 1..12 tokens, off-policy (ratios far from 1),
    and the current policy's log-probs and entropy on it."""
    model_dir = str(tiny_world / "models" / "qwen2_text")
    tokenizer, processor = load_tokenizer_and_processor(model_dir)
    model = load_model(model_dir)
    texts = PromptDataset(str(tiny_world / "data/text_sum/val.parquet"), tokenizer, processor, PromptDatasetConfig())
    prompts = collate_prompts([texts[i] for i in range(ROWS // 4)], tokenizer.pad_token_id).repeat(4, interleave=True)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, WIDTH + 1, (ROWS,), generator=generator)
    response_mask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    responses = torch.randint(3, 200, (ROWS, WIDTH), generator=generator).masked_fill(
        response_mask == 0, tokenizer.pad_token_id
    )
    data = rollout_output(model, prompts, responses, response_mask, None, {"temperature": 1.0})
    current = make_worker(worker_config(tiny_world)).compute_log_probs(data)
    log_probs = current.batch["old_log_probs"]
    # Old and reference policies near the current one, so that both clip ranges are hit.
    data.batch["old_log_probs"] = log_probs + torch.randn(ROWS, WIDTH, generator=generator) * 0.3
    data.batch["ref_log_probs"] = log_probs + torch.randn(ROWS, WIDTH, generator=generator) * 0.3
    data.batch["advantages"] = torch.randn(ROWS, 1, generator=generator) * response_mask
    data.meta_info["mini_batch_size"] = ROWS // 2
    return data, current


@pytest.fixture(scope="module")
def batch(batch_and_current) -> DataProto:
    return batch_and_current[0]


def step_metrics(tiny_world: Path, data: DataProto, **actor) -> dict[str, float]:
    return make_worker(worker_config(tiny_world, **actor)).update_actor(data).meta_info["metrics"]


def assert_same_metrics(ours: dict[str, float], reference: dict[str, float]) -> None:
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=RTOL, abs=1e-7), key


@pytest.fixture(scope="module")
def one_micro_batch(tiny_world, batch) -> dict[str, float]:
    return step_metrics(tiny_world, batch, micro_batch_size_per_device_for_update=64)


def test_metrics_do_not_move_with_the_micro_batch_split_or_dynamic_batching(tiny_world, batch, one_micro_batch):
    metrics = one_micro_batch
    # Not trivially equal: every clip fraction and the KL terms are non-zero.
    for key in ("actor/ppo_kl", "actor/pg_clipfrac_higher", "actor/pg_clipfrac_lower", "actor/entropy"):
        assert abs(metrics[key]) > 1e-3, key
    budget = 200
    sizes = [len(m) for m in micro_batches(batch[: ROWS // 2], 8, dynamic=True, max_tokens=budget)]
    assert len(set(sizes)) > 1, sizes
    assert_same_metrics(step_metrics(tiny_world, batch, micro_batch_size_per_device_for_update=8), metrics)
    dynamic = step_metrics(tiny_world, batch, dynamic_batching=True, max_token_len_per_gpu=budget)
    assert_same_metrics(dynamic, metrics)


def test_metrics_are_token_weighted_values_of_the_whole_mini_batch(tiny_world, batch_and_current):
    data, current = batch_and_current
    whole = data.select(list(data.batch.keys()))  # a copy whose meta_info may change
    whole.meta_info = {**data.meta_info, "mini_batch_size": ROWS}  # one mini-batch: the current weights
    metrics = step_metrics(tiny_world, whole, micro_batch_size_per_device_for_update=8)
    mask = data.batch["response_mask"].bool()
    log_probs, old = current.batch["old_log_probs"][mask], data.batch["old_log_probs"][mask]
    ratio = torch.exp(log_probs - old)
    advantages = data.batch["advantages"].expand_as(data.batch["response_mask"])[mask]
    config = worker_config(tiny_world).actor
    expected = {
        "actor/entropy": current.batch["entropy"][mask].mean(),
        "actor/ppo_kl": (old - log_probs).mean(),
        "actor/pg_clipfrac_higher": ((ratio > 1 + config.clip_ratio_high) & (advantages > 0)).float().mean(),
        "actor/pg_clipfrac_lower": ((ratio < 1 - config.clip_ratio_low) & (advantages < 0)).float().mean(),
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=RTOL, abs=1e-7), key


# --- two gloo ranks against one ---------------------------------------------------------------------
def _rank(rank: int, port: int, config: WorkerConfig, shards: list[DataProto], results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results[rank] = make_worker(config).update_actor(shards[rank]).meta_info["metrics"]


def test_two_ranks_log_the_metrics_of_one(tiny_world, batch, one_micro_batch):
    shards, _ = split_by_dp(batch, 2)
    for shard in shards:
        shard.meta_info = dict(batch.meta_info)
    config = worker_config(tiny_world, micro_batch_size_per_device_for_update=8)
    with mp.Manager() as manager:
        results = manager.dict()
        # Forked ranks skip re-importing the stack (seconds instead of half a minute on 2 cores); fork
        # is safe only while this process has run no multi-threaded (OpenMP) torch work.
        method = "fork" if torch.get_num_threads() == 1 else "spawn"
        mp.start_processes(_rank, args=(free_port(), config, shards, results), nprocs=2, start_method=method)
        ranks = [dict(results[0]), dict(results[1])]
    assert ranks[0] == ranks[1]
    assert_same_metrics(ranks[0], one_micro_batch)
