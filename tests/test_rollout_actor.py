"""The HF rollout engine and the actor on the tiny world: grouping, EOS handling, positions,
log-prob agreement with the sampler, and the update's accumulation, clipping and skipping."""

import copy

import pytest
import torch

from verl.models.multimodal import multimodal_token_ids
from verl.protocol import SamplingParams
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.rollout.hf_rollout import response_mask_from_eos

SEE_THINK = "examples/format_prompt/see_think.jinja"


def make_worker(tiny_world, model="qwen2_5_vl", **actor_overrides) -> ActorRolloutRefWorker:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model)
    config.actor.optim.lr = 1e-2
    for key, value in actor_overrides.items():
        setattr(config.actor, key, value)
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    return worker


@pytest.fixture(scope="module")
def worker(tiny_world):
    return make_worker(tiny_world)


@pytest.fixture(scope="module")
def prompts(tiny_world, worker):
    ds = PromptDataset(
        str(tiny_world / "data/digit_sum/val.parquet"),
        worker.tokenizer,
        worker.processor,
        PromptDatasetConfig(format_prompt=SEE_THINK),
    )
    return next(iter(PromptLoader(ds, 4, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id)))


def generate(worker, prompts, **sampling):
    batch = copy.copy(prompts)
    batch.meta_info = {"sampling": SamplingParams(**{"max_new_tokens": 24, **sampling})}
    return worker.generate_sequences(batch)


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 9, 7, 9, 3], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    assert response_mask_from_eos(responses, [9]).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_samples_are_grouped_and_reproducible(worker, prompts):
    out = generate(worker, prompts, n=3, temperature=1.0, seed=11)
    assert len(out) == 12
    # rows i*n .. i*n+n-1 belong to prompt i
    for i in range(4):
        for j in range(3):
            assert torch.equal(out.batch["prompts"][i * 3 + j], prompts.batch["input_ids"][i])
            assert out.non_tensor_batch["ground_truth"][i * 3 + j] == prompts.non_tensor_batch["ground_truth"][i]
    again = generate(worker, prompts, n=3, temperature=1.0, seed=11)
    assert torch.equal(out.batch["responses"], again.batch["responses"])
    other = generate(worker, prompts, n=3, temperature=1.0, seed=12)
    assert not torch.equal(out.batch["responses"], other.batch["responses"])
    # samples within a group differ (temperature 1 on a random model)
    assert not torch.equal(out.batch["responses"][0], out.batch["responses"][1])


def test_responses_are_padded_after_eos_and_never_hold_image_tokens(worker, prompts):
    out = generate(worker, prompts, n=4, temperature=1.0, seed=5, max_new_tokens=32)
    mask = out.batch["response_mask"]
    responses = out.batch["responses"]
    assert responses.shape[1] == 32
    assert torch.all(responses[mask == 0] == worker.tokenizer.pad_token_id)
    banned = torch.tensor(multimodal_token_ids(worker.model.config))
    assert not torch.isin(responses[mask == 1], banned).any()
    # attention covers prompt (left-padded) + valid response tokens
    assert torch.equal(out.batch["attention_mask"][:, -32:], mask)


def test_mrope_positions_are_three_dimensional(worker, prompts):
    out = generate(worker, prompts, n=1, temperature=0.0)
    positions = out.batch["position_ids"]
    assert positions.shape == (4, 3, out.batch["input_ids"].shape[1])
    # image tokens get distinct height/width positions; text tokens have equal t/h/w positions
    image_token = worker.model.config.image_token_id
    row = 0
    is_image = out.batch["input_ids"][row] == image_token
    assert is_image.sum() == 2
    image_pos = positions[row][:, is_image]
    assert not torch.equal(image_pos[1], image_pos[2])
    text = (~is_image) & (out.batch["attention_mask"][row] == 1)
    assert torch.equal(positions[row][0, text], positions[row][1, text])


