"""Chunked log-probs and entropy (verl/models/logprobs.py) against the plain full-logits path.

The plain path is what the actor computed before: full logits for the response positions, upcast
to fp32, divided by the temperature, log_softmax + gather, and entropy from the full distribution.
"""

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from verl.models.loading import load_model, load_tokenizer_and_processor
from verl.models.logprobs import capture_lm_head_input, chunked_log_probs, response_log_probs
from verl.models.multimodal import batch_multimodal_inputs, multimodal_token_ids, reset_rope_cache
from verl.models.positions import compute_position_ids
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts

SEE_THINK = "examples/format_prompt/see_think.jinja"
RESPONSE_LENGTHS = (12, 7, 3)  # unequal rows: the shorter ones are padded (attention mask 0)


@dataclass
class Batch:
    model: torch.nn.Module
    forward_kwargs: dict
    responses: torch.Tensor  # (b, T)
    response_mask: torch.Tensor  # (b, T)


def build_batch(tiny_world, name: str, dtype: torch.dtype = torch.float32) -> Batch:
    """Real prompts (with images for the VL models) followed by random responses of unequal lengths."""
    path = str(tiny_world / "models" / name)
    tokenizer, processor = load_tokenizer_and_processor(path)
    model = load_model(path, dtype=dtype)
    vision = processor is not None
    dataset = PromptDataset(
        str(tiny_world / "data" / ("digit_sum" if vision else "text_sum") / "val.parquet"),
        tokenizer,
        processor,
        PromptDatasetConfig(format_prompt=SEE_THINK if vision else None),
    )
    prompts = collate_prompts([dataset[i] for i in range(len(RESPONSE_LENGTHS))], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompts.batch["input_ids"], prompts.batch["attention_mask"]
    length = max(RESPONSE_LENGTHS)
    generator = torch.Generator().manual_seed(0)
    responses = torch.randint(0, len(tokenizer), (len(RESPONSE_LENGTHS), length), generator=generator)
    banned = torch.tensor(multimodal_token_ids(model.config), dtype=torch.long)
    responses[torch.isin(responses, banned)] = 0
    response_mask = (torch.arange(length)[None, :] < torch.tensor(RESPONSE_LENGTHS)[:, None]).long()
    responses[response_mask == 0] = tokenizer.pad_token_id
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    multimodal = batch_multimodal_inputs(prompts.non_tensor_batch["multi_modal_inputs"])
    assert vision == ("pixel_values" in multimodal)
    position_ids = compute_position_ids(
        model, input_ids, attention_mask, multimodal.get("image_grid_thw"), prompt_length=prompt_ids.shape[1]
    )
    if position_ids.dim() == 3:  # (b, 3, L) -> (3, b, L), as the actor passes it
        position_ids = position_ids.transpose(0, 1)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
        **multimodal,
    }
    return Batch(model, kwargs, responses, response_mask)


