"""Files in the state directory, written so that a power cut at any instant loses nothing.

Every write is: temp file in the same directory, write, flush, fsync, then
rename (or link, where an existing file must never be replaced), then fsync
of the directory. A reader therefore sees the old file or the new one, never
a partial one. Temp files are named ``.<name>.<random>.tmp``; a crash can
leave one behind, and :func:`remove_stale_temps` clears them at start.

The agent trusts only what it owns (docs/reliability.md, "Local adversary"):
the directory is a real directory of the agent's uid that nobody else may
write, every file is opened with O_NOFOLLOW and O_NONBLOCK and used only if
it is a regular file of the agent's, private where it must be, and no larger
than its cap; anything else is an UntrustedFileError naming the path and what
is wrong, and nothing is changed. One process at a time: :meth:`Store.prepare`
takes an exclusive flock on the directory, held for the process's life, before
it touches anything in it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import tempfile
import time
from enum import StrEnum
from pathlib import Path

from . import keys, registration
from .errors import StateLockedError, StoreError, UntrustedFileError

log = logging.getLogger(__name__)

DEVICE_KEY_FILE = "device-key.pem"
TEMP_SUFFIX = ".tmp"
# Caps on what is read from the state directory: each file is a few KiB at most (a 4096-bit PEM key is
# 3.2 KiB, a serial 2 KiB, state.json with a pending serial-request 10 KiB); these leave room and no more.
MAX_KEY_BYTES = 64 * 1024
MAX_SERIAL_BYTES = 1024 * 1024  # as much as the vault client takes in one answer
MAX_STATE_BYTES = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _owner_problem(st: os.stat_result, what: str) -> str | None:
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}"
    return None


def check_directory(path: Path, st: os.stat_result) -> None:
    """The state directory is the agent's: a real directory (not a symlink) of its uid that nobody else may write."""
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedFileError(f"cannot use state directory {path}: it is {_kind(st.st_mode)}, not a directory")
    problem = _owner_problem(st, "it")
    if problem is None and st.st_mode & 0o022:
        problem = f"it is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 0700 {path}"
    if problem:
        raise UntrustedFileError(f"cannot use state directory {path}: {problem}")


def read_owned(path: Path, limit: int, private: bool = False) -> bytes | None:
    """The bytes of ``path``, or None when it does not exist; UntrustedFileError unless it is a regular file
    of the agent's, not writable by others (``private``: not even readable), of at most ``limit`` bytes.

    O_NONBLOCK: opening a FIFO planted in its place returns at once (and is then refused) instead of
    waiting for a writer forever; O_NOFOLLOW: a symlink is refused, not followed to someone else's file.
    """
    fd = _open_owned(path, limit, private)
    if fd is None:
        return None
    try:
        data = _read_fd(fd, limit + 1)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew after fstat
        raise UntrustedFileError(f"cannot use {path}: it is more than the {limit} bytes such a file can hold")
    return data


def check_owned(path: Path, limit: int, private: bool = False) -> bool:
    """What read_owned() checks, without reading: False when absent, UntrustedFileError when not usable."""
    fd = _open_owned(path, limit, private)
    if fd is not None:
        os.close(fd)
    return fd is not None


def _open_owned(path: Path, limit: int, private: bool) -> int | None:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFileError(f"cannot use {path}: it is a symbolic link; the agent reads only its own "
                                     "regular files") from None
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot read {path}: {exc.strerror}") from None
    problem = None if stat.S_ISREG(st.st_mode) else f"it is {_kind(st.st_mode)}, not a regular file"
    problem = problem or _owner_problem(st, "it")
    mode = stat.S_IMODE(st.st_mode)
    if problem is None and mode & (0o077 if private else 0o022):
        problem = (f"it is {'readable' if private else 'writable'} by others (mode {mode:04o}); "
                   f"run: chmod {'0600' if private else 'go-w'} {path}")
    if problem is None and st.st_size > limit:
        problem = f"it is {st.st_size} bytes, more than the {limit} such a file can hold"
    if problem:
        os.close(fd)
        raise UntrustedFileError(f"cannot use {path}: {problem}")
    return fd


