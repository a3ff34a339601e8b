"""A run's folder (`trainer.save_checkpoint_path`): one run at a time (a lock the driver holds for
the run's lifetime, taken over from a killed run), checkpoint rotation that never deletes a merged
model, and files and folders written with the permissions the umask asks for."""

import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_checkpoint_integrity import save, writer
from tests.test_trainer import ROOT, read_metrics, run_args
from verl.trainer.main import main
from verl.utils.checkpoint import (
    LOCK_FILE,
    RunFolderBusyError,
    acquire_run_lock,
    merged_model_folders,
    remove_old_checkpoints,
    save_atomically,
    verify_checkpoint,
)
from verl.utils.file_modes import honour_umask

LOGGER = "verl.utils.checkpoint"
# A process that takes the run lock through the real helper, says so, and sleeps until killed.
HOLDER = (
    "import sys, time\n"
    "from verl.utils.checkpoint import acquire_run_lock\n"
    "lock = acquire_run_lock(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start_holder(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
        umask=0o022,  # it creates the run folder
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _run(command: list[str], timeout: float = 600, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, umask=umask)


def _rl_command(tiny_world: Path, save_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main", *run_args(tiny_world, save_dir, *extra)]


def _sft_command(tiny_world: Path, save_dir: Path, *extra: str) -> list[str]:
    """The smallest SFT run of tests/test_sft.py: 6 text-only rows, 2 a step, no evaluation."""
    rows = json.loads((tiny_world / "data" / "cold_start" / "text_only.json").read_text())[:6]
    train = save_dir.parent / f"{save_dir.name}_train.json"
    train.write_text(json.dumps(rows))
    args = [
        f"data.train_files=[{train}]",
        "data.val_files=[]",
        "data.batch_size=2",
        f"model.model_path={tiny_world / 'models' / 'qwen2_5_vl'}",
        "eval.generation_files=null",
        "trainer.device=cpu",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={save_dir}",
        *extra,
    ]
    return [sys.executable, "-m", "verl.trainer.sft", *args]


def _assert_readable_by_others(folder: Path) -> None:
    """Every file readable by group and others, every folder 0755 (what umask 022 gives)."""
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for path in folder.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o755, (path, oct(mode))
        else:
            assert mode & 0o044 == 0o044, (path, oct(mode))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ================================================================ one run per folder
def test_the_lock_names_its_holder_and_is_released(tmp_path):
    folder = tmp_path / "run"
    with acquire_run_lock(str(folder), command="train A") as lock:
        holder = json.loads((folder / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "train A" and holder["host"]
        # flock belongs to the open file, so even this process cannot take it a second time
        with pytest.raises(RunFolderBusyError) as busy:
            acquire_run_lock(str(folder))
        message = str(busy.value)
        assert f"pid {os.getpid()}" in message and str(folder) in message and "command: train A" in message
        assert lock.fd is not None
    assert not (folder / LOCK_FILE).exists()  # released: the next run finds no lock and no warning
    acquire_run_lock(str(folder)).release()


def test_a_second_training_into_the_same_folder_stops_naming_the_first(tiny_world, tmp_path):
    """A real run is training (checkpoint 1 saved); a second `python -m verl.trainer.main` into its
    folder exits non-zero at once, naming the first run's pid and the folder. The first run, then
    stopped with SIGTERM, logged each of its steps once (1, 2, ... in order) and its checkpoints,
    the one saved before the second run started included, are intact and unchanged."""
    save_dir = tmp_path / "run"
    # More steps than the first run gets to take: it is stopped once the second has been refused.
    command = _rl_command(tiny_world, save_dir, "trainer.max_steps=500", "trainer.save_freq=1", "data.val_files=null")
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            marker = save_dir / "global_step_1" / "manifest.json"
            deadline = time.time() + 300
            while not marker.exists() and first.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert marker.exists(), log_path.read_text()[-3000:]
            saved_before = _digest(marker)

            started = time.time()
            second = _run(command, timeout=120)
            assert first.poll() is None, "the first run ended before the second was refused"
            assert second.returncode == 1, second.stderr[-3000:]
            assert f"another run is using {save_dir}: pid {first.pid} on host" in second.stderr
            assert "-m verl.trainer.main" in second.stderr  # the other run's command
            assert "model parameters" not in second.stderr  # stopped before any model loaded
            assert time.time() - started < 60
        finally:
            first.send_signal(signal.SIGTERM)
            code = first.wait(timeout=300)
    assert code == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), steps
    assert _digest(marker) == saved_before
    checkpoints = sorted(p.name for p in save_dir.glob("global_step_*"))
    assert len(checkpoints) >= 1
    for name in checkpoints:
        assert verify_checkpoint(str(save_dir / name)).intact, name
    assert not (save_dir / LOCK_FILE).exists()  # released on the way out of the interrupted run


def test_a_lock_left_by_a_killed_training_is_taken_over_with_a_warning(tiny_world, tmp_path):
    save_dir = tmp_path / "run"
    holder = _start_holder(save_dir)
    _kill(holder)  # kill -9: the lock file stays, naming a dead process
    assert json.loads((save_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    run = _run(_rl_command(tiny_world, save_dir, "trainer.max_steps=1", "data.val_files=null"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"taking over the lock on {save_dir} left by pid {holder.pid} on host" in run.stderr
    assert sorted(read_metrics(save_dir)) == [1]
    assert not (save_dir / LOCK_FILE).exists()


def test_sft_runs_take_the_same_lock(tiny_world, tmp_path):
    """`python -m verl.trainer.sft` into a folder a live process holds exits non-zero naming it;
    once that process is killed -9, the same command takes the lock over with a warning and trains
    (under umask 022 its checkpoint is readable by others)."""
    save_dir = tmp_path / "sft"
    command = _sft_command(tiny_world, save_dir, "trainer.max_steps=1")
    holder = _start_holder(save_dir)
    try:
        busy = _run(command, timeout=120)
    finally:
        _kill(holder)
    assert busy.returncode == 1, busy.stderr[-3000:]
    assert f"another run is using {save_dir}: pid {holder.pid} on host" in busy.stderr
    assert not list(save_dir.glob("global_step_*")) and not (save_dir / "metrics.jsonl").exists()

    run = _run(command)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"taking over the lock on {save_dir} left by pid {holder.pid}" in run.stderr
    assert verify_checkpoint(str(save_dir / "global_step_1")).intact
    _assert_readable_by_others(save_dir)


# ================================================================ rotation and merged models
def _merge(checkpoint: Path) -> Path:
    """scripts/model_merger.py with its default output, as a user runs it."""
    merged = _run([sys.executable, "scripts/model_merger.py", f"--local_dir={checkpoint / 'actor'}"])
    assert merged.returncode == 0, merged.stderr[-3000:]
    return checkpoint / "actor" / "huggingface"


def test_save_limit_keeps_a_checkpoint_holding_a_merge(tiny_world, tmp_path, caplog):
    """save_limit=1: step 1 is merged with the merger's default, then the run continues to step 3.
    The rotation deletes step 2 but keeps step 1 with its merge, warning once that it does. Run under
    umask 022: the checkpoints, the merge and the metrics are readable by others."""
    save_dir = tmp_path / "run"
    steps = ["trainer.save_freq=1", "trainer.save_limit=1", "data.val_files=null"]
    previous = os.umask(0o022)
    try:
        main(run_args(tiny_world, save_dir, "trainer.max_steps=1", *steps))
        merged = _merge(save_dir / "global_step_1")
        weights = _digest(merged / "model.safetensors")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            main(run_args(tiny_world, save_dir, "trainer.max_steps=3", *steps))
    finally:
        os.umask(previous)
    assert sorted(p.name for p in save_dir.glob("global_step_*")) == ["global_step_1", "global_step_3"]
    assert _digest(merged / "model.safetensors") == weights
    kept = [r.getMessage() for r in caplog.records if "holds a merged model" in r.getMessage()]
    assert len(kept) == 1, kept  # said once, not at every later save
    assert f"keeping {save_dir / 'global_step_1'}, which holds a merged model (actor/huggingface)" in kept[0]
    assert sorted(read_metrics(save_dir)) == [1, 2, 3]
    _assert_readable_by_others(save_dir)


def test_merges_are_recognised_with_and_without_a_manifest(tmp_path):
    folder = save(tmp_path, 1)
    assert merged_model_folders(str(folder)) == []  # the checkpoint's own weights are no merge
    elsewhere = folder / "exported"  # a --target_dir of the user's choosing inside the checkpoint
    elsewhere.mkdir()
    (elsewhere / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert merged_model_folders(str(folder)) == ["exported"]
    # a checkpoint from before manifests (or an EasyR1 one): the merger's default folders count
    old = save(tmp_path, 2)
    (old / "manifest.json").unlink()
    (old / "actor" / "huggingface").mkdir()
    (old / "actor" / "huggingface" / "config.json").write_text("{}")  # EasyR1 keeps its config there
    assert merged_model_folders(str(old)) == []
    (old / "actor" / "huggingface" / "model.safetensors").write_bytes(b"x")
    assert merged_model_folders(str(old)) == ["actor/huggingface"]


def test_rotation_never_deletes_a_merge_and_a_resave_sets_it_aside(tmp_path, caplog):
    first, second, third = (save(tmp_path, step) for step in (1, 2, 3))
    adapter = first / "actor" / "adapter"  # the merger's --adapter_only default
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    with open(second / "actor" / "model.safetensors", "r+b") as f:  # damaged, and merged
        f.truncate(10)
    (second / "actor" / "huggingface").mkdir()
    (second / "actor" / "huggingface" / "model.safetensors").write_bytes(b"y")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert remove_old_checkpoints(str(tmp_path), 1) == []
    assert first.is_dir() and second.is_dir() and third.is_dir()
    assert f"keeping {first}, which holds a merged model (actor/adapter)" in caplog.text
    assert f"keeping {second}, which holds a merged model (actor/huggingface)" in caplog.text

    # A new save of step 1 (a run restarted from scratch into this folder) moves the merge aside.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        save(tmp_path, 1)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("global_step_1.kept_")]
    assert len(aside) == 1 and (aside[0] / "actor" / "adapter" / "adapter_model.safetensors").is_file()
    assert f"moved to {aside[0]} instead of deleting it" in caplog.text


# ================================================================ file modes
def test_a_tiny_world_build_is_readable_by_others(tmp_path):
    from verl.tiny_world import build_tiny_world
    from verl.tiny_world.data import DataSizes

    previous = os.umask(0o022)
    try:
        build_tiny_world(str(tmp_path / "world"), sizes=DataSizes(train=8, val=8, test=8, cold_start=8))
    finally:
        os.umask(previous)
    assert (tmp_path / "world" / "models" / "qwen2_5_vl" / "model.safetensors").is_file()
    assert list((tmp_path / "world" / "data").rglob("*.parquet"))
    _assert_readable_by_others(tmp_path / "world")


def test_checkpoint_files_follow_the_umask_not_a_fixed_mode(tmp_path):
    """Under umask 027 a checkpoint's safetensors file (written 0600 by safetensors) and the rest
    are 0640, folders 0750: the umask decides, not a hard-coded 0644."""

    def write(folder: str) -> None:
        writer(1)(folder)
        save_file({"w": torch.zeros(2)}, os.path.join(folder, "actor", "extra.safetensors"))

    previous = os.umask(0o027)
    try:
        path = Path(save_atomically(str(tmp_path), 1, write))
    finally:
        os.umask(previous)
    for entry in [path, *path.rglob("*")]:
        assert stat.S_IMODE(entry.stat().st_mode) == (0o750 if entry.is_dir() else 0o640), entry


def test_honour_umask_leaves_what_it_did_not_write(tmp_path):
    from verl.utils.file_modes import entries

    folder = tmp_path / "models"
    folder.mkdir()
    private = folder / "mine.txt"
    private.write_text("secret")
    private.chmod(0o600)
    before = entries(str(folder))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    previous = os.umask(0o022)
    try:
        honour_umask(str(folder), before)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o644
