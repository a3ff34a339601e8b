"""The Ray backend with FSDP2 on CPU (gloo): two workers compute what one computes, sharded
checkpoints resume on another number of workers, and a worker's exception or death ends the call
with an error naming the worker instead of a hang.

Tolerances: fp32 on CPU, so two workers differ from one only in summation order: log-probs within
1e-5, first-step loss and gradient norm within a relative 1e-4.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from verl.protocol import DataProto, SamplingParams
from verl.single_controller.dispatch import Dispatch, merge_from_dp, register, registered_methods, split_by_dp
from verl.single_controller.local import LocalWorkerGroup
from verl.single_controller.ray import RayWorkerGroup, ResourcePool, WorkerError, start_worker_group
from verl.trainer.metrics import prompt_forward_metrics
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker

ROOT = Path(__file__).resolve().parent.parent
LOG_PROB_ATOL = 1e-5
STEP_RTOL = 1e-4
MICRO_BATCH = 2


# --- dispatch (no Ray needed) --------------------------------------------------------------------
def batch_with_lengths(lengths: list[int]) -> DataProto:
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return DataProto.from_dict({"attention_mask": mask, "row": torch.arange(len(lengths))})


def test_dp_split_balances_tokens_and_merge_restores_the_callers_order():
    data = batch_with_lengths([1, 1, 1, 1, 9, 9, 9, 9])
    shards, split = split_by_dp(data, 2)
    assert [int(s.batch["attention_mask"].sum()) for s in shards] == [20, 20]
    # Each worker answers with two rows per input row (n samples per prompt), kept adjacent.
    outputs = [shard.repeat(2) for shard in shards]
    merged = merge_from_dp(outputs, split)
    assert merged.batch["row"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]


def test_dp_split_pads_an_odd_batch_and_merge_drops_the_padding():
    shards, split = split_by_dp(batch_with_lengths([3, 1, 2]), 2)
    assert [len(s) for s in shards] == [2, 2] and split.pad_size == 1
    assert merge_from_dp(shards, split).batch["row"].tolist() == [0, 1, 2]


def test_dp_split_keeps_each_mini_batch_whole_and_never_pads_it():
    data = batch_with_lengths([5, 1, 1, 5, 2, 8, 8, 2])
    data.meta_info["mini_batch_size"] = 4
    shards, _ = split_by_dp(data, 2)
    for shard in shards:  # rank r's first 2 rows come from mini-batch 0, its last 2 from mini-batch 1
        assert set(shard.batch["row"][:2].tolist()) <= {0, 1, 2, 3}
        assert set(shard.batch["row"][2:].tolist()) <= {4, 5, 6, 7}
    data.meta_info["mini_batch_size"] = 3
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        split_by_dp(data, 2)


def test_dp_split_with_a_group_key_keeps_each_group_on_one_rank(caplog):
    # Four groups of two rows (equal uids adjacent, as a rollout lays them out), unequal lengths.
    data = batch_with_lengths([9, 9, 1, 1, 5, 5, 5, 5])
    data.non_tensor_batch["uid"] = np.array(["a", "a", "b", "b", "c", "c", "d", "d"], dtype=object)
    shards, split = split_by_dp(data, 2, group_key="uid")
    for shard in shards:
        uids = shard.non_tensor_batch["uid"].tolist()
        assert uids == sorted(uids) and all(uids.count(u) == 2 for u in uids)  # whole groups, adjacent
    assert sorted(int(s.batch["attention_mask"].sum()) for s in shards) == [20, 20]
    assert merge_from_dp(shards, split).batch["row"].tolist() == list(range(8))
    # Groups of two cannot fill 8 ranks with one row each: they are cut, and the log says why, once.
    with caplog.at_level(logging.WARNING, logger="verl.single_controller.dispatch"):
        split_by_dp(data, 8, group_key="uid")
        split_by_dp(data, 8, group_key="uid")
    assert len(caplog.records) == 1
    assert "4 of 4 groups" in caplog.text and "worker.actor.global_batch_size" in caplog.text


def test_register_marks_the_methods_a_group_may_call():
    class Worker:
        @register(Dispatch.RANK_ZERO)
        def report(self) -> None: ...

        def helper(self) -> None: ...

    assert registered_methods(Worker) == {"report": Dispatch.RANK_ZERO}
    # The methods the trainer calls, each with the mode its work needs.
    assert (
        registered_methods(ActorRolloutRefWorker).items()
        >= {
            "init_model": Dispatch.ONE_TO_ALL,
            "generate_sequences": Dispatch.TP_GROUP_COMPUTE,
            "compute_log_probs": Dispatch.DP_COMPUTE,
            "compute_ref_log_probs": Dispatch.DP_COMPUTE,
            "update_actor": Dispatch.DP_COMPUTE,
            "save_checkpoint": Dispatch.ONE_TO_ALL,
            "load_checkpoint": Dispatch.ONE_TO_ALL,
        }.items()
    )


# --- two Ray workers against one local worker ----------------------------------------------------
def worker_config(tiny_world: Path) -> WorkerConfig:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_5_vl")
    config.actor.optim.lr = 1e-3
    # A changing learning rate, so a resumed run with a lost schedule shows up in `actor/lr`.
    config.actor.optim.lr_scheduler_type = "warmup"
    config.actor.optim.lr_warmup_steps = 4
    config.actor.optim.training_steps = 10
    config.actor.micro_batch_size_per_device_for_update = MICRO_BATCH
    config.actor.micro_batch_size_per_device_for_experience = MICRO_BATCH
    config.actor.shared_prompt = False  # the plain path; one test turns it on for the Ray workers
    return config


def local_group(tiny_world: Path) -> LocalWorkerGroup:
    group = LocalWorkerGroup(ActorRolloutRefWorker(worker_config(tiny_world), device="cpu", need_ref=True, seed=0))
    group.init_model()
    return group


def mixed_prompts(tiny_world: Path, worker: ActorRolloutRefWorker) -> DataProto:
    """One image prompt and seven text-only prompts: the image lands on one rank only."""

    def dataset(name: str) -> PromptDataset:
        return PromptDataset(
            str(tiny_world / "data" / name / "val.parquet"),
            worker.tokenizer,
            worker.processor,
            PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja")),
        )

    images, texts = dataset("digit_sum"), dataset("text_sum")
    prompts = collate_prompts([images[0]] + [texts[i] for i in range(7)], worker.tokenizer.pad_token_id)
    prompts.meta_info["sampling"] = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    return prompts


def has_images(rows: DataProto) -> bool:
    return any("pixel_values" in inputs for inputs in rows.non_tensor_batch["multi_modal_inputs"])


@pytest.fixture(scope="module")
def ray_cluster():
    # Four logical CPUs: the scenario's two workers stay up for the module while another test
    # starts a group of its own (idle workers use no CPU).
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scenario(tiny_world, ray_cluster, tmp_path_factory):
    """One local worker and a group of two Ray workers run the same stages on the same batch; each
    saves a checkpoint and then resumes the other's. Returns everything the tests compare."""
    out = SimpleNamespace(saves=tmp_path_factory.mktemp("saves"))
    local = local_group(tiny_world)
    pool = ResourcePool(nnodes=1, workers_per_node=2, use_gpu=False, cpus_per_worker=1.0)
    kwargs = {"config": worker_config(tiny_world), "device": "cpu", "need_ref": True, "seed": 0}
    group = RayWorkerGroup(pool, ActorRolloutRefWorker, kwargs, torch_threads=1, call_timeout_s=300)
    group.init_model()
    out.group = group

    prompts = mixed_prompts(tiny_world, local.worker)
    out.generated_local = local.generate_sequences(prompts)
    out.generated_ray = group.generate_sequences(prompts)

    batch = out.generated_local
    batch.meta_info = {"temperature": 1.0}
    out.old_local, out.old_ray = local.compute_log_probs(batch), group.compute_log_probs(batch)
    out.ref_local, out.ref_ray = local.compute_ref_log_probs(batch), group.compute_ref_log_probs(batch)
    batch = batch.union(out.old_local.select(["old_log_probs"])).union(out.ref_local)
    rewards = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5, 0.0])
    batch.batch["advantages"] = rewards[:, None] * batch.batch["response_mask"]
    batch.meta_info["mini_batch_size"] = len(batch)
    out.batch = batch
    out.shards, _ = split_by_dp(batch, 2)

    out.step1_local = local.update_actor(batch).meta_info["metrics"]
    out.step1_ray = group.update_actor(batch).meta_info["metrics"]
    local.save_checkpoint(str(out.saves / "one_worker"))
    group.save_checkpoint(str(out.saves / "two_workers"))

    # 2 -> 1: a fresh local worker resumes the two workers' save; both take step 2.
    resumed = local_group(tiny_world)
    resumed.load_checkpoint(str(out.saves / "two_workers"))
    out.resumed_log_probs = resumed.compute_log_probs(batch).batch["old_log_probs"]
    out.ray_log_probs = group.compute_log_probs(batch).batch["old_log_probs"]
    out.step2_resumed = resumed.update_actor(batch).meta_info["metrics"]
    out.step2_ray = group.update_actor(batch).meta_info["metrics"]
    out.after_step2_resumed = resumed.compute_log_probs(batch).batch["old_log_probs"]
    out.after_step2_ray = group.compute_log_probs(batch).batch["old_log_probs"]

    # 1 -> 2: the two workers resume the local worker's save (an HF folder); both take step 2.
    group.load_checkpoint(str(out.saves / "one_worker"))
    out.group_from_local = group.compute_log_probs(batch).batch["old_log_probs"]
    out.local_log_probs = local.compute_log_probs(batch).batch["old_log_probs"]
    out.step2_local = local.update_actor(batch).meta_info["metrics"]
    out.step2_group_from_local = group.update_actor(batch).meta_info["metrics"]
    yield out
    group.shutdown()


