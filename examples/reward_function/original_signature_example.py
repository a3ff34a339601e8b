"""A reward function in the original Vision-SR1 signature, to show that such files run unchanged.

The framework recognises the first parameter `predicts` and passes the responses, ground truths,
questions and one text-only answer per response (`description_answers`, "" when the response had
no description or the self-reward stage did not run).

    overall = (1 - format_weight) * accuracy + format_weight * format + description_accuracy
"""

from verl.utils.grading import extract_boxed, grade_answer, see_think_format_ok


def compute_score(
    predicts: list[str],
    ground_truths: list[str],
    questions: list[str],
    description_answers: list[str],
    format_weight: float = 0.1,
) -> list[dict[str, float]]:
    scores = []
    for predict, ground_truth, description_answer in zip(predicts, ground_truths, description_answers):
        accuracy = float(grade_answer(extract_boxed(predict), ground_truth))
        format_score = float(see_think_format_ok(predict))
        description_accuracy = float(grade_answer(extract_boxed(description_answer), ground_truth))
        scores.append(
            {
                "overall": (1 - format_weight) * accuracy + format_weight * format_score + description_accuracy,
                "accuracy": accuracy,
                "format": format_score,
                "description_accuracy": description_accuracy,
            }
        )
    return scores
