"""Per-stage time of a tiny-world GRPO step with each actor feature on and off, as the response
length and the group size n grow. Prints a table; not a test.

Three axes: the response length, the group size n, and the prompt length (images resized to
16..1024 merged tokens). Stages timed on the real tiny Qwen2.5-VL worker (real tokenizer and 151,657-token vocabulary),
called directly as the trainer's worker group would: old log-probs, reference log-probs and the
update (generation does not depend on these features and is left out). Responses are sampled once
at the largest length and n, and smaller settings take the first columns / samples, so every
variant scores exactly the same tokens.

Variants: plain (full logits, fixed micro-batches, separate old-log-prob pass); each feature alone
(chunked log-probs, on-policy shortcut, token-budget micro-batches); packed (padding-free rows in
token-budget micro-batches); packed_all (chunked, on-policy, dynamic batching and padding-free);
shared (one prompt forward per group); defaults (the config's defaults: chunked log-probs, the
on-policy shortcut and shared prompts). On CPU
the packed rows attend through sdpa with a block-diagonal mask, whose cost grows with the square of
a micro-batch's tokens; flash-attention's variable-length kernel on GPU has no such cost.

Prompt encodings (`--dp-sizes`, or alone with `--encodings-only`): how many prompt forwards one
shared-prompt log-prob pass runs over `--encoding-prompts` x `--encoding-n` sampled responses when
the batch is shared out over 1, 2, 4, ... data-parallel ranks, with the dispatch balancing rows one
by one (as before whole-group balancing) or keeping GRPO groups whole (`uid`s, what the workers
ask for with shared prompts). The ranks are simulated in this process with the worker group's own
split (verl/single_controller/dispatch.py) and the actor's own micro-batches and prompt grouping;
no model runs, so it takes seconds after sampling. One encoding per group is the floor.

Usage: OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/benchmark_scaling.py [--quick] [--encodings-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from verl.protocol import DataProto, SamplingParams  # noqa: E402
from verl.single_controller.dispatch import split_by_dp  # noqa: E402
from verl.tiny_world import build_tiny_world  # noqa: E402
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts  # noqa: E402
from verl.workers.actor.dp_actor import count_prompt_forwards  # noqa: E402
from verl.workers.actor.micro_batches import micro_batches  # noqa: E402
from verl.workers.config import WorkerConfig  # noqa: E402
from verl.workers.fsdp_worker import ActorRolloutRefWorker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "plain": {"logprob_chunk_size": 0, "on_policy": False, "dynamic_batching": False, "padding_free": False},
    "chunked": {"logprob_chunk_size": 256, "on_policy": False, "dynamic_batching": False, "padding_free": False},
    "on_policy": {"logprob_chunk_size": 0, "on_policy": True, "dynamic_batching": False, "padding_free": False},
    "dynamic": {"logprob_chunk_size": 0, "on_policy": False, "dynamic_batching": True, "padding_free": False},
    "packed": {"logprob_chunk_size": 0, "on_policy": False, "dynamic_batching": True, "padding_free": True},
    "shared": {"logprob_chunk_size": 0, "on_policy": False, "dynamic_batching": False, "shared_prompt": True},
    "defaults": {"logprob_chunk_size": 256, "on_policy": True, "dynamic_batching": False, "shared_prompt": True},
    "packed_all": {"logprob_chunk_size": 256, "on_policy": True, "dynamic_batching": True, "padding_free": True},
}


def tiny_world_path() -> str:
    """VISION_SR1_TINY_WORLD when set (built there if empty), else a fresh build in a temporary folder."""
    world = os.environ.get("VISION_SR1_TINY_WORLD") or tempfile.mkdtemp(prefix="tiny_world_bench_")
    if not os.path.isfile(os.path.join(world, "manifest.json")):
        build_tiny_world(world)
    return world


def make_worker(world: str, micro_update: int, micro_exp: int, max_tokens: int) -> ActorRolloutRefWorker:
    config = WorkerConfig()
    config.actor.model.model_path = os.path.join(world, "models", "qwen2_5_vl")
    config.actor.optim.lr = 1e-6
    config.actor.micro_batch_size_per_device_for_update = micro_update
    config.actor.micro_batch_size_per_device_for_experience = micro_exp
    config.ref.micro_batch_size_per_device_for_experience = micro_exp
    config.actor.max_token_len_per_gpu = max_tokens
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    return worker


def sample_batch(
    worker: ActorRolloutRefWorker, world: str, prompts: int, n: int, length: int, image_tokens: int | None = None
) -> DataProto:
    """`n` responses of up to `length` tokens to each of the first `prompts` digit-sum prompts; with
    `image_tokens`, every image is resized to about that many merged tokens (28 x 28 pixels each; the grid
    rounds it: 256 gives 22 x 11 = 242 for the 2:1 digit pairs)."""
    pixels = image_tokens * 28 * 28 if image_tokens else None
    if pixels:
        # The processor clamps images to its own pixel bounds too (the tiny world's are small).
        image_processor = worker.processor.image_processor
        image_processor.size = {"shortest_edge": min(pixels, 3136), "longest_edge": pixels}
        for name, value in (("min_pixels", min(pixels, 3136)), ("max_pixels", pixels)):
            if hasattr(image_processor, name):
                setattr(image_processor, name, value)
    ds = PromptDataset(
        os.path.join(world, "data", "digit_sum", "val.parquet"),
        worker.tokenizer,
        worker.processor,
        PromptDatasetConfig(
            format_prompt=os.path.join(ROOT, "examples/format_prompt/see_think.jinja"),
            min_pixels=pixels,
            max_pixels=pixels,
            max_prompt_length=8192,
        ),
    )
    batch = collate_prompts([ds[i % len(ds)] for i in range(prompts)], worker.tokenizer.pad_token_id)
    # One uid per prompt, repeated over its samples by the rollout, as the trainer gives them.
    batch.non_tensor_batch["uid"] = np.array([f"prompt{i}" for i in range(prompts)], dtype=object)
    batch.meta_info["sampling"] = SamplingParams(n=n, temperature=1.0, max_new_tokens=length, seed=7)
    return worker.generate_sequences(batch)


def shrink(full: DataProto, n_full: int, n: int, length: int) -> DataProto:
    """The first `n` samples of each group and the first `length` response tokens (prompt columns kept)."""
    rows = [g * n_full + j for g in range(len(full) // n_full) for j in range(n)]
    data = full[rows]
    prompt_len = data.batch["prompts"].shape[1]
    keep = prompt_len + length
    tensors = {
        "prompts": data.batch["prompts"],
        "responses": data.batch["responses"][:, :length],
        "response_mask": data.batch["response_mask"][:, :length],
        "input_ids": data.batch["input_ids"][:, :keep],
        "attention_mask": data.batch["attention_mask"][:, :keep],
        "position_ids": data.batch["position_ids"][..., :keep],
    }
    out = DataProto(tensors, dict(data.non_tensor_batch), {"temperature": 1.0, "mini_batch_size": len(data)})
    # Unequal lengths, as real responses have: row i keeps a share of 50..100% of its tokens.
    lengths = (length * (0.5 + 0.5 * torch.rand(len(out), generator=torch.Generator().manual_seed(0)))).long()
    cut = torch.arange(length)[None, :] >= lengths[:, None]
    out.batch["response_mask"] = out.batch["response_mask"].masked_fill(cut, 0)
    out.batch["attention_mask"] = out.batch["attention_mask"].clone()
    out.batch["attention_mask"][:, prompt_len:] = out.batch["response_mask"]
    scores = torch.randn(len(out))
    out.batch["advantages"] = scores[:, None] * out.batch["response_mask"]
    return out


def time_step(worker: ActorRolloutRefWorker, data: DataProto, variant: dict) -> dict[str, float]:
    actor_cfg = worker.config.actor
    actor_cfg.logprob_chunk_size = variant["logprob_chunk_size"]
    actor_cfg.dynamic_batching = variant["dynamic_batching"]
    actor_cfg.padding_free = variant.get("padding_free", False)
    actor_cfg.shared_prompt = variant.get("shared_prompt", False)  # off unless the variant turns it on
    times: dict[str, float] = {"old": 0.0}
    batch = data
    if not variant["on_policy"]:
        start = time.perf_counter()
        batch = batch.union(worker.compute_log_probs(batch).select(["old_log_probs"]))
        times["old"] = time.perf_counter() - start
    start = time.perf_counter()
    batch = batch.union(worker.compute_ref_log_probs(batch))
    times["ref"] = time.perf_counter() - start
    start = time.perf_counter()
    worker.update_actor(batch)
    times["update"] = time.perf_counter() - start
    times["total"] = times["old"] + times["ref"] + times["update"]
    return times


def prompt_encodings(data: DataProto, dp_size: int, micro_batch_size: int, whole_groups: bool) -> int:
    """Prompt forwards of one shared-prompt log-prob pass over `data` on `dp_size` simulated ranks:
    the dispatch's split (by `uid` groups or row by row), then each rank's micro-batches of
    `micro_batch_size` rows (whole groups when `whole_groups`, as the actor forms them), counted
    with the actor's own prompt grouping (equal prompt tokens and images)."""
    shards, _ = split_by_dp(data, dp_size, "uid" if whole_groups else None)
    pieces = [micro_batches(shard, micro_batch_size, False, 0, keep_groups=whole_groups) for shard in shards]
    # Real ranks agree on the number of micro-batches (the largest); equal here, so none is cut further.
    if len({len(p) for p in pieces}) != 1:
        print(f"  note: {dp_size} ranks formed {[len(p) for p in pieces]} micro-batches; real ranks cut to the largest")
    return sum(count_prompt_forwards(micro, shared_prompt=True) for rank in pieces for micro in rank)