def assert_step_matches(ours: dict[str, float], reference: dict[str, float]) -> None:
    for key in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/lr"):
        assert ours[key] == pytest.approx(reference[key], rel=STEP_RTOL), key


def test_mixed_batch_puts_images_on_one_rank_only(scenario):
    # The property the next test relies on: ranks differ in whether their micro-batches hold
    # images, which hangs FSDP unless both issue the same collectives.
    first, second = (shard[:MICRO_BATCH] for shard in scenario.shards)
    assert has_images(first) != has_images(second)


def test_two_workers_match_one_on_the_first_step(scenario):
    generated_local, generated_ray = scenario.generated_local, scenario.generated_ray
    assert torch.equal(generated_ray.batch["responses"], generated_local.batch["responses"])
    assert list(generated_ray.non_tensor_batch["row_index"]) == list(generated_local.non_tensor_batch["row_index"])
    for key, local, ray_ in (
        ("old_log_probs", scenario.old_local, scenario.old_ray),
        ("entropy", scenario.old_local, scenario.old_ray),
        ("ref_log_probs", scenario.ref_local, scenario.ref_ray),
    ):
        torch.testing.assert_close(ray_.batch[key], local.batch[key], atol=LOG_PROB_ATOL, rtol=0)
    assert scenario.step1_local["actor/grad_norm"] > 0
    assert_step_matches(scenario.step1_ray, scenario.step1_local)


