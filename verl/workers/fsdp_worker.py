"""One worker per device holding the actor (trained), its rollout engine and the reference model.

The controller talks to it only through a worker group (verl.single_controller); the same class
runs in-process (`trainer.backend=local`) and as a Ray actor. With several workers (or on a GPU)
the models are sharded with FSDP2 (verl.workers.fsdp_utils); a single CPU worker keeps plain modules.

Checkpoints are in the layout every worker shares (verl/workers/checkpoint.py): a Hugging Face
folder plus the optimizer state's shards, loadable into any number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

from verl.models.loading import (
    freeze_vision_parts,
    load_tokenizer_and_processor,
    resolve_attn_implementation,
    resolve_dtype,
)
from verl.protocol import DataProto, SamplingParams
from verl.single_controller.dispatch import Dispatch, register
from verl.utils.device import resolve_device
from verl.workers import checkpoint, fsdp_utils, lora
from verl.workers.actor.dp_actor import ADDITIVE_METRICS, DataParallelActor
from verl.workers.config import FSDPConfig, WorkerConfig
from verl.workers.optimizer import build_lr_scheduler, build_optimizer
from verl.workers.rollout import get_rollout_engine

logger = logging.getLogger(__name__)


class ActorRolloutRefWorker:
    """Roles: actor + rollout always; reference when `need_ref` (KL on).

    With LoRA (`worker.actor.model.lora.rank > 0`) the actor trains only its adapters and there is no
    second model: the reference policy is the actor with its adapters switched off.
    """

    def __init__(self, config: WorkerConfig, device: str = "auto", need_ref: bool = True, seed: int = 1) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.need_ref = need_ref
        self.seed = seed
        self.rank, self.world_size = fsdp_utils.init_distributed(self.device)
        self.sharded = dist.is_initialized()
        # Ranks that share one tensor-parallel rollout engine (consecutive ranks, as vLLM groups
        # them); the worker group reads this to dispatch `generate_sequences` over the groups.
        self.dispatch_tp_size = config.rollout.tensor_parallel_size
        if self.world_size % self.dispatch_tp_size:
            raise ValueError(
                f"worker.rollout.tensor_parallel_size={self.dispatch_tp_size} does not divide {self.world_size} workers"
            )
        # One weight sync per change of the actor's weights: `weights_version` counts the changes
        # (updates, checkpoint loads), `engine_version` is the one the engine last received; every
        # generation of a step (rollout, self-reward and counterfactual passes, ReMax baselines,
        # validation) reuses the synced engine until the next change.
        self.weights_version = 0
        self.engine_version: int | None = None
        self.weight_syncs = 0  # since the last update's metrics
        self.engine_active = False  # the engine woke and may hold device memory until a stage needs it
        self.phase_memory: dict[str, float] = {}  # peak device memory per phase, since the last update
        # Shared-prompt forwards need a GRPO group's rows on one rank: the worker group's data-parallel
        # dispatch keeps runs of equal `uid`s together (verl/single_controller/dispatch.py).
        self.dispatch_group_key = "uid" if config.actor.shares_prompts else None
        self.prompt_forwards: list[float] = []  # per log-prob pass since the last update, over all ranks

    # --- setup -------------------------------------------------------------------------------
    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict[str, int]:
        model_cfg = self.config.actor.model
        # The trainers check this at config load; a worker built by other code must not train a
        # family on a path it refuses (Qwen3.5 padding-free would mix rows' states silently).
        self.config.actor.check_family("worker.actor")
        torch.manual_seed(self.seed)
        self.tokenizer, self.processor = load_tokenizer_and_processor(
            model_cfg.tokenizer_path or model_cfg.model_path, model_cfg.trust_remote_code
        )
        on_gpu = self.device.type == "cuda"
        actor_dtype = resolve_dtype(self.config.actor.fsdp.torch_dtype, torch.float32)
        self.peft_model = None
        self.model = self._build_model(actor_dtype, self.config.actor.fsdp, trainable=True)
        if model_cfg.lora.adapter_path:
            lora.load_adapter(model_cfg.lora.adapter_path, self.model, model_cfg.lora)
            if self.need_ref and self.rank == 0:
                logger.warning(
                    "worker.actor.model.lora.adapter_path: the reference policy is %s without this adapter, so the KL "
                    "term pulls the policy back towards it; to keep the adapted model as the reference, merge the "
                    "adapter (scripts/model_merger.py) and train new adapters on the merged folder",
                    model_cfg.model_path,
                )
        self.ref_model = None
        if self.need_ref and self.peft_model is None:
            ref_dtype = resolve_dtype(self.config.ref.fsdp.torch_dtype, torch.bfloat16 if on_gpu else torch.float32)
            self.ref_model = self._build_model(ref_dtype, self.config.ref.fsdp, trainable=False).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, self.config.actor.optim)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.config.actor.optim)
        # Moving from the CPU to the CPU frees nothing: offload is a GPU matter.
        actor_offload, ref_offload = self.config.actor.offload, self.config.ref.offload
        self.actor_offload = fsdp_utils.CPUOffload(
            self.device,
            self.model,
            self.optimizer,
            actor_offload.offload_params and on_gpu,
            actor_offload.offload_optimizer and on_gpu,
        )
        self.ref_offload = fsdp_utils.CPUOffload(
            self.device, self.ref_model, params=ref_offload.offload_params and on_gpu
        )
        rollout_cfg = self.config.rollout
        engine_class = get_rollout_engine(rollout_cfg.name)
        # An engine with weights of its own (vllm) leaves the actor idle while it generates; the hf
        # engine generates with the actor's module, which must then stay on the device.
        shares_actor = getattr(engine_class, "shares_actor_module", False)
        self.offload_actor_for_generation = actor_offload.offload_during_generation and on_gpu and not shares_actor
        self.offload_ref_for_generation = ref_offload.offload_during_generation and on_gpu
        self.actor = DataParallelActor(
            self.config.actor,
            self.model,
            self.optimizer,
            ref_model=self.ref_model if self.config.actor.kl_penalty == "full" else None,
        )
        self.ref_actor = DataParallelActor(self.config.actor, self.ref_model) if self.ref_model is not None else None
        if self.need_ref and self.peft_model is not None:
            self.ref_actor = DataParallelActor(self.config.actor, self.model)  # run with the adapters off
        # Offloaded before the engine is built: vLLM refuses to start unless `gpu_memory_utilization`
        # of the device is free.
        self.actor_offload.offload()
        self.ref_offload.offload()
        self._offload_for_generation()
        self.rollout = engine_class(
            model=self.model,
            tokenizer=self.tokenizer,
            processor=self.processor,
            config=rollout_cfg,
            micro_batch_size=rollout_cfg.micro_batch_size,
            device=self.device,
        )
        return {
            # Sharded parameters report their full size.
            "actor_params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in params),
        }

    def _build_model(self, dtype: torch.dtype, fsdp_cfg: FSDPConfig, trainable: bool) -> torch.nn.Module:
        """The policy weights as the actor (trainable) or the reference (frozen), sharded when distributed."""
        model_cfg = self.config.actor.model
        attn = resolve_attn_implementation(model_cfg.attn_implementation, self.device)
        if trainable and self.config.actor.padding_free and self.device.type == "cuda" and attn != "flash_attention_2":
            logger.warning(
                "worker.actor.padding_free with attn_implementation=%s: packed rows attend through one "
                "block-diagonal mask whose memory and time grow with the square of a micro-batch's tokens; "
                "install flash-attn (bash setup.sh --gpu) or bound micro-batches with worker.actor.dynamic_batching",
                attn,
            )

        def prepare(model: torch.nn.Module) -> None:
            model.requires_grad_(trainable)
            if trainable and model_cfg.lora.enabled:
                # Freezes every base weight (the vision tower included); only the adapters train.
                self.peft_model = lora.apply_lora(model, model_cfg.lora)
            elif trainable:
                # As in EasyR1: freezing the vision tower freezes its projector too.
                freeze = model_cfg.freeze_vision_tower
                if not freeze_vision_parts(model, freeze_tower=freeze, freeze_projector=freeze) and freeze:
                    raise ValueError("worker.actor.model.freeze_vision_tower=true but the model has no vision tower")
            if trainable and model_cfg.enable_gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        return fsdp_utils.build_model(
            model_cfg.model_path,
            dtype,
            attn,
            model_cfg.trust_remote_code,
            self.device,
            prepare,
            fsdp_size=fsdp_cfg.fsdp_size,
            mp_policy=fsdp_utils.mixed_precision(self.device, fsdp_cfg.mp_param_dtype),
            full_shard=fsdp_cfg.enable_full_shard,
        )

    # --- stages ----------------------------------------------------------------------------
    @register(Dispatch.TP_GROUP_COMPUTE)
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Sample with `prompts.meta_info["sampling"]` (a SamplingParams)."""
        sampling: SamplingParams = prompts.meta_info["sampling"]
        # Tensor-parallel groups sample different prompts: each gets its own random stream (group 0
        # keeps the given seed); the ranks of one group must sample identically, so share its seed.
        group = self.rank // self.dispatch_tp_size
        sampling = dataclasses.replace(sampling, seed=sampling.seed + group * 2**32)
        self._sync_engine()
        self._offload_for_generation()
        if self.rollout.shares_actor_module:
            with self.actor_offload.loaded(), self._gathered(self.model), self._phase("gen"):
                return self.rollout.generate(prompts, sampling)
        with self._phase("gen"):
            return self.rollout.generate(prompts, sampling)

    def _sync_engine(self) -> None:
        """Give the engine the actor's current weights, unless it holds them already.

        The engine stays awake after generating, so the self-reward and counterfactual passes (and
        every other generation before the weights change) sample from the weights synced once. The
        hf engine shares the actor's module: its sync copies nothing but is counted the same way.
        """
        self.engine_active = True
        if self.engine_version == self.weights_version and self.rollout.holds_weights:
            return
        loaded = nullcontext() if self.rollout.shares_actor_module else self.actor_offload.loaded()
        with loaded, self._phase("weight_sync"):
            self.rollout.wake()
            self.rollout.sync_weights(self.model)
        self.engine_version = self.weights_version
        self.weight_syncs += 1

    def _offload_for_generation(self) -> None:
        """Models the engine does not run leave the device before its KV cache wakes (GPU only)."""
        if self.offload_actor_for_generation:
            self.actor_offload.offload_all()
        if self.offload_ref_for_generation:
            self.ref_offload.offload_all()

    def _release_engine(self) -> None:
        """Before a stage that computes with the actor or the reference: the engine gives the device
        back (on a GPU, vLLM frees its weights and KV cache; the next generation syncs again)."""
        if self.engine_active:
            self.rollout.sleep()
            self.engine_active = False

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Peak device memory of one phase (its maximum over the calls since the last update),
        reported in the update's metrics: `perf/max_memory_allocated_gb/<phase>` and
        `perf/max_memory_reserved_gb/<phase>` (torch's caching allocator), and
        `perf/device_memory_used_gb/<phase>` (the whole device at the phase's end as the driver
        sees it, whichever allocator holds it: vLLM's KV cache included). GPU only: nothing is
        recorded on CPU."""
        if self.device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        free, total = torch.cuda.mem_get_info(self.device)
        peaks = {
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated(self.device),
            "max_memory_reserved_gb": torch.cuda.max_memory_reserved(self.device),
            "device_memory_used_gb": total - free,
        }
        for key, value in peaks.items():
            metric = f"perf/{key}/{name}"
            self.phase_memory[metric] = max(self.phase_memory.get(metric, 0.0), value / 2**30)

    @register(Dispatch.DP_COMPUTE)
    def compute_log_probs(self, data: DataProto) -> DataProto:
        self._release_engine()
        with self.actor_offload.loaded(), self._phase("old_log_prob"):
            log_probs, entropy = self.actor.compute_log_probs(
                data,
                data.meta_info["temperature"],
                self.config.actor.micro_batch_size_per_device_for_experience,
                with_entropy=True,
            )
            fsdp_utils.release_gathered(self.model)
        self.prompt_forwards.append(fsdp_utils.sum_across_ranks(float(self.actor.prompt_forwards)))
        return DataProto.from_dict(tensors={"old_log_probs": log_probs, "entropy": entropy})

    @register(Dispatch.DP_COMPUTE)
    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        if self.ref_actor is None:
            raise RuntimeError("compute_ref_log_probs called on a worker without the reference role")
        self._release_engine()
        if self.peft_model is not None:  # LoRA: the reference is the base model, i.e. the adapters off
            loaded, ref_model = self.actor_offload.loaded(), self.model
            base_policy = lora.adapters_disabled(self.peft_model)
        else:
            loaded, ref_model, base_policy = self.ref_offload.loaded(), self.ref_model, nullcontext()
        with loaded, base_policy, self._phase("ref"):
            log_probs, _ = self.ref_actor.compute_log_probs(
                data, data.meta_info["temperature"], self.config.ref.micro_batch_size_per_device_for_experience
            )
            fsdp_utils.release_gathered(ref_model)
        self.prompt_forwards.append(fsdp_utils.sum_across_ranks(float(self.ref_actor.prompt_forwards)))
        return DataProto.from_dict(tensors={"ref_log_probs": log_probs})

    @register(Dispatch.DP_COMPUTE)
    def update_actor(self, data: DataProto) -> DataProto:
        # The dispatch gives every rank an equal share of each mini-batch, in mini-batch order.
        mini_batch_size = data.meta_info["mini_batch_size"] // self.world_size
        # kl_penalty=full compares with the reference model inside the update.
        ref_loaded = self.ref_offload.loaded() if self.actor.ref_model is not None else nullcontext()
        self._release_engine()
        with self.actor_offload.loaded(with_optimizer=True), ref_loaded, self._phase("update_actor"):
            metrics = self.actor.update_policy(data, data.meta_info["temperature"], mini_batch_size)
        self.weights_version += 1
        metrics = fsdp_utils.all_reduce_metrics(metrics, summed=ADDITIVE_METRICS)
        metrics["actor/lr"] = self.lr_scheduler.get_last_lr()[0]
        # Since the previous update: one per change of the weights however often the step generated.
        metrics["perf/weight_syncs"] = float(self.weight_syncs)
        metrics.update(fsdp_utils.max_across_ranks(self.phase_memory))
        if self.prompt_forwards:
            # Prompt encodings per log-prob pass (old, ref) of the step, all ranks together; the
            # trainer divides by the step's groups (perf/prompt_forwards_per_group).
            metrics["perf/prompt_forwards"] = sum(self.prompt_forwards) / len(self.prompt_forwards)
        self.weight_syncs, self.phase_memory, self.prompt_forwards = 0, {}, []
        self.lr_scheduler.step()
        return DataProto.from_dict(meta_info={"metrics": metrics})

    def _gathered(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Parameters gathered for a whole generation when sharded (see fsdp_utils.gathered_parameters).

        Only the hf engine runs the actor's own module; other engines hold their own copy of the weights.
        """
        if not self.sharded or self.config.rollout.name != "hf":
            return nullcontext()
        return fsdp_utils.gathered_parameters(model, self.config.actor.fsdp.enable_full_shard)

    # --- checkpoints -------------------------------------------------------------------------
    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """The shared worker layout (verl/workers/checkpoint.py) plus `worker_config.json`."""
        self._release_engine()
        with self.actor_offload.loaded(with_optimizer=True):
            checkpoint.save_checkpoint(
                path, self.model, self.optimizer, self.lr_scheduler, self.tokenizer, self.processor, self.peft_model
            )
        if self.rank == 0:
            with open(os.path.join(path, "worker_config.json"), "w") as f:
                json.dump(asdict(self.config), f, indent=2, default=str)

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Restore weights, optimizer, scheduler and RNG from a checkpoint written by any number of workers."""
        checkpoint.require_complete(path)
        self._release_engine()
        with self.actor_offload.loaded(with_optimizer=True):
            checkpoint.load_checkpoint(path, self.model, self.optimizer, self.lr_scheduler)
        self.weights_version += 1