@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen2_vl", "qwen2_text", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_actor_log_probs_match_the_sampler(tiny_world, model):
    worker = make_worker(tiny_world, model=model)
    data_file = "digit_sum" if model != "qwen2_text" else "text_sum"
    ds = PromptDataset(
        str(tiny_world / f"data/{data_file}/val.parquet"),
        worker.tokenizer,
        worker.processor,
        PromptDatasetConfig(format_prompt=SEE_THINK if model != "qwen2_text" else None),
    )
    prompts = next(iter(PromptLoader(ds, 3, shuffle=False, seed=0, pad_token_id=worker.tokenizer.pad_token_id)))
    out = generate(worker, prompts, n=2, temperature=0.7, seed=3, return_log_probs=True)
    out.meta_info["temperature"] = 0.7
    actor = worker.compute_log_probs(out).batch["old_log_probs"]
    mask = out.batch["response_mask"].bool()
    sampler = out.batch["rollout_log_probs"]
    assert torch.allclose(actor[mask], sampler[mask], atol=1e-4), (actor[mask] - sampler[mask]).abs().max()


def _training_batch(worker, prompts, seed=1):
    out = generate(worker, prompts, n=4, temperature=1.0, seed=seed)
    out.meta_info["temperature"] = 1.0
    out = out.union(worker.compute_log_probs(out))
    out = out.union(worker.compute_ref_log_probs(out))
    # reward the first sample of each group, punish the rest
    adv = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3] * 4)[:, None] * out.batch["response_mask"]
    out.batch["advantages"] = adv
    out.meta_info["mini_batch_size"] = len(out)
    return out


def test_update_raises_log_prob_of_rewarded_samples(tiny_world, prompts):
    worker = make_worker(tiny_world, micro_batch_size_per_device_for_update=16)
    batch = _training_batch(worker, prompts)
    before = batch.batch["old_log_probs"]
    metrics = worker.update_actor(batch).meta_info["metrics"]
    after = worker.compute_log_probs(batch).batch["old_log_probs"]
    mask = batch.batch["response_mask"]
    delta = ((after - before) * mask).sum(-1) / mask.sum(-1)
    rewarded, punished = delta[0::4], torch.cat([delta[1::4], delta[2::4], delta[3::4]])
    assert rewarded.mean() > 0 > punished.mean()
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/skipped_steps"] == 0
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # old == current on the first pass


def test_gradient_accumulation_matches_one_big_batch(tiny_world, prompts):
    results = []
    for micro in (16, 4):
        worker = make_worker(tiny_world, micro_batch_size_per_device_for_update=micro)
        # Plain SGD makes the weight change the (clipped) gradient itself; Adam's first step
        # would amplify float summation noise on near-zero gradients into sign flips.
        worker.actor.optimizer = torch.optim.SGD(worker.model.parameters(), lr=1.0)
        batch = _training_batch(worker, prompts)
        metrics = worker.update_actor(batch).meta_info["metrics"]
        results.append((metrics, [p.detach().clone() for p in worker.model.parameters()]))
    (m_big, p_big), (m_small, p_small) = results
    assert m_small["actor/grad_norm"] == pytest.approx(m_big["actor/grad_norm"], rel=1e-4)
    assert m_small["actor/pg_loss"] == pytest.approx(m_big["actor/pg_loss"], rel=1e-4, abs=1e-7)
    for a, b in zip(p_big, p_small):
        assert torch.allclose(a, b, atol=1e-6)


def test_non_finite_gradient_skips_the_step(tiny_world, prompts):
    worker = make_worker(tiny_world)
    batch = _training_batch(worker, prompts)
    batch.batch["advantages"][0, 0] = float("nan")
    params = [p.detach().clone() for p in worker.model.parameters()]
    metrics = worker.update_actor(batch).meta_info["metrics"]
    assert metrics["actor/skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, worker.model.parameters()))


def test_frozen_vision_tower_keeps_its_weights(tiny_world, prompts):
    config_worker = make_worker(tiny_world)
    config_worker.config.actor.model.freeze_vision_tower = True
    worker = ActorRolloutRefWorker(config_worker.config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    visual = {k: v.clone() for k, v in worker.model.model.visual.state_dict().items()}
    lm_before = worker.model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    worker.update_actor(_training_batch(worker, prompts))
    assert all(torch.equal(visual[k], v) for k, v in worker.model.model.visual.state_dict().items())
    assert not torch.equal(lm_before, worker.model.model.language_model.layers[0].mlp.up_proj.weight)


def test_kl_loss_is_zero_at_start_and_positive_after_an_update(tiny_world, prompts):
    worker = make_worker(tiny_world)
    batch = _training_batch(worker, prompts)
    first = worker.update_actor(batch).meta_info["metrics"]
    assert first["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)
    second = worker.update_actor(batch).meta_info["metrics"]
    assert second["actor/kl_loss"] > 0
