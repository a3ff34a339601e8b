"""Per-step metrics computed on the controller from a finished batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verl.protocol import DataProto


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values.float()
    return {
        f"{prefix}/mean": float(values.mean()),
        f"{prefix}/max": float(values.max()),
        f"{prefix}/min": float(values.min()),
    }


def compute_data_metrics(batch: DataProto) -> dict[str, float]:
    """Rewards, advantages, response lengths and how often responses hit the length limit."""
    response_mask = batch.batch["response_mask"].float()
    response_length = response_mask.sum(-1)
    max_length = batch.batch["responses"].shape[1]
    prompt_length = batch.batch["attention_mask"].sum(-1).float() - response_length
    valid = response_mask.bool()
    metrics = {
        **_stats("critic/score", batch.batch["token_level_scores"].sum(-1)),
        **_stats("critic/rewards", batch.batch["token_level_rewards"].sum(-1)),
        **_stats("critic/advantages", batch.batch["advantages"][valid]),
        **_stats("response_length", response_length),
        **_stats("prompt_length", prompt_length),
        "response_length/clip_ratio": float((response_length >= max_length).float().mean()),
    }
    if "entropy" in batch.batch:
        metrics["actor/entropy_rollout"] = float((batch.batch["entropy"] * response_mask).sum() / response_mask.sum())
    return metrics


def compute_throughput_metrics(batch: DataProto, timings: dict[str, float]) -> dict[str, float]:
    tokens = float(batch.batch["attention_mask"].sum())
    response_tokens = float(batch.batch["response_mask"].sum())
    step = timings.get("step", 0.0) or 1e-9
    metrics = {f"timing_s/{name}": seconds for name, seconds in timings.items()}
    metrics["perf/total_tokens"] = tokens
    metrics["perf/tokens_per_s"] = tokens / step
    if timings.get("gen"):
        metrics["perf/gen_tokens_per_s"] = response_tokens / timings["gen"]
    return metrics


def prompt_forward_metrics(worker_metrics: dict[str, float], uids: Sequence[str]) -> dict[str, float]:
    """`perf/prompt_forwards_per_group`: the workers' prompt encodings per log-prob pass (`perf/prompt_forwards`,
    all ranks, averaged over the step's old and reference passes) per GRPO group of the batch (its
    distinct `uids`). 1.0: every group's prompt encoded once (shared-prompt forwards with whole
    groups); n (the group size): once per response, as the plain path does. Empty when no pass ran."""
    if "perf/prompt_forwards" not in worker_metrics or len(uids) == 0:
        return {}
    return {"perf/prompt_forwards_per_group": worker_metrics["perf/prompt_forwards"] / len(set(uids))}
