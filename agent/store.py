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
import json
import os
import tempfile
import time
from pathlib import Path

from . import keys, registration
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
    """Create the state directory (0700 whatever the umask) if needed and check that we can write there.

    Parents made on the way are 0755 at most: a parent others could write to
    would let them move the state directory away and put their own in its
    place. A directory made here is fsynced into its parent (each level
    made), so that a power cut cannot take it, and the key about to be
    written in it, away with the parent's unsynced entry.
    """
    made = [path for path in (state_dir, *state_dir.parents) if not path.exists()]
    try:
        for path in reversed(made):
            with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: theirs to sync
                path.mkdir(mode=0o700 if path == state_dir else 0o755)
                fsync_dir(path.parent)
        if made:
            os.chmod(state_dir, 0o700)  # mkdir's mode passes through the umask; 0700 exactly
    except OSError as exc:
        raise StoreError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to state directory {state_dir}: {os.strerror(_why_not_writable(state_dir))}")


def _why_not_writable(directory: Path) -> int:
    """The errno a write would meet: a read-only mount says so (access(2) only says no)."""
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError as exc:
        return exc.errno or errno.EACCES
    return errno.EACCES


STATE_FILE = "state.json"
SERIAL_FILE = "serial.assertion"
SCHEMA = 1


class Store:
    """The state directory: device-key.pem, serial.assertion and state.json (versioned).

    The effect is written before the record: the key file before the state
    that names its id, the serial file before the state that says
    registered. :meth:`load` then only has to adopt what a crash left
    unrecorded (see registration.reconcile).
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    def prepare(self) -> list[str]:
        """Create the directory if needed; clear temp files a crash left; returns their names."""
        ensure_state_dir(self.dir)
        try:
            return remove_stale_temps(self.dir)
        except OSError as exc:
            raise StoreError(f"cannot clean state directory {self.dir}: {exc.strerror}") from None

    def load_progress(self) -> tuple[registration.Progress, str | None]:
        """The recorded progress, and the name a corrupt state file was moved to (else None)."""
        path = self.dir / STATE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return registration.Progress(), None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return progress_from_json(json.loads(raw)), None
        except (ValueError, TypeError, KeyError):
            aside = self.dir / f"{STATE_FILE}.corrupt-{int(time.time())}"
            os.replace(path, aside)
            fsync_dir(self.dir)
            return registration.Progress(), aside.name

    def save_progress(self, p: registration.Progress) -> None:
        data = json.dumps(progress_to_json(p), indent=2, sort_keys=True).encode() + b"\n"
        self._write(STATE_FILE, data, 0o600)

    def has_key(self) -> bool:
        return (self.dir / DEVICE_KEY_FILE).is_file()

    def has_artifacts(self) -> bool:
        """Both the device key and the serial assertion are on disk."""
        return (self.dir / DEVICE_KEY_FILE).is_file() and (self.dir / SERIAL_FILE).is_file()

    def save_serial(self, text: bytes) -> None:
        self._write(SERIAL_FILE, text, 0o644)

    def read_serial(self) -> bytes | None:
        try:
            return (self.dir / SERIAL_FILE).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.dir / SERIAL_FILE}: {exc.strerror}") from None

    def _write(self, name: str, data: bytes, mode: int) -> None:
        try:
            write_durable(self.dir / name, data, mode)
        except OSError as exc:
            raise StoreError(f"cannot write {self.dir / name}: {exc.strerror}") from None


_FIELDS = {
    "phase": "phase", "key-id": "key_id", "serial": "serial", "serial-request": "serial_request",
    "identity": "identity", "attempts": "attempts", "failures": "failures", "clock-tries": "clock_tries",
    "nonce-retries": "nonce_retries", "blocked-by": "blocked_by", "last-error": "last_error",
    "last-error-message": "last_error_message", "mode": "mode",  # absent in older files: "standalone"
}
MODES = ("standalone", "snapd")


def progress_to_json(p: registration.Progress) -> dict[str, object]:
    data: dict[str, object] = {"schema": SCHEMA}
    data.update({key: getattr(p, attr) for key, attr in _FIELDS.items()})
    data["phase"] = p.phase.value
    return data


def progress_from_json(data: object) -> registration.Progress:
    """A Progress from state.json; ValueError/TypeError when it is not one; StoreError when it is too new."""
    if not isinstance(data, dict) or not isinstance(data.get("schema"), int):
        raise ValueError("not a versioned state object")
    if data["schema"] > SCHEMA:
        raise StoreError(f"state.json has schema {data['schema']}, newer than this agent's {SCHEMA}: refusing to touch it")
    defaults = registration.Progress()
    values: dict[str, object] = {}
    for key, attr in _FIELDS.items():
        value = data.get(key, getattr(defaults, attr))
        if type(value) is not type(getattr(defaults, attr)) and attr != "phase":
            raise TypeError(f"state.json {key!r} has the wrong type")
        values[attr] = value
    values["phase"] = registration.Phase(str(values["phase"]))
    if values["mode"] not in MODES:
        raise ValueError(f"state.json 'mode' must be one of {', '.join(MODES)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["identity"].items()):  # type: ignore[attr-defined]
        raise TypeError("state.json 'identity' must map strings to strings")
    return registration.Progress(**values)  # type: ignore[arg-type]
