"""Loading and calling a user's reward function, named `path/to/file.py:function_name`.

The documented interface (EasyR1's batch style, reward_type="batch"; a file may declare its style
with a module constant, `REWARD_TYPE = "sequential"`, which an unset reward_type follows):

    def compute_score(reward_inputs: list[RewardInput], **kwargs) -> list[dict[str, float]]

one call with every sample, one score dict per sample. Also accepted:

- reward_type="sequential" (EasyR1's per-sample style):
  `fn(reward_input: RewardInput, **kwargs) -> dict[str, float]`, called once per sample;
- the original Vision-SR1 signature, recognised by a first parameter named `predicts`:
  `fn(predicts, ground_truths, questions, description_answers, **kwargs) -> list[dict]`.
  It receives those of the four lists it declares; `description_answers` holds one text-only
  answer per response (the first one, "" when there is none). It is always called as a batch.

Every score dict must contain `overall` (the scalar reward) and only finite numbers; other keys
are components logged as `reward/<name>`. `reward_function_kwargs` are passed as keyword
arguments and checked against the signature when the function is loaded.

A function asks for the self-reward stage's answers by declaring a `description_answers`
parameter (original style) or by carrying the attribute `needs_description_answers = True`:

    def compute_score(reward_inputs, format_weight=0.1): ...
    compute_score.needs_description_answers = True
"""

import hashlib
import importlib.util
import inspect
import math
import reprlib
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

REWARD_TYPES = ("batch", "sequential")
# A module constant declaring how the file's functions are called, as EasyR1's reward files do
# (`REWARD_TYPE = "sequential"` in examples/reward_function/r1v.py).
REWARD_TYPE_CONSTANT = "REWARD_TYPE"
# What training does with a sample whose reward fails (raises, non-finite, not a number): stop the run
# naming it, or leave its whole GRPO group out of the step (counted in `reward/dropped_groups`).
BAD_SAMPLE_POLICIES = ("error", "drop_group")
# Parameter names of the original Vision-SR1 batch signature, in its order.
ORIGINAL_PARAMETERS = ("predicts", "ground_truths", "questions", "description_answers")


class RewardInput(TypedDict):
    """One sample as a reward function sees it."""

    response: str
    """Decoded response text."""
    response_length: int
    """Response length in tokens."""
    ground_truth: str
    question: str
    """Question text, image placeholders removed."""
    description_answers: list[str] | None
    """Text-only answers of the self-reward stage for this response; None when the stage did not
    run or the response had no description."""
    prior_answers: list[str] | None
    """Answers of the same text-only pass with no description (the question alone), asked once per
    prompt and the same for every response of that prompt; None unless
    `self_reward.counterfactual_baseline` is on. Inputs built without this key mean None."""
    extra: dict[str, Any]
    """The sample's other data columns (e.g. `digits` in the digit-sum world)."""


class RewardFunctionError(RuntimeError):
    """The reward function could not be loaded, called, or returned an unusable result."""


def _resolve_reward_type(spec: str, fn: Callable[..., Any], configured: str | None) -> str:
    """The configured reward type, else the file's `REWARD_TYPE`, else batch; a configured type
    that contradicts the file's declaration is an error (the file knows how its function is called)."""
    declared = getattr(fn, "__globals__", {}).get(REWARD_TYPE_CONSTANT)
    if declared is not None and declared not in REWARD_TYPES:
        raise RewardFunctionError(
            f"{spec}: its module's {REWARD_TYPE_CONSTANT}={declared!r} is not one of {REWARD_TYPES}"
        )
    if configured is not None and declared is not None and configured != declared:
        raise RewardFunctionError(
            f"{spec}: reward_type {configured!r} is configured but its module declares "
            f"{REWARD_TYPE_CONSTANT}={declared!r} (leave reward_type unset to follow the file)"
        )
    return configured or declared or "batch"


# A sample shortened for error messages (long responses cut to 80 characters).
_sample_repr = reprlib.Repr()
_sample_repr.maxstring = _sample_repr.maxother = 80
_sample_repr.maxdict = 6


