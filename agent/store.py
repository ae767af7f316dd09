"""Files in the state directory, written so that a power cut at any instant loses nothing.

Every write is: temp file in the same directory, write, flush, fsync, then
rename (or link, where an existing file must never be replaced), then fsync
of the directory. A reader therefore sees the old file or the new one, never
a partial one. Temp files are named ``.<name>.<random>.tmp``; a crash can
leave one behind, and :func:`remove_stale_temps` clears them at start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from . import keys
from .errors import DeviceKeyError, StoreError

DEVICE_KEY_FILE = "device-key.pem"
TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int = 0o600, replace: bool = True) -> None:
    """Atomically and durably make ``path`` hold ``data``.

    With ``replace=False`` an existing ``path`` is never touched:
    FileExistsError is raised and ``path`` keeps what it had.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with EEXIST instead of replacing
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> list[str]:
    """Delete temp files a crash left behind; returns their names."""
    removed = []
    for entry in directory.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry.name)
    if removed:
        fsync_dir(directory)
    return removed


def save_device_key(state_dir: Path, pem: bytes) -> keys.DeviceKey:
    """Store a new device key (0600); refuses to replace one that exists."""
    key = keys.load_key(pem)
    try:
        write_durable(state_dir / DEVICE_KEY_FILE, pem, mode=0o600, replace=False)
    except FileExistsError:
        raise DeviceKeyError(f"cannot store device key: {state_dir / DEVICE_KEY_FILE} already exists") from None
    except OSError as exc:
        raise StoreError(f"cannot store device key in {state_dir}: {exc.strerror}") from None
    return key


def load_device_key(state_dir: Path) -> keys.DeviceKey | None:
    """The stored device key, or None when there is none yet."""
    path = state_dir / DEVICE_KEY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    if os.stat(path).st_mode & 0o077:
        raise DeviceKeyError(f"cannot use device key: {path} is readable by others (mode must be 0600)")
    return keys.load_key(pem)


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state directory (0700) if needed and check that we can write there."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to state directory {state_dir}: {os.strerror(errno.EACCES)}")
