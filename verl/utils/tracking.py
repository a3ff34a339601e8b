"""Experiment tracking: one `Tracker` sends each step's metrics and sample generations to the chosen loggers.

Loggers, chosen by name (`trainer.logger`):
- `console`: one line per step;
- `file`: JSON lines in `<output_dir>/metrics.jsonl`, `<output_dir>/generations.jsonl` and
  `<output_dir>/rows.jsonl` (per step: `rows`, the dataset rows it trained on; `sha256`, their hash;
  and, only when the step drew rows it did not train on, `dropped`: those rows by reason), and at
  the end the curves in `<output_dir>/reward_curves.png` (verl/utils/plot_metrics.py);
- `wandb`: a Weights & Biases run (set `WANDB_MODE=offline` to log without an account);
- `tensorboard`: event files in `<output_dir>/tensorboard`;
- `swanlab`: a SwanLab run (optional package `swanlab`).

On resume (`resume=True`) the file and tensorboard loggers drop what the interrupted run logged at or
after the first step logged now, so replayed steps appear once. A new backend is a `Logger`
subclass decorated with `@register_logger("name")`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What every logger is built from: the `Tracker`'s arguments."""

    project: str
    experiment: str
    config: dict[str, Any]
    output_dir: str
    resume: bool


class Logger:
    """One tracking backend: subclasses implement `log` and `log_generations`, and `finish` when
    they hold something open. `rows` of generations all have the same keys (checked by `Tracker`)."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError(f"{type(self).__name__}.log")

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        raise NotImplementedError(f"{type(self).__name__}.log_generations")

    def log_rows(self, rows: list[int], step: int, dropped: dict[str, list[int]]) -> None:
        """The dataset rows (indices) a step trained on, and those it drew but left out, by reason;
        only the file logger keeps them."""

    def finish(self) -> None:
        """Flush and close; backends that hold nothing open keep this no-op."""


LOGGERS: dict[str, type[Logger]] = {}


def register_logger(name: str) -> Callable[[type[Logger]], type[Logger]]:
    """Class decorator making a `Logger` subclass available to `Tracker` under `name`."""

    def register(cls: type[Logger]) -> type[Logger]:
        if name in LOGGERS:
            raise ValueError(f"logger {name!r} is already registered ({LOGGERS[name].__name__})")
        LOGGERS[name] = cls
        return cls

    return register


def _import_optional(package: str, logger: str) -> ModuleType:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"the {logger!r} logger needs the {package!r} package: pip install {package}") from error


@register_logger("console")
class ConsoleLogger(Logger):
    """One line per step to stdout: sorted keys, values to 4 significant digits."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        print(f"step {step}: " + " ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items())), flush=True)

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        for row in rows:
            print(f"step {step} sample: " + " | ".join(f"{key}={value!r}" for key, value in row.items()), flush=True)


@register_logger("file")
class FileLogger(Logger):
    """Appends one JSON object per line, each with a `step`; the file is closed after every write,
    so a crash loses nothing already logged."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        os.makedirs(run.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(run.output_dir, "metrics.jsonl")
        self.generations_path = os.path.join(run.output_dir, "generations.jsonl")
        self.rows_path = os.path.join(run.output_dir, "rows.jsonl")
        # The step to resume from is known only at the first write.
        self._drop_replayed_steps = run.resume

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._append(self.metrics_path, [{"step": step, **metrics}], step)

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        self._append(self.generations_path, [{"step": step, **row} for row in rows], step)

    def finish(self) -> None:
        """Draw the run's curves beside metrics.jsonl (reward_curves.png); a failure to draw is
        logged, never raised: the run itself succeeded."""
        if not os.path.exists(self.metrics_path):
            return
        from verl.utils.plot_metrics import write_curves

        try:
            out = write_curves(self.run.output_dir)
        except Exception as error:  # noqa: BLE001 - drawing is a convenience; the metrics are on disk
            _log.warning("could not draw the curves of %s: %s", self.metrics_path, error)
            return
        if out is not None:
            _log.info("curves: %s", out)

    def log_rows(self, rows: list[int], step: int, dropped: dict[str, list[int]]) -> None:
        # The hash makes two runs' accounts comparable at a glance; the ids prove which rows.
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        record: dict[str, Any] = {"step": step, "rows": rows, "sha256": digest}
        if dropped:
            record["dropped"] = dropped
        self._append(self.rows_path, [record], step)

    def _append(self, path: str, records: list[dict[str, Any]], step: int) -> None:
        if self._drop_replayed_steps:
            self._drop_replayed_steps = False
            for logged_path in (self.metrics_path, self.generations_path, self.rows_path):
                _keep_steps_before(logged_path, step)
        with open(path, "a") as file:
            file.writelines(json.dumps(record, default=_json_value) + "\n" for record in records)


def _keep_steps_before(path: str, step: int) -> None:
    """Rewrite a JSON-lines file keeping records with `step` < `step`, atomically (temp file + rename)."""
    if not os.path.exists(path):
        return
    with open(path) as file:
        lines = file.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash that interrupted the run
        if record["step"] < step:
            kept.append(line)
    with open(path + ".tmp", "w") as file:
        file.writelines(kept)
    os.replace(path + ".tmp", path)


def _json_value(value: Any) -> Any:
    """numpy / torch scalars become Python numbers; anything else non-JSON becomes its str."""
    return value.item() if hasattr(value, "item") else str(value)


@register_logger("wandb")
class WandbLogger(Logger):
    """A wandb run under `<output_dir>/wandb`. Its id is kept in `<output_dir>/wandb_run_id.txt` so a
    resumed training run continues the same wandb run."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        self._wandb = _import_optional("wandb", "wandb")
        os.makedirs(run.output_dir, exist_ok=True)
        id_path = os.path.join(run.output_dir, "wandb_run_id.txt")
        if run.resume and os.path.exists(id_path):
            with open(id_path) as file:
                run_id = file.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w") as file:
                file.write(run_id)
        self._run = self._wandb.init(
            project=run.project,
            name=run.experiment,
            config=run.config,
            dir=run.output_dir,
            id=run_id,
            resume="allow",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[row[column] for column in columns] for row in rows])
        self._run.log({"generations": table}, step=step)

    def finish(self) -> None:
        self._run.finish()


