"""One rank of a two-process tensor-parallel vLLM rollout (run by tests/test_vllm_rollout.py).

    python tests/vllm_tp_rank.py TINY_WORLD OUT_DIR   # with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* set

Builds the real worker (FSDP actor sharded over the two ranks, vLLM engine with
tensor_parallel_size=2 on the external launcher), samples the same prompts greedily on both ranks,
and saves its output and the hf engine's on the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from verl.models.loading import load_model
from verl.protocol import DataProto, SamplingParams
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.rollout.hf_rollout import HFRollout


def main(tiny_world: Path, out_dir: Path) -> None:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_text")
    config.actor.use_kl_loss = False
    config.rollout.name = "vllm"
    config.rollout.enforce_eager = True
    config.rollout.tensor_parallel_size = 2
    config.rollout.prompt_length, config.rollout.response_length = 320, 32
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    dataset = PromptDataset(
        str(tiny_world / "data/text_sum/val.parquet"), worker.tokenizer, None, PromptDatasetConfig()
    )
    prompts: DataProto = next(
        iter(PromptLoader(dataset, 8, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id))
    )
    prompts.meta_info = {"sampling": SamplingParams(max_new_tokens=16, temperature=0.0)}
    out = worker.generate_sequences(prompts)
    rank = int(os.environ["RANK"])
    # The hf engine on the same (untrained) weights, read from the model folder in full.
    model = load_model(config.actor.model.model_path, torch.float32, "sdpa")
    reference = HFRollout(model=model, tokenizer=worker.tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=16, temperature=0.0)
    )
    engine_tp = worker.rollout.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    torch.save(
        {
            "vllm": out.batch["responses"],
            "hf": reference.batch["responses"],
            "mask": out.batch["response_mask"],
            "engine_tp": engine_tp,
        },
        out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
