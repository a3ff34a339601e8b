"""The controller's training loop: rollout -> self-reward -> reward -> log-probs -> advantages -> update.

`fit()` reads top to bottom, one timer per stage. Workers are reached only through a worker group
(in-process or Ray), so this file is the same for every backend.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
import torch
from tqdm import tqdm

from verl.algorithms import core_algos
from verl.protocol import DataProto, SamplingParams
from verl.reward import RewardFunction, RewardFunctionError, RewardInput, aggregate_reward_metrics
from verl.trainer.accounting import group_rows, groups_left_out
from verl.trainer.config import PPOConfig
from verl.trainer.interrupt import checkpoint_guard
from verl.trainer.metrics import compute_data_metrics, compute_throughput_metrics, prompt_forward_metrics
from verl.trainer.self_reward import SelfRewardStage
from verl.utils.checkpoint import find_resume_checkpoint, save_and_prune, write_trainer_state
from verl.utils.config import to_dict
from verl.utils.dataset import PromptLoader
from verl.utils.progress import progress
from verl.utils.timer import timer
from verl.utils.tracking import Tracker
from verl.workers.contract import ActorRolloutRefGroup

logger = logging.getLogger(__name__)


class PPOTrainer:
    def __init__(
        self,
        config: PPOConfig,
        tokenizer: Any,
        worker_group: ActorRolloutRefGroup,
        train_loader: PromptLoader,
        val_loader: PromptLoader | None,
        reward_fn: RewardFunction,
        val_reward_fn: RewardFunction | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.wg = worker_group
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.reward_fn = reward_fn
        self.val_reward_fn = val_reward_fn or reward_fn
        self.self_reward = SelfRewardStage(config.self_reward, tokenizer, reward_fn.needs_description_answers)
        algo = config.algorithm
        self.use_reference = not algo.disable_kl
        self.skip_old_log_prob = old_log_prob_pass_skippable(config)
        self.kl_ctrl = core_algos.get_kl_controller(algo.kl_type, algo.kl_coef, algo.kl_target, algo.kl_horizon)
        self.checkpoint_root = config.trainer.save_checkpoint_path
        self.global_step = 0
        self.total_steps = config.trainer.total_steps(len(train_loader))
        self.tracker: Tracker | None = None
        self.last_val_generations: list[dict[str, Any]] = []
        # The dataset rows the current step drew but left out, by reason (rows.jsonl's `dropped`).
        self.dropped_rows: dict[str, list[int]] = defaultdict(list)

    # ================================================================ the loop
    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, resuming from the latest checkpoint; returns the last step's metrics."""
        cfg = self.config.trainer
        self._resume()
        self.tracker = Tracker(
            cfg.logger,
            cfg.project_name,
            cfg.experiment_name,
            to_dict(self.config),
            self.checkpoint_root,
            resume=self.global_step > 0,
        )
        if cfg.val_only:
            metrics = self._validate_and_log(write_generations=True)
            self.tracker.finish()
            return metrics
        if cfg.val_before_train and self.global_step == 0 and self.val_loader is not None:
            self._validate_and_log()

        metrics: dict[str, float] = {}
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="GRPO", disable=None)
        self._prompt_batches = self._endless_prompt_batches()
        while self.global_step < self.total_steps:
            prompts = next(self._prompt_batches)
            self.global_step += 1
            self.dropped_rows = defaultdict(list)
            metrics, timings = {}, {}
            validation_error: Exception | None = None
            with timer("step", timings):
                batch, rollout_metrics = self._rollout_and_score(prompts, timings)
                metrics.update(rollout_metrics)

                if not self.skip_old_log_prob:
                    with timer("old_log_prob", timings):
                        batch = batch.union(self.wg.compute_log_probs(batch))

                if self.use_reference:
                    with timer("ref", timings):
                        batch = batch.union(self.wg.compute_ref_log_probs(batch))

                with timer("adv", timings):
                    batch, adv_metrics = self._compute_advantages(batch)
                    metrics.update(adv_metrics)

                with timer("update_actor", timings):
                    metrics.update(self.wg.update_actor(batch).meta_info["metrics"])
                metrics.update(prompt_forward_metrics(metrics, batch.non_tensor_batch["uid"]))

                is_last = self.global_step >= self.total_steps
                if self.val_loader is not None and (
                    (cfg.val_freq > 0 and self.global_step % cfg.val_freq == 0) or is_last
                ):
                    with timer("validation", timings):
                        try:
                            metrics.update(self.validate())
                        except Exception as exc:  # the update is done: keep it (saved below), then stop
                            validation_error = exc
                    if validation_error is None:
                        self.tracker.log_generations(self._logged_generations(), step=self.global_step)

            metrics.update(compute_data_metrics(batch))
            metrics.update(compute_throughput_metrics(batch, timings))
            self.tracker.log_rows(group_rows(batch), step=self.global_step, dropped=self.dropped_rows)
            self.tracker.log(metrics, step=self.global_step)
            # Saved after logging: a run killed once this checkpoint exists resumes after this step,
            # so its metrics must be written already (a resumed run drops what was logged after).
            if validation_error is not None:
                self._save_after_failed_validation(validation_error)
            if (cfg.save_freq > 0 and self.global_step % cfg.save_freq == 0) or is_last:
                self.save_checkpoint()
            progress.update(1)
        progress.close()
        self.tracker.finish()
        return metrics

    def _save_after_failed_validation(self, error: Exception) -> NoReturn:
        """Validation failed after the step's update: save the step (whatever `save_freq` says),
        its training metrics being logged already, then raise `error`. A rerun resumes after this
        step instead of redoing it; the step's validation is not repeated."""
        try:
            path = self.save_checkpoint()
        except Exception:
            # The save's own traceback goes to the log; the validation error is what stopped the run.
            logger.exception(
                "step %d: validation failed, and saving the step's checkpoint failed too", self.global_step
            )
            raise error from None
        logger.error(
            "step %d: validation failed after the step's update; the step is saved in %s, so a rerun of "
            "the same command resumes after it (without this validation): %s",
            self.global_step,
            path,
            error,
        )
        raise error

    # ================================================================ stages
    def _endless_prompt_batches(self) -> Iterator[DataProto]:
        """Epoch after epoch; the loader's own state says where a resumed run continues."""
        while True:
            yield from self.train_loader

    def _sampling(self, validation: bool = False) -> SamplingParams:
        rollout = self.config.worker.rollout
        seed = rollout.seed * 1_000_003 + self.global_step  # reproducible per step, also after resume
        if validation:
            return SamplingParams(
                n=rollout.val_n,
                temperature=rollout.val_temperature,
                top_p=rollout.val_top_p,
                top_k=-1,
                max_new_tokens=self.config.data.max_response_length,
                seed=seed,
            )
        return SamplingParams(
            n=rollout.n,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=self.config.data.max_response_length,
            seed=seed,
        )

    def _generate(self, prompts: DataProto, sampling: SamplingParams) -> DataProto:
        prompts.meta_info["sampling"] = sampling
        return self.wg.generate_sequences(prompts)

    def _rollout_and_score(self, prompts: DataProto, timings: dict[str, float]) -> tuple[DataProto, dict[str, float]]:
        """Rollout, self-reward and reward for one prompt batch; with dynamic sampling, refill
        uninformative groups from further batches (at most `algorithm.max_refills` times)."""
        algo = self.config.algorithm
        target_prompts = len(prompts)
        kept: list[DataProto] = []
        metrics: dict[str, float] = {}
        refills = 0
        while True:
            batch, step_metrics = self._score_prompts(prompts, timings)
            if not kept:
                metrics.update(step_metrics)
            elif "reward/dropped_groups" in step_metrics:  # refills' bad groups count too
                metrics["reward/dropped_groups"] += step_metrics["reward/dropped_groups"]
            if not algo.online_filtering:
                return batch, metrics
            scores = np.array([s[algo.filter_key] for s in batch.non_tensor_batch["reward_scores"]], dtype=float)
            mask = core_algos.informative_groups(scores, batch.non_tensor_batch["uid"])
            self.dropped_rows["filtered"] += group_rows(batch, ~mask)
            kept.append(batch[mask])
            kept_prompts = sum(len(b) for b in kept) // self.config.worker.rollout.n
            if kept_prompts >= target_prompts or refills >= algo.max_refills:
                break
            refills += 1
            prompts = next(self._prompt_batches)
        batch = DataProto.concat(kept)
        # Informative groups beyond the step's prompt count (from the last refill) are left out too.
        surplus = np.arange(len(batch)) >= target_prompts * self.config.worker.rollout.n
        self.dropped_rows["surplus"] += group_rows(batch, surplus)
        batch = batch[~surplus]
        metrics["dynamic_sampling/refills"] = float(refills)
        metrics["dynamic_sampling/kept_prompts"] = float(len(batch) // self.config.worker.rollout.n)
        if len(batch) == 0:
            raise RuntimeError(
                f"dynamic sampling kept no group after {refills} refills: every group's "
                f"`{algo.filter_key}` rewards were identical (raise algorithm.max_refills or turn online_filtering off)"
            )
        return batch, metrics

    def _score_prompts(self, prompts: DataProto, timings: dict[str, float]) -> tuple[DataProto, dict[str, float]]:
        prompts.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(prompts))], dtype=object)
        sampling = self._sampling()
        with timer("gen", timings):
            batch = self._generate(prompts, sampling)
        batch.meta_info["temperature"] = sampling.temperature
        batch.non_tensor_batch["response_text"] = np.array(self._decode(batch), dtype=object)

        metrics: dict[str, float] = {}
        if self.self_reward.active:
            with timer("self_reward", timings):
                metrics.update(self._run_self_reward(batch, sampling))

        with timer("reward", timings):
            scores, bad_uids = self._score_training(batch)
            if self.config.algorithm.adv_estimator == "remax":
                baselines, bad_baselines = self._greedy_baselines(prompts, timings)
                batch.batch["reward_baselines"] = baselines
                bad_uids |= bad_baselines
            batch, scores = self._drop_groups(batch, scores, bad_uids)
            if self.config.worker.reward.on_bad_sample == "drop_group":
                metrics["reward/dropped_groups"] = float(len(bad_uids))
            batch.non_tensor_batch["reward_scores"] = np.array(scores, dtype=object)
            batch.batch["token_level_scores"] = _token_level(scores, batch.batch["response_mask"])
            metrics.update(aggregate_reward_metrics(scores))
        return batch, metrics

    def _score_training(self, batch: DataProto) -> tuple[list[dict[str, float] | None], set[str]]:
        """Training rewards under `worker.reward.on_bad_sample`: the scores (None for a failed sample)
        and the uids of the groups holding a failed sample; with `error`, the first failure stops
        the run naming the sample's dataset row, uid and question."""
        scores, failures = self.reward_fn.score_each(self._reward_inputs(batch))
        nt = batch.non_tensor_batch
        if failures and self.config.worker.reward.on_bad_sample == "error":
            index, why = min(failures.items())
            row = nt["row_index"][index] if "row_index" in nt else "?"
            raise RewardFunctionError(
                f"step {self.global_step}: the reward of dataset row {row} (uid {nt['uid'][index]}, "
                f"{len(failures)} bad sample(s) in this batch) failed: {why}. "
                "Set worker.reward.on_bad_sample=drop_group to leave such samples' groups out of the step instead."
            )
        for index, why in sorted(failures.items()):
            row = nt["row_index"][index] if "row_index" in nt else "?"
            logger.warning("step %d: dropping the group of dataset row %s: %s", self.global_step, row, why)
        return scores, {str(nt["uid"][index]) for index in failures}

    def _drop_groups(
        self, batch: DataProto, scores: list[dict[str, float] | None], bad_uids: set[str]
    ) -> tuple[DataProto, list[dict[str, float]]]:
        """The batch without the groups in `bad_uids` (whole groups, so the rows left still divide
        into the update's groups and mini-batches as dynamic sampling's kept groups do); the dataset
        rows left out go to `dropped_rows`."""
        if not bad_uids:
            return batch, scores
        bad, trimmed = groups_left_out(batch.non_tensor_batch["uid"], bad_uids, self.wg.world_size)
        if bad.all():
            raise RuntimeError(
                f"step {self.global_step}: every group had a sample whose reward failed "
                f"({len(bad_uids)} groups dropped); nothing is left to train on"
            )
        self.dropped_rows["bad_sample"] += group_rows(batch, bad)
        self.dropped_rows["divisibility"] += group_rows(batch, trimmed)
        if trimmed.any():
            logger.warning(
                "step %d: also left out %d intact group(s) so the rows divide over %d workers",
                self.global_step,
                len(set(batch.non_tensor_batch["uid"][trimmed].tolist())),
                self.wg.world_size,
            )
        keep = ~(bad | trimmed)
        return batch[keep], [score for score, kept in zip(scores, keep, strict=True) if kept]

    def _run_self_reward(self, batch: DataProto, sampling: SamplingParams) -> dict[str, float]:
        result = self.self_reward.run(
            responses=list(batch.non_tensor_batch["response_text"]),
            questions=list(batch.non_tensor_batch["question"]),
            ground_truths=list(batch.non_tensor_batch["ground_truth"]),
            generate=self.wg.generate_sequences,
            rollout_sampling=sampling,
            uids=list(batch.non_tensor_batch["uid"]),
        )
        batch.non_tensor_batch["description"] = np.array(result.descriptions, dtype=object)
        batch.non_tensor_batch["description_answers"] = _object_column(result.answers)
        if result.prior_answers is not None:
            batch.non_tensor_batch["prior_answers"] = _object_column(result.prior_answers)
        return result.metrics

    def _greedy_baselines(self, prompts: DataProto, timings: dict[str, float]) -> tuple[torch.Tensor, set[str]]:
        """ReMax baseline: the reward of each prompt's greedy response, repeated over its group; and
        the uids of the groups whose baseline reward failed (under the bad-sample policy)."""
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.config.data.max_response_length)
        with timer("gen_greedy", timings):
            baseline_batch = self._generate(prompts, greedy)
        baseline_batch.non_tensor_batch["response_text"] = np.array(self._decode(baseline_batch), dtype=object)
        scores, bad_uids = self._score_training(baseline_batch)
        overall = torch.tensor([s["overall"] if s is not None else 0.0 for s in scores], dtype=torch.float32)
        return overall.repeat_interleave(self.config.worker.rollout.n), bad_uids

    def _decode(self, batch: DataProto) -> list[str]:
        responses = batch.batch["responses"].masked_fill(batch.batch["response_mask"] == 0, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(responses, skip_special_tokens=self.config.worker.reward.skip_special_tokens)

    def _reward_inputs(self, batch: DataProto) -> list[RewardInput]:
        nt = batch.non_tensor_batch
        answers = nt.get("description_answers")
        prior = nt.get("prior_answers")
        lengths = batch.batch["response_mask"].sum(-1).tolist()
        samples = [
            {
                "response": nt["response_text"][i],
                "response_length": int(lengths[i]),
                "ground_truth": nt["ground_truth"][i],
                "question": nt["question"][i],
                "description_answers": answers[i] if answers is not None else None,
                "prior_answers": prior[i] if prior is not None else None,
                "extra": nt["extra"][i],
            }
            for i in range(len(batch))
        ]
        return samples

    def _compute_advantages(self, batch: DataProto) -> tuple[DataProto, dict[str, float]]:
        algo = self.config.algorithm
        metrics: dict[str, float] = {}
        response_mask = batch.batch["response_mask"]
        if self.use_reference and not algo.use_kl_loss:
            rewards, mean_kl = core_algos.apply_kl_penalty(
                batch.batch["token_level_scores"],
                batch.batch["old_log_probs"],
                batch.batch["ref_log_probs"],
                response_mask,
                self.kl_ctrl.value,
                algo.kl_penalty,
            )
            metrics.update({"actor/reward_kl_penalty": mean_kl, "actor/reward_kl_coef": self.kl_ctrl.value})
            self.kl_ctrl.update(mean_kl, n_steps=len(batch))
            batch.batch["token_level_rewards"] = rewards
        else:
            batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        index = batch.non_tensor_batch["uid"]
        if algo.advantage_mode == "decoupled":
            components = {
                name: torch.tensor([s[name] for s in batch.non_tensor_batch["reward_scores"]], dtype=torch.float32)
                for name in algo.decoupled_weights
                if name in batch.non_tensor_batch["reward_scores"][0]
            }
            advantages = core_algos.compute_decoupled_advantages(
                components, dict(algo.decoupled_weights), response_mask, index, algo.norm_adv_by_std_in_grpo
            )
            returns = advantages
        else:
            estimator = core_algos.get_adv_estimator(
                "dr_grpo" if algo.adv_estimator == "grpo" and not algo.norm_adv_by_std_in_grpo else algo.adv_estimator
            )
            advantages, returns = estimator(
                token_level_rewards=batch.batch["token_level_rewards"],
                response_mask=response_mask,
                index=index,
                gamma=algo.gamma,
                reward_baselines=batch.batch.get("reward_baselines"),
            )
        batch.batch["advantages"] = advantages
        batch.batch["returns"] = returns
        batch.meta_info["mini_batch_size"] = self.config.worker.actor.global_batch_size * self.config.worker.rollout.n
        return batch, metrics

    # ================================================================ validation
    def validate(self, write_generations: bool = False) -> dict[str, float]:
        """Greedy (by default) generation on the validation set; returns metrics `val/...`.

        Needs only the worker group and the loaders, so it runs outside `fit()` too. Every row
        (question, response, scores) stays in `last_val_generations`; with `write_generations` they
        also go to `<save_checkpoint_path>/generations_step_<N>.jsonl`.
        """
        if self.val_loader is None:
            raise ValueError("validate: no validation data (data.val_files is null)")
        sampling = self._sampling(validation=True)
        all_scores: list[dict[str, float]] = []
        dropped = 0
        rows: list[dict[str, Any]] = []
        stage_metrics: dict[str, list[float]] = defaultdict(list)
        for prompts in progress(self.val_loader.single_pass(), "validation", len(self.val_loader)):
            # The self-reward stage groups responses by prompt through uids, as in training.
            prompts.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(prompts))], dtype=object)
            batch = self._generate(prompts, sampling)
            batch.non_tensor_batch["response_text"] = np.array(self._decode(batch), dtype=object)
            if self.self_reward.active and self.config.self_reward.during_validation:
                for key, value in self._run_self_reward(batch, sampling).items():
                    stage_metrics[key].append(value)
            scores = self._score_validation(batch)
            all_scores.extend(score for score in scores if score is not None)
            dropped += sum(score is None for score in scores)
            nt = batch.non_tensor_batch
            for i, score in enumerate(scores):
                rows.append(
                    {
                        "question": nt["question"][i],
                        "response": nt["response_text"][i],
                        "ground_truth": nt["ground_truth"][i],
                        "description_answers": nt["description_answers"][i] if "description_answers" in nt else None,
                        "prior_answers": nt["prior_answers"][i] if "prior_answers" in nt else None,
                        "score": score,
                    }
                )
        metrics = {f"val/{k}": v for k, v in aggregate_reward_metrics(all_scores).items()}
        metrics.update({f"val/{k}": float(np.mean(v)) for k, v in stage_metrics.items()})
        if self._val_bad_sample_policy()[0] == "drop_group":
            metrics["val/dropped_bad_samples"] = float(dropped)
            if dropped and not all_scores:
                logger.warning(
                    "validation at step %d: every sample's reward failed; no val/reward metrics", self.global_step
                )
        self.last_val_generations = rows
        if write_generations:
            path = self.config.trainer.response_path or os.path.join(
                self.checkpoint_root, f"generations_step_{self.global_step}.jsonl"
            )
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            logger.info("wrote %d validation generations to %s", len(rows), path)
        return metrics

    def _val_bad_sample_policy(self) -> tuple[str, str]:
        """What validation does with a sample whose reward fails, and the config key that says so:
        the policy of the reward config scoring validation (`worker.val_reward` when set)."""
        if self.config.worker.val_reward is not None:
            return self.config.worker.val_reward.on_bad_sample, "worker.val_reward.on_bad_sample"
        return self.config.worker.reward.on_bad_sample, "worker.reward.on_bad_sample"

    def _score_validation(self, batch: DataProto) -> list[dict[str, float] | None]:
        """Validation rewards under the bad-sample policy: one score per sample, None for a failed
        one under `drop_group` (left out of the metrics, warned about naming its row); with `error`
        the first failure stops the run naming the row and the option that would keep it going."""
        scores, failures = self.val_reward_fn.score_each(self._reward_inputs(batch))
        if not failures:
            return scores
        policy, key = self._val_bad_sample_policy()
        nt = batch.non_tensor_batch
        dataset = self.val_loader.dataset

        def row_name(index: int) -> str:
            return dataset.row_name(int(nt["row_index"][index])) if "row_index" in nt else "row ?"

        if policy == "error":
            index, why = min(failures.items())
            raise RewardFunctionError(
                f"validation at step {self.global_step}: the reward of {row_name(index)} "
                f"({len(failures)} bad sample(s) in this batch) failed: {why}. "
                f"Set {key}=drop_group to leave such samples out of the validation metrics instead "
                "(counted in val/dropped_bad_samples)."
            )
        for index, why in sorted(failures.items()):
            logger.warning(
                "validation at step %d: leaving %s out of the metrics: %s", self.global_step, row_name(index), why
            )
        return scores

    def _logged_generations(self) -> list[dict[str, Any]]:
        return self.last_val_generations[: self.config.trainer.val_generations_to_log]

    def _validate_and_log(self, write_generations: bool = False) -> dict[str, float]:
        metrics = self.validate(write_generations)
        self.tracker.log(metrics, step=self.global_step)
        self.tracker.log_generations(self._logged_generations(), step=self.global_step)
        return metrics

    # ================================================================ checkpoints
    def save_checkpoint(self) -> str:
        def write(folder: str) -> None:
            self.wg.save_checkpoint(os.path.join(folder, "actor"))
            state = {
                "global_step": self.global_step,
                "dataloader": self.train_loader.state_dict(),
                "kl_coef": self.kl_ctrl.value,
            }
            write_trainer_state(folder, state)

        cfg = self.config.trainer
        with checkpoint_guard():  # a signal waits until the checkpoint is complete
            return save_and_prune(
                self.checkpoint_root, self.global_step, cfg.save_limit, write, cfg.checkpoint_checksum
            )

    def _resume(self) -> None:
        cfg = self.config.trainer
        found = find_resume_checkpoint(
            self.checkpoint_root, cfg.load_checkpoint_path, cfg.find_last_checkpoint, cfg.resume_on_damaged
        )
        if found is None:
            return
        path, state = found
        self.wg.load_checkpoint(os.path.join(path, "actor"))
        self.train_loader.load_state_dict(state["dataloader"])
        self.kl_ctrl.value = state["kl_coef"]
        self.global_step = state["global_step"]
        logger.info("resumed from %s at step %d", path, self.global_step)


def old_log_prob_pass_skippable(config: PPOConfig) -> bool:
    """Whether the update may take its own detached log-probs as the old ones (on-policy shortcut).

    True when `worker.actor.skip_old_log_prob_when_on_policy` is on, the batch is used once
    (ppo_epochs=1) in one optimizer step (global_batch_size == rollout_batch_size), and nothing
    before the update needs old log-probs: the KL penalty in the reward (KL on, use_kl_loss=false)
    does, so it keeps the separate pass. The rollout entropy metric then comes from the update.
    """
    actor, algo = config.worker.actor, config.algorithm
    kl_in_reward = not algo.disable_kl and not algo.use_kl_loss
    return (
        actor.skip_old_log_prob_when_on_policy
        and actor.ppo_epochs == 1
        and actor.global_batch_size == config.data.rollout_batch_size
        and not kl_in_reward
    )


def _object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array of `values` (np.array would make a 2-D array of equal-length lists)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _token_level(scores: list[dict[str, float]], response_mask: torch.Tensor) -> torch.Tensor:
    """The overall reward placed on each response's last valid token."""
    token_scores = torch.zeros(response_mask.shape, dtype=torch.float32)
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    token_scores[torch.arange(len(scores)), last] = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
    return token_scores
