"""Rule-based grading, applied to every row before any judge is asked.

Free-form rows: the last `\\boxed{...}` is compared with the ground truth by mathruler's rules.
Multiple-choice rows: the chosen letter is found by `extract_choice` and string-matched.
"""

import re
from typing import Any

from schema import is_multiple_choice

from verl.utils.grading import extract_boxed, grade_answer

# Used when a multiple-choice row does not list its choices: the most options a benchmark has
# (MMMU-Pro's ten, A-J).
MAX_CHOICES_WITHOUT_LIST = 10

_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
# "(B)", "(B) Paris", "B", "B.", "B)", "B: Paris". A bare letter needs punctuation or the end
# after it, so "A cat" is not read as choice A.
_LEADING_CHOICE = re.compile(r"\s*\*{0,2}(?:\(([A-Z])\)|([A-Z])(?:[.:)]|\*{0,2}\s*$))")
# "Answer: B", "The answer is (B).", "final answer is: **C**". A bare letter followed by a
# lowercase word ("Answer: I think ...", "the answer is A cat") is prose, not a choice.
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*\*{0,2}(?:\(([A-Z])\)|([A-Z])(?![A-Za-z0-9])(?!\s+[a-z]))"
)


def _letter_from(match: re.Match[str] | None) -> str | None:
    if match is None:
        return None
    return match.group(1) or match.group(2)


def _within(letter: str | None, n_choices: int) -> str | None:
    if letter is None or ord(letter) - ord("A") >= n_choices:
        return None
    return letter


def extract_choice(text: str, n_choices: int) -> str | None:
    """The choice letter a response picked, or None when it picked none of the first `n_choices`.

    Where it looks, first hit wins:
      1. the last `\\boxed{...}`: `\\boxed{B}`, `\\boxed{(B) Paris}`, `\\boxed{\\text{B.}}`; when a box
         exists it is the final answer, so a box without a letter gives None;
      2. the last "answer is B" / "Answer: (B)" phrase;
      3. a response that starts with the letter: "B", "(B) Paris", "B. Paris", "B)".
    """
    if not 1 <= n_choices <= 26:
        raise ValueError(f"extract_choice: n_choices must be 1..26, got {n_choices}")
    boxed = extract_boxed(text)
    if boxed is not None:
        return _within(_letter_from(_LEADING_CHOICE.match(_LATEX_TEXT.sub(r"\1", boxed))), n_choices)
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        return _within(_letter_from(phrases[-1]), n_choices)
    return _within(_letter_from(_LEADING_CHOICE.match(text)), n_choices)


def _normalize_choice_text(text: str) -> str:
    return _LATEX_TEXT.sub(r"\1", text).strip().rstrip(".").strip().casefold()


def _choice_by_text(text: str | None, choices: list[str]) -> str | None:
    """The letter of the choice whose text equals `text` (case and a final period ignored)."""
    if text is None:
        return None
    wanted = _normalize_choice_text(text)
    for index, choice in enumerate(choices):
        if _normalize_choice_text(choice) == wanted:
            return chr(ord("A") + index)
    return None


def _true_letter(row: dict[str, Any], choices: list[str], n_choices: int) -> str:
    truth = row["ground_truth"]
    letter = extract_choice(truth, n_choices) or _choice_by_text(truth, choices)
    if letter is None:
        raise ValueError(
            f"row id {row['id']!r}: multiple-choice ground truth {truth!r} is neither a letter "
            f"among the first {n_choices} nor the text of one of its choices"
        )
    return letter


def rule_grade(row: dict[str, Any]) -> tuple[bool, str | None]:
    """(correct, extracted answer) for one generation row; the answer is None if none was found."""
    response = row["response"]
    if is_multiple_choice(row):
        choices = row.get("choices") or []
        n_choices = len(choices) or MAX_CHOICES_WITHOUT_LIST
        answer = extract_choice(response, n_choices) or _choice_by_text(extract_boxed(response), choices)
        return answer == _true_letter(row, choices, n_choices), answer
    answer = extract_boxed(response)
    return grade_answer(answer, row["ground_truth"]), answer
