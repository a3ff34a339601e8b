"""The self-reward stage: description extraction, the leak fix, text-only prompts, alignment of
second-pass answers with their responses, skipping when unused, and both advantage modes."""

import numpy as np
import pytest
import torch

from verl.algorithms import core_algos
from verl.protocol import SamplingParams
from verl.reward import RewardFunction
from verl.trainer.config import SelfRewardConfig
from verl.trainer.self_reward import SelfRewardStage, states_answer
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker

PERCEPTION = "examples/format_prompt/perception_prompt.jinja"


@pytest.fixture(scope="module")
def worker(tiny_world):
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_5_vl")
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    return worker


def stage(tokenizer, **overrides) -> SelfRewardStage:
    return SelfRewardStage(SelfRewardConfig(enable="true", prompt_template=PERCEPTION, **overrides), tokenizer, True)


def test_description_extraction_by_tag_and_regex(worker):
    s = stage(worker.tokenizer)
    assert s.extract_description("<description> two digits, 3 and 5 </description><think>..") == "two digits, 3 and 5"
    assert s.extract_description("<think>no description</think> \\boxed{8}") is None
    assert s.extract_description("<description>  </description>") is None  # empty is no description
    custom = stage(worker.tokenizer, description_regex=r"SEE:(.*?)THINK:")
    assert custom.extract_description("SEE: a cat THINK: ...") == "a cat"
    with pytest.raises(ValueError, match="capturing group"):
        stage(worker.tokenizer, description_regex=r"SEE:.*")


def test_second_pass_prompt_is_text_only_with_raw_question_and_chat_template(worker):
    s = stage(worker.tokenizer)
    ids = s.build_prompt_ids("The image shows the digits 3 and 5.", "What is the sum of the two digits in the image?")
    text = worker.tokenizer.decode(ids)
    image_ids = {worker.model.config.image_token_id, worker.model.config.vision_start_token_id}
    assert not image_ids & set(ids)
    assert "<image>" not in text
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    assert "Image description: The image shows the digits 3 and 5." in text
    assert "Question: What is the sum of the two digits in the image?" in text


def _generate(worker):
    def generate(prompts):
        return worker.generate_sequences(prompts)

    return generate


RESPONSES = [
    "<description>The image shows the digits 3 and 5.</description> <think>3 + 5 = 8.</think> \\boxed{8}",
    "<think>no description here, answer 8</think> \\boxed{8}",
    "<description>The image shows the digits 7 and 2.</description> <think>7 + 2 = 9.</think> \\boxed{9}",
    "<description>The image shows the digits 0 and 4.</description> \\boxed{4}",
]
QUESTION = "What is the sum of the two digits in the image?"


def test_response_without_description_gets_no_second_pass_and_answers_align(worker):
    s = stage(worker.tokenizer, n=2)
    greedy = SamplingParams(n=8, temperature=0.0, max_new_tokens=12, seed=0)
    result = s.run(RESPONSES, [QUESTION] * 4, ["8", "8", "9", "4"], _generate(worker), greedy)
    assert result.answers[1] is None  # the leak fix: the whole response is never re-prompted
    assert result.descriptions[1] is None
    assert all(len(result.answers[i]) == 2 for i in (0, 2, 3))  # the stage's own n, not the rollout's
    assert result.metrics["self_reward/second_pass_prompts"] == 3
    assert result.metrics["self_reward/description_rate"] == 0.75

    # Alignment: the answer to each description does not depend on its position in the batch.
    order = [3, 2, 1, 0]
    shuffled = s.run([RESPONSES[i] for i in order], [QUESTION] * 4, ["4", "9", "8", "8"], _generate(worker), greedy)
    for new_position, old_position in enumerate(order):
        assert shuffled.answers[new_position] == result.answers[old_position]
    # and each equals the answer generated for that description alone
    alone = s.run([RESPONSES[2]], [QUESTION], ["9"], _generate(worker), greedy)
    assert alone.answers[0] == result.answers[2]


def test_leak_guard_denies_descriptions_that_state_the_answer(worker):
    assert states_answer("the digits 0 and 4", "4") and not states_answer("digits 3 and 5", "8")
    assert not states_answer("digits 14 and 2", "4") and not states_answer("about 4.5 cm", "4")
    assert states_answer("the answer is 4.", "4")
    s = stage(worker.tokenizer, deny_answer_leak=True)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    result = s.run(RESPONSES, [QUESTION] * 4, ["8", "8", "9", "4"], _generate(worker), greedy)
    assert result.answers[3] is None and result.answers[0] is not None
    assert result.metrics["self_reward/leak_denied"] == 1


def test_stage_is_skipped_when_no_reward_needs_it(worker, tmp_path):
    plain = RewardFunction("examples/reward_function/see_think.py:compute_score")
    needs = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score")
    assert not plain.needs_description_answers and needs.needs_description_answers
    auto = SelfRewardConfig(prompt_template=PERCEPTION)
    assert not SelfRewardStage(auto, worker.tokenizer, plain.needs_description_answers).active
    assert SelfRewardStage(auto, worker.tokenizer, needs.needs_description_answers).active
    forced_off = SelfRewardConfig(enable="false", prompt_template=PERCEPTION)
    assert not SelfRewardStage(forced_off, worker.tokenizer, True).active
    with pytest.raises(FileNotFoundError, match="prompt_template"):
        SelfRewardStage(SelfRewardConfig(prompt_template=str(tmp_path / "x.jinja")), worker.tokenizer, True)


def test_visual_reward_uses_the_aligned_answers():
    reward = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score")
    samples = [
        {
            "response": RESPONSES[0],
            "response_length": 10,
            "ground_truth": "8",
            "question": QUESTION,
            "description_answers": ["<think>3+5</think> \\boxed{8}", "\\boxed{7}"],
            "extra": {},
        },
        {
            "response": RESPONSES[1],
            "response_length": 10,
            "ground_truth": "8",
            "question": QUESTION,
            "description_answers": None,
            "extra": {},
        },
    ]
    scores = reward(samples)
    assert scores[0]["visual"] == 0.5 and scores[1]["visual"] == 0.0
    assert scores[1]["accuracy"] == 1.0  # the answer is right, but without a description: no visual credit


def test_decoupled_and_summed_advantages_differ_where_components_disagree():
    # one group of 4: accuracy varies a lot, visual only in one response
    accuracy = torch.tensor([1.0, 1.0, 0.0, 0.0])
    visual = torch.tensor([0.0, 0.0, 0.0, 1.0])
    weights = {"accuracy": 0.9, "visual": 1.0}
    index = np.array(["g"] * 4, dtype=object)
    mask = torch.ones(4, 3)
    overall = 0.9 * accuracy + 1.0 * visual
    token_scores = torch.zeros(4, 3)
    token_scores[:, -1] = overall
    summed, _ = core_algos.get_adv_estimator("grpo")(token_level_rewards=token_scores, response_mask=mask, index=index)
    decoupled = core_algos.compute_decoupled_advantages({"accuracy": accuracy, "visual": visual}, weights, mask, index)
    # summed: response 3 (wrong but good perception) outranks response 0 (right, no perception)? 1.0 > 0.9
    assert summed[3, 0] > summed[0, 0]
    # decoupled: each component is normalised on its own, so the rare visual success weighs more
    assert not torch.allclose(summed, decoupled)
    acc_norm = (accuracy - accuracy.mean()) / (accuracy.std() + 1e-6)
    vis_norm = (visual - visual.mean()) / (visual.std() + 1e-6)
    assert torch.allclose(decoupled[:, 0], 0.9 * acc_norm + vis_norm, atol=1e-5)
