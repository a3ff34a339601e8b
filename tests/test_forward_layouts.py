"""Padding-free (`worker.actor.padding_free`) and shared-prompt (`worker.actor.shared_prompt`)
forwards against the plain padded path.

Packing (verl.models.packing) concatenates the rows' real tokens into one sequence whose positions
restart at each row; on CPU transformers turns that into a block-diagonal causal mask for sdpa. On
the tiny-world models (Qwen2.5-VL, Qwen2-VL, text Qwen2, Qwen3-VL, Qwen3-VL-MoE), with image and
text rows of unequal prompt and response lengths, the log-probs, the entropy and the gradient of a
loss over them equal the padded path's within 1e-5 relative (fp32; only summation order differs).

Shared-prompt forwards encode each group's prompt once and run its responses against the prompt's
key/value cache; on groups of 3 samples per prompt (image and text prompts) the same quantities
equal the plain path's. The full worker steps are compared in tests/test_actor_throughput.py.

Qwen3.5 (gated delta-net linear attention) differs on both paths: packed rows leak state into each
other, so padding-free is refused at config load; shared prompts hold without gradients only, so
its update takes the plain path (both measured below).
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from verl.models.families import family_of
from verl.models.loading import load_tokenizer_and_processor
from verl.models.packing import pack_rows
from verl.models.shared_prompt import prompt_groups
from verl.protocol import DataProto
from verl.utils.config import ConfigError
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.workers.actor.dp_actor import DataParallelActor, count_prompt_forwards, forward_response_log_probs
from verl.workers.config import ActorConfig
from verl.workers.rollout.base import rollout_output

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5


# --- packing, no model ---------------------------------------------------------------------------
def test_pack_rows_keeps_real_tokens_and_points_each_response_token_at_its_predictor():
    pad = 0
    # Prompt width 3 (left-padded), response width 3 (right-padded).
    input_ids = torch.tensor([[pad, 11, 12, 21, 22, pad], [13, 14, 15, 23, pad, pad], [pad, pad, 16, 24, 25, 26]])
    attention_mask = (input_ids != pad).long()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    packed = pack_rows(input_ids, attention_mask, positions, response_length=3)
    assert packed.input_ids.tolist() == [[11, 12, 21, 22, 13, 14, 15, 23, 16, 24, 25, 26]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert packed.response_tokens.tolist() == [21, 22, 23, 24, 25, 26]
    # Each response token is predicted by the packed token right before it, in its own row.
    flat = packed.input_ids[0]
    assert flat[packed.predictor_index].tolist() == [12, 21, 15, 16, 24, 25]
    unpacked = packed.unpack(packed.response_tokens)
    assert unpacked.tolist() == [[21, 22, 0], [23, 0, 0], [24, 25, 26]]


def test_pack_rows_puts_the_text_positions_on_top_of_3d_rope_positions():
    input_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 0]])
    attention_mask = (input_ids != 0).long()
    rope = torch.arange(2 * 3 * 4).view(2, 3, 4)  # (b, 3, L) as stored
    packed = pack_rows(input_ids, attention_mask, rope, response_length=1)
    assert packed.position_ids.shape == (4, 1, 6)
    assert packed.position_ids[0, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert packed.position_ids[1:, 0].tolist() == [
        [1, 2, 3, 12, 13, 14],
        [5, 6, 7, 16, 17, 18],
        [9, 10, 11, 20, 21, 22],
    ]


def test_pack_rows_refuses_layouts_it_cannot_map_back():
    ids = torch.tensor([[5, 6, 7, 0, 8]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, (ids != 0).long(), torch.zeros_like(ids), response_length=3)
    ids = torch.tensor([[0, 0, 7, 8]])
    with pytest.raises(ValueError, match="no real prompt token"):
        pack_rows(ids, (ids != 0).long(), torch.zeros_like(ids), response_length=2)


# --- the tiny-world models ---------------------------------------------------------------------
def mixed_batch(tiny_world: Path, model_name: str, model: torch.nn.Module, samples: int = 1) -> DataProto:
    """Prompts of unequal lengths (images and text for Qwen-VL), random responses of unequal lengths;
    `samples` adjacent rows per prompt, as a rollout lays out a group."""
    model_dir = tiny_world / "models" / model_name
    tokenizer, processor = load_tokenizer_and_processor(str(model_dir))
    config = PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja"))
    texts = PromptDataset(str(tiny_world / "data/text_sum/val.parquet"), tokenizer, processor, config)
    if processor is not None:
        images = PromptDataset(str(tiny_world / "data/digit_sum/val.parquet"), tokenizer, processor, config)
        rows = [images[0], texts[0], texts[1], images[1], texts[2]]
    else:
        rows = [texts[i] for i in range(5)]
    prompts = collate_prompts(rows, tokenizer.pad_token_id).repeat(samples, interleave=True)
    generator = torch.Generator().manual_seed(0)
    width = 12
    lengths = torch.tensor([12, 3, 7, 1, 10] * samples)[: len(prompts)]
    response_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    # Ordinary text tokens only (ids below the tiny vocabulary's special tokens).
    responses = torch.randint(3, 200, (len(prompts), width), generator=generator)
    responses = responses.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    data = rollout_output(model, prompts, responses, response_mask, None, {})
    assert len(set(data.batch["attention_mask"].sum(-1).tolist())) >= 5, "rows should differ in length"
    return data


def load(tiny_world: Path, model_name: str) -> torch.nn.Module:
    model_class = AutoModelForCausalLM if model_name == "qwen2_text" else AutoModelForImageTextToText
    return model_class.from_pretrained(
        tiny_world / "models" / model_name, attn_implementation="sdpa", dtype=torch.float32
    )


def log_probs_entropy_and_gradients(model: torch.nn.Module, data: DataProto, chunk_size: int, **layout) -> tuple:
    """Log-probs, entropy and the parameter gradients of a loss that weights every real slot differently."""
    mask = data.batch["response_mask"].bool()
    weights = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask) * mask
    model.zero_grad(set_to_none=True)
    log_probs, entropy, _ = forward_response_log_probs(
        model, data, temperature=0.9, chunk_size=chunk_size, with_entropy=True, **layout
    )
    ((log_probs * weights).sum() + (entropy * weights).sum() * 0.1).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return log_probs.detach(), entropy.detach(), grads


def assert_same(ours: tuple, plain: tuple, mask: torch.Tensor) -> None:
    torch.testing.assert_close(ours[0][mask], plain[0][mask], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(ours[1][mask], plain[1][mask], rtol=RTOL, atol=1e-6)
    assert ours[2].keys() == plain[2].keys() and len(plain[2]) > 10
    for name, grad in plain[2].items():
        # Relative to the whole tensor: single entries near zero carry summation noise of ~1e-6.
        error = float((ours[2][name] - grad).norm() / grad.norm().clamp(min=1e-12))
        assert error < RTOL, f"{name}: relative gradient error {error:.2e}"


MODELS = ["qwen2_5_vl", "qwen2_vl", "qwen2_text", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
PADDING_FREE_REFUSED = pytest.mark.skip(
    reason="Qwen3.5 padding-free is refused at config load: test_qwen3_5_packed_rows_leak_state_so_padding_free_is_refused"
)
SHARED_PROMPT_NO_GRAD = pytest.mark.skip(
    reason="Qwen3.5's update takes the plain path: test_qwen3_5_shares_prompts_without_gradients_only"
)


@pytest.mark.parametrize(
    "model_name", [pytest.param(m, marks=PADDING_FREE_REFUSED) if m == "qwen3_5" else m for m in MODELS]
)
@pytest.mark.parametrize("chunk_size", [0, 5])
def test_padding_free_log_probs_entropy_and_gradients_equal_the_padded_path(tiny_world, model_name, chunk_size):
    model = load(tiny_world, model_name)
    data = mixed_batch(tiny_world, model_name, model)
    mask = data.batch["response_mask"].bool()
    padded = log_probs_entropy_and_gradients(model, data, chunk_size)
    packed = log_probs_entropy_and_gradients(model, data, chunk_size, padding_free=True)
    assert_same(packed, padded, mask)
    assert (packed[0][~mask] == 0).all() and (packed[1][~mask] == 0).all()


@pytest.mark.parametrize(
    "model_name", [pytest.param(m, marks=SHARED_PROMPT_NO_GRAD) if m == "qwen3_5" else m for m in MODELS]
)
@pytest.mark.parametrize("chunk_size", [0, 5])
def test_shared_prompt_log_probs_entropy_and_gradients_equal_the_plain_path(tiny_world, model_name, chunk_size):
    model = load(tiny_world, model_name)
    data = mixed_batch(tiny_world, model_name, model, samples=3)
    mask = data.batch["response_mask"].bool()
    plain = log_probs_entropy_and_gradients(model, data, chunk_size)
    shared = log_probs_entropy_and_gradients(model, data, chunk_size, shared_prompt=True)
    assert_same(shared, plain, mask)


# --- Qwen3.5: gated delta-net layers (verl/models/families/qwen3_5.py) -------------------------
def test_qwen3_5_packed_rows_leak_state_so_padding_free_is_refused(tiny_world):
    """Why the family refuses padding-free: the first packed row equals the padded path, every row
    after it differs (the recurrent state runs on across the row boundary), and the config check
    refuses `worker.actor.padding_free` for this model."""
    model = load(tiny_world, "qwen3_5")
    data = mixed_batch(tiny_world, "qwen3_5", model)
    mask = data.batch["response_mask"].bool()
    with torch.no_grad():
        padded, _, _ = forward_response_log_probs(model, data, temperature=0.9, chunk_size=0, with_entropy=False)
        packed, _, _ = forward_response_log_probs(
            model, data, temperature=0.9, chunk_size=0, with_entropy=False, padding_free=True
        )
    torch.testing.assert_close(packed[0][mask[0]], padded[0][mask[0]], rtol=RTOL, atol=1e-6)
    for row in range(1, len(data)):
        assert (packed[row][mask[row]] - padded[row][mask[row]]).abs().max() > 1e-4, f"row {row} did not leak"
    config = ActorConfig(padding_free=True)
    config.model.model_path = str(tiny_world / "models" / "qwen3_5")
    with pytest.raises(ConfigError, match=r"Qwen3\.5 \(qwen3_5\) cannot take `worker\.actor\.padding_free`"):
        config.check_family("worker.actor")


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_qwen3_5_shares_prompts_without_gradients_only(tiny_world, chunk_size):
    """No-grad shared-prompt passes (old and reference log-probs) equal the plain path; with
    gradients the prompt cache's in-place state update breaks autograd, which is why the family
    says `shared_prompt_under_autograd=False`."""
    model = load(tiny_world, "qwen3_5")
    data = mixed_batch(tiny_world, "qwen3_5", model, samples=3)
    mask = data.batch["response_mask"].bool()
    with torch.no_grad():
        plain = forward_response_log_probs(model, data, temperature=0.9, chunk_size=chunk_size, with_entropy=True)
        shared = forward_response_log_probs(
            model, data, temperature=0.9, chunk_size=chunk_size, with_entropy=True, shared_prompt=True
        )
    torch.testing.assert_close(shared[0][mask], plain[0][mask], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], rtol=RTOL, atol=1e-6)
    assert not family_of(model.config).shared_prompt_under_autograd
    log_probs, _, _ = forward_response_log_probs(
        model, data, temperature=0.9, chunk_size=chunk_size, with_entropy=False, shared_prompt=True
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (log_probs * mask).sum().backward()


def test_qwen3_5_update_with_shared_prompts_takes_the_plain_path(tiny_world):
    """An actor configured to share prompts updates Qwen3.5 as the plain actor does (same loss,
    gradient norm and weights after the step) instead of failing in the backward, while its
    log-prob pass still encodes each of the 5 prompts once for its 15 rows."""
    data = mixed_batch(tiny_world, "qwen3_5", load(tiny_world, "qwen3_5"), samples=3)
    data.batch["advantages"] = torch.linspace(-1.0, 1.0, len(data))[:, None] * data.batch["response_mask"]
    results = {}
    for shared in (True, False):
        model = load(tiny_world, "qwen3_5")
        config = ActorConfig(shared_prompt=shared, use_kl_loss=False, micro_batch_size_per_device_for_update=6)
        actor = DataParallelActor(config, model, torch.optim.SGD(model.parameters(), lr=0.1))
        actor.compute_log_probs(data, temperature=0.9, micro_batch_size=15)
        forwards = actor.prompt_forwards
        metrics = actor.update_policy(data, temperature=0.9, mini_batch_size=len(data))
        results[shared] = (forwards, metrics, {name: p.detach().clone() for name, p in model.named_parameters()})
    assert results[True][0] == 5 and results[False][0] == 15
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert results[True][1][key] == pytest.approx(results[False][1][key], rel=RTOL), key
    for name, weight in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], weight, rtol=RTOL, atol=1e-7, msg=name)


def test_shared_prompt_forwards_of_groups_cut_across_micro_batches_equal_the_plain_path(tiny_world):
    # Groups of 3 rows in micro-batches of 4 (rows 0-3 | 4-7 | 8-11 | 12-14): every boundary cuts a
    # group, whose prompt is then encoded once in each micro-batch holding some of its rows. The
    # gradients accumulated over the micro-batches equal one plain forward of the whole batch.
    model = load(tiny_world, "qwen2_5_vl")
    data = mixed_batch(tiny_world, "qwen2_5_vl", model, samples=3)
    mask = data.batch["response_mask"].bool()
    plain = log_probs_entropy_and_gradients(model, data, chunk_size=5)
    weights = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask) * mask  # as in the helper
    model.zero_grad(set_to_none=True)
    pieces, log_probs, entropies = data.split(4), [], []
    for start, micro in zip(range(0, len(data), 4), pieces):
        lp, entropy, _ = forward_response_log_probs(
            model, micro, temperature=0.9, chunk_size=5, with_entropy=True, shared_prompt=True
        )
        w = weights[start : start + len(micro)]
        ((lp * w).sum() + (entropy * w).sum() * 0.1).backward()
        log_probs.append(lp.detach())
        entropies.append(entropy.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert_same((torch.cat(log_probs), torch.cat(entropies), grads), plain, mask)
    # 5 groups, 7 prompt encodings: groups 1 (rows 3-5) and 2 (rows 6-8) straddle a boundary.
    assert sum(count_prompt_forwards(micro, shared_prompt=True) for micro in pieces) == 7


def test_prompt_groups_split_same_tokens_with_different_images(tiny_world):
    model = load(tiny_world, "qwen2_5_vl")
    data = mixed_batch(tiny_world, "qwen2_5_vl", model, samples=2)
    width = data.batch["responses"].shape[1]
    prompt_ids = data.batch["input_ids"][:, :-width]
    prompt_mask = data.batch["attention_mask"][:, :-width]
    multimodal = list(data.non_tensor_batch["multi_modal_inputs"])
    groups = prompt_groups(prompt_ids, prompt_mask, multimodal)
    assert groups.first_rows.tolist() == [0, 2, 4, 6, 8]
    assert groups.group_of_row.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # Same placeholder tokens, another image (pixels changed): a group of its own.
    multimodal[1] = {**multimodal[1], "pixel_values": multimodal[1]["pixel_values"] + 1.0}
    assert prompt_groups(prompt_ids, prompt_mask, multimodal).first_rows.tolist() == [0, 1, 2, 4, 6, 8]


def test_packing_without_the_restart_would_leak_across_rows(tiny_world):
    """The equality above is not vacuous: the same packed tokens with running positions (one long
    sequence, no row boundaries) give different log-probs for every row after the first."""
    model_dir = tiny_world / "models" / "qwen2_text"
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    data = mixed_batch(tiny_world, "qwen2_text", model)
    width = data.batch["responses"].shape[1]
    packed = pack_rows(data.batch["input_ids"], data.batch["attention_mask"], data.batch["position_ids"], width)
    with torch.no_grad():
        boundaries = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits[0]
        running = torch.arange(packed.input_ids.shape[1])[None]
        leaking = model(input_ids=packed.input_ids, position_ids=running).logits[0]
    first_row = int(data.batch["attention_mask"][0].sum())
    torch.testing.assert_close(boundaries[:first_row], leaking[:first_row], rtol=RTOL, atol=1e-6)
    assert (boundaries[first_row:] - leaking[first_row:]).abs().max() > 1e-3
