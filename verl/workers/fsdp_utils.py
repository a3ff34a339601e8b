"""FSDP2 for the worker: joining the process group, sharding, mixed precision, loading large models
from rank 0, unsharding for generation, CPU offload (between stages and around generation) and
sharded checkpoints.

Sharding layout: every decoder layer is its own FSDP unit; everything else (embeddings, the whole
vision tower, final norm, head) is the root unit. Keeping the vision tower in the root unit means
its parameters are gathered on every rank at every forward, whether or not that rank's micro-batch
holds images, and `reduce_scatter_unused_params` makes text-only ranks contribute zero gradients for
it. So ranks with and without images issue the same collectives in the same order and a mixed batch
can never hang: this takes the place of a dummy vision pass, without hooking into the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from verl.models.loading import load_model, resolve_dtype, vision_tower
from verl.utils.network import free_port

# Collectives (and joining the group) give up after this long instead of waiting forever on a dead peer.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


# --- process group -------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group described by torchrun-style variables and return (rank, world size).

    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set by the Ray worker group (or torchrun).
    Without them a CPU worker stays a plain single process; a single GPU worker still forms a
    group of one, because FSDP2 (mixed precision, offload, sharded saves) needs one.
    Backends: gloo on CPU, NCCL for GPU tensors (with gloo beside it for CPU tensors).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if world_size == 1 and device.type != "cuda":
        return 0, 1
    if world_size == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed: WORLD_SIZE={world_size} but {missing} are not set")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def build_device_mesh(device: torch.device, fsdp_size: int) -> DeviceMesh:
    """1-D mesh (full sharding over all ranks), or a 2-D (replicate, shard) mesh for hybrid
    sharding when `fsdp_size` ranks form one shard group."""
    world_size = dist.get_world_size()
    if fsdp_size <= 0 or fsdp_size >= world_size:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    if world_size % fsdp_size:
        raise ValueError(f"worker.actor.fsdp.fsdp_size={fsdp_size} must divide the number of workers ({world_size})")
    return init_device_mesh(device.type, (world_size // fsdp_size, fsdp_size), mesh_dim_names=("replicate", "shard"))


def mixed_precision(device: torch.device, param_dtype: str) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (bf16) with fp32 gradient reduction on GPU; plain fp32 on CPU."""
    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=resolve_dtype(param_dtype), reduce_dtype=torch.float32)


# --- sharding ------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (`_no_split_modules`) outside the vision tower, in order."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    tower = vision_tower(model)
    in_tower = {id(m) for m in tower.modules()} if tower is not None else set()
    layers = [m for m in model.modules() if type(m).__name__ in block_names and id(m) not in in_tower]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (_no_split_modules={block_names})")
    return layers


def shard_model(
    model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, full_shard: bool
) -> FSDPModule:
    """Apply FSDP2 in place (see the module docstring for the layout). With `full_shard` False the
    parameters stay gathered from forward to backward (only gradients and optimizer states are
    sharded): less communication, more memory."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=full_shard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    model.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def build_model(
    path: str,
    dtype: torch.dtype,
    attn_implementation: str,
    trust_remote_code: bool,
    device: torch.device,
    prepare: Callable[[torch.nn.Module], None],
    fsdp_size: int = -1,
    mp_policy: MixedPrecisionPolicy | None = None,
    full_shard: bool = True,
) -> torch.nn.Module:
    """A worker's model: a plain module on `device` in a single process; FSDP2-sharded over every
    rank when the process group is up (see `build_sharded_model`). `prepare` sets it up before
    sharding (requires_grad, gradient checkpointing, LoRA adapters injected in place)."""
    if not dist.is_initialized():
        model = load_model(path, dtype, attn_implementation, trust_remote_code)
        prepare(model)
        return model.to(device)
    return build_sharded_model(
        path,
        dtype,
        attn_implementation,
        trust_remote_code,
        device,
        build_device_mesh(device, fsdp_size),
        mp_policy or MixedPrecisionPolicy(),
        full_shard,
        prepare,
    )


def build_sharded_model(
    path: str,
    dtype: torch.dtype,
    attn_implementation: str,
    trust_remote_code: bool,
    device: torch.device,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    full_shard: bool,
    prepare: Callable[[torch.nn.Module], None],
) -> torch.nn.Module:
    """Load a Hugging Face model on rank 0 only, build it on the meta device elsewhere, let
    `prepare` set it up (requires_grad, gradient checkpointing), shard it, and broadcast rank 0's
    weights and buffers shard by shard.

    Host memory holds one full copy of the model (on rank 0) instead of one per worker.
    """
    rank = dist.get_rank()
    model = (load_model if rank == 0 else _meta_model)(path, dtype, attn_implementation, trust_remote_code)
    prepare(model)
    full_state, buffers = {}, {}
    if rank == 0:
        # Taken after `prepare`, which may add parameters (LoRA adapters, initialised on rank 0).
        full_state = model.state_dict()
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    shard_model(model, mesh, mp_policy, full_shard)
    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers (rotary frequencies) are not in the state dict but were emptied above: broadcast them too.
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def _meta_model(path: str, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool) -> torch.nn.Module:
    """The model's structure without memory; the generation config comes from the folder as
    `from_pretrained` would read it (EOS ids differ from the model config's)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    auto_cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_cls.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def fsdp_modules(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def release_gathered(model: torch.nn.Module) -> None:
    """Free parameters a no-grad forward left gathered: the root unit keeps its parameters after
    forward (for the backward that usually follows), a full copy of embeddings and vision tower."""
    for unit in fsdp_modules(model):
        unit.reshard()


def sum_across_ranks(value: float) -> float:
    """`value` summed over all ranks (itself when not distributed)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item())


def max_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over all ranks (every rank passes the same keys)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist()))


def all_reduce_metrics(metrics: dict[str, float], summed: Collection[str]) -> dict[str, float]:
    """Whole-batch metrics from every rank's share: keys in `summed` (losses already normalised by
    the global token count) add up over ranks; the others are averaged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[key] for key in keys], dtype=torch.float64)
    dist.all_reduce(values)
    world_size = dist.get_world_size()
    return {key: value if key in summed else value / world_size for key, value in zip(keys, values.tolist())}