class RewardFunction:
    """A user's reward function, loaded from `spec` and called with checked inputs and outputs.

    Attributes: `spec`, `kwargs`, `reward_type` as given; `style` ("batch", "sequential" or
    "original"): how the function is called; `needs_description_answers`: whether it uses the
    self-reward stage's answers.
    """

    def __init__(self, spec: str, kwargs: Mapping[str, Any] | None = None, reward_type: str | None = None):
        if reward_type is not None and reward_type not in REWARD_TYPES:
            raise RewardFunctionError(f"reward_type {reward_type!r} for {spec!r} is not one of {REWARD_TYPES}")
        self.spec = spec
        self.kwargs = dict(kwargs or {})
        self._path, self._fn = _load_function(spec)
        reward_type = _resolve_reward_type(spec, self._fn, reward_type)
        self.reward_type = reward_type
        try:
            signature = inspect.signature(self._fn)
        except (TypeError, ValueError) as exc:
            raise RewardFunctionError(f"cannot read the parameters of {spec}: {exc}") from exc
        parameters = list(signature.parameters)
        if parameters[:1] == ["predicts"]:
            if reward_type == "sequential":
                raise RewardFunctionError(
                    f"{spec} has the original Vision-SR1 batch signature ({', '.join(parameters)}); "
                    "use reward_type='batch'"
                )
            self.style = "original"
            self._data_names = [name for name in ORIGINAL_PARAMETERS if name in parameters]
        else:
            self.style = reward_type
            self._data_names = parameters[:1]
        self.needs_description_answers = (
            "description_answers" in parameters or getattr(self._fn, "needs_description_answers", False) is True
        )
        self._check_arguments(signature)

    def __reduce__(self):
        # Rebuild by loading the file again where unpickled (e.g. in a Ray actor): a function from a
        # file loaded by path cannot be pickled by reference.
        fn_name = self.spec.rpartition(":")[2]
        return (RewardFunction, (f"{self._path}:{fn_name}", self.kwargs, self.reward_type))

    def __call__(self, samples: list[RewardInput]) -> list[dict[str, float]]:
        """Score every sample; one dict of floats (with `overall`) per sample, in order."""
        if not samples:
            return []
        if self.style == "sequential":
            results = [self._call_one(sample, index) for index, sample in enumerate(samples)]
        elif self.style == "original":
            results = self._call_batch(len(samples), (), self._original_columns(samples))
        else:
            results = self._call_batch(len(samples), (samples,), {})
        return [self._check_score(score, index, samples[index]) for index, score in enumerate(results)]

    def score_each(self, samples: list[RewardInput]) -> tuple[list[dict[str, float] | None], dict[int, str]]:
        """Score every sample, keeping going past samples that fail: returns one score per sample
        (None where it failed) and, for each failed sample's index, why (a raise, a non-finite or
        non-numeric value, a missing `overall`), so a caller can name the sample or set it aside.

        A batch-style call that raises is repeated one sample at a time to find which samples make
        it fail; a batch that fails as a whole (wrong length, not a list) still raises."""
        if not samples:
            return [], {}
        scores: list[dict[str, float] | None] = [None] * len(samples)
        failures: dict[int, str] = {}
        if self.style == "sequential":
            results: list[Any] = []
            for index, sample in enumerate(samples):
                try:
                    results.append(self._call_one(sample, index))
                except RewardFunctionError as exc:
                    results.append(None)
                    failures[index] = str(exc)
        else:
            try:
                results = list(self._call_whole_batch(samples))
            except _BatchCallRaised:
                results = []
                for index, sample in enumerate(samples):
                    try:
                        (one,) = self._call_whole_batch([sample])
                    except _BatchCallRaised as exc:
                        one = None
                        failures[index] = (
                            f"{self.spec} raised on sample {index} {_sample_repr.repr(sample)}: "
                            f"{type(exc.__cause__).__name__}: {exc.__cause__}"
                        )
                    results.append(one)
        for index, score in enumerate(results):
            if index in failures:
                continue
            try:
                scores[index] = self._check_score(score, index, samples[index])
            except RewardFunctionError as exc:
                failures[index] = str(exc)
        return scores, failures

    def _call_whole_batch(self, samples: list[RewardInput]) -> Sequence[Any]:
        """The batch call of `samples`; a raise inside the user's function becomes `_BatchCallRaised`."""
        try:
            if self.style == "original":
                return self._call_batch(len(samples), (), self._original_columns(samples))
            return self._call_batch(len(samples), (samples,), {})
        except RewardFunctionError as exc:
            if exc.__cause__ is not None:  # the function itself raised (not a malformed result)
                raise _BatchCallRaised(str(exc)) from exc.__cause__
            raise

    def _check_arguments(self, signature: inspect.Signature) -> None:
        """Fail at load time, not at the first step, when the kwargs do not fit the signature."""
        parameters = signature.parameters
        takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        for key in self.kwargs:
            if key in self._data_names:
                raise RewardFunctionError(
                    f"reward_function_kwargs key {key!r} clashes with the data argument {key!r} of {self.spec}"
                )
            if key not in parameters and not takes_any_keyword:
                raise RewardFunctionError(
                    f"reward_function_kwargs key {key!r} is not a parameter of {self.spec} "
                    f"(its parameters: {', '.join(parameters) or 'none'})"
                )
        try:
            if self.style == "original":
                signature.bind(**dict.fromkeys(self._data_names), **self.kwargs)
            else:
                signature.bind(None, **self.kwargs)
        except TypeError as exc:
            raise RewardFunctionError(
                f"{self.spec} cannot be called as the {self.style!r} style with reward_function_kwargs "
                f"{sorted(self.kwargs)}: {exc}"
            ) from exc

    def _original_columns(self, samples: list[RewardInput]) -> dict[str, list[str]]:
        columns = {
            "predicts": [sample["response"] for sample in samples],
            "ground_truths": [sample["ground_truth"] for sample in samples],
            "questions": [sample["question"] for sample in samples],
            # The original produced one text-only answer per response.
            "description_answers": [(sample["description_answers"] or [""])[0] for sample in samples],
        }
        return {name: columns[name] for name in self._data_names}

    def _call_one(self, sample: RewardInput, index: int) -> Any:
        try:
            return self._fn(sample, **self.kwargs)
        except Exception as exc:
            raise RewardFunctionError(
                f"{self.spec} raised on sample {index} {_sample_repr.repr(sample)}: {type(exc).__name__}: {exc}"
            ) from exc

    def _call_batch(self, size: int, args: tuple[Any, ...], data: dict[str, Any]) -> Sequence[Any]:
        try:
            results = self._fn(*args, **data, **self.kwargs)
        except Exception as exc:
            raise RewardFunctionError(
                f"{self.spec} raised in its batch call (one call with all {size} samples, style "
                f"{self.style!r}): {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(results, Mapping | str) or not isinstance(results, Sequence):
            raise RewardFunctionError(
                f"{self.spec} returned a {type(results).__name__}; a batch reward function returns a list with "
                "one dict per sample (use reward_type='sequential' for a function that scores one sample)"
            )
        if len(results) != size:
            raise RewardFunctionError(f"{self.spec} returned {len(results)} scores for {size} samples")
        return results

    def _check_score(self, score: Any, index: int, sample: RewardInput) -> dict[str, float]:
        where = f"{self.spec} returned for sample {index} {_sample_repr.repr(sample)}"
        if not isinstance(score, Mapping):
            raise RewardFunctionError(f"{where} a {type(score).__name__}, not a dict of floats")
        if "overall" not in score:
            raise RewardFunctionError(f"{where} no 'overall' key (keys: {list(score)})")
        checked = {}
        for key, value in score.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"{where} {key}={value!r}, which is not a number") from None
            if not math.isfinite(number):
                raise RewardFunctionError(f"{where} {key}={number}; scores must be finite")
            checked[str(key)] = number
        return checked


