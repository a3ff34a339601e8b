"""See-think reward without the self visual reward (the "see-think, no self-reward" ablation).

    overall = accuracy_weight * accuracy + format_weight * format

- accuracy: the response's last `\\boxed{}` graded against the ground truth (mathruler rules);
- format: 1 when the response is `<description>...</description> <think>...</think> \\boxed{...}`.

Validation: pass `reward_function_kwargs: {accuracy_weight: 1.0, format_weight: 0.0}` so that the
validation reward is the plain accuracy.
"""

from verl.utils.grading import extract_boxed, grade_answer, see_think_format_ok


def compute_score(
    reward_inputs: list[dict], accuracy_weight: float = 0.9, format_weight: float = 0.1
) -> list[dict[str, float]]:
    scores = []
    for reward_input in reward_inputs:
        accuracy = float(grade_answer(extract_boxed(reward_input["response"]), reward_input["ground_truth"]))
        format_score = float(see_think_format_ok(reward_input["response"]))
        scores.append(
            {
                "overall": accuracy_weight * accuracy + format_weight * format_score,
                "accuracy": accuracy,
                "format": format_score,
            }
        )
    return scores
