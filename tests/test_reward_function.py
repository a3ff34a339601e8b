"""Grading helpers, reward-function loading/calling in every supported style, and the example rewards."""

import pickle
import textwrap
from pathlib import Path

import pytest

from verl.reward import RewardFunction, RewardFunctionError, RewardInput, aggregate_reward_metrics
from verl.utils.grading import extract_boxed, extract_tag, grade_answer, see_think_format_ok, think_format_ok

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "reward_function"
GOOD = r"<description>The image shows the digits 3 and 5.</description> <think>3 + 5 = 8.</think> \boxed{8}"


def sample(
    response: str = GOOD,
    ground_truth: str = "8",
    description_answers: list[str] | None = None,
    **extra,
) -> RewardInput:
    return {
        "response": response,
        "response_length": len(response.split()),
        "ground_truth": ground_truth,
        "question": "What is the sum of the two digits?",
        "description_answers": description_answers,
        "extra": extra,
    }


def write_reward(tmp_path: Path, source: str, name: str = "reward.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# ---------------------------------------------------------------- grading helpers


@pytest.mark.parametrize(
    "response",
    [
        GOOD,
        "<description>d</description><think>t</think>\\boxed{8}",
        "  <description>\nmulti\nline\n</description>\n<think>\na\nb\n</think>\n\\boxed{\\frac{1}{2}}\n",
        "< description >d</ description > < think >t< /think > \\boxed{8}",  # spacing around tags
    ],
)
def test_see_think_format_accepts(response):
    assert see_think_format_ok(response)


@pytest.mark.parametrize(
    "response",
    [
        r"<think>t</think> \boxed{8}",  # no description
        r"<description>d</description> \boxed{8}",  # no think
        r"<description>d</description> <think>t</think> 8",  # no box
        r"<description>d</description> <think>t</think> \boxed{8} and more",  # text after the box
        r"intro <description>d</description> <think>t</think> \boxed{8}",  # text before
        r"<think>t</think> <description>d</description> \boxed{8}",  # wrong order
        # The greedy-regex pitfall: a block stretched over a later closing tag.
        r"<description>d</description> <think>0 + 0 = .</think> \boxed.</think> \boxed{0}",
        r"<description>d</description> <think>t</think> \boxed{1} \boxed{2}",  # two boxes
        r"<description>d</description> <think>t</think> \boxed{1} x {2}",  # braces not one box
        r"<description>a <think>b</description> <think>t</think> \boxed{8}",  # tag inside a block
    ],
)
def test_see_think_format_rejects(response):
    assert not see_think_format_ok(response)


def test_think_format():
    assert think_format_ok(r"<think>3 + 5 = 8</think> \boxed{8}")
    assert not think_format_ok(r"<think>0 + 0 = .</think> \boxed.</think> \boxed{0}")
    assert not think_format_ok(GOOD)  # a description block is not part of the CoT format
    assert not think_format_ok(r"<think>t</think>")


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{ 2 }") == "2"  # the last box, stripped
    assert extract_boxed(r"\boxed{a{b{c}}d} tail") == "a{b{c}}d"
    assert extract_boxed(r"\boxed{None}") == "None"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{never closed") is None
    assert extract_boxed(r"\boxed 8") is None


@pytest.mark.parametrize(
    ("predicted", "ground_truth", "correct"),
    [
        ("8", "8", True),
        ("8.0", "8", True),  # mathruler's mathd normalisation equates these
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1/2", r"\frac{1}{2}", True),
        ("a", "A", True),  # case-insensitive
        ("9", "8", False),
        (None, "8", False),
        (None, "None", False),  # mathruler alone would accept its own "None" sentinel here
        ("", "8", False),
    ],
)
def test_grade_answer(predicted, ground_truth, correct):
    assert grade_answer(predicted, ground_truth) is correct


def test_extract_tag():
    assert extract_tag(GOOD, "description") == "The image shows the digits 3 and 5."
    assert extract_tag("<think> a </think><think>b</think>", "think") == "a"
    assert extract_tag("< description > x </ description >", "description") == "x"
    assert extract_tag("<description>   </description>", "description") is None
    assert extract_tag("no tags", "description") is None


# ---------------------------------------------------------------- loading and calling


def test_batch_style_gets_all_samples_and_kwargs(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        def compute_score(reward_inputs, bonus=0.0):
            return [{"overall": len(r["response"]) + bonus, "length": r["response_length"]} for r in reward_inputs]
        """,
    )
    reward = RewardFunction(f"{spec}:compute_score", {"bonus": 0.5})
    assert reward.style == "batch"
    assert not reward.needs_description_answers
    scores = reward([sample("ab cd"), sample("x")])
    assert scores == [{"overall": 5.5, "length": 2.0}, {"overall": 1.5, "length": 1.0}]
    assert reward([]) == []


def test_sequential_style_is_called_per_sample(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        import numpy as np

        def score_one(reward_input, scale=1.0):
            return {"overall": np.float32(scale * len(reward_input["extra"]["tag"])), "flag": True}
        """,
    )
    reward = RewardFunction(f"{spec}:score_one", {"scale": 2.0}, reward_type="sequential")
    assert reward.style == "sequential"
    scores = reward([sample(tag="abc"), sample(tag="z")])
    # numpy floats and bools come back as plain floats
    assert scores == [{"overall": 6.0, "flag": 1.0}, {"overall": 2.0, "flag": 1.0}]
    assert all(type(value) is float for score in scores for value in score.values())


def test_original_signature_aligns_description_answers(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        def compute_score(predicts, ground_truths, questions, description_answers, weight=1.0):
            return [
                {"overall": weight, "row": float(p), "answer_len": float(len(d)), "q": float(len(q))}
                for p, g, q, d in zip(predicts, ground_truths, questions, description_answers)
            ]
        """,
    )
    reward = RewardFunction(f"{spec}:compute_score", {"weight": 2.0})
    assert reward.style == "original"
    assert reward.needs_description_answers
    samples = [sample("0", description_answers=["abc", "ignored"]), sample("1"), sample("2", description_answers=[])]
    scores = reward(samples)
    assert [score["row"] for score in scores] == [0.0, 1.0, 2.0]
    # first answer for each response; "" where there is none
    assert [score["answer_len"] for score in scores] == [3.0, 0.0, 0.0]
    assert scores[0]["overall"] == 2.0


def test_original_signature_with_fewer_columns(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        def compute_score(predicts, ground_truths):
            return [{"overall": float(p == g)} for p, g in zip(predicts, ground_truths)]
        """,
    )
    reward = RewardFunction(f"{spec}:compute_score")
    assert not reward.needs_description_answers
    assert reward([sample("8"), sample("7")]) == [{"overall": 1.0}, {"overall": 0.0}]


def test_needs_description_answers_by_attribute(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        def batch(reward_inputs):
            return [{"overall": 0.0} for _ in reward_inputs]
        batch.needs_description_answers = True

        def one(reward_input):
            return {"overall": 0.0}
        one.needs_description_answers = True

        def plain(reward_inputs):
            return [{"overall": 0.0} for _ in reward_inputs]
        """,
    )
    assert RewardFunction(f"{spec}:batch").needs_description_answers
    assert RewardFunction(f"{spec}:one", reward_type="sequential").needs_description_answers
    assert not RewardFunction(f"{spec}:plain").needs_description_answers


def test_relative_spec_and_pickle_roundtrip(tmp_path, monkeypatch):
    write_reward(tmp_path, "def f(reward_inputs, k=0):\n    return [{'overall': k} for _ in reward_inputs]\n")
    monkeypatch.chdir(tmp_path)
    reward = RewardFunction("reward.py:f", {"k": 3})
    monkeypatch.chdir("/")
    restored = pickle.loads(pickle.dumps(reward))
    assert restored([sample()]) == [{"overall": 3.0}]


def test_same_file_name_in_two_folders_do_not_collide(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spec_a = write_reward(tmp_path / "a", "def f(r):\n    return [{'overall': 1} for _ in r]\n")
    spec_b = write_reward(tmp_path / "b", "def f(r):\n    return [{'overall': 2} for _ in r]\n")
    reward_a, reward_b = RewardFunction(f"{spec_a}:f"), RewardFunction(f"{spec_b}:f")
    assert reward_a([sample()]) == [{"overall": 1.0}]
    assert reward_b([sample()]) == [{"overall": 2.0}]


# ---------------------------------------------------------------- errors


def test_load_errors_name_the_spec(tmp_path):
    with pytest.raises(RewardFunctionError, match=r"missing\.py.*not found"):
        RewardFunction(f"{tmp_path}/missing.py:compute_score")
    with pytest.raises(RewardFunctionError, match="not of the form"):
        RewardFunction(f"{tmp_path}/reward.py")
    spec = write_reward(tmp_path, "def other(r):\n    return []\n\nNOT_CALLABLE = 3\n")
    with pytest.raises(RewardFunctionError, match=r"has no 'compute_score'.*its functions: other"):
        RewardFunction(f"{spec}:compute_score")
    with pytest.raises(RewardFunctionError, match=r"reward\.py:NOT_CALLABLE.*int, not a function"):
        RewardFunction(f"{spec}:NOT_CALLABLE")
    broken = write_reward(tmp_path, "import no_such_module_here\n", name="broken.py")
    with pytest.raises(RewardFunctionError, match=r"importing .*broken\.py.*ModuleNotFoundError") as info:
        RewardFunction(f"{broken}:f")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(RewardFunctionError, match="reward_type 'parallel'"):
        RewardFunction(f"{spec}:other", reward_type="parallel")


def test_kwarg_errors_name_key_and_function(tmp_path):
    spec = write_reward(tmp_path, "def f(reward_inputs, format_weight=0.1):\n    return []\n")
    with pytest.raises(RewardFunctionError, match=r"key 'fromat_weight' is not a parameter of .*reward\.py:f"):
        RewardFunction(f"{spec}:f", {"fromat_weight": 0.0})
    with pytest.raises(RewardFunctionError, match="clashes with the data argument 'reward_inputs'"):
        RewardFunction(f"{spec}:f", {"reward_inputs": []})
    required = write_reward(tmp_path, "def g(reward_inputs, *, threshold):\n    return []\n", name="required.py")
    with pytest.raises(RewardFunctionError, match=r"required\.py:g cannot be called.*threshold"):
        RewardFunction(f"{required}:g")
    assert RewardFunction(f"{required}:g", {"threshold": 1}).kwargs == {"threshold": 1}
    anything = write_reward(tmp_path, "def h(reward_inputs, **options):\n    return []\n", name="anything.py")
    assert RewardFunction(f"{anything}:h", {"whatever": 1}).kwargs == {"whatever": 1}


def test_original_signature_cannot_be_sequential(tmp_path):
    spec = write_reward(tmp_path, "def f(predicts, ground_truths):\n    return []\n")
    with pytest.raises(RewardFunctionError, match="use reward_type='batch'"):
        RewardFunction(f"{spec}:f", reward_type="sequential")


def test_sequential_raise_names_function_and_sample(tmp_path):
    spec = write_reward(
        tmp_path,
        """
        def one(reward_input):
            if reward_input["ground_truth"] == "bad":
                raise ValueError("cannot grade")
            return {"overall": 1.0}
        """,
    )
    reward = RewardFunction(f"{spec}:one", reward_type="sequential")
    with pytest.raises(
        RewardFunctionError, match=r"reward\.py:one raised on sample 2 .*'bad'.*ValueError: cannot grade"
    ) as info:
        reward([sample(), sample(), sample(ground_truth="bad")])
    assert isinstance(info.value.__cause__, ValueError)


def test_batch_raise_is_chained(tmp_path):
    spec = write_reward(tmp_path, "def f(reward_inputs):\n    return [1 / 0 for _ in reward_inputs]\n")
    with pytest.raises(
        RewardFunctionError, match=r"reward\.py:f raised in its batch call .*2 samples.*ZeroDivisionError"
    ) as info:
        RewardFunction(f"{spec}:f")([sample(), sample()])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[{'overall': 1.0}, {'accuracy': 1.0}]", r"for sample 1 .* no 'overall' key \(keys: \['accuracy'\]\)"),
        ("[{'overall': 1.0}]", "returned 1 scores for 2 samples"),
        ("[{'overall': 1.0}, {'overall': float('nan')}]", r"for sample 1 .*overall=nan; scores must be finite"),
        ("[{'overall': 1.0, 'x': float('inf')}, {'overall': 1.0}]", r"for sample 0 .*x=inf"),
        ("[{'overall': 1.0}, {'overall': 'high'}]", r"for sample 1 .*overall='high', which is not a number"),
        ("[{'overall': 1.0}, {'overall': None}]", r"for sample 1 .*overall=None, which is not a number"),
        ("[{'overall': 1.0}, 0.5]", r"for sample 1 .*a float, not a dict"),
        ("{'overall': 1.0}", r"returned a dict; a batch reward function returns a list.*reward_type='sequential'"),
    ],
)
def test_bad_results_are_rejected(tmp_path, body, message):
    spec = write_reward(tmp_path, f"def f(reward_inputs):\n    return {body}\n")
    with pytest.raises(RewardFunctionError, match=r"reward\.py:f") as info:
        RewardFunction(f"{spec}:f")([sample(), sample()])
    assert info.match(message)


def test_sequential_missing_overall_names_sample(tmp_path):
    spec = write_reward(
        tmp_path, "def one(r):\n    return {'score': 1.0} if r['ground_truth'] == 'x' else {'overall': 1}\n"
    )
    with pytest.raises(RewardFunctionError, match=r"reward\.py:one returned for sample 1 .*no 'overall'"):
        RewardFunction(f"{spec}:one", reward_type="sequential")([sample(), sample(ground_truth="x")])


def test_aggregate_reward_metrics():
    scores = [{"overall": 1.0, "accuracy": 1.0}, {"overall": 0.0, "accuracy": 0.0, "visual": 0.5}]
    assert aggregate_reward_metrics(scores) == {"reward/overall": 0.5, "reward/accuracy": 0.5, "reward/visual": 0.5}
    assert aggregate_reward_metrics([]) == {}


# ---------------------------------------------------------------- the shipped example rewards


def example(name: str, kwargs: dict | None = None) -> RewardFunction:
    return RewardFunction(f"{EXAMPLES / name}:compute_score", kwargs)


def test_self_reward_visual_fraction_and_weights():
    reward = example("see_think_self_reward.py")
    assert reward.needs_description_answers
    right, wrong = r"<think>.</think> \boxed{8}", r"<think>.</think> \boxed{9}"
    scores = reward(
        [
            sample(description_answers=[right, wrong, right, "no box"]),
            sample(description_answers=None),
            sample(description_answers=[]),
            sample(r"<think>3 + 5 = 8.</think> \boxed{8}", description_answers=[right]),
        ]
    )
    assert scores[0] == pytest.approx(
        {
            "overall": 0.9 + 0.1 + 0.5,
            "accuracy": 1.0,
            "format": 1.0,
            "visual": 0.5,
            "description_accuracy": 0.5,
            "consistency": 1.0,  # reported, weight 0 by default
        }
    )
    assert scores[1]["visual"] == 0.0 and scores[1]["overall"] == pytest.approx(1.0)
    assert scores[2]["visual"] == 0.0
    # no description block: format 0, but the answer and the text-only answer still count
    assert scores[3] == pytest.approx(
        {
            "overall": 0.9 + 1.0,
            "accuracy": 1.0,
            "format": 0.0,
            "visual": 1.0,
            "description_accuracy": 1.0,
            "consistency": 1.0,
        }
    )
    validation = example("see_think_self_reward.py", {"accuracy_weight": 1.0, "format_weight": 0.0})
    assert validation([sample(ground_truth="9")])[0]["overall"] == 0.0
    assert validation([sample()])[0]["overall"] == 1.0


def test_see_think_and_cot_rewards():
    see_think = example("see_think.py")
    assert not see_think.needs_description_answers
    cot_response = r"<think>3 + 5 = 8.</think> \boxed{8}"
    ok, unformatted = see_think([sample(), sample(cot_response)])
    assert ok == pytest.approx({"overall": 1.0, "accuracy": 1.0, "format": 1.0})
    assert unformatted == pytest.approx({"overall": 0.9, "accuracy": 1.0, "format": 0.0})
    cot = example("cot.py", {"format_weight": 0.5, "accuracy_weight": 0.5})
    wrong_answer, wrong_format = cot([sample(cot_response, ground_truth="7"), sample()])
    assert wrong_answer == pytest.approx({"overall": 0.5, "accuracy": 0.0, "format": 1.0})
    assert wrong_format == pytest.approx({"overall": 0.5, "accuracy": 1.0, "format": 0.0})


@pytest.mark.parametrize(
    ("description", "digits", "perception"),
    [
        ("The image shows the digits 3 and 5.", [3, 5], 1.0),
        ("The image shows three and five.", [3, 5], 1.0),
        ("The image shows the digits 3 and 5.", "35", 1.0),
        ("The image shows the digits 5 and 3.", [3, 5], 0.0),  # wrong order
        ("The image shows the digit 3.", [3, 3], 0.0),  # the repeated digit must be named twice
        ("The image shows 3 and 3.", [3, 3], 1.0),
        ("The image shows the digits 13 and 5.", [3, 5], 0.0),  # "13" is not the digit 3
    ],
)
def test_digit_sum_perception(description, digits, perception):
    response = f"<description>{description}</description> <think>x</think> \\boxed{{8}}"
    [score] = example("digit_sum.py")([sample(response, digits=digits)])
    assert score["perception"] == perception
    assert score["overall"] == pytest.approx(1.0)


def test_digit_sum_scores_and_missing_description():
    reward = example("digit_sum.py", {"format_weight": 0.0})
    scores = reward([sample(digits=[3, 5]), sample(r"<think>3 + 5</think> \boxed{9}", digits=[3, 5])])
    assert scores == [
        {"overall": 1.0, "accuracy": 1.0, "format": 1.0, "perception": 1.0},
        {"overall": 0.0, "accuracy": 0.0, "format": 0.0, "perception": 0.0},
    ]


def test_original_signature_example_runs_through_adapter():
    reward = example("original_signature_example.py")
    assert reward.style == "original" and reward.needs_description_answers
    scores = reward(
        [sample(description_answers=[r"\boxed{9}", r"\boxed{8}"]), sample(description_answers=[r"\boxed{8}"])]
    )
    # only the first text-only answer counts in the original signature
    assert [score["description_accuracy"] for score in scores] == [0.0, 1.0]
    assert [score["overall"] for score in scores] == pytest.approx([1.0, 2.0])