class _BatchCallRaised(RuntimeError):
    """The user's batch function raised (its cause), as opposed to returning a malformed result."""


def _load_function(spec: str) -> tuple[Path, Callable[..., Any]]:
    """Import the file named in `spec` (relative to the working directory) and return its function."""
    path_text, colon, fn_name = spec.rpartition(":")
    if not colon or not path_text or not fn_name:
        raise RewardFunctionError(f"reward function {spec!r} is not of the form 'path/to/file.py:function_name'")
    path = Path(path_text).resolve()
    if not path.is_file():
        raise RewardFunctionError(f"reward function file {path_text!r} of {spec!r} not found (looked at {path})")
    # Registered in sys.modules under a name unique to the path, because dataclasses and typing
    # look a module's classes up there; two files with the same name must not collide.
    module_name = "reward_function_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardFunctionError(f"reward function file {path_text!r} of {spec!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardFunctionError(f"importing {path_text!r} for {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, fn_name):
        defined = sorted(name for name, value in vars(module).items() if inspect.isfunction(value))
        raise RewardFunctionError(
            f"{path_text!r} has no {fn_name!r} (from {spec!r}); its functions: {', '.join(defined) or 'none'}"
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardFunctionError(f"{spec}: {fn_name!r} is a {type(fn).__name__}, not a function")
    return path, fn


def aggregate_reward_metrics(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every score component as `reward/<name>`, over the samples that report it."""
    values: dict[str, list[float]] = defaultdict(list)
    for score in scores:
        for name, value in score.items():
            values[name].append(value)
    return {f"reward/{name}": sum(numbers) / len(numbers) for name, numbers in values.items()}
