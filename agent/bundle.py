"""`factory-agent support-bundle`: one tar.gz a technician can mail to support, never a secret in it.

Each member sits under one top directory beside a MANIFEST (JSON: what each member is, the command that
made it, its exit status). Children (status, check, identity, journalctl, systemctl) run with a timeout; a
child that fails, hangs or is absent is recorded, never fatal. The configuration is copied with secrets
redacted; the api-key file and the device key are described (path, mode, owner, size; the key by its id),
never read into the bundle. The state directory is listed without following symlinks. A last pass
replaces any api-key the configuration yields, wherever it shows up.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, store
from .errors import AgentError, ConfigError

if TYPE_CHECKING:
    from .config import Config

CHILD_TIMEOUT = 30.0  # seconds for each status/check/identity child
JOURNAL_TIMEOUT = 15.0  # seconds for journalctl and systemctl
MAX_CONFIG_BYTES = 1 << 20
REDACTED = "<redacted>"
LIBRARIES = ("pyudev", "dbus-next", "dbus-fast", "requests", "cryptography", "systemd-python")
PUBLIC_FILES = (store.SERIAL_FILE, store.STATE_FILE)
_SECRET_NAME = re.compile(r"(api[-_]?key|token|password|passwd|secret|passphrase|private|credential)", re.I)
_ASSIGNMENT = re.compile(r"^(\s*)([A-Za-z0-9_.\"'-]+)(\s*=\s*)(.*)$")
_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)


@dataclass
class Member:
    name: str
    what: str
    data: bytes
    command: str = ""
    status: int | str | None = None


@dataclass
class Bundle:
    members: list[Member] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)

    def add(self, name: str, what: str, data: bytes | str, command: str = "", status: int | str | None = None) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.members.append(Member(name, what, raw, command, status))


def default_name(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"
    return f"factory-agent-support-{host}-{stamp}.tar.gz"


# --- children ---------------------------------------------------------------


def run_child(argv: list[str], timeout: float) -> tuple[int | str, bytes, bytes]:
    """(exit status, stdout, stderr); the status is "absent" or "timeout after N s" when there was none."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return "absent", b"", b""
    except subprocess.TimeoutExpired as exc:
        return f"timeout after {timeout:g} s", exc.stdout or b"", exc.stderr or b""
    except OSError as exc:
        return f"cannot run: {exc.strerror}", b"", b""
    return done.returncode, done.stdout, done.stderr


def _add_child(bundle: Bundle, name: str, what: str, argv: list[str], timeout: float) -> int | str:
    status, out, err = run_child(argv, timeout)
    command = " ".join(argv)
    bundle.add(name, what, out, command, status)
    bundle.add(f"{name}.stderr", f"stderr of {name}", err, command, status)
    return status


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def add_agent_outputs(bundle: Bundle, bus: str, config_files: list[str], state_dir: Path) -> None:
    configs = [a for f in config_files for a in ("--config", f)]
    common = ["--bus", bus, *configs, "--state-dir", str(state_dir)]
    status = _add_child(bundle, "status.json", "factory-agent status --json --long (with history)",
                        _agent("status", "--json", "--long", *common), CHILD_TIMEOUT)
    refused = next(m for m in bundle.members if m.name == "status.json.stderr").data
    if status == 2 and b"unrecognized arguments: --long" in refused:  # 2 is also "in progress": argparse's only
        bundle.members = [m for m in bundle.members if not m.name.startswith("status.json")]
        _add_child(bundle, "status.json", "factory-agent status --json (no --long in this version)",
                   _agent("status", "--json", *common), CHILD_TIMEOUT)
    _add_child(bundle, "check.json", "factory-agent check --json (preflight)", _agent("check", "--json", *configs),
               CHILD_TIMEOUT)
    _add_child(bundle, "identity.json", "factory-agent identity --json", _agent("identity", "--json", *configs),
               CHILD_TIMEOUT)


def add_system(bundle: Bundle) -> None:
    for name, what, argv in (
            ("journal.txt", "the unit's journal since boot",
             ["journalctl", "-u", "factory-agent", "-b", "--no-pager", "-o", "short-iso"]),
            ("systemctl-status.txt", "systemctl status factory-agent",
             ["systemctl", "status", "--no-pager", "factory-agent"])):
        if shutil.which(argv[0]) is None:
            bundle.add(name, what, f"{argv[0]}: absent\n", " ".join(argv), "absent")
        else:
            _add_child(bundle, name, what, argv, JOURNAL_TIMEOUT)


# --- versions ---------------------------------------------------------------


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"agent": __version__, "python": sys.version, "executable": sys.executable}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    found["kernel"] = " ".join(platform.uname())
    try:
        found["os-release"] = Path("/etc/os-release").read_text(errors="replace")
    except OSError as exc:
        found["os-release"] = f"cannot read /etc/os-release: {exc.strerror}"
    return found


# --- configuration ----------------------------------------------------------


def redact_toml(text: str) -> str:
    """Every value whose key looks like a secret (api-key, token, password...) becomes <redacted>; file
    paths (keys ending in -file) stay; private-key PEM blocks go whole."""
    text = _PEM.sub(b"<redacted private key>", text.encode()).decode()
    lines = []
    for line in text.splitlines():
        m = _ASSIGNMENT.match(line)
        if m and _SECRET_NAME.search(m[2]) and not m[2].strip("\"'").endswith(("-file", "_file", "-files")):
            line = f"{m[1]}{m[2]}{m[3]}\"{REDACTED}\""
        lines.append(line)
    return "\n".join(lines) + "\n"


