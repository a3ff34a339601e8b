"""The self-reward stage: description extraction, the leak fix, text-only prompts, alignment of
second-pass answers with their responses, skipping when unused, both advantage modes, and the
counterfactual (question-alone) baseline with the gain and consistency rewards built on it, and
the dedupe of identical text-only prompts."""

import json

import numpy as np
import pytest
import torch

from verl.algorithms import core_algos
from verl.protocol import SamplingParams
from verl.reward import RewardFunction, RewardFunctionError
from verl.trainer.config import PPOConfig, SelfRewardConfig
from verl.trainer.main import build_trainer, main
from verl.trainer.self_reward import SelfRewardStage, states_answer
from verl.utils.config import load_config
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


# ---------------------------------------------------------------- counterfactual baseline (question alone)
# Three prompts with different questions, so a prompt's text names its uid. Their responses are
# interleaved (rows of one uid are not adjacent); response 1 has no description.
UIDS = ["p", "q", "p", "r", "q", "r"]
QUESTIONS = {"p": QUESTION, "q": "What is the sum of 3 and 5?", "r": "What is the sum of 7 and 2?"}
CF_RESPONSES = [RESPONSES[0], RESPONSES[1], RESPONSES[2], RESPONSES[3], RESPONSES[0], RESPONSES[2]]
CF_TRUTHS = ["8", "8", "9", "4", "8", "9"]


def _recording(worker, calls):
    """The real worker's generate, keeping each call's input prompts and output."""

    def generate(prompts):
        output = worker.generate_sequences(prompts)
        calls.append((prompts, output))
        return output

    return generate


def _run_rows(s, worker, rows, sampling, calls, with_uids=True):
    return s.run(
        [CF_RESPONSES[i] for i in rows],
        [QUESTIONS[UIDS[i]] for i in rows],
        [CF_TRUTHS[i] for i in rows],
        _recording(worker, calls),
        sampling,
        uids=[UIDS[i] for i in rows] if with_uids else None,
    )


def _prompt_texts(worker, prompts):
    return _decode_prompts(worker, prompts.batch["input_ids"], prompts.batch["attention_mask"])


def _decode_prompts(worker, ids, mask):
    ids = ids.masked_fill(mask == 0, worker.tokenizer.pad_token_id)
    return [text.replace(worker.tokenizer.pad_token, "") for text in worker.tokenizer.batch_decode(ids)]


def test_counterfactual_baseline_is_off_by_default(worker):
    assert SelfRewardConfig().counterfactual_baseline is False
    s = stage(worker.tokenizer, n=2)
    calls = []
    greedy = SamplingParams(n=4, temperature=0.0, max_new_tokens=6)
    result = _run_rows(s, worker, range(6), greedy, calls)
    assert result.prior_answers is None
    assert result.metrics["self_reward/prior_passes"] == 0
    # one call with the five descriptions only: no question-alone prompt
    assert len(calls) == 1 and len(calls[0][0]) == 5
    assert all("Image description:" in text for text in _prompt_texts(worker, calls[0][0]))


def test_question_alone_pass_runs_once_per_prompt_text_only_in_the_same_call(worker):
    s = stage(worker.tokenizer, n=2, counterfactual_baseline=True)
    calls = []
    greedy = SamplingParams(n=4, temperature=0.0, max_new_tokens=6)
    result = _run_rows(s, worker, range(6), greedy, calls)
    assert len(calls) == 1  # descriptions and priors in one generate call
    prompts, output = calls[0]
    texts = _prompt_texts(worker, prompts)
    described, alone = texts[:5], texts[5:]
    assert len(alone) == 3 and result.metrics["self_reward/prior_passes"] == 3  # p, q, r once each
    assert len(output) == (5 + 3) * 2  # the stage's n for both kinds
    image_ids = {worker.model.config.image_token_id, worker.model.config.vision_start_token_id}
    assert not image_ids & set(prompts.batch["input_ids"].flatten().tolist())
    for text, uid in zip(alone, ["p", "q", "r"]):  # in order of first appearance
        assert f"Question: {QUESTIONS[uid]}" in text
        assert "Image description" not in text and not any(d and d in text for d in result.descriptions)
        assert "<image>" not in text and "<description>" not in text
    assert all("Image description: The image shows the digits" in text for text in described)
    # n answers per prompt, one list per response row, equal within a prompt
    assert all(len(answers) == 2 for answers in result.prior_answers)
    for i, uid in enumerate(UIDS):
        assert result.prior_answers[i] == result.prior_answers[UIDS.index(uid)]
    # adding the question-alone prompts leaves the description answers as they were
    off = _run_rows(stage(worker.tokenizer, n=2), worker, range(6), greedy, [])
    assert off.answers == result.answers


