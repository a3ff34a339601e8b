"""Checkpoint folders: `<root>/global_step_<N>/`, written atomically, verified and found again on resume.

A checkpoint is written to a temporary folder and renamed, so it is complete or absent. That does not
protect it afterwards: a disk that filled up, a copy cut short, a power loss before the data reached
the disk or a flipped byte can still leave a `global_step_<N>` folder that fails deep inside model
loading. So every checkpoint carries `manifest.json`, written last (after `trainer_state.json`, before
the rename): the relative path, size and SHA-256 (or only the size) of every file under the folder,
whatever its layout and however many processes wrote it. On resume the newest checkpoint is checked
against its manifest and its `trainer_state.json` is validated; a damaged one is named in a warning
(file and problem) and the run falls back to the newest intact one, or stops when asked to.

Checkpoints saved before manifests existed (a `trainer_state.json` but no `manifest.json`) are accepted
with a warning that their files cannot be verified; their `trainer_state.json` is still validated.
Files that are not in the manifest (added after the save, e.g. `scripts/model_merger.py`'s default
`actor/huggingface/` output) are ignored: nothing the save wrote can be missing or changed unnoticed.
Weight files among them mark a merged model, and a folder holding one is never deleted: not by
`trainer.save_limit`'s rotation (it is kept beyond the limit, with a warning naming it) and not by a
new save of the same step (it is renamed aside instead).

Every file and folder of a checkpoint gets the permissions of the umask (verl/utils/file_modes.py).
`acquire_run_lock` keeps a second run out of a run's folder for the first run's lifetime.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from verl.utils.file_modes import honour_umask

STEP_DIR = re.compile(r"^global_step_(\d+)$")
TRACKER_FILE = "latest_global_step.txt"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
CHECKSUMS = ("sha256", "size")
"""What a manifest records per file besides its size: sha256, or nothing more (size)."""
ON_DAMAGED = ("fallback", "error")
"""What resuming does when the newest checkpoint is damaged."""
MERGE_WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Weight files that, added to a checkpoint after its save, make it one holding a merged model."""
MERGE_FOLDERS = ("huggingface", "adapter")
"""scripts/model_merger.py's default output folders (full model, LoRA adapter) inside `actor/`."""
_READ_CHUNK = 8 << 20
_SHOWN_PROBLEMS = 5
logger = logging.getLogger(__name__)
_merges_reported: set[str] = set()


class CheckpointDamagedError(RuntimeError):
    """A checkpoint failed verification; the message names the checkpoint, the file and the problem."""


@dataclass
class Verification:
    """The result of checking one checkpoint folder."""

    path: str
    problems: list[str] = field(default_factory=list)
    """One "file: what is wrong" per problem; empty when the checkpoint is intact."""
    verified: bool = True
    """False for a checkpoint without manifest.json (saved before manifests existed): only its
    trainer_state.json could be checked."""
    extra: list[str] = field(default_factory=list)
    """Files not in the manifest, added after the save; ignored."""
    state: dict[str, Any] | None = None
    """The trainer state, when trainer_state.json is valid."""

    @property
    def intact(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """One line naming the checkpoint and its (first few) damaged files."""
        shown = "; ".join(self.problems[:_SHOWN_PROBLEMS])
        more = len(self.problems) - _SHOWN_PROBLEMS
        return f"checkpoint {self.path} is damaged: {shown}" + (f" (and {more} more problems)" if more > 0 else "")


# ---------------------------------------------------------------- manifest
def _files_under(folder: str) -> list[str]:
    """Every file under `folder` (recursively, hidden ones too) as a sorted relative POSIX path,
    except the manifest itself."""
    found = []
    for directory, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(directory, name), folder)
            found.append(PurePosixPath(*relative.split(os.sep)).as_posix())
    return sorted(name for name in found if name != MANIFEST_FILE)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(folder: str, names: list[str]) -> list[str]:
    """Hashes of several files at once: hashlib releases the GIL, and a checkpoint of a large model
    is many gigabytes over several files (weights and optimizer shards)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda name: _sha256(os.path.join(folder, name)), names))


def build_manifest(folder: str, checksum: str = "sha256", step: int | None = None) -> dict[str, Any]:
    """The manifest of `folder` as it is now: every file's size, and its SHA-256 with checksum=sha256."""
    if checksum not in CHECKSUMS:
        raise ValueError(f"checkpoint checksum must be one of {', '.join(CHECKSUMS)}, got {checksum!r}")
    names = _files_under(folder)
    files: dict[str, dict[str, Any]] = {name: {"size": os.path.getsize(os.path.join(folder, name))} for name in names}
    if checksum == "sha256":
        for name, digest in zip(names, _sha256_all(folder, names)):
            files[name]["sha256"] = digest
    return {"version": MANIFEST_VERSION, "global_step": step, "checksum": checksum, "files": files}