def describe_file(path: Path) -> dict[str, Any]:
    """Path, type, mode, owner and size: lstat only, the content never read."""
    try:
        st = path.lstat()
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror}
    return {"path": str(path), "type": _kind(st.st_mode), "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "owner": f"{st.st_uid}:{st.st_gid}", "size": st.st_size, "mtime": int(st.st_mtime)}


def config_files(explicit: list[str]) -> list[Path]:
    from . import config

    if explicit:
        files = [Path(f) for f in explicit]
        for f in files:
            if not f.is_file():
                raise ConfigError(f"cannot read config file {f}: not a readable file")
        return files
    return [f for f in config.default_files() if f.exists()]


def _without_api_key(files: list[Path]) -> Config | None:
    """The configuration without opening the api-key file, or None when even that does not load."""
    from . import config

    try:
        return config.load(files or None, without_api_key=True)
    except AgentError:
        return None


def add_config(bundle: Bundle, explicit: list[str]) -> None:
    from . import config

    files = config_files(explicit)
    report: dict[str, Any] = {"files": [str(f) for f in files], "search": "--config" if explicit else "default"}
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as fh:
                text = fh.read(MAX_CONFIG_BYTES).decode(errors="replace")
            bundle.add(f"config/{i:02d}-{path.name}", f"configuration file {path}, secrets redacted",
                       redact_toml(text), f"read {path}", 0)
        except OSError as exc:
            report.setdefault("unreadable", {})[str(path)] = exc.strerror
    cfg: Config | None
    try:
        cfg = config.load(files or None)
    except AgentError as exc:
        report["load"] = f"error: {exc}"
        cfg = _without_api_key(files)  # the api-key file may be what does not load: still say where it is
    else:
        report["load"] = "ok"
        bundle.secrets.append(cfg.vault.api_key)
    if cfg is not None and cfg.vault.api_key_file:
        report["api-key-file"] = describe_file(Path(cfg.vault.api_key_file))
    bundle.add("config/summary.json", "which files agent.config loads, whether they load, the api-key file's "
               "metadata (never its content)", json.dumps(report, indent=2, sort_keys=True) + "\n", "", 0)


# --- state directory ---------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "other"


def _sha256_nofollow(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 16):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def list_state(state_dir: Path) -> dict[str, Any]:
    listing: dict[str, Any] = {"directory": describe_file(state_dir), "entries": []}
    try:
        names = sorted(os.listdir(state_dir))
    except OSError as exc:
        listing["error"] = f"cannot list {state_dir}: {exc.strerror}"
        return listing
    for name in names:
        entry = describe_file(state_dir / name)
        entry["name"] = name
        if entry.get("type") == "file" and name in PUBLIC_FILES:
            try:
                entry["sha256"] = _sha256_nofollow(state_dir / name)
            except OSError as exc:
                entry["sha256"] = f"cannot read: {exc.strerror}"
        elif entry.get("type") == "file" and name == store.DEVICE_KEY_FILE:
            entry["key-id"] = _key_id(state_dir)
        listing["entries"].append(entry)
    return listing


def _key_id(state_dir: Path) -> str:
    try:
        key = store.load_device_key(state_dir)
    except (AgentError, OSError, ValueError) as exc:
        return f"cannot load: {exc}"
    return key.key_id if key is not None else "absent"


# --- the archive -------------------------------------------------------------


def manifest(bundle: Bundle) -> bytes:
    rows = [{"name": m.name, "what": m.what, "command": m.command, "exit-status": m.status, "size": len(m.data)}
            for m in bundle.members]
    doc = {"tool": f"factory-agent {__version__}", "created": int(time.time()),
           "child-timeout-seconds": CHILD_TIMEOUT, "journal-timeout-seconds": JOURNAL_TIMEOUT, "members": rows}
    return (json.dumps(doc, indent=2) + "\n").encode()


def scrub(data: bytes, secrets: list[str]) -> bytes:
    for secret in secrets:
        if secret:
            data = data.replace(secret.encode(), REDACTED.encode())
    return _PEM.sub(b"<redacted private key>", data)


def archive(bundle: Bundle, top: str) -> bytes:
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in [*bundle.members, Member("MANIFEST", "this list", manifest(bundle))]:
            data = scrub(m.data, bundle.secrets)
            info = tarfile.TarInfo(f"{top}/{m.name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(now)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def build(bus: str, explicit_config: list[str], state_dir: Path) -> Bundle:
    bundle = Bundle()
    add_config(bundle, explicit_config)  # first: its api-key is scrubbed from everything after
    add_agent_outputs(bundle, bus, explicit_config, state_dir)
    bundle.add("versions.json", "agent, Python, libraries, kernel, os-release",
               json.dumps(versions(), indent=2) + "\n", "", 0)
    bundle.add("state-dir.json", f"listing of {state_dir} (symlinks not followed; SHA-256 of public files only)",
               json.dumps(list_state(state_dir), indent=2) + "\n", f"lstat {state_dir}/*", 0)
    add_system(bundle)
    return bundle


def run(output: str | None, bus: str, explicit_config: list[str], state_dir: Path) -> int:
    name = default_name()
    data = archive(build(bus, explicit_config, state_dir), name.removesuffix(".tar.gz"))
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    path = Path(output) if output else Path(name)
    try:
        write_atomic(path, data)
    except OSError as exc:
        print(f"factory-agent: cannot write the support bundle {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{path} {len(data)} bytes")
    return 0