def _answers_by_prompt(worker, output):
    """Each output row's decoded answer, grouped by the question of a question-alone prompt."""
    prompt_ids = output.batch["prompts"]
    prompts = _decode_prompts(worker, prompt_ids, output.batch["attention_mask"][:, : prompt_ids.shape[1]])
    answers = worker.tokenizer.batch_decode(
        output.batch["responses"].masked_fill(output.batch["response_mask"] == 0, worker.tokenizer.pad_token_id),
        skip_special_tokens=True,
    )
    found = {}
    for prompt, answer in zip(prompts, answers):
        if "Image description" in prompt:
            continue
        uid = next(u for u, q in QUESTIONS.items() if f"Question: {q}\n" in prompt)
        found.setdefault(uid, []).append(answer)
    return found


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4, 5], [5, 1, 3, 0, 4, 2]])
def test_prior_answers_follow_their_prompt_under_n_and_reordering(worker, order):
    # Sampled (not greedy) answers differ from row to row, so a misaligned answer would show.
    s = stage(worker.tokenizer, n=3, counterfactual_baseline=True)
    calls = []
    sampled = SamplingParams(n=8, temperature=1.0, max_new_tokens=8, seed=3)
    result = _run_rows(s, worker, order, sampled, calls)
    by_prompt = _answers_by_prompt(worker, calls[0][1])
    assert sorted(by_prompt) == ["p", "q", "r"] and all(len(a) == 3 for a in by_prompt.values())
    assert len({answer for answers in by_prompt.values() for answer in answers}) > 3  # not all alike
    for position, row in enumerate(order):
        assert result.prior_answers[position] == by_prompt[UIDS[row]]


def test_counterfactual_baseline_needs_aligned_uids(worker):
    s = stage(worker.tokenizer, counterfactual_baseline=True)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="one uid per response"):
        _run_rows(s, worker, range(6), greedy, [], with_uids=False)
    with pytest.raises(ValueError, match="misaligned"):
        s.run(
            RESPONSES[:2], [QUESTION, "What is the sum of 3 and 5?"], ["8", "8"], _generate(worker), greedy, ["u", "u"]
        )


def _boxed(answer):
    return f"<think>from the description</think> \\boxed{{{answer}}}"


def _input(response, truth, description, prior):
    return {
        "response": response,
        "response_length": 10,
        "ground_truth": truth,
        "question": QUESTION,
        "description_answers": None if description is None else [_boxed(a) for a in description],
        "prior_answers": None if prior is None else [_boxed(a) for a in prior],
        "extra": {},
    }


NINE = "<description>The image shows the digits 5 and 4.</description> <think>5 + 4 = 9.</think> \\boxed{9}"
CASES = [
    # right answer, description right 3/4 (leads to 8), prior right 1/4: gain 0.5
    _input(RESPONSES[0], "8", ["8", "8", "7", "8"], ["9", "8", "9", "9"]),
    # the steering hack: description and prior both say 9, which is right: no gain
    _input(NINE, "9", ["9", "9", "9", "9"], ["9", "9", "9", "9"]),
    # prior better than description (1/4 vs 3/4): gain floored at 0; description leads to 7, response says 8
    _input(RESPONSES[0], "8", ["8", "7", "7", "7"], ["8", "8", "8", "7"]),
    # no description: no description accuracy, gain or consistency, prior reported
    _input(RESPONSES[1], "8", None, ["8", "8", "8", "8"]),
    # a tie (one 7, one 8): the earliest, 7, is where the description leads
    _input(RESPONSES[0], "8", ["7", "8"], ["7", "7"]),
]


