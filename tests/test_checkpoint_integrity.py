"""Verified checkpoints: the manifest written with each checkpoint, verification of real files on
resume, fallback to the newest intact checkpoint (or an error naming the file), pruning that never
keeps a damaged checkpoint over an intact one, and a real training run resuming past a truncated one."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import ROOT, read_metrics, run_args

from verl.trainer.config import PPOConfig
from verl.utils.checkpoint import (
    MANIFEST_FILE,
    CheckpointDamagedError,
    find_resume_checkpoint,
    list_checkpoints,
    remove_old_checkpoints,
    save_and_prune,
    save_atomically,
    verify_checkpoint,
    write_trainer_state,
)
from verl.utils.config import ConfigError, load_config

WEIGHTS = "actor/model.safetensors"
LOGGER = "verl.utils.checkpoint"


def writer(step: int, state: dict | None = None):
    """A `write` that lays out a checkpoint like the trainers do: a model folder with nested
    optimizer shards from several ranks (hidden metadata file included) and the trainer state last."""

    def write(folder: str) -> None:
        actor = Path(folder) / "actor"
        (actor / "optimizer").mkdir(parents=True)
        (actor / "config.json").write_text(json.dumps({"step": step}))
        (actor / "model.safetensors").write_bytes(os.urandom(50_000 + step))
        (actor / "training_state.pt").write_bytes(os.urandom(3_000))
        (actor / "optimizer" / ".metadata").write_bytes(os.urandom(700))
        for rank in range(2):
            (actor / "optimizer" / f"__{rank}_0.distcp").write_bytes(os.urandom(20_000))
        write_trainer_state(folder, state or {"global_step": step, "dataloader": {"batches_done": step}})

    return write


def save(root: Path, step: int, checksum: str = "sha256") -> Path:
    return Path(save_atomically(str(root), step, writer(step), checksum))


def truncate(path: Path, keep: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def flip_byte(path: Path, offset: int = 1234) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- the manifest
def test_manifest_lists_every_file_under_the_folder_with_size_and_sha256(tmp_path):
    folder = save(tmp_path, 2)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    on_disk = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )
    assert sorted(manifest["files"]) == on_disk
    assert "actor/optimizer/.metadata" in on_disk and "trainer_state.json" in on_disk
    assert manifest["checksum"] == "sha256" and manifest["global_step"] == 2
    entry = manifest["files"][WEIGHTS]
    assert entry["size"] == (folder / WEIGHTS).stat().st_size
    assert entry["sha256"] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    check = verify_checkpoint(str(folder))
    assert check.intact and check.verified and check.state["global_step"] == 2
    assert not (tmp_path / ".tmp_global_step_2").exists()


def test_a_save_whose_trainer_state_is_wrong_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="`global_step` is 5 but the checkpoint is step 2"):
        save_atomically(str(tmp_path), 2, writer(2, {"global_step": 5, "dataloader": {}}))
    assert list_checkpoints(str(tmp_path)) == []


def damage_truncate(folder: Path) -> None:
    truncate(folder / WEIGHTS)


def damage_flip(folder: Path) -> None:
    flip_byte(folder / WEIGHTS)


def damage_delete(folder: Path) -> None:
    (folder / "actor" / "optimizer" / "__1_0.distcp").unlink()


def damage_empty_state(folder: Path) -> None:
    (folder / "trainer_state.json").write_text("")


def damage_wrong_step(folder: Path) -> None:
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7, "dataloader": {}}))


def damage_manifest(folder: Path) -> None:
    truncate(folder / MANIFEST_FILE, 40)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (damage_truncate, [f"{WEIGHTS}: 100 bytes, the manifest says 50002 (truncated)"]),
        (damage_flip, [f"{WEIGHTS}: contents differ from the manifest (sha256 mismatch: corrupted)"]),
        (damage_delete, ["actor/optimizer/__1_0.distcp: missing"]),
        (damage_empty_state, ["trainer_state.json: 0 bytes, the manifest says", "trainer_state.json: empty"]),
        (damage_wrong_step, ["trainer_state.json: `global_step` is 7 but the checkpoint is step 2"]),
        (damage_manifest, ["manifest.json: not valid JSON"]),
    ],
)
def test_verification_names_the_damaged_file_and_problem(tmp_path, damage, expected):
    folder = save(tmp_path, 2)
    assert verify_checkpoint(str(folder)).intact
    damage(folder)
    check = verify_checkpoint(str(folder))
    assert not check.intact and check.state is None
    for text in expected:
        assert any(text in problem for problem in check.problems), (text, check.problems)
    assert str(folder) in check.describe()


def test_size_only_manifests_find_truncation_but_not_flipped_bytes(tmp_path):
    folder = save(tmp_path, 2, checksum="size")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["checksum"] == "size" and "sha256" not in manifest["files"][WEIGHTS]
    flip_byte(folder / WEIGHTS)
    assert verify_checkpoint(str(folder)).intact  # the documented trade-off of checksum=size
    truncate(folder / WEIGHTS)
    assert "(truncated)" in verify_checkpoint(str(folder)).problems[0]


def test_files_added_after_the_save_are_ignored(tmp_path):
    folder = save(tmp_path, 2)
    merged = folder / "actor" / "huggingface"  # scripts/model_merger.py's default output
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    check = verify_checkpoint(str(folder))
    assert check.intact and check.extra == ["actor/huggingface/config.json"]


def test_checkpoints_from_before_manifests_are_accepted_unverified(tmp_path, caplog):
    folder = save(tmp_path, 2)
    (folder / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        path, state = find_resume_checkpoint(str(tmp_path), None, True)
    assert path == str(folder) and state["global_step"] == 2
    assert f"checkpoint {folder} has no manifest.json" in caplog.text and "cannot be verified" in caplog.text
    # their trainer state is still validated
    damage_empty_state(folder)
    check = verify_checkpoint(str(folder))
    assert check.problems == ["trainer_state.json: empty"]


# ---------------------------------------------------------------- resume: fallback and errors
def three_checkpoints(root: Path) -> list[Path]:
    return [save(root, step) for step in (1, 2, 3)]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    first, second, third = three_checkpoints(tmp_path)
    truncate(third / WEIGHTS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        path, state = find_resume_checkpoint(str(tmp_path), None, True)
    assert (path, state["global_step"]) == (str(second), 2)
    assert f"checkpoint {third} is damaged: {WEIGHTS}: 100 bytes" in caplog.text

    damage_empty_state(second)
    path, state = find_resume_checkpoint(str(tmp_path), None, True)
    assert (path, state["global_step"]) == (str(first), 1)

    damage_delete(first)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_resume_checkpoint(str(tmp_path), None, True) is None
    assert "no intact checkpoint" in caplog.text and "starting from scratch" in caplog.text


def test_error_mode_stops_naming_the_checkpoint_and_file(tmp_path):
    *_, third = three_checkpoints(tmp_path)
    flip_byte(third / WEIGHTS)
    with pytest.raises(CheckpointDamagedError, match=f"checkpoint {third} is damaged: {WEIGHTS}: contents differ"):
        find_resume_checkpoint(str(tmp_path), None, True, on_damaged="error")


def test_a_damaged_explicit_checkpoint_is_always_an_error(tmp_path):
    first, *_ = three_checkpoints(tmp_path)
    truncate(first / "actor" / "training_state.pt")
    with pytest.raises(CheckpointDamagedError, match=f"load_checkpoint_path: checkpoint {first} is damaged: actor/t"):
        find_resume_checkpoint(str(tmp_path), str(first), True, on_damaged="fallback")
    with pytest.raises(CheckpointDamagedError, match="the folder does not exist"):
        find_resume_checkpoint(str(tmp_path), str(tmp_path / "global_step_9"), True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.resume_on_damaged=ignore", "`trainer.resume_on_damaged`: .ignore. is not one of: fallback, error"),
        ("trainer.checkpoint_checksum=md5", "`trainer.checkpoint_checksum`: .md5. is not one of: sha256, size"),
    ],
)
def test_bad_integrity_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override], PPOConfig)


# ---------------------------------------------------------------- pruning
def test_pruning_never_keeps_a_damaged_checkpoint_over_an_intact_one(tmp_path, caplog):
    """A run that fell back from damaged step 5 to step 1 saves step 2 with save_limit=1: keeping
    the newest folder by step would keep the damaged 5 and delete both intact checkpoints."""
    first, fifth = save(tmp_path, 1), save(tmp_path, 5)
    truncate(fifth / WEIGHTS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        second = save_and_prune(str(tmp_path), 2, 1, writer(2))
    assert [path for _, path in list_checkpoints(str(tmp_path))] == [second]
    assert f"removing checkpoint {fifth} is damaged: {WEIGHTS}" in caplog.text
    assert not first.exists()


def test_pruning_with_nothing_intact_deletes_nothing(tmp_path):
    first, second = save(tmp_path, 1), save(tmp_path, 2)
    damage_delete(first)
    truncate(second / WEIGHTS)
    assert remove_old_checkpoints(str(tmp_path), 1) == []
    assert first.exists() and second.exists()


# ---------------------------------------------------------------- a real run resumes past a truncated checkpoint
def run_trainer(save_dir: Path, world: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "verl.trainer.main", *run_args(world, save_dir, "trainer.save_freq=1", *extra)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(tiny_world, tmp_path):
    run_trainer(tmp_path, tiny_world, "trainer.max_steps=2")
    first_run = read_metrics(tmp_path)
    newest = tmp_path / "global_step_2"
    truncate(newest / WEIGHTS)

    rerun = run_trainer(tmp_path, tiny_world, "trainer.max_steps=3")
    assert f"checkpoint {newest} is damaged: {WEIGHTS}" in rerun.stderr and "(truncated)" in rerun.stderr
    assert f"resumed from {tmp_path / 'global_step_1'} at step 1" in rerun.stderr
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2, 3]
    assert metrics[1] == first_run[1]  # step 1 was not trained again
    for step in (1, 2, 3):
        assert verify_checkpoint(str(tmp_path / f"global_step_{step}")).intact, step
