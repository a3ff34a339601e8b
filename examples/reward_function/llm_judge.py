"""Reward graded by an LLM judge: an OpenAI-compatible server, asked through the openai SDK.

    overall = accuracy_weight * accuracy + format_weight * format

- accuracy: 1 when the answer is right. The rules grade first (the last `\\boxed{}` against the
  ground truth, mathruler, as in see_think.py); a response they reject goes to the judge, which sees
  the question, the ground truth and the boxed answer (the whole response when there is no box)
  and must reply CORRECT or INCORRECT (verl/utils/llm_judge.py: the same prompt and strict parsing
  as Evaluation/LLM_eval.py). With `judge_every_response=True` every response goes to the judge
  and the rules only stand in where its reply is unusable.
- format: 1 when the response is `<description>...</description> <think>...</think> \\boxed{...}`.

A reply that is neither CORRECT nor INCORRECT, or a request that still fails after the SDK's
retries, falls back to the rule grade and is counted (`judge_unparsed`, `judge_failed`; logged as
`reward/judge_unparsed` etc., the fraction of samples). If every request of a call fails, the call
raises: that is a server or configuration fault, not a verdict.

Configuration, read from the environment when the function is first called:
  REWARD_JUDGE_BASE_URL  the server up to /v1, e.g. http://localhost:8000/v1 (a `vllm serve`)
  REWARD_JUDGE_MODEL     the model name the server serves
  JUDGE_API_KEY          the API key, optional for a local server; the same rules as the grading
                         command: sent over https, or plain http only to this machine, unless
                         `allow_insecure_http=True`; redirects are not followed.
Needs the openai package: pip install 'vision-sr1[judge]'. Without it the file fails to load,
so a run stops at its configuration check, not at the first step.

Validation: pass `reward_function_kwargs: {accuracy_weight: 1.0, format_weight: 0.0}` so that the
validation reward is the plain accuracy.
"""

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from verl.utils.grading import extract_boxed, grade_answer, see_think_format_ok
from verl.utils.llm_judge import (
    API_KEY_ENV,
    JUDGE_PROMPT,
    JudgeRequestError,
    OpenAISDKJudge,
    import_openai,
    parse_verdict,
)

BASE_URL_ENV = "REWARD_JUDGE_BASE_URL"
MODEL_ENV = "REWARD_JUDGE_MODEL"

import_openai()  # fail at load time, with the install command, when the optional dependency is missing


@functools.lru_cache(maxsize=4)
def _judge_client(
    base_url: str, model: str, api_key: str | None, timeout_s: float, max_retries: int, allow_insecure_http: bool
) -> OpenAISDKJudge:
    # One client per configuration: it keeps its connections open across training steps.
    return OpenAISDKJudge(
        base_url,
        model,
        api_key,
        timeout_s,
        max_retries,
        allow_insecure_http,
        allow_hint="reward_function_kwargs allow_insecure_http=True",
    )


def _configured_client(timeout_s: float, max_retries: int, allow_insecure_http: bool) -> OpenAISDKJudge:
    base_url, model = os.environ.get(BASE_URL_ENV), os.environ.get(MODEL_ENV)
    missing = [name for name, value in ((BASE_URL_ENV, base_url), (MODEL_ENV, model)) if not value]
    if missing:
        raise ValueError(
            f"the LLM-judge reward needs {' and '.join(missing)} set in the environment of the training "
            f"processes ({BASE_URL_ENV}: the server up to /v1, e.g. http://localhost:8000/v1; {MODEL_ENV}: "
            f"the model it serves; {API_KEY_ENV}: the API key, if the server wants one)"
        )
    return _judge_client(base_url, model, os.environ.get(API_KEY_ENV), timeout_s, max_retries, allow_insecure_http)


def _ask(client: OpenAISDKJudge, prompt: str) -> str | JudgeRequestError:
    try:
        return client.generate(prompt)
    except JudgeRequestError as error:
        return error


def compute_score(
    reward_inputs: list[dict],
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    judge_every_response: bool = False,
    max_workers: int = 8,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    allow_insecure_http: bool = False,
) -> list[dict[str, float]]:
    rule_grades, prompts = [], {}
    for index, reward_input in enumerate(reward_inputs):
        boxed = extract_boxed(reward_input["response"])
        rule_correct = grade_answer(boxed, reward_input["ground_truth"])
        rule_grades.append(float(rule_correct))
        if judge_every_response or not rule_correct:
            prompts[index] = JUDGE_PROMPT.format(
                question=reward_input["question"],
                ground_truth=reward_input["ground_truth"],
                answer=boxed if boxed is not None else reward_input["response"],
            )

    replies: dict[int, str | JudgeRequestError] = {}
    if prompts:
        client = _configured_client(timeout_s, max_retries, allow_insecure_http)
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            replies = dict(zip(prompts, pool.map(functools.partial(_ask, client), prompts.values())))
        failures = [reply for reply in replies.values() if isinstance(reply, JudgeRequestError)]
        if len(failures) == len(replies):
            raise RuntimeError(f"every judge request of this batch failed ({len(failures)}); the first: {failures[0]}")
        if failures:
            print(
                f"warning: {len(failures)} of {len(replies)} judge requests failed, graded by rules instead; "
                f"the first: {failures[0]}",
                file=sys.stderr,
            )

    scores = []
    for index, reward_input in enumerate(reward_inputs):
        reply = replies.get(index)
        failed = isinstance(reply, JudgeRequestError)
        verdict = parse_verdict(reply) if isinstance(reply, str) else None
        if verdict in ("correct", "incorrect"):
            accuracy = float(verdict == "correct")
        else:  # not asked, unparsed or failed: the rules decide
            accuracy = rule_grades[index]
        format_score = float(see_think_format_ok(reward_input["response"]))
        scores.append(
            {
                "overall": accuracy_weight * accuracy + format_weight * format_score,
                "accuracy": accuracy,
                "format": format_score,
                "rule_accuracy": rule_grades[index],
                "judge_asked": float(index in prompts),
                "judge_unparsed": float(verdict == "unparsed"),
                "judge_failed": float(failed),
            }
        )
    return scores
