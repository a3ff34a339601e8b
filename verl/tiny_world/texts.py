"""Every sentence the tiny world's data is made of, in one place.

The digit-sum task asks for the sum of two handwritten digits. The wording follows the
Vision-SR1 formats: a see-think answer (`<description>`, `<think>`, `\\boxed{}`), a think-only
answer, and a text-only "perception" prompt that gives the model a description instead of the image.
"""

IMAGE_PLACEHOLDER = "<image>"
QUESTION = "What is the sum of the two digits in the image?"

SEE_THINK_INSTRUCTION = (
    "First describe the image inside <description> </description> tags, "
    "then reason inside <think> </think> tags, then give the final answer in \\boxed{}."
)
THINK_INSTRUCTION = "First reason inside <think> </think> tags, then give the final answer in \\boxed{}."
DESCRIPTION_ONLY_INSTRUCTION = (
    "You cannot see the image; answer from its description alone. Reason inside <think> </think> tags, "
    "then give the final answer as a single word or phrase in \\boxed{}."
)

# Plain English for the tokenizer corpus, so that words outside the task templates still get
# a few merged tokens instead of falling back to single bytes.
GENERIC_ENGLISH = (
    "The model looks at a picture and tells us what it sees. A good answer is short, clear and correct. "
    "When the question is about numbers, count carefully, add the values and check the result again. "
    "If something is missing or unclear, say so instead of guessing. This is a small example with a few "
    "common words: one two three four five six seven eight nine ten, left right top bottom, black white, "
    "first second last, number digit sum total, yes no maybe, because therefore however, answer question, "
    "look read write think describe explain, image photo picture figure chart table, it shows there are."
)


def digit_sum_problem() -> str:
    """The RL prompt of the vision task: one image placeholder, then the question."""
    return IMAGE_PLACEHOLDER + QUESTION


def digit_choice_question(first: int, second: int) -> str:
    """The two-option twin of QUESTION: one option is the sum, so a blind guess is right half the time."""
    return f"What is the sum of the two digits in the image: {first} or {second}?"


def digit_choice_problem(first: int, second: int) -> str:
    """The RL prompt of the two-option question: one image placeholder, then the question."""
    return IMAGE_PLACEHOLDER + digit_choice_question(first, second)


def text_sum_problem(left: int, right: int) -> str:
    """The RL prompt of the text-only twin task, which states the digits in words."""
    return f"What is the sum of {left} and {right}?"


def description(left: int, right: int) -> str:
    """What a perfect perception of the image says."""
    return f"The image shows the digits {left} and {right}."


def think_answer(left: int, right: int) -> str:
    """A think-only target: the reasoning, then the boxed sum."""
    return f"<think>{left} + {right} = {left + right}.</think> \\boxed{{{left + right}}}"


def see_think_answer(left: int, right: int) -> str:
    """A see-think target: the description, then the think-only target."""
    return f"<description>{description(left, right)}</description> {think_answer(left, right)}"


def perception_prompt(left: int, right: int) -> str:
    """A text-only prompt that replaces the image by its description (Vision-SR1's second pass)."""
    return f"Image description: {description(left, right)}\nQuestion: {QUESTION}\n{DESCRIPTION_ONLY_INSTRUCTION}"


def task_corpus() -> list[str]:
    """Every text the tiny world can produce, for all 100 digit pairs, plus generic English.

    It does not depend on the seed or the data sizes, so every build gets the same tokenizer. The
    two-option questions of digit_mix are left out on purpose: adding them would have changed the
    tokenizer, and with it every model and measured result of earlier builds; the byte-level BPE
    encodes them from the pieces it has.
    """
    lines = [digit_sum_problem(), SEE_THINK_INSTRUCTION, THINK_INSTRUCTION, GENERIC_ENGLISH]
    for left in range(10):
        for right in range(10):
            lines += [
                text_sum_problem(left, right),
                str(left + right),
                see_think_answer(left, right),
                perception_prompt(left, right),
            ]
    return lines
