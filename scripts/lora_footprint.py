"""Memory footprint of one RL worker with LoRA against full fine-tuning: one process per setting.

python scripts/lora_footprint.py --model_path tiny_world/models/qwen2_5_vl [--ranks 0 8] [--device cpu]

For each rank (0 = full fine-tuning) a fresh process builds the worker with the reference role (KL
on), samples a batch, computes old and reference log-probs, takes one optimizer step, and prints:
trainable parameters, the bytes of parameters held (actor + reference model, if any), gradients and
optimizer state, and the peak memory (GPU: torch's peak allocation; CPU: the process's peak RSS,
which includes the Python and torch runtime).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model_path: str, rank: int, device: str, data_file: str) -> dict[str, float]:
    import torch

    from verl.protocol import SamplingParams
    from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
    from verl.workers.config import WorkerConfig
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    config = WorkerConfig()
    config.actor.model.model_path = model_path
    config.actor.model.lora.rank = rank
    config.actor.micro_batch_size_per_device_for_update = 4
    worker = ActorRolloutRefWorker(config, device=device, need_ref=True, seed=0)
    sizes = worker.init_model()
    dataset = PromptDataset(data_file, worker.tokenizer, worker.processor, PromptDatasetConfig())
    prompts = next(iter(PromptLoader(dataset, 4, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id)))
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=1)
    batch = worker.generate_sequences(prompts)
    batch.meta_info = {"temperature": 1.0, "mini_batch_size": len(batch)}
    batch = batch.union(worker.compute_log_probs(batch).select(["old_log_probs"]))
    batch = batch.union(worker.compute_ref_log_probs(batch))
    batch.batch["advantages"] = torch.linspace(-1.0, 1.0, len(batch))[:, None] * batch.batch["response_mask"]
    worker.update_actor(batch)
    models = [worker.model] + ([worker.ref_model] if worker.ref_model is not None else [])
    optimizer_state = [v for state in worker.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    trainable = [p for p in worker.model.parameters() if p.requires_grad]
    if worker.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux
    return {
        "lora_rank": rank,
        "params": sizes["actor_params"],
        "trainable_params": sizes["trainable_params"],
        "reference_model_loaded": worker.ref_model is not None,
        "param_MiB": tensor_bytes(p for m in models for p in m.parameters()) / 2**20,
        "grad_MiB": tensor_bytes(trainable) / 2**20,
        "optimizer_state_MiB": tensor_bytes(optimizer_state) / 2**20,
        "peak_MiB": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument(
        "--data_file", required=True, help="a prompt parquet file (e.g. tiny_world/data/digit_sum/val.parquet)"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 8], help="LoRA ranks to compare (0: full)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the per-setting child
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.model_path, args.one, args.device, args.data_file)))
        return
    rows = []
    for rank in args.ranks:
        command = [sys.executable, __file__, f"--model_path={args.model_path}", f"--data_file={args.data_file}"]
        out = subprocess.run([*command, f"--device={args.device}", f"--one={rank}"], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-4000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
