"""The Ray backend: a resource pool of placement groups, one Ray actor per device hosting one worker,
and the worker group that dispatches the controller's calls to them.

Nothing here waits without a deadline. A worker that raises, dies or overruns ends the call with a
`WorkerError` naming the worker (and carrying its traceback); the group then stops every worker,
since the survivors may be blocked in a collective with the one that failed.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verl.protocol import DataProto
from verl.single_controller.dispatch import (
    GROUP_KEY_ATTR,
    TP_SIZE_ATTR,
    Dispatch,
    check_tp_size,
    merge_from_dp,
    merge_from_tp_groups,
    registered_methods,
    split_by_dp,
    split_by_tp_groups,
)
from verl.utils.network import free_port

logger = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 300.0
"""Placement groups, worker start-up and joining the process group."""
CALL_TIMEOUT_S = 3600.0
"""One worker-group call (a whole generation, a whole update)."""
POLL_S = 1.0


class WorkerError(RuntimeError):
    """A worker raised, died or did not answer in time; the message names it and says what happened."""


def init_ray(nnodes: int) -> None:
    """Connect to the running cluster (`RAY_ADDRESS` set, or several nodes), else start a local one."""
    if ray.is_initialized():
        return
    if nnodes > 1 or os.environ.get("RAY_ADDRESS"):
        # A multi-node cluster is started by hand: see docs/multi_node.md.
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    else:
        # "local": a new instance of our own, never a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)


# --- resources -----------------------------------------------------------------------------------
@dataclass
class ResourcePool:
    """`nnodes` x `workers_per_node` worker slots; each node's slots are one placement group packed
    on a single node, so a node's workers can share its fast interconnect."""

    nnodes: int
    workers_per_node: int
    use_gpu: bool
    cpus_per_worker: float = 1.0
    placement_groups: list[PlacementGroup] = field(default_factory=list, init=False)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.workers_per_node

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}

    def create(self, timeout_s: float = SETUP_TIMEOUT_S) -> None:
        """Reserve the slots, failing with a message (never waiting forever) when the cluster lacks them."""
        self._check_cluster()
        for node in range(self.nnodes):
            group = placement_group([self.bundle()] * self.workers_per_node, strategy="STRICT_PACK")
            self.placement_groups.append(group)
            try:
                ray.get(group.ready(), timeout=timeout_s)
            except GetTimeoutError:
                self.remove()
                raise RuntimeError(
                    f"resource pool: node group {node} ({self.workers_per_node} x {self.bundle()}) was not "
                    f"placed within {timeout_s:.0f}s; free resources: {ray.available_resources()}"
                ) from None

    def slots(self) -> list[tuple[PlacementGroup, int]]:
        """(placement group, bundle index) of every worker, in rank order."""
        return [(group, index) for group in self.placement_groups for index in range(self.workers_per_node)]

    def remove(self) -> None:
        for group in self.placement_groups:
            remove_placement_group(group)
        self.placement_groups = []

    def _check_cluster(self) -> None:
        need = {key: value * self.workers_per_node for key, value in self.bundle().items()}
        nodes = [node for node in ray.nodes() if node["Alive"]]
        fitting = [node for node in nodes if all(node["Resources"].get(k, 0) >= v for k, v in need.items())]
        if len(fitting) < self.nnodes:
            have = "; ".join(
                f"{node['NodeManagerAddress']}: CPU {node['Resources'].get('CPU', 0):g}, "
                f"GPU {node['Resources'].get('GPU', 0):g}"
                for node in nodes
            )
            raise RuntimeError(
                f"resource pool: trainer.nnodes={self.nnodes} x trainer.n_gpus_per_node={self.workers_per_node} "
                f"needs {self.nnodes} node(s) with {need} each, but only {len(fitting)} of the cluster's nodes "
                f"have that ({have})"
            )