def test_visual_gain_prior_accuracy_and_consistency_by_hand():
    absolute = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score")(CASES)
    expected = [  # description_accuracy, prior_accuracy, visual_gain, consistency
        (0.75, 0.25, 0.5, 1.0),
        (1.0, 1.0, 0.0, 1.0),
        (0.25, 0.75, 0.0, 0.0),
        (0.0, 1.0, 0.0, 0.0),
        (0.5, 0.0, 0.5, 0.0),
    ]
    for score, (description, prior, gain, consistency) in zip(absolute, expected):
        assert score["description_accuracy"] == pytest.approx(description)
        assert score["prior_accuracy"] == pytest.approx(prior)
        assert score["visual_gain"] == pytest.approx(gain)
        assert score["consistency"] == consistency
        assert score["visual"] == pytest.approx(description)  # absolute: the description accuracy
    # overall = 0.9 accuracy + 0.1 format + visual (+ consistency_weight * consistency)
    assert absolute[0]["overall"] == pytest.approx(0.9 + 0.1 + 0.75)
    assert absolute[1]["overall"] == pytest.approx(0.9 + 0.1 + 1.0)  # the hack pays in absolute mode
    assert absolute[3]["overall"] == pytest.approx(0.9 + 0.0 + 0.0)  # right, no description, bad format

    gain_fn = RewardFunction(
        "examples/reward_function/see_think_self_reward.py:compute_score",
        {"visual_reward": "gain", "consistency_weight": 0.5},
    )
    gain = gain_fn(CASES)
    assert [score["visual"] for score in gain] == pytest.approx([0.5, 0.0, 0.0, 0.0, 0.5])
    assert gain[0]["overall"] == pytest.approx(0.9 + 0.1 + 0.5 + 0.5)
    assert gain[1]["overall"] == pytest.approx(0.9 + 0.1 + 0.0 + 0.5)  # the hack no longer pays
    assert gain[2]["overall"] == pytest.approx(0.9 + 0.1 + 0.0 + 0.0)


def test_gain_without_prior_answers_is_an_error_and_absolute_omits_prior_keys():
    no_prior = [dict(CASES[0], prior_answers=None), {k: v for k, v in CASES[1].items() if k != "prior_answers"}]
    scores = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score")(no_prior)
    assert all("prior_accuracy" not in s and "visual_gain" not in s for s in scores)
    assert scores[0]["visual"] == 0.75 and scores[0]["consistency"] == 1.0
    gain = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score", {"visual_reward": "gain"})
    with pytest.raises(RewardFunctionError, match="counterfactual_baseline"):
        gain(no_prior)
    typo = RewardFunction("examples/reward_function/see_think_self_reward.py:compute_score", {"visual_reward": "gian"})
    with pytest.raises(RewardFunctionError, match="visual_reward"):
        typo(CASES)


def test_trainer_gives_prior_answers_to_the_reward_and_logs_the_baseline(tiny_world, tmp_path):
    val = tiny_world / "data/digit_sum/val.parquet"
    main(
        [
            f"data.train_files={val}",
            f"data.val_files={val}",
            "data.val_batch_size=64",
            f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
            "data.format_prompt=examples/format_prompt/see_think.jinja",
            "data.rollout_batch_size=4",
            "worker.actor.global_batch_size=4",
            "worker.actor.micro_batch_size_per_device_for_update=8",
            "worker.rollout.n=4",
            "data.max_response_length=16",
            "worker.reward.reward_function=examples/reward_function/see_think_self_reward.py:compute_score",
            "worker.reward.reward_function_kwargs={visual_reward: gain, consistency_weight: 0.1}",
            "self_reward.counterfactual_baseline=true",
            "self_reward.n=2",
            "self_reward.max_response_length=8",
            "trainer.logger=[file]",
            f"trainer.save_checkpoint_path={tmp_path}",
            "trainer.val_before_train=false",
            "trainer.max_steps=2",
        ]
    )
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f]
    metrics = steps[-1]  # validation runs after the last step only
    assert metrics["self_reward/prior_passes"] == 4  # one per prompt, not one per response
    assert {"reward/prior_accuracy", "reward/visual_gain", "reward/consistency"} <= set(metrics)
    assert "val/self_reward/prior_passes" in metrics and "val/reward/visual_gain" in metrics
    # Each step's rollout, description pass and question-alone pass share one weight sync (the hf
    # engine's sync copies nothing, but the worker decides when to sync as it does for vLLM).
    assert [step["perf/weight_syncs"] for step in steps] == [1, 1]
    assert not any(key.startswith("perf/max_memory") for key in metrics)  # GPU only


