"""The actor's throughput features against the plain path, on the tiny Qwen2.5-VL worker with mixed
image/text rows of unequal lengths: chunked log-probs (`logprob_chunk_size`), token-budget
micro-batches (`dynamic_batching`), packed rows (`padding_free`), one prompt forward per group
(`shared_prompt`) and the on-policy shortcut (no separate old-log-prob pass).

Each variant runs on a fresh worker with the same seed and weights, one update with plain SGD (so
the weight change is the clipped gradient itself). fp32 on CPU: the variants differ from the plain
path only in summation order, so log-probs, losses and weights agree within 1e-5 relative.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from verl.protocol import DataProto, SamplingParams
from verl.single_controller.dispatch import split_by_dp
from verl.trainer.config import PPOConfig
from verl.trainer.ppo_trainer import old_log_prob_pass_skippable
from verl.utils.config import ConfigError
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.workers.actor.dp_actor import count_prompt_forwards
from verl.workers.actor.micro_batches import micro_batches, prompt_run_starts, split_to_count, token_budget_groups
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5


# --- grouping (no model) -------------------------------------------------------------------------
def test_token_budget_groups_are_consecutive_and_within_budget():
    # 3+4 fits 8; 5 would not fit with them; 9 exceeds the budget and runs alone.
    assert token_budget_groups([3, 4, 5, 9, 2, 2, 2], 8) == [[0, 1], [2], [3], [4, 5, 6]]


def test_split_to_count_halves_the_heaviest_group_in_order():
    counts = [1, 1, 6, 1, 1]
    assert split_to_count([[0, 1, 2, 3, 4]], counts, 2) == [[0, 1, 2], [3, 4]]
    assert split_to_count([[0, 1], [2, 3, 4]], counts, 3) == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="cannot form 3"):
        split_to_count([[0], [1]], counts, 3)


def prompt_rows(prompts: list[int], lengths: list[int], uids: bool = True) -> DataProto:
    """One row per entry: a 2-token prompt `prompts[i]` (rows with equal prompts form a group) and
    a response of `lengths[i]` tokens, right-padded to the longest."""
    width = max(lengths)
    rows = len(prompts)
    prompt = torch.tensor(prompts)[:, None].repeat(1, 2)
    response_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    responses = 7 * response_mask
    tensors = {
        "input_ids": torch.cat([prompt, responses], 1),
        "attention_mask": torch.cat([torch.ones(rows, 2, dtype=torch.long), response_mask], 1),
        "responses": responses,
        "row": torch.arange(rows),
    }
    keys = {"uid": np.array([f"p{k}" for k in prompts], dtype=object)} if uids else None
    return DataProto.from_dict(tensors, keys)


def test_whole_group_micro_batches_never_cut_a_group():
    # Groups of 3, 2, 4 and 1 rows; micro-batches of up to 4 rows: 3 | 2 | 4 | 1, never 3 + 1 of the next.
    data = prompt_rows([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [1] * 10)
    assert prompt_run_starts(data) == [0, 3, 5, 9]
    pieces = micro_batches(data, 4, dynamic=False, max_tokens=0, keep_groups=True)
    assert [p.batch["row"].tolist() for p in pieces] == [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
    # A group larger than the micro-batch size runs alone rather than being cut.
    pieces = micro_batches(data, 2, dynamic=False, max_tokens=0, keep_groups=True)
    assert [len(p) for p in pieces] == [3, 2, 4, 1]
    # By token budget (each row: 2 prompt tokens + its response): groups of 8, 10 and 6 tokens,
    # budget 21: whole groups 8 + 10 | 6, where plain packing fills 21 by cutting the last group.
    data = prompt_rows([0, 0, 1, 1, 2, 2], [1, 3, 2, 4, 1, 1])
    pieces = micro_batches(data, 4, dynamic=True, max_tokens=21, keep_groups=True)
    assert [p.batch["row"].tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5]]
    plain = micro_batches(data, 4, dynamic=True, max_tokens=21)
    assert [p.batch["row"].tolist() for p in plain] == [[0, 1, 2, 3, 4], [5]]


def test_split_to_count_cuts_between_groups_first():
    counts = [1, 1, 1, 1, 1, 1]
    # Units [0, 1] [2] [3, 4, 5]: the one micro-batch must become two (another rank needs two);
    # the cut goes before the first unit start past the token midpoint, never inside a unit.
    assert split_to_count([[0, 1, 2, 3, 4, 5]], counts, 2, unit_starts={0, 2, 3}) == [[0, 1, 2], [3, 4, 5]]
    assert split_to_count([[0, 1, 2, 3, 4, 5]], counts, 2, unit_starts={0, 5}) == [[0, 1, 2, 3, 4], [5]]
    # Only one unit: cut inside it (the ranks must agree on the count), at the midpoint.
    assert split_to_count([[0, 1, 2, 3]], counts, 2, unit_starts={0}) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_16_prompts_x_8_samples_encode_each_prompt_once_on_any_number_of_ranks(dp_size):
    # The dispatch of a log-prob pass over `dp_size` ranks, then each rank's micro-batches of 16
    # responses, as the workers form them: with the group key, one prompt encoding per group (16);
    # balancing rows one by one cut the groups into many more.
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 64, (128,), generator=generator).tolist()
    data = prompt_rows([g for g in range(16) for _ in range(8)], lengths)

    def encodings(group_key: str | None) -> int:
        shards, _ = split_by_dp(data, dp_size, group_key)
        return sum(
            count_prompt_forwards(micro, shared_prompt=True)
            for shard in shards
            for micro in micro_batches(shard, 16, dynamic=False, max_tokens=0, keep_groups=group_key is not None)
        )

    assert encodings("uid") == 16
    if dp_size > 1:
        assert encodings(None) > 16 + 8 * (dp_size - 1)


# --- the tiny worker -----------------------------------------------------------------------------
def make_worker(tiny_world: Path, model: str = "qwen2_5_vl", **actor) -> ActorRolloutRefWorker:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model)
    config.actor.micro_batch_size_per_device_for_update = 4
    config.actor.micro_batch_size_per_device_for_experience = 4
    config.ref.micro_batch_size_per_device_for_experience = 4
    config.actor.entropy_coeff = 1e-2  # the entropy's gradient is part of what must match
    config.actor.shared_prompt = False  # each feature on its own unless a test turns it on
    for key, value in actor.items():
        setattr(config.actor, key, value)
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    # Plain SGD: the weight change is the gradient (Adam's first step would amplify summation noise).
    worker.actor.optimizer = torch.optim.SGD(worker.model.parameters(), lr=1.0)
    return worker


@pytest.fixture(scope="module")
def batch(tiny_world) -> DataProto:
    return build_batch(tiny_world)


def build_batch(tiny_world: Path, model: str = "qwen2_5_vl") -> DataProto:
    """Two image prompts and four text-only ones, two samples each: prompt and response lengths differ."""
    worker = make_worker(tiny_world, model, logprob_chunk_size=0)

    def dataset(name: str) -> PromptDataset:
        return PromptDataset(
            str(tiny_world / "data" / name / "val.parquet"),
            worker.tokenizer,
            worker.processor,
            PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja")),
        )

    images, texts = dataset("digit_sum"), dataset("text_sum")
    rows = [images[0], texts[0], texts[1], images[1], texts[2], texts[3]]
    prompts = collate_prompts(rows, worker.tokenizer.pad_token_id)
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)
    data = worker.generate_sequences(prompts)
    # The random model rarely samples EOS: end the responses at unequal lengths, padded as the
    # sampler pads after EOS.
    lengths = torch.tensor([16, 3, 9, 12, 5, 16, 1, 7, 14, 10, 2, 11])
    ended = torch.arange(16)[None, :] >= lengths[:, None]
    pad = worker.tokenizer.pad_token_id
    data.batch["response_mask"] = (~ended).long()
    data.batch["responses"] = data.batch["responses"].masked_fill(ended, pad)
    data.batch["input_ids"] = data.batch["input_ids"].clone()
    data.batch["input_ids"][:, -16:] = data.batch["responses"]
    data.batch["attention_mask"] = data.batch["attention_mask"].clone()
    data.batch["attention_mask"][:, -16:] = data.batch["response_mask"]
    data.meta_info = {"temperature": 1.0, "mini_batch_size": len(data)}
    data = data.union(worker.compute_ref_log_probs(data))
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 1.0, 0.0, -1.0, 0.75, 0.3, -0.3])
    data.batch["advantages"] = rewards[:, None] * data.batch["response_mask"]
    assert len(set(data.batch["attention_mask"].sum(-1).tolist())) > 4, "rows should differ in length"
    return data


def run_step(tiny_world: Path, data: DataProto, with_old_pass: bool = True, model: str = "qwen2_5_vl", **actor) -> dict:
    worker = make_worker(tiny_world, model, **actor)
    out = worker.compute_log_probs(data)
    step_input = data.union(out.select(["old_log_probs"])) if with_old_pass else data
    metrics = worker.update_actor(step_input).meta_info["metrics"]
    return {
        "log_probs": out.batch["old_log_probs"],
        "entropy": out.batch["entropy"],
        "metrics": metrics,
        "params": [p.detach().clone() for p in worker.model.parameters()],
    }


@pytest.fixture(scope="module")
def plain(tiny_world, batch) -> dict:
    """Full logits, fixed-size micro-batches, every row's prompt run on its own, separate old-log-prob pass."""
    return run_step(tiny_world, batch, logprob_chunk_size=0, dynamic_batching=False, shared_prompt=False)