def _read_fd(fd: int, most: int) -> bytes:
    chunks, size = [], 0
    while size < most:
        chunk = os.read(fd, min(64 * 1024, most - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


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
    """Store a new device key (0600); never replaces one that exists: that one is adopted instead.

    A key can appear while ours was being made only from outside the lock (``factory-agent key
    --generate``, a person restoring a backup): the one on disk is the identity from then on, checked
    as any stored key is, and ours is dropped. Never a second generation.
    """
    key = keys.load_key(pem)
    try:
        write_durable(state_dir / DEVICE_KEY_FILE, pem, mode=0o600, replace=False)
    except FileExistsError:
        found = load_device_key(state_dir)
        if found is None:  # gone again meanwhile: the same race once more is no reason to loop
            raise StoreError(f"cannot store device key: {state_dir / DEVICE_KEY_FILE} appeared and vanished") from None
        log.warning("%s appeared while a key was being generated; adopting it (key %s)",
                    state_dir / DEVICE_KEY_FILE, found.key_id)
        return found
    except OSError as exc:
        raise StoreError(f"cannot store device key in {state_dir}: {exc.strerror}") from None
    return key


def load_device_key(state_dir: Path) -> keys.DeviceKey | None:
    """The stored device key, or None when there is none yet (UntrustedFileError unless ours and 0600)."""
    pem = read_owned(state_dir / DEVICE_KEY_FILE, MAX_KEY_BYTES, private=True)
    return None if pem is None else keys.load_key(pem)


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


DEFAULT_DIR = Path("/var/lib/factory-agent")  # the unit's StateDirectory=factory-agent
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
        self._lock: int | None = None  # the .lock file's descriptor, open (and locked) for the process's life

    def prepare(self) -> list[str]:
        """Create the directory if needed, check it is ours, take its lock, then clear the temp files a crash
        left (only the lock's holder may: another instance's may be in flight); returns their names."""
        ensure_state_dir(self.dir)
        self.lock()
        self.check_files()
        try:
            return remove_stale_temps(self.dir)
        except OSError as exc:
            raise StoreError(f"cannot clean state directory {self.dir}: {exc.strerror}") from None

    def check_files(self) -> None:
        """Every state file that exists is one the agent may use (read_owned's checks, nothing read), so that a
        planted one stops the start with its path, before the key is loaded in the background or the vault asked."""
        check_owned(self.dir / DEVICE_KEY_FILE, MAX_KEY_BYTES, private=True)
        check_owned(self.dir / SERIAL_FILE, MAX_SERIAL_BYTES)
        check_owned(self.dir / STATE_FILE, MAX_STATE_BYTES)

    def lock(self) -> None:
        """The state directory checked (check_directory), then an exclusive flock on it, kept until the process
        ends; StateLockedError if another process holds it.

        The directory, not a lock file in it: nothing is created, so a second instance changes not one byte,
        and the lock is on the very inode whose files it guards (a directory renamed away takes its lock with
        it). flock, not fcntl locks: it belongs to the open file, so no other close() in this process drops
        it; O_CLOEXEC keeps it out of the key generation child, which must not outlive it holding the lock.
        """
        if self._lock is not None:
            return
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UntrustedFileError(f"cannot use state directory {self.dir}: it is a symbolic link, "
                                         "not a directory") from None
            raise StoreError(f"cannot open state directory {self.dir}: {exc.strerror}") from None
        try:
            check_directory(self.dir, os.fstat(fd))  # the directory that was opened, not one swapped in since
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLockedError(f"another factory-agent holds {self.dir}: one agent per state directory") from None
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd

    def close(self) -> None:
        """Release the lock now, not at the process's end: for a process that runs one agent after another."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def load_progress(self) -> tuple[registration.Progress, str | None]:
        """The recorded progress, and the name a corrupt state file was moved to (else None)."""
        path = self.dir / STATE_FILE
        raw = read_owned(path, MAX_STATE_BYTES)
        if raw is None:
            return registration.Progress(), None
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
        """Something is at device-key.pem (whatever it is: loading it says whether it can be used)."""
        return os.path.lexists(self.dir / DEVICE_KEY_FILE)

    def has_artifacts(self) -> bool:
        """Something is at both device-key.pem and serial.assertion."""
        return self.has_key() and os.path.lexists(self.dir / SERIAL_FILE)

    def save_serial(self, text: bytes) -> None:
        self._write(SERIAL_FILE, text, 0o644)

    def read_serial(self) -> bytes | None:
        return read_owned(self.dir / SERIAL_FILE, MAX_SERIAL_BYTES)

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
    "last-attempt-at": "last_attempt_at", "registered-at": "registered_at",  # absent in older files: 0
    "unreachable": "unreachable",  # absent in older files: 0
}
_VOCABULARIES: dict[str, type[StrEnum]] = {"phase": registration.Phase, "mode": registration.Mode}


def progress_to_json(p: registration.Progress) -> dict[str, object]:
    data: dict[str, object] = {"schema": SCHEMA}
    data.update({key: getattr(p, attr) for key, attr in _FIELDS.items()})
    data["phase"] = p.phase.value
    data["history"] = [event_to_json(e) for e in p.history]
    return data


def event_to_json(e: registration.Event) -> dict[str, object]:
    data: dict[str, object] = {"at": e.at, "step": e.kind.value, "detail": e.detail}
    if e.count > 1:
        data.update(count=e.count, **{"last-at": e.last_at})
    return data


def _event_from_json(data: object) -> registration.Event:
    if not isinstance(data, dict) or data.get("step") not in set(registration.EventKind):
        raise ValueError("state.json 'history' holds an entry that is not a known step")
    at, detail, count, last_at = data.get("at"), data.get("detail"), data.get("count", 1), data.get("last-at", 0)
    if type(at) is not int or type(detail) is not str or type(count) is not int or type(last_at) is not int:
        raise TypeError("state.json 'history' holds an entry with a field of the wrong type")
    return registration.Event(at, registration.EventKind(data["step"]), detail, max(count, 1), last_at)


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
        vocabulary = _VOCABULARIES.get(attr)
        if vocabulary is not None:  # a str in the file, one of the enum's values in memory
            if value not in set(vocabulary):
                raise ValueError(f"state.json {key!r} must be one of {', '.join(vocabulary)}")
            value = vocabulary(value)
        elif type(value) is not type(getattr(defaults, attr)):
            raise TypeError(f"state.json {key!r} has the wrong type")
        values[attr] = value
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["identity"].items()):  # type: ignore[attr-defined]
        raise TypeError("state.json 'identity' must map strings to strings")
    history = data.get("history", [])  # absent in older files
    if not isinstance(history, list):
        raise TypeError("state.json 'history' must be a list")
    values["history"] = tuple(_event_from_json(e) for e in history[-registration.HISTORY_MAX:])
    return registration.Progress(**values)  # type: ignore[arg-type]