# ---------------------------------------------------------------- dedupe of identical text-only prompts
def _scripted_responses(ground_truths):
    """See-think responses whose descriptions repeat within and across groups (as a trained policy's
    do), with one response that has no description."""
    digits = ["3 and 5", "3 and 5", "7 and 2", "3 and 5"]
    return [
        f"<description>The image shows the digits {digits[row % 4]}.</description> <think>..</think> \\boxed{{{truth}}}"
        if row != 5
        else f"<think>no description</think> \\boxed{{{truth}}}"
        for row, truth in enumerate(ground_truths)
    ]


def test_dedupe_gives_the_answers_and_rewards_of_one_prompt_per_response(tiny_world, tmp_path):
    train = tiny_world / "data/digit_sum/train.parquet"
    config = load_config(
        [
            f"data.train_files={train}",
            "data.val_files=null",
            f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
            "data.format_prompt=examples/format_prompt/see_think.jinja",
            "data.rollout_batch_size=4",
            "worker.actor.global_batch_size=4",
            "worker.rollout.n=4",
            "data.max_response_length=8",
            "worker.reward.reward_function=examples/reward_function/see_think_self_reward.py:compute_score",
            "worker.reward.reward_function_kwargs={visual_reward: gain}",
            "self_reward.counterfactual_baseline=true",
            "self_reward.temperature=0",  # greedy: a shared answer is exactly the one it would get alone
            "self_reward.n=2",
            "self_reward.max_response_length=8",
            f"trainer.save_checkpoint_path={tmp_path}",
        ],
        PPOConfig,
    )
    trainer = build_trainer(config)
    prompts = next(iter(trainer.train_loader))
    prompts.non_tensor_batch["uid"] = np.array([f"u{i}" for i in range(len(prompts))], dtype=object)
    sampling = trainer._sampling()
    rollout = trainer._generate(prompts, sampling)  # the real rows: uids, questions, ground truths
    texts = _scripted_responses(list(rollout.non_tensor_batch["ground_truth"]))
    rollout.non_tensor_batch["response_text"] = np.array(texts, dtype=object)

    results = {}
    for dedupe in (False, True):
        batch = rollout[np.arange(len(rollout))]  # a copy: each pass fills its own columns
        calls = []
        trainer.self_reward.config.dedupe = dedupe
        generate = trainer.wg.generate_sequences

        def recording(prompts, calls=calls, generate=generate):
            """The worker group's own generate, recording what each call asks."""
            calls.append(prompts)
            return generate(prompts)

        trainer.wg.generate_sequences = recording
        try:
            metrics = trainer._run_self_reward(batch, sampling)
        finally:
            trainer.wg.generate_sequences = generate
        scores, bad = trainer._score_training(batch)
        assert not bad and len(calls) == 1  # descriptions and question-alone prompts in one call
        results[dedupe] = (batch.non_tensor_batch, scores, metrics, len(calls[0]))

    (plain, plain_scores, plain_metrics, plain_rows), (deduped, scores, metrics, rows) = results[False], results[True]
    for key in ("description", "description_answers", "prior_answers"):
        assert list(deduped[key]) == list(plain[key]), key
    assert scores == plain_scores
    assert deduped["description_answers"][5] is None and all(len(a) == 2 for a in deduped["prior_answers"])
    # 15 descriptions and 4 question-alone prompts asked; generated: one per prompt before, and after
    # dedupe 2 descriptions per question (3 prompts' "3 and 5" and "7 and 2") plus one question alone
    # (every digit-sum prompt asks the same question).
    assert plain_rows == plain_metrics["self_reward/generated_prompts"] == 15 + 4
    assert len(set(rollout.non_tensor_batch["question"])) == 1
    assert rows == metrics["self_reward/generated_prompts"] == 2 + 1
    assert metrics["self_reward/second_pass_prompts"] == 15 and metrics["self_reward/prior_passes"] == 4
