"""Files and folders we write get the permissions the user's umask asks for.

safetensors >= 0.8 writes through a temporary file (Rust's `tempfile::NamedTempFile`, always mode
0600) that it renames into place, so every `model.safetensors` it writes (through transformers'
`save_pretrained`, peft's adapter save or `safetensors.torch.save_file`) is readable by its owner
only, whatever the umask (safetensors/safetensors#782). Everything else we write goes through
`open()`/`os.makedirs` and honours the umask. Another user of a shared machine could then read a
checkpoint's config but not its weights. `honour_umask` gives what such writers left behind the
mode a plain `open()` or `os.makedirs` would have given (files 0666 & ~umask, folders 0777 & ~umask);
the writers of tiny worlds, checkpoints and merges call it on what they wrote.
"""

from __future__ import annotations

import contextlib
import os
import stat

_FILE_MODE = 0o666
_FOLDER_MODE = 0o777


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel shows it (Linux >= 4.7):
    setting it to read it back would race with threads creating files meanwhile."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere: the usual set-and-restore, through a restrictive mask so a file created by another
    # thread in between is private rather than world-writable.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


Entries = dict[str, tuple[int, int]]
"""Relative path -> (inode, mtime in ns) of everything under a folder: what `entries` saw."""


def entries(path: str) -> Entries:
    """Everything under folder `path` now, to tell later which entries a writer created or replaced;
    {} when it does not exist."""
    found: Entries = {}
    for directory, folders, files in os.walk(path):
        for name in folders + files:
            full = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(full)
                found[os.path.relpath(full, path)] = (info.st_ino, info.st_mtime_ns)
    return found


def honour_umask(path: str, before: Entries | None = None) -> None:
    """Give `path` and, for a folder, everything under it the permission bits a fresh file or
    folder gets under the current umask (files keep their execute bits where they have them).

    With `before` (`entries(path)` taken before writing into a folder that already held files),
    only what was created or replaced since is changed: the modes of a user's own files in that
    folder are theirs. Entries that are not ours (chmod refused) and symbolic links are left alone.
    """
    mask = current_umask()
    if before is None:
        _set_mode(path, mask)
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for name, state in entries(path).items():
        if before is None or before.get(name) != state:
            _set_mode(os.path.join(path, name), mask)


def _set_mode(path: str, mask: int) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        wanted = _FOLDER_MODE & ~mask
    else:
        # An executable stays executable (for whom the umask allows); data files get 0666 & ~umask.
        executable = 0o111 if info.st_mode & stat.S_IXUSR else 0
        wanted = (_FILE_MODE | executable) & ~mask
    # setgid on a shared group's folder (and the other special bits) is the folder's own choice: kept.
    wanted |= stat.S_IMODE(info.st_mode) & 0o7000
    if stat.S_IMODE(info.st_mode) != wanted:
        with contextlib.suppress(PermissionError):  # not ours: not something we wrote
            os.chmod(path, wanted)
