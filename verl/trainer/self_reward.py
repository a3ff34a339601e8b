"""The self-reward (perception re-prompt) stage of Vision-SR1.

After the first rollout, each response's `<description>` is handed back to the same policy, text
only: "here is a description of an image and a question; answer from the description alone". The
answers (`description_answers`, aligned with their responses) let the reward function credit
descriptions that carry enough visual information. No gradient flows through this stage.

A response without a description gets no second pass and `description_answers=None`: passing the
whole response instead would leak its final answer into the visual reward.

With `counterfactual_baseline`, each prompt (the rows sharing a `uid`) is also asked once with no
description at all, the question alone in the same template, `n` answers like a description's.
Those `prior_answers` measure what the question's answer prior gives for free: a visual reward
measured against them cannot be won by descriptions that merely steer toward the most likely
answer. They go through the same generate call as the description prompts.

With `dedupe` (the default), each distinct text-only prompt, a (description, question) pair or a
question alone, is generated once and its `n` answers go to every response that asked it. The
second pass sees text only, so two responses with the same description and question (common: a
GRPO group often repeats a description, and every prompt of a dataset may share one question) ask
the policy the same thing. Greedy, the answers are the ones each would have got alone. Sampled,
each response still gets `n` draws from the same distribution, so its expected reward is unchanged;
what changes is that equal descriptions get equal credit instead of independent noise that GRPO
would turn into spurious advantage differences between them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jinja2 import Template
from transformers import PreTrainedTokenizerBase

from verl.protocol import DataProto, SamplingParams
from verl.trainer.config import SelfRewardConfig


def description_pattern(config: SelfRewardConfig) -> re.Pattern[str]:
    if config.description_regex is not None:
        pattern = re.compile(config.description_regex, re.DOTALL)
        if pattern.groups != 1:
            raise ValueError("self_reward.description_regex must have exactly one capturing group")
        return pattern
    tag = re.escape(config.description_tag)
    return re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL)


def states_answer(description: str, answer: str) -> bool:
    """True when `answer` appears in the description as a standalone word or number."""
    answer = answer.strip()
    if not answer:
        return False
    # Not part of a longer word or number ("14", "4.5"), but a sentence's full stop may follow.
    pattern = rf"(?<!\w)(?<!\d\.){re.escape(answer)}(?!\w)(?!\.\d)"
    return re.search(pattern, description, re.IGNORECASE) is not None


@dataclass
class SelfRewardResult:
    descriptions: list[str | None]
    answers: list[list[str] | None]
    metrics: dict[str, float]
    prior_answers: list[list[str]] | None = None
    """Per response, the question-alone answers of its prompt (equal lists within a group); None
    when the counterfactual baseline is off."""


class SelfRewardStage:
    """Builds text-only perception prompts from descriptions and collects the policy's answers."""

    def __init__(
        self,
        config: SelfRewardConfig,
        tokenizer: PreTrainedTokenizerBase,
        reward_needs_it: bool,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.active = config.enable == "true" or (config.enable == "auto" and reward_needs_it)
        self.pattern = description_pattern(config)
        self.template: Template | None = None
        if self.active:
            if not os.path.isfile(config.prompt_template):
                raise FileNotFoundError(f"self_reward.prompt_template: file not found: {config.prompt_template}")
            with open(config.prompt_template, encoding="utf-8") as f:
                self.template = Template(f.read().strip())

    def extract_description(self, response: str) -> str | None:
        match = self.pattern.search(response)
        if match is None:
            return None
        description = match.group(1).strip()
        return description or None

    def build_prompt_ids(self, description: str | None, question: str) -> list[int]:
        """Token ids of the chat-formatted text-only prompt (no image tokens).

        `description=None` asks the question alone (the counterfactual baseline): the template gets
        an empty `description`, which it can test with `{% if description %}`.
        """
        assert self.template is not None
        user_text = self.template.render(description=description or "", question=question)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling(self, rollout: SamplingParams) -> SamplingParams:
        cfg = self.config
        return SamplingParams(
            n=cfg.n,
            temperature=rollout.temperature if cfg.temperature is None else cfg.temperature,
            top_p=rollout.top_p if cfg.top_p is None else cfg.top_p,
            top_k=rollout.top_k,
            max_new_tokens=cfg.max_response_length or rollout.max_new_tokens,
            seed=rollout.seed + 7919,  # a stream of its own, still reproducible per step
        )

    def run(
        self,
        responses: list[str],
        questions: list[str],
        ground_truths: list[str],
        generate: Callable[[DataProto], DataProto],
        rollout_sampling: SamplingParams,
        uids: Sequence[str] | None = None,
    ) -> SelfRewardResult:
        """Second pass for every response that has a description; answers aligned with `responses`.

        `uids` name each response's prompt; the counterfactual baseline needs them to ask each
        prompt once, wherever its responses sit in the batch.
        """
        descriptions = [self.extract_description(r) for r in responses]
        eligible = []
        denied = 0
        for index, description in enumerate(descriptions):
            if description is None:
                continue
            if self.config.deny_answer_leak and states_answer(description, ground_truths[index]):
                denied += 1
                continue
            eligible.append(index)
        # One row per prompt, the first of its responses, in order of first appearance.
        prompt_rows = self.prompt_rows(uids, questions) if self.config.counterfactual_baseline else []
        answers: list[list[str] | None] = [None] * len(responses)
        sampling = self.sampling(rollout_sampling)
        # Every text-only question to ask, descriptions first, then the question-alone ones: all go
        # through one generate call (one batch, one engine wake on vLLM).
        asks: list[tuple[str | None, str]] = [(descriptions[i], questions[i]) for i in eligible]
        asks += [(None, questions[row]) for row in prompt_rows]
        slots, distinct = self.dedupe_asks(asks)
        texts = self.generate_answers(distinct, sampling, generate)
        n = sampling.n
        # list() so that responses sharing a prompt never share (and mutate) one list.
        asked = [list(texts[slot * n : (slot + 1) * n]) for slot in slots]
        for position, index in enumerate(eligible):
            answers[index] = asked[position]
        prior_answers = None
        if self.config.counterfactual_baseline:
            assert uids is not None
            by_uid = {uids[row]: asked[len(eligible) + position] for position, row in enumerate(prompt_rows)}
            prior_answers = [list(by_uid[uid]) for uid in uids]
        metrics = {
            "self_reward/description_rate": float(np.mean([d is not None for d in descriptions])) if responses else 0.0,
            "self_reward/second_pass_prompts": float(len(eligible)),
            "self_reward/leak_denied": float(denied),
            "self_reward/prior_passes": float(len(prompt_rows)),
            # Prompts actually generated (after dedupe), descriptions and question-alone together.
            "self_reward/generated_prompts": float(len(distinct)),
        }
        return SelfRewardResult(
            descriptions=descriptions, answers=answers, metrics=metrics, prior_answers=prior_answers
        )

    def dedupe_asks(self, asks: list[tuple[str | None, str]]) -> tuple[list[int], list[tuple[str | None, str]]]:
        """The prompts to generate and, per ask, the index of the one answering it.

        The key is the (description, question) pair, which fixes the rendered prompt (the template
        sees nothing else); without `dedupe` every ask is its own prompt.
        """
        if not self.config.dedupe:
            return list(range(len(asks))), list(asks)
        first: dict[tuple[str | None, str], int] = {}
        slots = [first.setdefault(ask, len(first)) for ask in asks]
        return slots, list(first)

    def generate_answers(
        self,
        asks: list[tuple[str | None, str]],
        sampling: SamplingParams,
        generate: Callable[[DataProto], DataProto],
    ) -> list[str]:
        """`sampling.n` decoded answers per ask, an ask's answers adjacent, in the order of `asks`."""
        if not asks:
            return []
        prompt_ids = [self.build_prompt_ids(description, question) for description, question in asks]
        prompts = left_padded_prompts(prompt_ids, self.tokenizer.pad_token_id)
        prompts.meta_info["sampling"] = sampling
        output = generate(prompts)
        return self.tokenizer.batch_decode(
            output.batch["responses"].masked_fill(output.batch["response_mask"] == 0, self.tokenizer.pad_token_id),
            skip_special_tokens=True,
        )

    @staticmethod
    def prompt_rows(uids: Sequence[str] | None, questions: Sequence[str]) -> list[int]:
        """The first row of each prompt (rows grouped by uid, not by position).

        Responses of one prompt need not be adjacent (the batch may have been reordered), so rows
        are grouped by uid; rows of one uid with different questions mean the uids are misaligned.
        """
        if uids is None or len(uids) != len(questions):
            raise ValueError(
                "self_reward.counterfactual_baseline needs one uid per response to group responses by prompt "
                f"(got {'none' if uids is None else len(uids)} for {len(questions)} responses)"
            )
        first: dict[str, int] = {}
        for row, uid in enumerate(uids):
            if uid not in first:
                first[uid] = row
            elif questions[row] != questions[first[uid]]:
                raise ValueError(f"responses of prompt uid {uid!r} have different questions; uids are misaligned")
        return list(first.values())


def left_padded_prompts(prompt_ids: list[list[int]], pad_token_id: int) -> DataProto:
    """Text-only prompts in the layout rollout engines take (left padding, no images)."""
    length = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    empty: list[dict[str, Any]] = [{} for _ in prompt_ids]
    return DataProto.from_dict(
        tensors={"input_ids": input_ids, "attention_mask": attention_mask},
        non_tensors={"multi_modal_inputs": empty, "multi_modal_data": [{} for _ in prompt_ids]},
    )
