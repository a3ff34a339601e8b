"""Vision-SR1 reward: answer accuracy, see-think format, and the self visual reward.

    overall = accuracy_weight * accuracy + format_weight * format + visual_weight * visual
              + consistency_weight * consistency

- accuracy: the response's last `\\boxed{}` graded against the ground truth (mathruler rules);
- format: 1 when the response is `<description>...</description> <think>...</think> \\boxed{...}`;
- description_accuracy: the fraction of the response's text-only answers (the self-reward stage
  re-asks the policy with only its own description) whose boxed answer is correct; 0 when there
  are none, so a response without a description gets no visual credit;
- visual, by `visual_reward`:
  - "absolute" (default, the original method): visual = description_accuracy;
  - "gain": visual = max(0, description_accuracy - prior_accuracy), where prior_accuracy is the
    accuracy of the same text-only pass asked with the question alone (`prior_answers`, from
    `self_reward.counterfactual_baseline=true`). A description that only steers toward the
    answer the question's prior already gives (say, always the most frequent sum) earns nothing;
    only what the description adds beyond the question pays.
- consistency: 1 when the response's boxed answer agrees with the answer its description leads to
  (the most frequent boxed answer of its text-only answers, the earliest on a tie); 0 when there
  is no description answer. The default weight 0 only reports it.

Returned keys: overall, accuracy, format, visual, description_accuracy, consistency; with prior
answers also prior_accuracy and visual_gain (reported in both modes, so a dashboard shows how much
of the absolute visual reward the prior explains).

Validation: pass `reward_function_kwargs: {accuracy_weight: 1.0, format_weight: 0.0}` so that the
validation reward is the plain accuracy (without the self-reward stage visual is 0 there).
"""

from verl.utils.grading import answers_accuracy, extract_boxed, grade_answer, leading_answer, see_think_format_ok

VISUAL_REWARDS = ("absolute", "gain")


def compute_score(
    reward_inputs: list[dict],
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    visual_weight: float = 1.0,
    visual_reward: str = "absolute",
    consistency_weight: float = 0.0,
) -> list[dict[str, float]]:
    if visual_reward not in VISUAL_REWARDS:
        raise ValueError(f"visual_reward={visual_reward!r} is not one of {VISUAL_REWARDS}")
    scores = []
    for reward_input in reward_inputs:
        ground_truth = reward_input["ground_truth"]
        final_answer = extract_boxed(reward_input["response"])
        accuracy = float(grade_answer(final_answer, ground_truth))
        format_score = float(see_think_format_ok(reward_input["response"]))
        description_answers = reward_input["description_answers"]
        description_accuracy = answers_accuracy(description_answers or [], ground_truth)
        led_to = leading_answer(description_answers or [])
        consistency = float(led_to is not None and grade_answer(final_answer, led_to))
        prior: dict[str, float] = {}
        prior_answers = reward_input.get("prior_answers")
        if prior_answers is not None:
            prior["prior_accuracy"] = answers_accuracy(prior_answers, ground_truth)
            prior["visual_gain"] = max(0.0, description_accuracy - prior["prior_accuracy"])
        elif visual_reward == "gain" and description_answers is not None:
            raise ValueError("visual_reward='gain' needs prior answers: set self_reward.counterfactual_baseline=true")
        visual = prior.get("visual_gain", 0.0) if visual_reward == "gain" else description_accuracy
        score = {
            "overall": accuracy_weight * accuracy
            + format_weight * format_score
            + visual_weight * visual
            + consistency_weight * consistency,
            "accuracy": accuracy,
            "format": format_score,
            "visual": visual,
            "description_accuracy": description_accuracy,
            "consistency": consistency,
            **prior,
        }
        scores.append(score)
    return scores


# Tells the trainer to run the self-reward stage and fill `description_answers`.
compute_score.needs_description_answers = True