# --- the actor that hosts a worker ---------------------------------------------------------------
class WorkerHost:
    """Runs inside one Ray actor: joins the job's process group, then holds one worker and runs its methods."""

    def __init__(self, torch_threads: int | None) -> None:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.worker: Any = None

    def identity(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port, for the process group's rendezvous (asked of rank 0)."""
        return ray.util.get_node_ip_address(), free_port()

    def start(
        self, rank: int, world_size: int, master: tuple[str, int], worker_cls: type, kwargs: dict
    ) -> tuple[int, str | None]:
        """Build the worker; returns what the dispatch needs of it: its tensor-parallel size and group key."""
        # torchrun-style variables: the worker joins the process group from them. Ray gives each
        # actor only its own GPU, so the local device index is always 0.
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
        )
        self.worker = worker_cls(**kwargs)
        return int(getattr(self.worker, TP_SIZE_ATTR, 1)), getattr(self.worker, GROUP_KEY_ATTR, None)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)


# --- the group -----------------------------------------------------------------------------------
class RayWorkerGroup:
    """One `worker_cls(**worker_kwargs)` per slot of `resource_pool`; its `@register`ed methods are
    methods of the group (`group.update_actor(batch)`), dispatched by their modes."""

    def __init__(
        self,
        resource_pool: ResourcePool,
        worker_cls: type,
        worker_kwargs: dict[str, Any],
        torch_threads: int | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
        setup_timeout_s: float = SETUP_TIMEOUT_S,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayWorkerGroup: Ray is not initialised (call verl.single_controller.ray.init_ray)")
        self.methods = registered_methods(worker_cls)
        self.worker_name = worker_cls.__name__
        self.call_timeout_s = call_timeout_s
        self.world_size = resource_pool.world_size
        self.stopped_because: str | None = None
        if not resource_pool.placement_groups:
            resource_pool.create(setup_timeout_s)
        self.resource_pool = resource_pool
        host_cls = ray.remote(WorkerHost)
        self.hosts = [
            host_cls.options(
                num_cpus=resource_pool.cpus_per_worker,
                num_gpus=1 if resource_pool.use_gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=index
                ),
            ).remote(torch_threads)
            for group, index in resource_pool.slots()
        ]
        self.identities: list[dict[str, Any]] = [{"pid": "?", "node": "?"} for _ in self.hosts]  # until they answer
        self.identities = self._gather([h.identity.remote() for h in self.hosts], "identity", setup_timeout_s)
        master = self._gather([self.hosts[0].master_address.remote()], "master_address", setup_timeout_s)[0]
        starts = [
            host.start.remote(rank, self.world_size, master, worker_cls, worker_kwargs)
            for rank, host in enumerate(self.hosts)
        ]
        started = self._gather(starts, f"{self.worker_name}.__init__", setup_timeout_s)
        if len(set(started)) != 1:
            raise ValueError(
                f"{self.worker_name}: the workers state different (tensor-parallel size, group key) {started}"
            )
        self.tp_size, self.group_key = started[0]
        check_tp_size(self.world_size, self.tp_size)
        for rank, who in enumerate(self.identities):
            logger.info("worker rank %d: pid %d on node %s", rank, who["pid"], who["node"])

    @property
    def worker_pids(self) -> list[int]:
        return [who["pid"] for who in self.identities]

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods", {})
        if name not in methods:
            raise AttributeError(f"RayWorkerGroup: {name!r} is not a @register'ed method of the worker class")
        return functools.partial(self.execute, name, methods[name])

    def execute(self, method: str, mode: Dispatch, *args: Any, **kwargs: Any) -> Any:
        """Run `method` on the workers as `mode` says; see verl.single_controller.dispatch."""
        if self.stopped_because is not None:
            raise WorkerError(f"`{method}`: the worker group was stopped earlier: {self.stopped_because}")
        if mode is Dispatch.ONE_TO_ALL:
            refs = [host.call.remote(method, args, kwargs) for host in self.hosts]
            return self._gather(refs, method, self.call_timeout_s)[0]
        if mode is Dispatch.RANK_ZERO:
            return self._gather([self.hosts[0].call.remote(method, args, kwargs)], method, self.call_timeout_s)[0]
        data = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(data, DataProto):
            raise TypeError(f"`{method}` dispatches by data-parallel rank: call it with one DataProto argument")
        if mode is Dispatch.TP_GROUP_COMPUTE:
            shards, split = split_by_tp_groups(data, self.world_size, self.tp_size, self.group_key)
            refs = [host.call.remote(method, (shard,), {}) for host, shard in zip(self.hosts, shards)]
            return merge_from_tp_groups(self._gather(refs, method, self.call_timeout_s), split, self.tp_size)
        shards, split = split_by_dp(data, self.world_size, self.group_key)
        refs = [host.call.remote(method, (shard,), {}) for host, shard in zip(self.hosts, shards)]
        return merge_from_dp(self._gather(refs, method, self.call_timeout_s), split)

    def shutdown(self) -> None:
        """Stop every worker and free the slots; calling it again does nothing."""
        if self.stopped_because is None:
            self.stopped_because = "it was shut down"
        for host in self.hosts:
            ray.kill(host, no_restart=True)
        self.hosts = []
        self.resource_pool.remove()

    # --- waiting -------------------------------------------------------------------------------
    def _gather(self, refs: list[ray.ObjectRef], method: str, timeout_s: float) -> list[Any]:
        """Results in rank order; the first failure (not the last) ends the wait."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = sorted(rank_of[ref] for ref in pending)
                self._stop(f"`{method}` did not finish within {timeout_s:g}s on worker rank(s) {late}")
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(remaining, POLL_S))
            for ref in ready:
                rank = rank_of[ref]
                try:
                    # Ready, but a large result may still have to come from another node.
                    results[rank] = ray.get(ref, timeout=max(deadline - time.monotonic(), POLL_S))
                except RayTaskError as exc:
                    self._stop(f"{self._describe(rank)} raised in `{method}`:\n{exc}", exc)
                except RayActorError as exc:
                    self._stop(f"{self._describe(rank)} died during `{method}`: {_death_reason(exc)}", exc)
                except GetTimeoutError:
                    self._stop(f"the result of `{method}` from {self._describe(rank)} did not arrive in time")
                except RayError as exc:
                    self._stop(f"{self._describe(rank)} failed in `{method}`: {exc}", exc)
        return [results[rank] for rank in range(len(refs))]

    def _describe(self, rank: int) -> str:
        who = self.identities[rank]
        return f"worker rank {rank} (pid {who['pid']}, node {who['node']})"

    def _stop(self, reason: str, cause: BaseException | None = None) -> None:
        self.stopped_because = reason.splitlines()[0]
        self.shutdown()
        raise WorkerError(f"{reason}\nAll {self.world_size} workers were stopped; the run cannot continue.") from cause


def start_worker_group(
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    nnodes: int,
    workers_per_node: int,
    device: str,
    torch_threads: int | None = None,
    setup_timeout_s: float = SETUP_TIMEOUT_S,
    call_timeout_s: float = CALL_TIMEOUT_S,
) -> RayWorkerGroup:
    """Ray (joined or started), a pool of `nnodes` x `workers_per_node` slots and one `worker_cls`
    per slot, built with `worker_kwargs` plus the resolved `device` (auto: cuda when the cluster
    has GPUs). CPU workers share a node's cores, one torch thread per core they hold."""
    init_ray(nnodes)
    cluster = ray.cluster_resources()
    if device == "auto":
        device = "cuda" if cluster.get("GPU", 0) > 0 else "cpu"
    on_gpu = device == "cuda"
    cpus_per_worker = 1.0 if on_gpu else cluster.get("CPU", 1.0) / (nnodes * workers_per_node)
    threads = torch_threads or (None if on_gpu else max(1, int(cpus_per_worker)))
    pool = ResourcePool(nnodes, workers_per_node, use_gpu=on_gpu, cpus_per_worker=cpus_per_worker)
    return RayWorkerGroup(
        pool,
        worker_cls,
        {**worker_kwargs, "device": device},
        torch_threads=threads,
        call_timeout_s=call_timeout_s,
        setup_timeout_s=setup_timeout_s,
    )


def _death_reason(exc: RayActorError) -> str:
    """Ray's summary line and its reason line (exit type, OOM hints), without the actor's ids."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines[1:] if line.startswith("The actor is dead because")]
    return " ".join(lines[:1] + reasons) if lines else type(exc).__name__
