"""Small grading helpers shared by reward functions and evaluation.

Plain functions over strings: where the final answer is (`extract_boxed`), whether it is right
(`grade_answer`, mathruler's rules), and whether a response has the expected shape
(`see_think_format_ok`, `think_format_ok`). Reward files may import this module; it imports
nothing else from the framework.
"""

import re
from collections import Counter
from collections.abc import Sequence

from mathruler.grader import grade_answer as _mathruler_grade_answer

_BOX_OPEN = r"\boxed{"

# The method's tags. A block's content may not contain one of them: otherwise a full match could
# stretch a block over a later tag, e.g. accept `<think>x</think> \boxed.</think> \boxed{0}`
# (non-greedy `.*?` alone does not prevent that, because full matching backtracks).
_TAG = r"</?(?:description|think)>"
_BLOCK = rf"(?:(?!{_TAG}).)*?"
_ANSWER = r"\\boxed\{(?P<answer>.*)\}"
_SEE_THINK = re.compile(rf"\s*<description>{_BLOCK}</description>\s*<think>{_BLOCK}</think>\s*{_ANSWER}\s*", re.DOTALL)
_THINK = re.compile(rf"\s*<think>{_BLOCK}</think>\s*{_ANSWER}\s*", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced, whitespace stripped), or None.

    Same rule as mathruler's `extract_boxed_content`, which instead returns the string "None"
    when there is no box or the last box is never closed; here that case is None, so a box that
    literally holds "None" is not confused with a missing one.
    """
    start = text.rfind(_BOX_OPEN)
    if start == -1:
        return None
    content_start = start + len(_BOX_OPEN)
    depth = 0
    for position in range(content_start, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return text[content_start:position].strip()
            depth -= 1
    return None


def grade_answer(predicted: str | None, ground_truth: str) -> bool:
    """Whether `predicted` equals `ground_truth` under mathruler's rules (normalised strings or sympy).

    None (no answer found) is wrong; so is any input on which mathruler raises.
    """
    if predicted is None:
        return False
    try:
        return bool(_mathruler_grade_answer(predicted, ground_truth))
    except Exception:
        return False


def _normalize_tag_spacing(response: str) -> str:
    # Some models write `< think >` or `</ description>`; the format check ignores that spacing.
    return re.sub(r"\s*([<>/])\s*", r"\1", response)


def _is_single_answer(answer: str) -> bool:
    """The box body holds no tag, no second box and balanced braces."""
    if re.search(_TAG, answer) or _BOX_OPEN in answer:
        return False
    depth = 0
    for char in answer:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _format_ok(pattern: re.Pattern[str], response: str) -> bool:
    match = pattern.fullmatch(_normalize_tag_spacing(response))
    return match is not None and _is_single_answer(match.group("answer"))


def see_think_format_ok(response: str) -> bool:
    """Whether the whole response is `<description>...</description> <think>...</think> \\boxed{...}`.

    Whitespace around `<`, `>` and `/` is ignored, and only whitespace may surround the parts.
    Stricter than a plain regex: no block may contain a tag and the box must be one balanced box.
    """
    return _format_ok(_SEE_THINK, response)


def think_format_ok(response: str) -> bool:
    """Whether the whole response is `<think>...</think> \\boxed{...}` (the CoT / Vision-R1 format).

    Same rules as `see_think_format_ok`, without the description block.
    """
    return _format_ok(_THINK, response)


def extract_tag(text: str, tag: str) -> str | None:
    """Stripped content of the first `<tag>...</tag>`; None when the tag is absent or empty."""
    name = re.escape(tag)
    match = re.search(rf"<\s*{name}\s*>(.*?)<\s*/\s*{name}\s*>", text, re.DOTALL)
    if match is None:
        return None
    content = match.group(1).strip()
    return content or None


def answers_accuracy(answers: Sequence[str], ground_truth: str) -> float:
    """Fraction of `answers` (full generated texts) whose last `\\boxed{}` is right; 0.0 for none,
    so a missing second pass earns no credit rather than an undefined one."""
    if not answers:
        return 0.0
    return sum(grade_answer(extract_boxed(text), ground_truth) for text in answers) / len(answers)


def leading_answer(answers: Sequence[str]) -> str | None:
    """The boxed answer most of `answers` give, the earliest of those tied (the first when there is one).

    It stands for "the answer a description leads to" when the text-only pass samples several.
    None when no answer has a box.
    """
    boxed = [answer for answer in map(extract_boxed, answers) if answer is not None]
    if not boxed:
        return None
    counts = Counter(boxed)
    top = max(counts.values())
    return next(answer for answer in boxed if counts[answer] == top)
