"""Cold-start supervised fine-tuning: `python -m verl.trainer.sft config=FILE key=value ...`.

`SFTTrainer` runs the loop: batches from `SFTLoader`, a train step on the SFT worker
(verl/workers/sft_worker.py) through a worker group, evaluation (loss on held-out conversations and
a greedy-generation check scored by a reward function), and checkpoints in the RL trainer's layout,
so RL starts from one with `worker.actor.model.model_path=<...>/global_step_<N>/actor`:

    <save_checkpoint_path>/global_step_<N>/actor/              the worker checkpoint: a Hugging Face
                                                               folder plus optimizer/ and training_state.pt
    <save_checkpoint_path>/global_step_<N>/eval_metrics.json   the evaluation at step N, when there was one
    <save_checkpoint_path>/global_step_<N>/trainer_state.json  written last: the checkpoint is complete
    <save_checkpoint_path>/generations_step_<N>.jsonl          every greedy generation of the check at step N
    <save_checkpoint_path>/rows.jsonl                          with the `file` logger: the rows of
                                                               `data.train_files` each step trained on

`trainer.backend=local` hosts one worker in this process (CPU or one GPU); `trainer.backend=ray`
hosts one per device (`trainer.nnodes` x `trainer.n_gpus_per_node`; CPU processes sharing the cores
when there is no GPU), FSDP-sharded, each taking an equal share of every batch.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from verl.models.loading import load_tokenizer_and_processor
from verl.protocol import SamplingParams
from verl.reward import RewardFunction, aggregate_reward_metrics
from verl.trainer.interrupt import checkpoint_guard
from verl.trainer.main import build_worker_group, load_reward_function, preflight, run_cli
from verl.trainer.sft_config import SFTConfig
from verl.utils.checkpoint import find_resume_checkpoint, save_and_prune, write_trainer_state
from verl.utils.config import to_dict
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.utils.progress import progress
from verl.utils.sft_dataset import ConversationEncoder, SFTDataset, SFTLoader
from verl.utils.timer import timer
from verl.utils.tracking import Tracker
from verl.workers.contract import SFTWorkerGroup
from verl.workers.sft_worker import SFTWorker

logger = logging.getLogger(__name__)


class SFTTrainer:
    """The SFT loop: train steps, evaluation, checkpoints and resume, through a worker group."""

    def __init__(
        self,
        config: SFTConfig,
        tokenizer: Any,
        worker_group: SFTWorkerGroup,
        train_loader: SFTLoader,
        val_loader: SFTLoader | None = None,
        generation_loader: PromptLoader | None = None,
        reward_fn: RewardFunction | None = None,
    ) -> None:
        if (generation_loader is None) != (reward_fn is None):
            raise ValueError("SFTTrainer: the generation check needs both generation_loader and reward_fn")
        self.config = config
        self.tokenizer = tokenizer
        self.wg = worker_group
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.generation_loader = generation_loader
        self.reward_fn = reward_fn
        self.checkpoint_root = config.trainer.save_checkpoint_path
        self.global_step = 0
        self.total_steps = config.trainer.total_steps(len(train_loader))
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.last_generations: list[dict[str, Any]] = []
        self.tracker: Tracker | None = None
        # The step at which the evaluation met `eval.stop_at`, once it has; a resumed run that finds it ends there.
        self.stopped_at: int | None = None

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
        if cfg.val_before_train and self.global_step == 0:
            self.tracker.log(self.evaluate(), step=0)
            self.tracker.log_generations(self.last_generations, step=0)

        metrics: dict[str, float] = {}
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="SFT", disable=None)
        batches = self._endless_batches()
        while self.global_step < self.total_steps:
            timings: dict[str, float] = {}
            with timer("step", timings):
                with timer("data", timings):
                    batch = next(batches)
                self.global_step += 1
                rows = batch.non_tensor_batch["row_index"].tolist()
                with timer("update", timings):
                    # One optimizer step on exactly these rows: data-parallel ranks share them, never pad them.
                    batch.meta_info["mini_batch_size"] = len(batch)
                    metrics = self.wg.train_step(batch).meta_info["metrics"]
                is_last = self.global_step >= self.total_steps
                if (cfg.val_freq > 0 and self.global_step % cfg.val_freq == 0) or is_last:
                    with timer("evaluate", timings):
                        metrics.update(self.evaluate())
                    self.tracker.log_generations(self.last_generations, step=self.global_step)
                    if self.target_reached(metrics):
                        self.stopped_at = self.global_step
                        is_last = True
            loader = self.train_loader
            metrics["train/epoch"] = loader.epoch + loader.batches_done / len(loader)
            metrics.update({f"timing_s/{name}": seconds for name, seconds in timings.items()})
            metrics["perf/examples_per_s"] = len(batch) / timings["update"]
            self.tracker.log_rows(rows, step=self.global_step)
            self.tracker.log(metrics, step=self.global_step)
            # Saved after logging: a run killed once this checkpoint exists resumes after this step,
            # so its metrics must be written already (a resumed run drops what was logged after).
            if (cfg.save_freq > 0 and self.global_step % cfg.save_freq == 0) or is_last:
                self.save_checkpoint()
            progress.update(1)
            if self.stopped_at is not None:
                break
        progress.close()
        self.tracker.finish()
        self._report_stop()
        return metrics

    def target_reached(self, metrics: dict[str, float]) -> bool:
        """Whether these evaluation metrics meet every threshold of `eval.stop_at` (never when it is empty)."""
        target = self.config.eval.stop_at
        if not target:
            return False
        missing = [key for key in target if key not in metrics]
        if missing:
            raise KeyError(
                f"eval.stop_at names {missing}, which the generation check did not report "
                f"(it reported {sorted(key for key in metrics if key.startswith('gen/'))})"
            )
        return all(metrics[key] >= threshold for key, threshold in target.items())

    def _report_stop(self) -> None:
        """One line saying why the run ended and with which figures, so a log shows what RL will start from."""
        if not self.config.eval.stop_at:
            return
        figures = ""
        if self.last_eval is not None:
            figures = ", ".join(f"{k}={v:.3f}" for k, v in sorted(self.last_eval[1].items()))
            figures = f" (evaluation at step {self.last_eval[0]}: {figures})"
        target = ", ".join(f"{k}>={v}" for k, v in self.config.eval.stop_at.items())
        if self.stopped_at is not None:
            print(f"SFT stopped at step {self.stopped_at}: target {target} reached{figures}", flush=True)
        else:
            print(
                f"SFT ended at the step cap ({self.global_step}) without reaching the target {target}{figures}",
                flush=True,
            )

    def _endless_batches(self):
        """Epoch after epoch; the loader's own state says where a resumed run continues."""
        while True:
            yield from self.train_loader

    # ================================================================ evaluation
    def evaluate(self) -> dict[str, float]:
        """`val/loss` on the held-out conversations and `gen/<component>` of the greedy-generation check."""
        metrics: dict[str, float] = {}
        if self.val_loader is not None:
            loss_sum, tokens = 0.0, 0.0
            for batch in progress(self.val_loader.single_pass(), "validation loss", len(self.val_loader)):
                result = self.wg.eval_loss(batch).batch
                loss_sum += float(result["loss_sum"].sum())
                tokens += float(result["label_tokens"].sum())
            metrics["val/loss"] = loss_sum / tokens
        if self.generation_loader is not None:
            metrics.update(self._generation_check())
        self.last_eval = (self.global_step, metrics)
        return metrics

    def _generation_check(self) -> dict[str, float]:
        """Greedy responses to the check's prompts, scored by the reward function; writes them all to a file."""
        evaluation = self.config.eval
        sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=evaluation.max_new_tokens)
        scores: list[dict[str, float]] = []
        rows: list[dict[str, Any]] = []
        lengths: list[float] = []
        for prompts in progress(self.generation_loader.single_pass(), "generation check", len(self.generation_loader)):
            prompts.meta_info["sampling"] = sampling
            batch = self.wg.generate_sequences(prompts)
            response_mask = batch.batch["response_mask"]
            responses = batch.batch["responses"].masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            nt = batch.non_tensor_batch
            samples = [
                {
                    "response": texts[i],
                    "response_length": int(response_mask[i].sum()),
                    "ground_truth": nt["ground_truth"][i],
                    "question": nt["question"][i],
                    "description_answers": None,
                    "prior_answers": None,
                    "extra": nt["extra"][i],
                }
                for i in range(len(batch))
            ]
            batch_scores = self.reward_fn(samples)
            scores.extend(batch_scores)
            lengths.extend(float(sample["response_length"]) for sample in samples)
            rows.extend(
                {
                    "question": sample["question"],
                    "response": sample["response"],
                    "ground_truth": sample["ground_truth"],
                    "score": score,
                }
                for sample, score in zip(samples, batch_scores)
            )
        metrics = {key.replace("reward/", "gen/", 1): value for key, value in aggregate_reward_metrics(scores).items()}
        metrics["gen/response_length"] = float(np.mean(lengths))
        self.last_generations = rows[: evaluation.generations_to_log]
        os.makedirs(self.checkpoint_root, exist_ok=True)
        path = os.path.join(self.checkpoint_root, f"generations_step_{self.global_step}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return metrics

    # ================================================================ checkpoints
    def save_checkpoint(self) -> str:
        def write(folder: str) -> None:
            self.wg.save_checkpoint(os.path.join(folder, "actor"))
            if self.last_eval is not None and self.last_eval[0] == self.global_step:
                with open(os.path.join(folder, "eval_metrics.json"), "w") as f:
                    json.dump({"global_step": self.global_step, **self.last_eval[1]}, f, indent=2)
            state = {"global_step": self.global_step, "dataloader": self.train_loader.state_dict()}
            if self.stopped_at is not None:
                state["stopped_at"] = self.stopped_at
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
        self.global_step = state["global_step"]
        if state.get("stopped_at") is not None:
            # The target was met here: the run is complete, and training on would overshoot it.
            self.stopped_at = state["stopped_at"]
            self.total_steps = self.global_step
            eval_path = os.path.join(path, "eval_metrics.json")
            if os.path.isfile(eval_path):
                with open(eval_path) as f:
                    saved = json.load(f)
                self.last_eval = (saved.pop("global_step"), saved)
        logger.info("resumed from %s at step %d", path, self.global_step)


def build_trainer(config: SFTConfig) -> SFTTrainer:
    """Data, worker and trainer, built in dependency order."""

    data, model_cfg, evaluation = config.data, config.model, config.eval
    preflight(
        config.trainer.save_checkpoint_path,
        model_cfg.model_path,
        {
            "data.train_files": list(data.train_files),
            "data.val_files": list(data.val_files),
            "eval.generation_files": [evaluation.generation_files] if evaluation.generation_files else [],
        },
    )
    reward_fn = None
    if evaluation.generation_files is not None:
        reward_fn = load_reward_function(
            "eval.reward_function", evaluation.reward_function, evaluation.reward_function_kwargs
        )
    tokenizer, processor = load_tokenizer_and_processor(
        model_cfg.tokenizer_path or model_cfg.model_path, model_cfg.trust_remote_code
    )
    encoder = ConversationEncoder(tokenizer, processor, data.min_pixels, data.max_pixels)
    train_set = SFTDataset(data.train_files, encoder, data.max_length, data.image_dir)
    train_loader = SFTLoader(
        train_set,
        data.batch_size,
        tokenizer.pad_token_id,
        shuffle=data.shuffle,
        seed=data.seed,
        ratios=data.train_ratios,
        group_by_length=data.group_by_length,
    )
    val_loader = None
    if data.val_files:
        val_set = SFTDataset(data.val_files, encoder, data.max_length, data.image_dir)
        val_loader = SFTLoader(val_set, data.batch_size, tokenizer.pad_token_id, shuffle=False, drop_last=False)
    generation_loader = None
    if evaluation.generation_files is not None:
        prompt_config = PromptDatasetConfig(
            prompt_key=evaluation.prompt_key,
            answer_key=evaluation.answer_key,
            image_key=evaluation.image_key,
            format_prompt=evaluation.format_prompt,
            max_prompt_length=evaluation.max_prompt_length,
            min_pixels=data.min_pixels,
            max_pixels=data.max_pixels,
        )
        prompts = PromptDataset(evaluation.generation_files, tokenizer, processor, prompt_config)
        generation_loader = PromptLoader(
            prompts, evaluation.batch_size, False, data.seed, tokenizer.pad_token_id, drop_last=False
        )

    config.optim.training_steps = config.trainer.total_steps(len(train_loader))
    worker_kwargs = {
        "model_config": model_cfg,
        "optim_config": config.optim,
        "micro_batch_size": config.trainer.micro_batch_size,
        "generation_batch_size": evaluation.batch_size,
        "seed": config.trainer.seed,
    }
    worker_group = build_worker_group(SFTWorker, worker_kwargs, config.trainer)
    logger.info("model parameters: %s", worker_group.init_model())
    return SFTTrainer(config, tokenizer, worker_group, train_loader, val_loader, generation_loader, reward_fn)


USAGE = (
    "usage: python -m verl.trainer.sft [config=FILE.yaml ...] [key.sub=value ...] [--check-config] [-h]\n"
    "       vision-sr1-sft ...  (the same, once the package is installed)"
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_cli(argv, SFTConfig, build_trainer, None, USAGE, __doc__ or "", "examples/sft_config.yaml")


def cli() -> None:
    """Console entry point `vision-sr1-sft`."""
    main()


if __name__ == "__main__":
    main()