@pytest.fixture(scope="module")
def batches(tiny_world):
    cache = {}

    def get(name: str) -> Batch:
        if name not in cache:
            cache[name] = build_batch(tiny_world, name)
        return cache[name]

    return get


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def plain_log_probs(batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The old actor path: (b, T, V) fp32 logits, log_softmax + gather, entropy from the full logits."""
    reset_rope_cache(batch.model)
    length = batch.responses.shape[1]
    logits = batch.model(**batch.forward_kwargs, logits_to_keep=length + 1).logits[:, :-1, :].float()
    if temperature > 0:
        logits = logits / temperature
    log_probs = logits.log_softmax(-1).gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    return log_probs, entropy_of(logits)


def chunked(batch: Batch, temperature: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    reset_rope_cache(batch.model)
    return response_log_probs(batch.model, batch.forward_kwargs, batch.responses, temperature, chunk_size, True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).abs().max() / scale)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [4, 7, 1000])  # divides N = 36, does not, one chunk for all
def test_values_match_the_full_logits_path(batches, chunk_size, temperature):
    batch = batches("qwen2_5_vl")
    with torch.no_grad():
        expected_lp, expected_ent = plain_log_probs(batch, temperature)
        log_probs, entropy = chunked(batch, temperature, chunk_size)
    assert log_probs.shape == entropy.shape == batch.responses.shape
    assert log_probs.dtype == entropy.dtype == torch.float32
    assert relative_error(log_probs, expected_lp) < 1e-5
    assert relative_error(entropy, expected_ent) < 1e-5
    # Not trivially equal: entropies vary per position and log-probs are far from uniform.
    assert entropy.std() > 0 and log_probs.std() > 0.1


# entropy_coeff 0: the chunked path still computes the entropy (the actor reports it) but leaves it
# out of the loss, as the actor does; its backward then receives no entropy gradient at all.
@pytest.mark.parametrize(
    "name, entropy_coeff", [("qwen2_5_vl", 0.01), ("qwen2_vl", 0.01), ("qwen2_text", 0.01), ("qwen2_5_vl", 0.0)]
)
def test_gradients_match_the_full_logits_path(batches, name, entropy_coeff):
    batch = batches(name)
    model = batch.model
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight  # tied: the gradient reaches both uses
    mask = batch.response_mask.float()
    advantages = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)

    def gradients(compute) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        log_probs, entropy = compute()
        loss = (advantages * log_probs * mask).sum()
        if entropy_coeff != 0:
            loss = loss - entropy_coeff * (entropy * mask).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = gradients(lambda: plain_log_probs(batch, 0.7))
    actual = gradients(lambda: chunked(batch, 0.7, 5))
    model.zero_grad(set_to_none=True)
    assert actual.keys() == expected.keys()
    assert len(expected) == len(list(model.parameters()))
    if name != "qwen2_text":
        assert any(n.startswith("model.visual.") for n in expected)
    for param_name, grad in expected.items():
        assert relative_error(actual[param_name], grad) < 1e-5, param_name
    head_name = next(n for n, p in model.named_parameters() if p is head.weight)
    assert expected[head_name].abs().max() > 0


def test_without_entropy_the_log_probs_are_the_same_and_entropy_is_none(batches):
    batch = batches("qwen2_text")
    with torch.no_grad():
        expected, _ = chunked(batch, 1.0, 8)
        reset_rope_cache(batch.model)
        log_probs, entropy = response_log_probs(batch.model, batch.forward_kwargs, batch.responses, 1.0, 8)
    assert entropy is None
    assert torch.equal(log_probs, expected)


def test_capture_makes_the_model_compute_no_logits_and_is_removed_after(batches):
    batch = batches("qwen2_vl")
    model = batch.model
    length = batch.responses.shape[1]
    with torch.no_grad():
        with capture_lm_head_input(model) as captured:
            reset_rope_cache(model)
            output = model(**batch.forward_kwargs, logits_to_keep=length + 1)
        assert output.logits.shape == (len(batch.responses), 0, model.config.text_config.vocab_size)
        hidden, weight = captured.single()
        assert hidden.shape == (len(batch.responses), length + 1, model.config.text_config.hidden_size)
        assert weight is model.lm_head.weight
        reset_rope_cache(model)
        full = model(**batch.forward_kwargs, logits_to_keep=length + 1).logits
    assert torch.allclose(full, hidden @ weight.T, atol=1e-5)


def test_lm_head_with_a_bias_is_refused(tiny_world):
    model = load_model(str(tiny_world / "models" / "qwen2_text"))
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match="bias"), capture_lm_head_input(model):
        pass


def test_bf16_matches_the_plain_path_and_stays_close_to_fp32():
    generator = torch.Generator().manual_seed(0)
    n, h, v = 37, 64, 3000
    hidden32 = torch.randn(n, h, generator=generator)
    weight32 = torch.randn(v, h, generator=generator) * 0.3
    tokens = torch.randint(0, v, (n,), generator=generator)
    weights = torch.randn(n, generator=generator)

    def run(hidden, weight, chunked_path: bool):
        hidden = hidden.detach().requires_grad_()
        weight = weight.detach().requires_grad_()
        if chunked_path:
            log_probs, entropy = chunked_log_probs(hidden, weight, tokens, 0.7, chunk_size=8, with_entropy=True)
        else:
            logits = F.linear(hidden, weight).float() / 0.7
            log_probs = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            entropy = entropy_of(logits)
        ((weights * log_probs).sum() - 0.01 * entropy.sum()).backward()
        return log_probs, entropy, hidden.grad, weight.grad

    hidden16, weight16 = hidden32.bfloat16(), weight32.bfloat16()
    chunked16 = run(hidden16, weight16, True)
    plain16 = run(hidden16, weight16, False)
    reference = run(hidden32, weight32, False)
    lp, ent, grad_hidden, grad_weight = chunked16
    assert lp.dtype == ent.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    # The same bf16 logits as the plain path: agreement to fp32 rounding for the values, to bf16
    # rounding for the gradients (the plain path rounds dlogits to bf16 before both products).
    assert relative_error(lp, plain16[0]) < 1e-5
    assert relative_error(ent, plain16[1]) < 1e-5
    assert relative_error(grad_hidden.float(), plain16[2].float()) < 2e-2
    assert relative_error(grad_weight.float(), plain16[3].float()) < 2e-2
    # Against fp32 inputs, only bf16 rounding of the inputs and logits remains.
    for actual, expected in zip(chunked16, reference):
        assert relative_error(actual.float(), expected) < 5e-2


@pytest.mark.parametrize("with_entropy, use_entropy", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_gradcheck(with_entropy, use_entropy, temperature):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    tokens = torch.tensor([0, 6, 3, 3, 1])

    def function(hidden, weight):
        log_probs, entropy = chunked_log_probs(hidden, weight, tokens, temperature, 2, with_entropy)
        if not with_entropy:
            assert entropy is None
            return log_probs
        return (log_probs, entropy) if use_entropy else log_probs

    assert torch.autograd.gradcheck(function, (hidden, weight))


def backward_ops(with_entropy: bool, entropy_coeff: float) -> Counter:
    """The aten ops (name -> count) that one backward of the chunked path runs, as the profiler records them."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 50, (10,), generator=generator)
    log_probs, entropy = chunked_log_probs(hidden, weight, tokens, 0.7, 4, with_entropy)
    loss = (torch.linspace(-1.0, 1.0, 10) * log_probs).sum()
    if entropy_coeff != 0:
        loss = loss - entropy_coeff * entropy.sum()
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        loss.backward()
    return Counter(event.name for event in recorded.events() if event.name.startswith("aten::"))


def test_entropy_left_out_of_the_loss_costs_its_backward_nothing():
    # The actor always asks for the entropy (it is reported); with entropy_coeff 0 it is not in the
    # loss, and the backward must then run exactly the ops of a log-prob-only backward: no zeros
    # made for the entropy's gradient, no per-chunk exp/add/mul over the vocabulary for it.
    log_prob_only = backward_ops(with_entropy=False, entropy_coeff=0.0)
    assert backward_ops(with_entropy=True, entropy_coeff=0.0) == log_prob_only
    # The comparison can tell: with entropy in the loss the backward does more.
    with_entropy_grad = backward_ops(with_entropy=True, entropy_coeff=0.01)
    assert with_entropy_grad["aten::exp"] > 0 and log_prob_only["aten::exp"] == 0


def test_shapes_are_checked():
    hidden, weight = torch.zeros(4, 3), torch.zeros(10, 3)
    with pytest.raises(ValueError, match="disagree"):
        chunked_log_probs(hidden, weight, torch.zeros(5, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_log_probs(hidden, weight, torch.zeros(4, dtype=torch.long), 1.0, chunk_size=0)