def write_manifest(folder: str, checksum: str = "sha256", step: int | None = None) -> dict[str, Any]:
    """Write `manifest.json` describing everything else under `folder`; write it after all other files."""
    manifest = build_manifest(folder, checksum, step)
    with open(os.path.join(folder, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _read_manifest(folder: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, the problem with manifest.json)."""
    try:
        with open(os.path.join(folder, MANIFEST_FILE), "rb") as f:
            raw = f.read()
    except OSError as error:
        return None, f"{MANIFEST_FILE}: unreadable ({error.strerror or error})"
    if not raw.strip():
        return None, f"{MANIFEST_FILE}: empty"
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        return None, f"{MANIFEST_FILE}: not valid JSON ({error})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST_FILE}: not a manifest (no `files` object)"
    if manifest.get("checksum") not in CHECKSUMS:
        return None, f"{MANIFEST_FILE}: unknown checksum {manifest.get('checksum')!r}"
    for name, entry in manifest["files"].items():
        parts = PurePosixPath(name).parts
        if not name or PurePosixPath(name).is_absolute() or ".." in parts:
            return None, f"{MANIFEST_FILE}: file path {name!r} leaves the checkpoint folder"
        if not isinstance(entry, dict) or not _is_int(entry.get("size")):
            return None, f"{MANIFEST_FILE}: entry of {name} has no integer size"
        if manifest["checksum"] == "sha256" and not isinstance(entry.get("sha256"), str):
            return None, f"{MANIFEST_FILE}: entry of {name} has no sha256"
    return manifest, None


# ---------------------------------------------------------------- trainer state
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def folder_step(path: str) -> int | None:
    """N of a `global_step_<N>` folder; None for any other name."""
    match = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def read_trainer_state(folder: str, expected_step: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) when trainer_state.json is a JSON object with an int `global_step` (equal to
    `expected_step` when given) and a `dataloader` dict; else (None, what is wrong)."""
    path = os.path.join(folder, STATE_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, f"{STATE_FILE}: missing"
    except OSError as error:
        return None, f"{STATE_FILE}: unreadable ({error.strerror or error})"
    if not raw.strip():
        return None, f"{STATE_FILE}: empty"
    try:
        state = json.loads(raw)
    except ValueError as error:
        return None, f"{STATE_FILE}: not valid JSON ({error})"
    if not isinstance(state, dict):
        return None, f"{STATE_FILE}: not a JSON object"
    step = state.get("global_step")
    if not _is_int(step):
        return None, f"{STATE_FILE}: `global_step` must be an integer, got {step!r}"
    if expected_step is not None and step != expected_step:
        return None, f"{STATE_FILE}: `global_step` is {step} but the checkpoint is step {expected_step}"
    if not isinstance(state.get("dataloader"), dict):
        return None, f"{STATE_FILE}: `dataloader` must be an object, got {state.get('dataloader')!r}"
    return state, None


# ---------------------------------------------------------------- verification
def verify_checkpoint(path: str, checksums: bool = True) -> Verification:
    """Check a checkpoint folder against its manifest and validate its trainer state.

    checksums=False checks presence and sizes only (no file is read but the two JSON files): cheap
    enough to run on every checkpoint at every save, and it catches truncated and missing files.
    """
    result = Verification(path)
    if not os.path.isdir(path):
        result.problems.append("the folder does not exist")
        return result
    step = folder_step(path)
    if not os.path.exists(os.path.join(path, MANIFEST_FILE)):
        state, problem = read_trainer_state(path, step)
        if problem is None:
            result.verified, result.state = False, state
        elif not os.path.exists(os.path.join(path, STATE_FILE)):
            result.problems.append(f"{MANIFEST_FILE} and {STATE_FILE}: missing (an incomplete checkpoint)")
        else:
            result.problems.append(problem)
        return result

    manifest, problem = _read_manifest(path)
    if problem is not None:
        result.problems.append(problem)
        return result
    listed: dict[str, dict[str, Any]] = manifest["files"]
    if step is None and _is_int(manifest.get("global_step")):
        step = manifest["global_step"]  # a checkpoint copied to a folder of another name
    if STATE_FILE not in listed:
        result.problems.append(f"{MANIFEST_FILE}: does not list {STATE_FILE}")

    # Sizes first: they find truncated and missing files without reading a byte.
    same_size = []
    for name, entry in sorted(listed.items()):
        file_path = os.path.join(path, *PurePosixPath(name).parts)
        if not os.path.isfile(file_path):
            result.problems.append(f"{name}: missing")
            continue
        size = os.path.getsize(file_path)
        if size != entry["size"]:
            cut = " (truncated)" if size < entry["size"] else ""
            result.problems.append(f"{name}: {size} bytes, the manifest says {entry['size']}{cut}")
        else:
            same_size.append(name)
    state, problem = read_trainer_state(path, step)
    if problem is not None:
        result.problems.append(problem)
    result.state = state
    if checksums and manifest["checksum"] == "sha256" and same_size:
        for name, digest in zip(same_size, _sha256_all(path, same_size)):
            if digest != listed[name]["sha256"]:
                result.problems.append(f"{name}: contents differ from the manifest (sha256 mismatch: corrupted)")
    result.extra = [name for name in _files_under(path) if name not in listed]
    if not result.intact:
        result.state = None
    return result


# ---------------------------------------------------------------- finding and writing checkpoints
def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Every `global_step_<N>` folder under `root` as (step, path), oldest first, intact or not
    (`verify_checkpoint` tells them apart)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The newest checkpoint under `root` that passes full verification."""
    for _, path in reversed(list_checkpoints(root)):
        if verify_checkpoint(path).intact:
            return path
    return None


def save_atomically(root: str, step: int, write: Callable[[str], None], checksum: str = "sha256") -> str:
    """Call `write(tmp_dir)`, add the manifest, then rename the folder to `global_step_<step>`: a
    checkpoint is complete or absent, and what it holds can be verified later.

    `write` must create `trainer_state.json` (checked here, so every checkpoint written can be
    resumed); a crash mid-write leaves only a temporary folder, which the next save removes.
    """
    if checksum not in CHECKSUMS:
        raise ValueError(f"checkpoint checksum must be one of {', '.join(CHECKSUMS)}, got {checksum!r}")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    tmp = os.path.join(root, f".tmp_global_step_{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    _, problem = read_trainer_state(tmp, step)
    if problem is not None:
        raise RuntimeError(f"saving checkpoint step {step}: {problem} (the save must write a valid {STATE_FILE})")
    write_manifest(tmp, checksum, step)
    # The writers' safetensors files come out 0600 whatever the umask (see verl/utils/file_modes.py).
    honour_umask(tmp)
    if os.path.exists(final):
        _remove_or_set_aside(final, "replaced by a new save of the same step")
    os.replace(tmp, final)
    tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(step))
    os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    return final


def merged_model_folders(path: str) -> list[str]:
    """The sub-folders (relative POSIX paths) of checkpoint `path` holding model weights its save did
    not write: a merge, e.g. scripts/model_merger.py's default `actor/huggingface/`; [] when none.

    With a readable manifest, any weight file not listed in it counts, wherever the merge was
    written in the folder. Without one (a checkpoint from before manifests, an EasyR1 one, a damaged
    manifest), weight files under a `huggingface/` or `adapter/` folder, the merger's default
    outputs, count: such a checkpoint's own weights never live there.
    """
    manifest, _ = _read_manifest(path) if os.path.isfile(os.path.join(path, MANIFEST_FILE)) else (None, None)
    names = _files_under(path) if os.path.isdir(path) else []
    if manifest is not None:
        added = [name for name in names if name not in manifest["files"]]
    else:
        added = [name for name in names if set(PurePosixPath(name).parts[:-1]) & set(MERGE_FOLDERS)]
    weights = [name for name in added if name.endswith(MERGE_WEIGHT_SUFFIXES)]
    return sorted({PurePosixPath(name).parent.as_posix() for name in weights})


def _warn_kept_merge(path: str, merges: list[str]) -> None:
    """Once per checkpoint and process: every later save would say it again."""
    if path in _merges_reported:
        return
    _merges_reported.add(path)
    logger.warning(
        "trainer.save_limit: keeping %s, which holds a merged model (%s); move the merge out and delete the "
        "checkpoint yourself to free its space",
        path,
        ", ".join(merges),
    )


def _remove_or_set_aside(path: str, why: str) -> str | None:
    """Delete checkpoint folder `path`, unless it holds a merged model: then rename it to
    `<path>.kept_<time>` (out of the `global_step_<N>` names, so no rotation or resume sees it
    again) with a warning, and return the new path."""
    merges = merged_model_folders(path)
    if not merges:
        shutil.rmtree(path)
        return None
    aside = f"{path}.kept_{time.strftime('%Y%m%d_%H%M%S')}"
    os.replace(path, aside)
    logger.warning(
        "%s (%s) holds a merged model (%s): moved to %s instead of deleting it", path, why, ", ".join(merges), aside
    )
    return aside


def remove_old_checkpoints(root: str, keep: int) -> list[str]:
    """Keep the newest `keep` intact checkpoints and delete the rest (keep <= 0 keeps everything);
    returns what was removed.

    Checkpoints are checked by size only here (every save runs this). A damaged checkpoint never
    counts as one of the `keep`: it cannot be resumed from, and keeping it in place of an intact one
    could leave nothing to resume. It is deleted too, but only while an intact checkpoint remains.
    A checkpoint holding a merged model (`merged_model_folders`) is never deleted: the user made it
    to keep it, and scripts/model_merger.py writes into the checkpoint by default. It is kept beyond
    the `keep` newest, with a warning naming it.
    """
    if keep <= 0:
        return []
    intact, damaged = [], []
    for _, path in list_checkpoints(root):
        check = verify_checkpoint(path, checksums=False)
        (intact if check.intact else damaged).append(check)
    if not intact:
        return []
    removed = []
    for check in damaged + intact[:-keep]:
        merges = merged_model_folders(check.path)
        if merges:
            _warn_kept_merge(check.path, merges)
            continue
        if not check.intact:
            logger.warning("removing %s", check.describe())
        shutil.rmtree(check.path)
        removed.append(check.path)
    return removed


def write_trainer_state(folder: str, state: dict) -> None:
    """The step and data position of a checkpoint; the manifest, written after it, covers it."""
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def save_and_prune(root: str, step: int, keep: int, write: Callable[[str], None], checksum: str = "sha256") -> str:
    """`save_atomically`, then keep only the newest `keep` intact checkpoints (keep <= 0 keeps all)."""
    start = time.monotonic()
    path = save_atomically(root, step, write, checksum)
    logger.info("saved %s in %.1f s", path, time.monotonic() - start)
    for removed in remove_old_checkpoints(root, keep):
        logger.info("removed old checkpoint %s", removed)
    return path


def _accept(check: Verification) -> tuple[str, dict]:
    if not check.verified:
        logger.warning(
            "checkpoint %s has no %s (saved before checkpoints had manifests): its files cannot be verified",
            check.path,
            MANIFEST_FILE,
        )
    if check.extra:
        shown = ", ".join(check.extra[:_SHOWN_PROBLEMS]) + (", ..." if len(check.extra) > _SHOWN_PROBLEMS else "")
        logger.info("checkpoint %s: %d files not in its manifest are ignored: %s", check.path, len(check.extra), shown)
    assert check.state is not None
    return check.path, check.state


def find_resume_checkpoint(
    root: str, load_path: str | None, find_last: bool, on_damaged: str = "fallback"
) -> tuple[str, dict] | None:
    """The checkpoint to resume from and its trainer state, verified; None to start from scratch.

    An explicit `load_path` must be intact (else CheckpointDamagedError naming the file). Otherwise
    the newest checkpoint under `root` is verified: if damaged, on_damaged=fallback warns (naming
    the checkpoint, file and problem) and tries the next newest, starting from scratch with a warning
    when none is intact; on_damaged=error raises CheckpointDamagedError.
    """
    if on_damaged not in ON_DAMAGED:
        raise ValueError(f"on_damaged must be one of {', '.join(ON_DAMAGED)}, got {on_damaged!r}")
    if load_path is not None:
        check = verify_checkpoint(load_path)
        if not check.intact:
            raise CheckpointDamagedError(f"trainer.load_checkpoint_path: {check.describe()}")
        return _accept(check)
    if not find_last:
        return None
    damaged = []
    for _, path in reversed(list_checkpoints(root)):
        check = verify_checkpoint(path)
        if check.intact:
            if damaged:
                logger.warning("resuming from %s, the newest intact checkpoint", path)
            return _accept(check)
        if on_damaged == "error":
            raise CheckpointDamagedError(
                f"{check.describe()}. Set trainer.resume_on_damaged=fallback to resume from an older checkpoint, "
                f"or move the damaged one away."
            )
        logger.warning("%s; trying an older checkpoint", check.describe())
        damaged.append(path)
    if damaged:
        logger.warning("no intact checkpoint under %s (%d damaged): starting from scratch", root, len(damaged))
    return None


# ---------------------------------------------------------------- one run per folder
LOCK_FILE = "run.lock"
"""In `trainer.save_checkpoint_path` while a run uses it: JSON naming the holder."""


class RunFolderBusyError(RuntimeError):
    """Another live run holds the folder; the message names it (pid, host, start, command) and the folder."""


@dataclass
class RunLock:
    """An exclusive `flock` on `<folder>/run.lock`, held by the open file `fd`. The kernel drops it
    when the process ends, however it ends (kill -9 included), so a lock left behind never blocks a
    later run; the JSON in the file only names the holder for messages."""

    folder: str
    path: str
    fd: int | None

    def release(self) -> None:
        """Remove the lock file (while still holding the lock, so no other run can be using it) and
        drop the lock."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # a folder removed or made read-only meanwhile: dropping the lock below is what matters
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder; {} when empty or unreadable (written by no run yet,
    or cut short by a crash while writing it)."""
    try:
        raw = os.pread(fd, 1 << 16, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not _is_int(pid) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name into the lock file"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}, "
        f"command: {holder.get('command', '?')}"
    )


def _lock_unsupported(error: OSError) -> bool:
    return error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def acquire_run_lock(folder: str, command: str | None = None) -> RunLock:
    """Lock `folder` (a run's `trainer.save_checkpoint_path`, created if missing) for this process,
    so that a second run into it stops at once instead of mixing its metrics and checkpoints with
    ours; release it with `release()` or a `with` block.

    Raises RunFolderBusyError naming the other run and the folder when a live process holds it. A
    lock file left by a run that died without releasing it (kill -9, out of memory, power loss) is
    taken over with a warning naming that run. `command` is recorded for the messages (default: this
    process's command line). On a file system without locks (some network mounts) the run goes on
    with a warning: one run per folder cannot be enforced there.

    The file descriptor is not inherited by processes started with exec (Ray's workers and its local
    instance included): the driver that took it alone holds the lock.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command if command is not None else shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusyError(_busy_message(folder, path, other)) from None
        except OSError as error:
            os.close(fd)
            if not _lock_unsupported(error):
                raise
            logger.warning(
                "cannot lock %s (%s): the file system does not support locks; make sure no other run uses %s",
                path,
                error.strerror or error,
                folder,
            )
            return RunLock(folder, path, None)
        # The holder before us may have released (and removed the file) between our open and our
        # lock: then we hold a lock on a file no other run can see. Open the path again.
        if _same_file(fd, path):
            break
        os.close(fd)
    previous = _read_holder(fd)
    if previous:
        logger.warning(
            "taking over the lock on %s left by %s: that run ended without releasing it (killed?), "
            "no live process holds it",
            folder,
            _describe_holder(previous),
        )
    record = (json.dumps(holder, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    # The lock file is ours too: the umask decides who may read it, and the next run's user must.
    honour_umask(path)
    return RunLock(folder, path, fd)


def _busy_message(folder: str, path: str, holder: dict[str, Any]) -> str:
    who = _describe_holder(holder)
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
        # The recorded holder died, yet the lock is held: a process it forked (without exec) kept the file open.
        who = f"a process started by {who} (pid {holder.get('pid')} itself is no longer running)"
    return (
        f"another run is using {folder}: {who}. Two runs in one folder would mix their metrics and overwrite "
        f"each other's checkpoints. Wait for it to finish or stop it, or give this run another "
        f"trainer.save_checkpoint_path. (lock file: {path})"
    )