def test_two_workers_weights_after_the_first_step_match_one_workers(scenario, tiny_world):
    # Not only the loss and the gradient norm: every weight the two workers saved after step 1
    # (gathered from their shards) equals the one worker's, Adam's first step included.
    saves = scenario.saves
    assert_same_parameters(saves / "two_workers", saves / "one_worker", tiny_world / "models" / "qwen2_5_vl")


def test_ray_group_exposes_only_registered_methods(scenario):
    # As the in-process group (tests/test_layers.py): a call that works locally cannot fail only on Ray.
    assert callable(scenario.group.compute_log_probs)
    with pytest.raises(AttributeError, match="'_build_model' is not a @register'ed method"):
        scenario.group._build_model()


def test_two_worker_checkpoint_resumes_on_one_worker(scenario):
    assert (scenario.saves / "two_workers" / "optimizer" / ".metadata").is_file()
    torch.testing.assert_close(scenario.resumed_log_probs, scenario.ray_log_probs, atol=LOG_PROB_ATOL, rtol=0)
    assert_step_matches(scenario.step2_resumed, scenario.step2_ray)
    # The optimizer's moments came along: after the second update both still agree closely (a
    # fresh optimizer moves every weight by about the learning rate and misses this by far).
    torch.testing.assert_close(scenario.after_step2_resumed, scenario.after_step2_ray, atol=1e-4, rtol=0)


