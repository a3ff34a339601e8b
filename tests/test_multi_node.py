"""A GRPO run on a two-node Ray cluster, both nodes on this machine, as docs/multi_node.md starts one.

`python -m verl.trainer.main trainer.nnodes=2 trainer.n_gpus_per_node=1` joins the cluster named by
RAY_ADDRESS; its ResourcePool asks for one STRICT_PACK placement group per node. Each node has one
CPU, so the two groups can only be placed one per node: the test finds each worker's node from the
cluster's actor table (the pids the driver logs), by node id, since both nodes share this machine's
IP address. The same job with two workers on one node does the same arithmetic (fp32 on CPU, one
torch thread per worker, the same two-rank reductions), so its metrics must match the two-node
run's to float rounding.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parent.parent
REWARD = str(ROOT / "tests" / "rewards" / "digit_density.py") + ":compute_score"

WORKER_LINE = re.compile(r"worker rank (\d+): pid (\d+) on node (\S+)")


def grpo_args(tiny_world: Path, save_dir: Path, nnodes: int, workers_per_node: int) -> list[str]:
    """Two short GRPO steps with a validation at the end, on `nnodes` x `workers_per_node` CPU workers."""
    data = tiny_world / "data/digit_sum/val.parquet"
    return [
        f"data.train_files={data}",
        f"data.val_files={data}",
        "data.val_batch_size=64",
        f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
        "data.format_prompt=examples/format_prompt/see_think.jinja",
        "data.rollout_batch_size=4",
        "worker.actor.global_batch_size=4",
        "worker.actor.micro_batch_size_per_device_for_update=4",
        "worker.actor.micro_batch_size_per_device_for_experience=4",
        "worker.ref.micro_batch_size_per_device_for_experience=4",
        "worker.rollout.n=4",
        "data.max_response_length=16",
        "worker.actor.optim.lr=1e-3",
        f"worker.reward.reward_function={REWARD}",
        "trainer.max_steps=2",
        "trainer.val_before_train=false",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={save_dir}",
        "trainer.backend=ray",
        "trainer.device=cpu",
        "trainer.torch_threads=1",
        f"trainer.nnodes={nnodes}",
        f"trainer.n_gpus_per_node={workers_per_node}",
    ]


def run_driver(args: list[str], log_path: Path, ray_address: str | None) -> str:
    """The trainer's command line in its own process; its log, after checking that it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    with open(log_path, "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    text = log_path.read_text()
    assert result.returncode == 0, text[-4000:]
    return text


def read_metrics(save_dir: Path) -> dict[int, dict[str, Any]]:
    with open(save_dir / "metrics.jsonl") as f:
        return {row["step"]: row for row in map(json.loads, f)}


def computed(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics less the wall-clock ones (durations, throughputs), which differ in any two runs."""
    return {key: v for key, v in metrics.items() if not key.startswith("timing_s/") and not key.endswith("_per_s")}


def worker_nodes(log: str, cluster: Cluster) -> dict[int, str]:
    """Node id of each worker rank: the driver logs each rank's pid, the cluster each actor's node
    (by id: nodes on one machine share its IP address, which is what the log names)."""
    pids = {int(rank): int(pid) for rank, pid, _ in WORKER_LINE.findall(log)}
    node_of_pid = {
        actor["Pid"]: actor["Address"]["NodeID"]
        for actor in cluster.global_state.actor_table(None).values()
        if actor["ActorClassName"] == "WorkerHost"
    }
    return {rank: node_of_pid[pid] for rank, pid in pids.items()}


@contextmanager
def two_node_cluster() -> Iterator[tuple[Cluster, list[str]]]:
    """A head node and a second node (separate raylets) of one CPU each, and their node ids.

    While it runs, a plain `ray.init()` on this machine joins it (Ray records its address as `ray
    start` does), so a run meant to start its own Ray instance must come before or after."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, [cluster.head_node.node_id, second.node_id]
    finally:
        cluster.shutdown()


def test_grpo_run_on_two_nodes_places_a_worker_on_each_and_matches_one_node(tiny_world, tmp_path):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    # The same job, two workers on one node (a local Ray instance the driver starts and stops).
    run_driver(grpo_args(tiny_world, one_node, 1, 2), tmp_path / "one_node.log", None)

    with two_node_cluster() as (cluster, node_ids):
        log = run_driver(grpo_args(tiny_world, two_nodes, 2, 1), tmp_path / "two_nodes.log", cluster.address)
        placement = worker_nodes(log, cluster)
    assert sorted(placement) == [0, 1], log[-4000:]
    assert sorted(placement.values()) == sorted(node_ids)

    ours, reference = read_metrics(two_nodes), read_metrics(one_node)
    assert sorted(ours) == sorted(reference) == [1, 2]
    for step in (1, 2):
        assert computed(ours[step]).keys() == computed(reference[step]).keys()
        for key, expected in computed(reference[step]).items():
            assert ours[step][key] == pytest.approx(expected, rel=1e-6, abs=1e-9), (step, key)
    # Training happened, so equal metrics are not two sets of zeros.
    assert reference[1]["actor/grad_norm"] > 0 and "val/reward/overall" in reference[2]


@pytest.mark.slow
def test_losing_a_node_stops_the_run_naming_its_worker_and_a_rerun_resumes(tiny_world, tmp_path):
    """The second node's raylet is killed (its workers die with it) after the first checkpoint: the
    driver exits with a WorkerError naming a worker and stops both; once a node joins in its place,
    the same command resumes from that checkpoint and finishes. docs/multi_node.md tells users this."""
    save_dir = tmp_path / "run"
    args = [*grpo_args(tiny_world, save_dir, 2, 1), "trainer.max_steps=4", "trainer.save_freq=1"]
    with two_node_cluster() as (cluster, _):
        [second] = cluster.worker_nodes
        log_path = tmp_path / "lost_node.log"
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        with open(log_path, "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "verl.trainer.main", *args], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        try:
            marker = save_dir / "global_step_1" / "trainer_state.json"
            deadline = time.monotonic() + 300
            while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), log_path.read_text()[-4000:]
            cluster.remove_node(second, allow_graceful=False)
            lost_at = time.monotonic()
            driver.wait(timeout=120)
            assert time.monotonic() - lost_at < 120
        finally:
            driver.kill()
        text = log_path.read_text()
        assert driver.returncode != 0
        lost_ranks = [rank for rank, node in worker_nodes(text, cluster).items() if node == second.node_id]
        assert len(lost_ranks) == 1, text[-4000:]
        # The first failure reported ends the call: the lost worker's death, or (gloo on CPU notices
        # a vanished peer at once) the survivor's collective breaking off with a connection error.
        lost, survivor = lost_ranks[0], 1 - lost_ranks[0]
        died = re.search(rf"WorkerError: worker rank {lost} \(pid \d+, node \S+\) died during `\w+`", text)
        broke_off = re.search(rf"WorkerError: worker rank {survivor} \(pid \d+, node \S+\) raised in `\w+`", text)
        assert died or (broke_off and "Connection reset by peer" in text), text[-4000:]
        assert "All 2 workers were stopped" in text

        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rerun = run_driver(args, tmp_path / "rerun.log", cluster.address)
    assert re.search(r"resumed from \S*global_step_[1-9]", rerun), rerun[-4000:]
    assert sorted(read_metrics(save_dir)) == [1, 2, 3, 4]