@contextmanager
def gathered_parameters(model: torch.nn.Module, full_shard: bool) -> Iterator[None]:
    """Keep every parameter gathered for the duration (generation).

    Ranks take different numbers of decode steps, so no collective may run inside generation: all
    units are gathered once up front (every rank, same order) and released afterwards.
    """
    units = fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(full_shard and unit is not model, recurse=False)


# --- CPU offload between stages and around generation ---------------------------------------------
def move_module(module: torch.nn.Module, device: torch.device) -> None:
    """A module's parameters, their gradients and its buffers to `device`, each as a fresh tensor.

    `nn.Module._apply` is what `module.to()` runs: FSDP2 overrides it to re-register its sharded
    parameters afterwards, and DTensor parameters are swapped in place (`torch.utils.swap_tensors`),
    so the optimizer's state stays keyed by the same parameter objects. `copy=True` gives new
    storage even where a tensor is on `device` already, so a CPU run (the tests) replaces storage
    exactly as a move between devices does.
    """
    module._apply(lambda tensor: tensor.to(device, copy=True))


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """An optimizer's tensor states (moments) to `device`, each as a fresh tensor (see `move_module`)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            # Scalar step counters stay where the optimizer keeps them (AdamW: on the CPU).
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[key] = value.to(device, copy=True)


class CPUOffload:
    """Where a module's parameters (with their gradients) and an optimizer's states are: on the
    device or on the CPU.

    `params` / `optimizer_states` keep them on the CPU between stages; `with offload.loaded():`
    brings the parameters (and with `with_optimizer` the optimizer's states) to the device for one
    stage, and afterwards what the config keeps on the CPU goes back there. `offload_all()` moves
    everything to the CPU (the generation phase of an engine with its own weights); each part
    comes back only when a stage needs it. Moves happen only where a part is not already, so
    nothing is copied twice. The worker turns offload off on a CPU device (nothing to free there);
    the class itself works on any device.
    """

    def __init__(
        self,
        device: torch.device,
        module: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        params: bool = False,
        optimizer_states: bool = False,
    ) -> None:
        self.device = device
        self.module = module
        self.optimizer = optimizer
        self.offload_params = params
        self.offload_optimizer = optimizer_states
        # Models are built on the device; the optimizer's states are created where the parameters are.
        self.params_on_device = True
        self.optimizer_on_device = True

    def offload(self) -> None:
        """What the config keeps on the CPU between stages goes there (nothing comes back)."""
        self.place(
            params=self.params_on_device and not self.offload_params,
            optimizer=self.optimizer_on_device and not self.offload_optimizer,
        )

    def offload_all(self) -> None:
        """Parameters, gradients and optimizer states to the CPU, whatever the config keeps there."""
        self.place(params=False, optimizer=False)

    @contextmanager
    def loaded(self, with_optimizer: bool = False) -> Iterator[None]:
        self.place(params=True, optimizer=with_optimizer or self.optimizer_on_device)
        try:
            yield
        finally:
            self.offload()

    def place(self, params: bool, optimizer: bool) -> None:
        """Parameters (with gradients) and optimizer states on the device (True) or the CPU (False)."""
        host = torch.device("cpu")
        freed = False
        if self.module is not None and params != self.params_on_device:
            move_module(self.module, self.device if params else host)
            freed |= not params
        self.params_on_device = params
        if self.optimizer is not None and optimizer != self.optimizer_on_device:
            move_optimizer_state(self.optimizer, self.device if optimizer else host)
            freed |= not optimizer
        self.optimizer_on_device = optimizer
        if freed and self.device.type == "cuda":
            # Give the cached blocks back to the driver: vLLM allocates its KV cache outside torch's cache.
            torch.cuda.empty_cache()


# --- checkpoints ---------------------------------------------------------------------------------
def save_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: bool = True) -> None:
    """Every rank writes its own shards of the optimizer states, and of the weights unless
    `weights` is False (torch.distributed.checkpoint)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if weights:
        state["model"] = get_model_state_dict(model)
    with warnings.catch_warnings():
        # One plain process writing the layout every worker count reads is intended; torch warns about it.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path)


def load_sharded(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: bool = True) -> None:
    """Load a `save_sharded` folder into `optimizer` (and `model` with `weights`), whatever the
    number of ranks that wrote it and the number reading it (one plain process included)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if weights:
        state["model"] = get_model_state_dict(model)
    with warnings.catch_warnings():
        # One plain process reading a multi-worker save is intended; torch warns about it.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    if weights:
        set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, object] | None]:
    """Unsharded weights and optimizer state (keyed by parameter name; None without `optimizer`),
    on the CPU of rank 0 (other ranks get empty dicts). Works on plain modules too."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, object] | None,
) -> None:
    """Load unsharded weights and optimizer state (as from `full_state`; the optimizer is skipped
    when None) into a plain or sharded model; when distributed, only rank 0's dicts are read and
    the others may be empty."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state or {}, options=options)