def test_one_worker_checkpoint_resumes_on_two_workers(scenario):
    assert (scenario.saves / "one_worker" / "model.safetensors").is_file()
    torch.testing.assert_close(scenario.group_from_local, scenario.local_log_probs, atol=LOG_PROB_ATOL, rtol=0)
    assert_step_matches(scenario.step2_group_from_local, scenario.step2_local)


def assert_same_parameters(ours: Path, reference: Path, initial: Path) -> None:
    """The weights two checkpoints saved after the same update agree: each tensor's change from
    `initial` within 1e-3 of the reference's change, relative to the change's norm (fp32 summation
    order moves single entries; a wrong gradient moves whole tensors). Every trained tensor moved."""
    start, a, b = (load_file(folder / "model.safetensors") for folder in (initial, ours, reference))
    # The sharded save also writes the tied LM head (`lm_head.weight`, equal to the embedding).
    assert b.keys() == start.keys() and a.keys() >= b.keys()
    moved = 0
    for name, before in start.items():
        ours_delta, reference_delta = a[name] - before, b[name] - before
        scale = float(reference_delta.norm())
        moved += scale > 0
        error = float((ours_delta - reference_delta).norm())
        assert error <= 1e-3 * scale + 1e-9, f"{name}: change differs by {error:.2e} (change {scale:.2e})"
    assert moved > len(start) // 2


@pytest.fixture(scope="module")
def plain_grouped_step(tiny_world, tmp_path_factory) -> SimpleNamespace:
    """One plain local worker (no shared prompts) on 8 prompts x 2 samples with GRPO `uid`s: its old and
    reference log-probs, one update and the checkpoint it saves after it."""
    out = SimpleNamespace(saves=tmp_path_factory.mktemp("grouped"))
    local = local_group(tiny_world)
    prompts = mixed_prompts(tiny_world, local.worker)
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    batch = local.generate_sequences(prompts)
    batch.non_tensor_batch["uid"] = np.array([f"prompt{row // 2}" for row in range(len(batch))], dtype=object)
    batch.meta_info = {"temperature": 1.0}
    out.batch = batch
    out.old, out.ref = local.compute_log_probs(batch), local.compute_ref_log_probs(batch)
    update = batch.union(out.old.select(["old_log_probs"])).union(out.ref)
    rewards = torch.linspace(-0.5, 1.0, len(update))  # a loss well away from zero
    update.batch["advantages"] = rewards[:, None] * update.batch["response_mask"]
    update.meta_info["mini_batch_size"] = len(update)
    out.update = update
    out.metrics = local.update_actor(update).meta_info["metrics"]
    local.save_checkpoint(str(out.saves / "plain"))
    return out


