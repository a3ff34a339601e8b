"""Vision-SR1 reward: answer accuracy, see-think format, and the self visual reward.

    overall = accuracy_weight * accuracy + format_weight * format + visual_weight * visual

- accuracy: the response's last `\\boxed{}` graded against the ground truth (mathruler rules);
- format: 1 when the response is `<description>...</description> <think>...</think> \\boxed{...}`;
- visual: the fraction of the response's text-only answers (the self-reward stage re-asks the
  policy with only its own description) whose boxed answer is correct; 0 when there are none,
  so a response without a description gets no visual credit.

Returned keys: overall, accuracy, format, visual, and description_accuracy (the same number as
visual, under the name the original Vision-SR1 dashboards used).

Validation: pass `reward_function_kwargs: {accuracy_weight: 1.0, format_weight: 0.0}` so that the
validation reward is the plain accuracy (validation does not run the self-reward stage, so visual
is 0 there).
"""

from verl.utils.grading import extract_boxed, grade_answer, see_think_format_ok


def _is_correct(text: str, ground_truth: str) -> float:
    return float(grade_answer(extract_boxed(text), ground_truth))


def compute_score(
    reward_inputs: list[dict], accuracy_weight: float = 0.9, format_weight: float = 0.1, visual_weight: float = 1.0
) -> list[dict[str, float]]:
    scores = []
    for reward_input in reward_inputs:
        ground_truth = reward_input["ground_truth"]
        accuracy = _is_correct(reward_input["response"], ground_truth)
        format_score = float(see_think_format_ok(reward_input["response"]))
        answers = reward_input["description_answers"] or []
        visual = sum(_is_correct(answer, ground_truth) for answer in answers) / len(answers) if answers else 0.0
        scores.append(
            {
                "overall": accuracy_weight * accuracy + format_weight * format_score + visual_weight * visual,
                "accuracy": accuracy,
                "format": format_score,
                "visual": visual,
                "description_accuracy": visual,
            }
        )
    return scores


# Tells the trainer to run the self-reward stage and fill `description_answers`.
compute_score.needs_description_answers = True