def print_prompt_encodings(worker: ActorRolloutRefWorker, world: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    data = sample_batch(worker, world, args.encoding_prompts, args.encoding_n, args.base_length)
    print(
        f"\nprompt encodings per log-prob pass: {args.encoding_prompts} prompts x {args.encoding_n} samples "
        f"(up to {args.base_length} tokens, sampled in {time.perf_counter() - started:.1f}s), micro-batches of "
        f"{args.micro_experience}; one per group is {args.encoding_prompts}, the plain path runs {len(data)}"
    )
    header = (
        f"{'ranks':>5} {'row balancing':>14} {'whole groups':>13} {'per group (rows)':>17} {'per group (groups)':>19}"
    )
    print(header)
    print("-" * len(header))
    for dp_size in args.dp_sizes:
        rows, groups = (prompt_encodings(data, dp_size, args.micro_experience, whole) for whole in (False, True))
        print(
            f"{dp_size:>5} {rows:>14} {groups:>13} {rows / args.encoding_prompts:>17.2f} "
            f"{groups / args.encoding_prompts:>19.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--ns", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--base-n", type=int, default=8, help="n while the length grows")
    parser.add_argument("--base-length", type=int, default=64, help="response length while n grows")
    parser.add_argument("--micro-update", type=int, default=8)
    parser.add_argument("--micro-experience", type=int, default=16)
    parser.add_argument("--max-token-len-per-gpu", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per cell (the median is shown)")
    parser.add_argument(
        "--image-tokens",
        type=int,
        nargs="*",
        default=[16, 64, 256, 1024],
        help="prompt-length axis: image tokens per prompt (at --base-n and --base-length); none to skip",
    )
    parser.add_argument("--quick", action="store_true", help="lengths 32 128, n 4 8, image tokens 16 256")
    parser.add_argument(
        "--dp-sizes", type=int, nargs="*", default=[1, 2, 4, 8], help="prompt-encodings table: ranks; none to skip"
    )
    parser.add_argument("--encoding-prompts", type=int, default=16, help="prompt-encodings table: prompts")
    parser.add_argument("--encoding-n", type=int, default=8, help="prompt-encodings table: samples per prompt")
    parser.add_argument("--encodings-only", action="store_true", help="only the prompt-encodings table")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.ns, args.image_tokens = [32, 128], [4, 8], [16, 256]
    torch.set_num_threads(1)

    world = tiny_world_path()
    worker = make_worker(world, args.micro_update, args.micro_experience, args.max_token_len_per_gpu)
    if args.dp_sizes:
        print_prompt_encodings(worker, world, args)
    if args.encodings_only:
        return
    n_full, len_full = max(args.ns + [args.base_n]), max(args.lengths + [args.base_length])
    started = time.perf_counter()
    full = sample_batch(worker, world, args.prompts, n_full, len_full)
    print(f"sampled {len(full)} responses of up to {len_full} tokens in {time.perf_counter() - started:.1f}s")

    cells = [(args.base_n, length) for length in args.lengths]
    cells += [(n, args.base_length) for n in args.ns if (n, args.base_length) not in cells]
    # Warm-up (first forward allocations, lazy inits) on the smallest cell.
    time_step(worker, shrink(full, n_full, min(args.ns), min(args.lengths)), VARIANTS["plain"])

    header = (
        f"{'n':>3} {'len':>4} {'prompt':>6} {'rows':>4} {'variant':<10} {'old':>7} {'ref':>7} {'update':>7} "
        f"{'total':>7} {'vs plain':>8}"
    )
    print(header)
    print("-" * len(header))

    def time_cell(data: DataProto, n: int, length: int) -> None:
        plain_total = None
        prompt = data.batch["attention_mask"][:, : data.batch["prompts"].shape[1]].sum(-1).float().mean()
        for name, variant in VARIANTS.items():
            runs = [time_step(worker, data, variant) for _ in range(args.repeats)]
            t = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            plain_total = plain_total or t["total"]
            print(
                f"{n:>3} {length:>4} {float(prompt):>6.0f} {len(data):>4} {name:<10} {t['old']:>7.2f} "
                f"{t['ref']:>7.2f} {t['update']:>7.2f} {t['total']:>7.2f} {t['total'] / plain_total:>7.2f}x",
                flush=True,
            )

    for n, length in cells:
        time_cell(shrink(full, n_full, n, length), n, length)
    # The prompt-length axis: the same prompts with larger images (mean prompt tokens in "prompt").
    for tokens in args.image_tokens:
        larger = sample_batch(worker, world, args.prompts, args.base_n, args.base_length, image_tokens=tokens)
        time_cell(shrink(larger, args.base_n, args.base_n, args.base_length), args.base_n, args.base_length)
    print(f"total benchmark time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