@pytest.mark.parametrize("workers", [2, 4])
def test_shared_prompt_workers_encode_each_prompt_once_and_match_one_plain_worker(
    tiny_world, ray_cluster, plain_grouped_step, workers
):
    # Shared-prompt forwards under FSDP2: the dispatch keeps each group (equal uids) on one rank and
    # each rank's micro-batches of 2 rows hold one group each, so the 8 prompts are encoded 8 times
    # per log-prob pass (perf/prompt_forwards_per_group 1.0), where row balancing cut groups apart.
    # Every micro-batch runs two forwards (the distinct prompts with a cache, then the responses)
    # before one backward, on ranks with and without images. Log-probs, the step's metrics and the
    # weights after it equal the plain local worker's.
    plain = plain_grouped_step
    config = worker_config(tiny_world)
    config.actor.shared_prompt = True
    # Beside the scenario's two workers (two of the cluster's four CPUs) when it is up.
    pool = ResourcePool(nnodes=1, workers_per_node=workers, use_gpu=False, cpus_per_worker=2 / workers)
    kwargs = {"config": config, "device": "cpu", "need_ref": True, "seed": 0}
    group = RayWorkerGroup(pool, ActorRolloutRefWorker, kwargs, torch_threads=1, call_timeout_s=300)
    try:
        assert group.group_key == "uid"
        group.init_model()
        old, ref = group.compute_log_probs(plain.batch), group.compute_ref_log_probs(plain.batch)
        for key, ours, reference in (("old_log_probs", old, plain.old), ("ref_log_probs", ref, plain.ref)):
            torch.testing.assert_close(ours.batch[key], reference.batch[key], atol=LOG_PROB_ATOL, rtol=0)
        metrics = group.update_actor(plain.update).meta_info["metrics"]
        assert_step_matches(metrics, plain.metrics)
        uids = plain.batch.non_tensor_batch["uid"]
        assert prompt_forward_metrics(metrics, uids) == {"perf/prompt_forwards_per_group": 1.0}
        # The plain worker encodes each response's prompt: n = 2 per group.
        assert prompt_forward_metrics(plain.metrics, uids) == {"perf/prompt_forwards_per_group": 2.0}
        group.save_checkpoint(str(plain.saves / f"shared_{workers}"))
        assert_same_parameters(
            plain.saves / f"shared_{workers}", plain.saves / "plain", tiny_world / "models" / "qwen2_5_vl"
        )
    finally:
        group.shutdown()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_once_busy(pid: int, busy_s: float, call_done: threading.Event) -> None:
    """SIGKILL `pid` once it has spent `busy_s` CPU seconds since now, i.e. provably inside the
    call, however fast the machine; never after the call has returned."""
    start = cpu_seconds(pid)
    while not call_done.wait(0.05):
        if cpu_seconds(pid) - start >= busy_s:
            os.kill(pid, signal.SIGKILL)
            return


def test_killing_a_worker_mid_step_ends_the_call_with_its_name(scenario):
    group = scenario.group
    victim = group.worker_pids[1]
    long_update = DataProto.concat([scenario.batch] * 16)  # 128 rows: 32 micro-batches per rank
    long_update.meta_info["mini_batch_size"] = len(long_update)
    call_done = threading.Event()
    killer = threading.Thread(target=kill_once_busy, args=(victim, 0.5, call_done))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(WorkerError, match=rf"worker rank 1 \(pid {victim}, .*\) died during `update_actor`"):
            group.update_actor(long_update)
    finally:
        call_done.set()
        killer.join()
        group.shutdown()  # frees the slots for the next tests even when this one fails
    assert time.monotonic() - start < 60
    with pytest.raises(WorkerError, match="stopped earlier"):
        group.compute_log_probs(scenario.batch)


def test_an_exception_in_a_worker_shows_its_traceback(ray_cluster, tiny_world, tmp_path):
    pool = ResourcePool(nnodes=1, workers_per_node=1, use_gpu=False, cpus_per_worker=1.0)
    kwargs = {"config": worker_config(tiny_world), "device": "cpu", "need_ref": False, "seed": 0}
    group = RayWorkerGroup(pool, ActorRolloutRefWorker, kwargs, torch_threads=1, call_timeout_s=120)
    with pytest.raises(WorkerError) as caught:
        group.load_checkpoint(str(tmp_path / "missing"))
    message = str(caught.value)
    assert f"worker rank 0 (pid {group.worker_pids[0]}" in message and "raised in `load_checkpoint`" in message
    # The worker's own traceback: its file, its function and the original exception.
    assert "fsdp_worker.py" in message and "FileNotFoundError" in message
    assert "training_state.pt" in message


