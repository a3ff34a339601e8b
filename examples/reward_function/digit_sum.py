"""Reward of the digit-sum world: two handwritten digits side by side, "what is their sum?".

    overall = (1 - format_weight) * accuracy + format_weight * format

- accuracy: the boxed sum graded against the ground truth;
- format: 1 when the response is `<description>...</description> <think>...</think> \\boxed{...}`;
- perception (reported, not part of overall): 1 when the description names the two digits of the
  sample's `digits` column in order, as numerals or words ("3 and 5", "three and five"); other
  numbers may appear in between. It shows whether the model reads the image, apart from whether
  it adds correctly.

Validation: pass `reward_function_kwargs: {format_weight: 0.0}`, so overall is the accuracy.
"""

import re

from verl.utils.grading import extract_boxed, extract_tag, grade_answer, see_think_format_ok

_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_MENTION = re.compile(r"\b(\d|" + "|".join(_DIGIT_WORDS) + r")\b", re.IGNORECASE)


def _mentioned_digits(description: str) -> list[int]:
    mentions = [match.lower() for match in _DIGIT_MENTION.findall(description)]
    return [int(m) if m.isdigit() else _DIGIT_WORDS.index(m) for m in mentions]


def _names_in_order(mentioned: list[int], wanted: list[int]) -> bool:
    """Whether `wanted` is a subsequence of `mentioned`."""
    remaining = iter(mentioned)
    return all(digit in remaining for digit in wanted)


def _perception(response: str, digits) -> float:
    description = extract_tag(response, "description")
    if description is None:
        return 0.0
    # The column may hold a list of ints or a string such as "35" or "3,5".
    wanted = [int(d) for d in (re.findall(r"\d", digits) if isinstance(digits, str) else digits)]
    return float(_names_in_order(_mentioned_digits(description), wanted))


def compute_score(reward_inputs: list[dict], format_weight: float = 0.1) -> list[dict[str, float]]:
    scores = []
    for reward_input in reward_inputs:
        response = reward_input["response"]
        accuracy = float(grade_answer(extract_boxed(response), reward_input["ground_truth"]))
        format_score = float(see_think_format_ok(response))
        scores.append(
            {
                "overall": (1 - format_weight) * accuracy + format_weight * format_score,
                "accuracy": accuracy,
                "format": format_score,
                "perception": _perception(response, reward_input["extra"]["digits"]),
            }
        )
    return scores