def assert_same_step(ours: dict, reference: dict, keys=("actor/loss", "actor/pg_loss", "actor/kl_loss")) -> None:
    for key in (*keys, "actor/grad_norm"):
        assert ours["metrics"][key] == pytest.approx(reference["metrics"][key], rel=RTOL, abs=1e-8), key
    for a, b in zip(ours["params"], reference["params"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-7)


def test_chunked_log_probs_match_the_full_logits_path(tiny_world, batch, plain):
    # A chunk of 7 tokens: many chunks per micro-batch, the last one partial.
    chunked = run_step(tiny_world, batch, logprob_chunk_size=7)
    mask = batch.batch["response_mask"].bool()
    torch.testing.assert_close(chunked["log_probs"][mask], plain["log_probs"][mask], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(chunked["entropy"][mask], plain["entropy"][mask], rtol=RTOL, atol=1e-6)
    assert_same_step(chunked, plain)


def test_full_kl_keeps_the_full_logits_in_the_update_and_matches(tiny_world, batch):
    # kl_penalty=full needs whole distributions: the update takes the full-logits path for it
    # while old/ref log-probs stay chunked; the step equals the all-full-logits one.
    full = run_step(tiny_world, batch, logprob_chunk_size=0, kl_penalty="full")
    chunked = run_step(tiny_world, batch, logprob_chunk_size=7, kl_penalty="full")
    assert chunked["metrics"]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)  # ref == actor at the start
    assert_same_step(chunked, full)


def test_token_budget_micro_batches_match_fixed_size_ones(tiny_world, batch, plain):
    counts = batch.batch["attention_mask"].sum(-1)

    def sizes_for(budget: int) -> list[int]:
        return [len(g) for g in micro_batches(batch, 4, dynamic=True, max_tokens=budget)]

    # The smallest budget above two rows' worth that gives micro-batches of unequal sizes.
    budget = next(b for b in range(int(counts.max()) * 2, int(counts.sum())) if len(set(sizes_for(b))) > 1)
    groups = micro_batches(batch, 4, dynamic=True, max_tokens=budget)
    sizes = [len(g) for g in groups]
    # The budget really changes the grouping: unequal micro-batches, none over budget unless alone.
    assert len(set(sizes)) > 1 and sum(sizes) == len(batch)
    assert all(int(g.batch["attention_mask"].sum()) <= budget or len(g) == 1 for g in groups)
    dynamic = run_step(tiny_world, batch, logprob_chunk_size=0, dynamic_batching=True, max_token_len_per_gpu=budget)
    torch.testing.assert_close(dynamic["log_probs"], plain["log_probs"], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(dynamic["entropy"], plain["entropy"], rtol=RTOL, atol=1e-6)
    assert_same_step(dynamic, plain)


def test_padding_free_token_budget_step_equals_the_padded_fixed_size_step(tiny_world, batch, plain):
    # Everything on at once: packed micro-batches formed by a token budget, chunked log-probs, and
    # the update's log-probs as the old ones. Same log-probs at every real slot, same step.
    budget = int(batch.batch["attention_mask"].sum(-1).max()) * 3
    packed = run_step(
        tiny_world,
        batch,
        logprob_chunk_size=7,
        padding_free=True,
        dynamic_batching=True,
        max_token_len_per_gpu=budget,
    )
    mask = batch.batch["response_mask"].bool()
    torch.testing.assert_close(packed["log_probs"][mask], plain["log_probs"][mask], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(packed["entropy"][mask], plain["entropy"][mask], rtol=RTOL, atol=1e-6)
    assert_same_step(packed, plain)


def test_shared_prompt_step_equals_the_plain_step(tiny_world, batch, plain):
    # Each of the six prompts' two samples run against one prompt forward, in the old-log-prob
    # pass, the reference pass and the update (no gradient checkpointing here).
    shared = run_step(tiny_world, batch, logprob_chunk_size=7, shared_prompt=True)
    mask = batch.batch["response_mask"].bool()
    torch.testing.assert_close(shared["log_probs"][mask], plain["log_probs"][mask], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(shared["entropy"][mask], plain["entropy"][mask], rtol=RTOL, atol=1e-6)
    assert_same_step(shared, plain)


def cuts_a_group(pieces: list[DataProto]) -> bool:
    """Whether some micro-batch boundary falls between two rows of one prompt group."""
    prompts = [micro.batch["input_ids"][:, : -micro.batch["responses"].shape[1]] for micro in pieces]
    return any(torch.equal(a[-1], b[0]) for a, b in zip(prompts, prompts[1:]))


@pytest.mark.parametrize(
    ("policy_loss", "loss_agg_mode"),
    [
        ("ppo", "seq-mean-token-sum"),
        ("ppo", "seq-mean-token-mean"),
        ("ppo", "seq-mean-token-sum-norm"),
        ("gspo", "seq-mean-token-mean"),
    ],
)
def test_sequence_level_losses_under_token_budgets_and_packing_equal_the_plain_step(
    tiny_world, batch, policy_loss, loss_agg_mode
):
    # The seq-mean modes divide by the mini-batch's sequence count and gspo takes a ratio per
    # sequence: packed rows in micro-batches formed by a token budget (here cutting prompt groups
    # apart), and whole-group micro-batches of shared prompts by the same budget, give the plain step.
    losses = {"policy_loss": policy_loss, "loss_agg_mode": loss_agg_mode, "entropy_coeff": 0.0}
    if policy_loss == "gspo":  # sequence-level ratios: the small clip ranges gspo is used with
        losses.update(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    counts = batch.batch["attention_mask"].sum(-1)

    def pieces(budget: int, keep_groups: bool = False) -> list[DataProto]:
        return micro_batches(batch, 4, dynamic=True, max_tokens=budget, keep_groups=keep_groups)

    # The smallest budget above two rows' worth whose plain micro-batches cut a group apart.
    budget = next(b for b in range(int(counts.max()) * 2, int(counts.sum())) if cuts_a_group(pieces(b)))
    assert len(pieces(budget)) > 2 and not cuts_a_group(pieces(budget, keep_groups=True))
    plain = run_step(tiny_world, batch, logprob_chunk_size=0, **losses)
    dynamic = {"dynamic_batching": True, "max_token_len_per_gpu": budget, "logprob_chunk_size": 7}
    for layout in ({"padding_free": True}, {"shared_prompt": True}):
        ours = run_step(tiny_world, batch, **dynamic, **layout, **losses)
        assert_same_step(ours, plain, keys=("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/pg_clipfrac_higher"))


def test_shared_prompt_is_on_by_default_unless_padding_free_and_refused_together_with_it():
    config = WorkerConfig()
    assert config.actor.shared_prompt is None and config.actor.shares_prompts
    config.actor.padding_free = True
    assert not config.actor.shares_prompts
    config.actor.check("worker.actor")
    config.actor.shared_prompt = True
    with pytest.raises(ConfigError, match="worker.actor.shared_prompt"):
        config.actor.check("worker.actor")


def test_padding_free_with_the_full_kl_matches(tiny_world, batch):
    # kl_penalty=full: the update keeps whole distributions of the packed rows, and the reference
    # forward inside the update is packed too.
    padded = run_step(tiny_world, batch, logprob_chunk_size=0, kl_penalty="full")
    packed = run_step(tiny_world, batch, logprob_chunk_size=0, kl_penalty="full", padding_free=True)
    assert_same_step(packed, padded)


def test_on_policy_shortcut_gives_the_same_step_as_the_separate_pass(tiny_world, batch):
    separate = run_step(tiny_world, batch, with_old_pass=True)
    shortcut = run_step(tiny_world, batch, with_old_pass=False)
    assert shortcut["metrics"]["actor/ppo_kl"] == 0.0  # ratio exactly 1
    assert separate["metrics"]["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    shared = set(separate["metrics"]) & set(shortcut["metrics"])
    assert_same_step(shortcut, separate, keys=sorted(shared - {"actor/ppo_kl", "actor/grad_norm"}))
    # The rollout entropy the trainer would compute from the skipped pass comes from the update.
    mask = batch.batch["response_mask"]
    expected = float((separate["entropy"] * mask).sum() / mask.sum())
    assert shortcut["metrics"]["actor/entropy_rollout"] == pytest.approx(expected, rel=RTOL)


def test_update_without_old_log_probs_refuses_off_policy_batches(tiny_world, batch):
    worker = make_worker(tiny_world)
    two_minis = DataProto(batch.batch, batch.non_tensor_batch, {**batch.meta_info, "mini_batch_size": len(batch) // 2})
    with pytest.raises(ValueError, match="no old_log_probs"):
        worker.update_actor(two_minis)


def test_the_trainer_skips_the_old_pass_only_when_nothing_needs_it():
    def config(**changes) -> PPOConfig:
        cfg = PPOConfig()
        cfg.data.rollout_batch_size = cfg.worker.actor.global_batch_size
        for path, value in changes.items():
            section, key = path.split("__")
            setattr(getattr(cfg, section) if section != "actor" else cfg.worker.actor, key, value)
        return cfg

    assert old_log_prob_pass_skippable(config())
    assert not old_log_prob_pass_skippable(config(actor__skip_old_log_prob_when_on_policy=False))
    assert not old_log_prob_pass_skippable(config(actor__ppo_epochs=2))
    assert not old_log_prob_pass_skippable(config(data__rollout_batch_size=64))  # several steps per rollout
    # The KL penalty in the reward reads old log-probs before the update.
    assert not old_log_prob_pass_skippable(config(algorithm__use_kl_loss=False))
    assert old_log_prob_pass_skippable(config(algorithm__use_kl_loss=False, algorithm__disable_kl=True))


# --- two gloo ranks: the same number of micro-batches ---------------------------------------------
def _count_micro_batches(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Rank 0's short rows fit in one micro-batch, rank 1's long rows need four.
        lengths = [2, 2, 2, 2] if rank == 0 else [8, 8, 8, 8]
        mask = torch.zeros(4, 8, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        data = DataProto.from_dict({"attention_mask": mask, "row": torch.arange(4)})
        pieces = micro_batches(data, 4, dynamic=True, max_tokens=8)
        results[rank] = [piece.batch["row"].tolist() for piece in pieces]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing the stack: minutes on a loaded 2-core machine
def test_ranks_agree_on_the_number_of_token_budget_micro_batches():
    import torch.multiprocessing as mp

    from verl.utils.network import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_count_micro_batches, args=(free_port(), results), nprocs=2, join=True)
        short, long = results[0], results[1]
    assert long == [[0], [1], [2], [3]]
    # Rank 0 splits its single group to match, keeping row order.
    assert len(short) == 4 and sum(short, []) == [0, 1, 2, 3]


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2_text"])
def test_chunked_log_probs_match_on_the_other_model_families(tiny_world, model):
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model)
    config.actor.micro_batch_size_per_device_for_experience = 3
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    name, prompt = (
        ("digit_sum", "examples/format_prompt/see_think.jinja") if model != "qwen2_text" else ("text_sum", None)
    )
    ds = PromptDataset(
        str(tiny_world / "data" / name / "val.parquet"),
        worker.tokenizer,
        worker.processor,
        PromptDatasetConfig(format_prompt=str(ROOT / prompt) if prompt else None),
    )
    prompts = collate_prompts([ds[i] for i in range(4)], worker.tokenizer.pad_token_id)
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    data = worker.generate_sequences(prompts)
    data.meta_info = {"temperature": 0.7}
    results = {}
    for chunk in (0, 5):
        worker.config.actor.logprob_chunk_size = chunk
        out = worker.compute_log_probs(data)
        results[chunk] = (out.batch["old_log_probs"], out.batch["entropy"])
    mask = data.batch["response_mask"].bool()
    for plain, chunked in zip(results[0], results[5]):
        torch.testing.assert_close(chunked[mask], plain[mask], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("model", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_every_layout_gives_the_plain_step_on_the_qwen3_families(tiny_world, model):
    # The layouts above, on Qwen3-VL (deepstack features, interleaved rope), its MoE variant (routed
    # experts) and Qwen3.5 (delta-net layers; no padding-free, refused for that family, and its
    # update runs the plain path under shared_prompt: see verl/models/families/qwen3_5.py).
    data = build_batch(tiny_world, model)
    plain = run_step(tiny_world, data, model=model, logprob_chunk_size=0, dynamic_batching=False, shared_prompt=False)
    budget = int(data.batch["attention_mask"].sum(-1).max()) * 3
    dynamic = {"dynamic_batching": True, "max_token_len_per_gpu": budget}
    layouts = {
        "chunked": {"logprob_chunk_size": 7},
        "token budget": {"logprob_chunk_size": 0, **dynamic},
        "shared prompt": {"logprob_chunk_size": 7, "shared_prompt": True, **dynamic},
    }
    if model != "qwen3_5":
        layouts["padding-free"] = {"logprob_chunk_size": 7, "padding_free": True, **dynamic}
    mask = data.batch["response_mask"].bool()
    for name, layout in layouts.items():
        ours = run_step(tiny_world, data, model=model, **layout)
        torch.testing.assert_close(ours["log_probs"][mask], plain["log_probs"][mask], rtol=RTOL, atol=1e-6, msg=name)
        torch.testing.assert_close(ours["entropy"][mask], plain["entropy"][mask], rtol=RTOL, atol=1e-6, msg=name)
        assert_same_step(ours, plain)