def test_a_call_past_its_deadline_stops_the_group_naming_the_late_rank(ray_cluster, tiny_world):
    # Built as the trainers build it, so trainer.worker_call_timeout_s reaches the group. Loading
    # a model takes far longer than 10 ms on any machine.
    kwargs = {"config": worker_config(tiny_world), "need_ref": False, "seed": 0}
    group = start_worker_group(ActorRolloutRefWorker, kwargs, 1, 1, "cpu", torch_threads=1, call_timeout_s=0.01)
    assert group.call_timeout_s == 0.01
    with pytest.raises(WorkerError, match=r"`init_model` did not finish within 0\.01s on worker rank\(s\) \[0\]"):
        group.init_model()
    with pytest.raises(WorkerError, match="stopped earlier"):
        group.init_model()


def test_a_pool_larger_than_the_cluster_fails_at_once(ray_cluster):
    pool = ResourcePool(nnodes=1, workers_per_node=5, use_gpu=False, cpus_per_worker=1.0)
    with pytest.raises(RuntimeError, match=r"needs 1 node\(s\) with \{'CPU': 5.0\} each"):
        pool.create(timeout_s=5)


# --- the whole run through the command line ------------------------------------------------------
@pytest.mark.slow
def test_killed_worker_ends_a_ray_run_with_a_clear_error(tiny_world, tmp_path):
    """`python -m verl.trainer.main trainer.backend=ray` with two CPU workers; rank 1 is killed
    during the first step and the driver exits with an error naming it."""
    val = tiny_world / "data/digit_sum/val.parquet"
    args = [
        f"data.train_files={val}",
        f"data.val_files={val}",
        f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
        "data.format_prompt=examples/format_prompt/see_think.jinja",
        "data.rollout_batch_size=8",
        "worker.actor.global_batch_size=8",
        "worker.actor.micro_batch_size_per_device_for_update=2",
        "worker.rollout.n=4",
        "data.max_response_length=48",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={tmp_path / 'run'}",
        "trainer.val_before_train=false",
        "trainer.backend=ray",
        "trainer.device=cpu",
        "trainer.n_gpus_per_node=2",
    ]
    log_path = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "verl.trainer.main", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        victim = _wait_for_training(driver, log_path, deadline=time.monotonic() + 300)
        time.sleep(1.0)  # inside the first step's generation
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        driver.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        driver.kill()
    text = log_path.read_text()
    assert driver.returncode != 0
    assert re.search(rf"WorkerError: worker rank 1 \(pid {victim}, .*\) died during `\w+`", text), text[-3000:]


def _wait_for_training(driver: subprocess.Popen, log_path: Path, deadline: float) -> int:
    """Rank 1's pid, once the workers are built and training has begun."""
    while time.monotonic() < deadline:
        text = log_path.read_text()
        pid = re.search(r"worker rank 1: pid (\d+)", text)
        if pid and "model parameters:" in text:
            return int(pid.group(1))
        assert driver.poll() is None, f"the run ended before training began:\n{text[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"training did not begin in time:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow  # four Ray workers: over a minute on two shared cores
def test_ray_group_dispatches_over_tensor_parallel_groups(ray_cluster):
    class RankEcho:  # defined here so Ray pickles it by value (the test module is not importable there)
        """Answers with the rows it got, tagged with its rank; states groups of two ranks."""

        dispatch_tp_size = 2

        def __init__(self) -> None:
            self.rank = int(os.environ["RANK"])

        @register(Dispatch.TP_GROUP_COMPUTE)
        def echo(self, data: DataProto) -> DataProto:
            data.batch["rank"] = torch.full((len(data),), self.rank)
            return data

    pool = ResourcePool(nnodes=1, workers_per_node=4, use_gpu=False, cpus_per_worker=0.5)
    group = RayWorkerGroup(pool, RankEcho, {}, torch_threads=1)
    try:
        assert group.tp_size == 2
        merged = group.echo(batch_with_lengths([4, 1, 3, 2, 5, 6]))
        assert merged.batch["row"].tolist() == [0, 1, 2, 3, 4, 5]
        assert set(merged.batch["rank"].tolist()) == {0, 2}  # one answer per group, from its first rank
    finally:
        group.shutdown()
