"""CPU offload of the actor (verl/workers/fsdp_utils.py `CPUOffload`): parameters, gradients and
optimizer states leave the device and come back bit for bit, and FSDP2 trains on afterwards exactly
as without the round trip.

On a GPU the worker moves the actor to the CPU while vLLM generates
(`worker.actor.offload.offload_during_generation`); here two FSDP2 ranks (gloo) run the same moves
between two CPU storages (`copy=True`), which is what a device move does to FSDP2's bookkeeping:
every sharded parameter, gradient and moment gets new storage.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from verl.protocol import SamplingParams
from verl.trainer.self_reward import left_padded_prompts
from verl.utils.network import free_port
from verl.workers import fsdp_utils
from verl.workers.config import WorkerConfig


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's shards of every parameter, gradient and optimizer state, cloned."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for name, param in model.named_parameters():
        out[f"param:{name}"] = _local(param.detach()).clone()
        if param.grad is not None:
            out[f"grad:{name}"] = _local(param.grad).clone()
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim:{names[id(param)]}:{key}"] = _local(value).clone()
    return out


def _shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's shards of every parameter, gradient and optimizer moment (holding them keeps
    their storage alive, so a new tensor cannot reuse an old one's address)."""
    tensors = [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return [_local(t) for t in tensors if _local(t).numel() > 0]


def _addresses(tensors: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    """Write a `_snapshot` back into this rank's shards, in place."""
    optimizer.zero_grad(set_to_none=True)
    names = {id(p): name for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            _local(param.detach()).copy_(saved[f"param:{name}"])
        for param, state in optimizer.state.items():
            for key, value in state.items():
                _local(value).copy_(saved[f"optim:{names[id(param)]}:{key}"])


def _rank(rank: int, port: int, model_path: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    config = WorkerConfig()
    config.actor.model.model_path = model_path
    config.actor.optim.lr = 1e-2  # steps large enough to move every weight (constant schedule)
    config.actor.use_kl_loss = False
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    model, optimizer = worker.model, worker.optimizer
    prompts = left_padded_prompts([[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42]], 0)
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    batch = worker.generate_sequences(prompts)  # both ranks sample the same rows (same seed, all rows)
    generator = torch.Generator().manual_seed(0)
    batch.batch["advantages"] = torch.randn(len(batch), 1, generator=generator) * batch.batch["response_mask"]
    batch.meta_info.update(temperature=1.0, mini_batch_size=len(batch))
    batch.batch["old_log_probs"] = worker.compute_log_probs(batch).batch["old_log_probs"]
    share = batch.chunk(2)[rank]
    worker.update_actor(share)  # AdamW moments exist from here on
    for param in model.parameters():  # a gradient on every parameter, as mid-update
        param.grad = param.detach() * 0.5

    offload = fsdp_utils.CPUOffload(torch.device("cpu"), model, optimizer, params=True, optimizer_states=True)
    before, on_device = _snapshot(model, optimizer), _shards(model, optimizer)
    offload.offload_all()
    assert not offload.params_on_device and not offload.optimizer_on_device
    offloaded = _shards(model, optimizer)
    assert len(offloaded) == len(on_device) and not _addresses(offloaded) & _addresses(on_device)
    _assert_identical(_snapshot(model, optimizer), before)
    with offload.loaded(with_optimizer=True):
        assert not _addresses(_shards(model, optimizer)) & _addresses(offloaded)
        _assert_identical(_snapshot(model, optimizer), before)
    # On leaving the stage, what the config keeps on the CPU went back there; the next stage reloads it.
    assert not offload.params_on_device and not offload.optimizer_on_device
    offload.place(params=True, optimizer=True)
    _assert_identical(_snapshot(model, optimizer), before)

    # The next update after the round trip equals the same update from the same state without it.
    optimizer.zero_grad(set_to_none=True)
    worker.update_actor(share)
    after_round_trip = _snapshot(model, optimizer)
    _restore(model, optimizer, before)
    worker.update_actor(share)
    _assert_identical(_snapshot(model, optimizer), after_round_trip)
    changed = [k for k in before if k.startswith("param:") and not torch.equal(after_round_trip[k], before[k])]
    assert changed, "the update moved the weights"
    Path(out, f"rank{rank}.ok").write_text(str(len(changed)))


def test_offload_and_reload_are_exact_and_training_continues_identically(tiny_world, tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tiny_world / "models" / "qwen2_text"), str(tmp_path)), nprocs=2)
    assert all(int((tmp_path / f"rank{rank}.ok").read_text()) > 0 for rank in range(2))