@register_logger("tensorboard")
class TensorboardLogger(Logger):
    """Scalars per metric and a markdown table of generations, in `<output_dir>/tensorboard`."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        _import_optional("tensorboard", "tensorboard")
        self._writer = None

    def _writer_at(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes readers hide the interrupted run's events at steps >= `step`.
            purge_step = step if self.run.resume else None
            self._writer = SummaryWriter(os.path.join(self.run.output_dir, "tensorboard"), purge_step=purge_step)
        return self._writer

    def log(self, metrics: dict[str, float], step: int) -> None:
        writer = self._writer_at(step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_markdown_cell(row[column]) for column in columns) + " |" for row in rows]
        writer = self._writer_at(step)
        writer.add_text("generations", "\n".join(lines), step)
        writer.flush()

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


class Tracker:
    """Sends metrics and sample generations to every logger named in `loggers`."""

    def __init__(
        self,
        loggers: list[str],
        project: str,
        experiment: str,
        config: dict[str, Any],
        output_dir: str,
        resume: bool = False,
    ) -> None:
        unknown = [name for name in loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"unknown logger(s) {unknown}; valid names: {sorted(LOGGERS)}")
        run = RunInfo(project, experiment, config, output_dir, resume)
        self.loggers = [LOGGERS[name](run) for name in dict.fromkeys(loggers)]

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one step's metrics; values may be Python, numpy or one-element torch numbers."""
        numbers = {}
        for key, value in metrics.items():
            try:
                numbers[key] = float(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise TypeError(f"Tracker.log: metric {key!r} at step {step} is not a number: {value!r}") from error
        for logger in self.loggers:
            logger.log(numbers, step)

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        """Log sample generations, e.g. rows of {input, output, ground_truth, score}; all rows need the same keys."""
        if not rows:
            return
        columns = list(rows[0])
        for i, row in enumerate(rows):
            if list(row) != columns:
                raise ValueError(f"Tracker.log_generations: row {i} has keys {list(row)}, row 0 has {columns}")
        for logger in self.loggers:
            logger.log_generations(rows, step)

    def log_rows(self, rows: list[int], step: int, dropped: dict[str, list[int]] | None = None) -> None:
        """Log which dataset rows (indices, one per prompt trained on) a step used, so a resumed run
        can be shown to neither skip nor repeat data; `dropped` holds the rows the step drew but
        left out, by reason (e.g. {"bad_sample": [...], "filtered": [...]}), so that the rows
        trained on and those dropped together are every row the step drew. Reasons without rows
        are left out of the record."""
        ids = [int(row) for row in rows]
        left_out = {reason: [int(row) for row in dropped_rows] for reason, dropped_rows in (dropped or {}).items()}
        left_out = {reason: dropped_rows for reason, dropped_rows in left_out.items() if dropped_rows}
        for logger in self.loggers:
            logger.log_rows(ids, step, left_out)

    def finish(self) -> None:
        """Flush and close every logger (call once, at the end of training)."""
        for logger in self.loggers:
            logger.finish()


@register_logger("swanlab")
class SwanlabLogger(Logger):
    """A SwanLab run (EasyR1's `swanlab` logger) under `<output_dir>/swanlab`; needs `pip install swanlab`
    (set `SWANLAB_MODE=local` to log without an account)."""

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        self._swanlab = _import_optional("swanlab", "swanlab")
        logdir = os.path.join(run.output_dir, "swanlab")
        os.makedirs(logdir, exist_ok=True)  # swanlab wants the folder to exist
        self._swanlab.init(project=run.project, experiment_name=run.experiment, config=run.config, logdir=logdir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._swanlab.log(metrics, step=step)

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        text = "\n\n".join(" | ".join(f"{key}={value!r}" for key, value in row.items()) for row in rows)
        self._swanlab.log({"generations": self._swanlab.Text(text)}, step=step)

    def finish(self) -> None:
        self._swanlab.finish()
