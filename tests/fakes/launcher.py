"""The one way every test layer starts the real daemon (``python -m agent ...``) as a child process.

- :func:`agent_env` builds its environment: PYTHONPATH on this tree, the bus address, the D-Bus
  library (FACTORY_AGENT_DBUS), and without the variables a harness must not pass on;
- :func:`run_args` builds ``run``'s arguments, :func:`agent_argv` the whole argv, :func:`sh_exec` a sh line;
- :func:`run` runs a command to completion (output captured; killed and reaped after a timeout);
- :class:`Agent` starts one and reads its stderr as it comes (or sends it to a file), waits for
  readiness (:meth:`Agent.wait_for`, :meth:`Agent.wait_line`) or exit (:meth:`Agent.wait_exit`),
  and :meth:`Agent.stop` stops it: SIGTERM, then SIGKILL after a deadline, always reaped;
- :func:`as_user` runs any of these as another uid (setpriv) from a fresh 0755 copy of what the
  child imports, with the interpreter's real path, so that the child never walks the clone's path:
  the checkout may live in a 0700 directory (a ``mktemp -d``, a home directory).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
# The modules the daemon imports from outside the standard library: copied for another uid when they
# come from a virtual environment (the distro's /usr/bin/python3 finds its own dist-packages itself).
RUNTIME = ("cryptography", "_cffi_backend", "cffi", "pycparser", "requests", "urllib3", "idna", "certifi",
           "charset_normalizer", "pyudev", "h11", "dbus_next", "dbus_fast", "systemd")
STOP_TIMEOUT = 10.0


def agent_env(*, bus_address: str | None = None, backend: str | None = None, pythonpath: str | None = None,
              drop: Iterable[str] = (), drop_prefixes: tuple[str, ...] = (), base: Mapping[str, str] | None = None,
              **extra: str) -> dict[str, str]:
    """``base`` (default os.environ) minus ``drop`` and names starting with ``drop_prefixes``, with PYTHONPATH
    (default: this tree), DBUS_SESSION_BUS_ADDRESS and FACTORY_AGENT_DBUS set when given, then ``extra``."""
    dropped = set(drop)
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in dropped and not (drop_prefixes and k.startswith(drop_prefixes))}
    env["PYTHONPATH"] = str(REPO) if pythonpath is None else pythonpath
    if bus_address is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = bus_address
    if backend is not None:
        env["FACTORY_AGENT_DBUS"] = backend
    env.update(extra)
    return env


def run_args(config: Path, state: Path, *extra: str, bus: str = "none", once: bool = False) -> list[str]:
    """``run --bus BUS [--once] --config CONFIG --state-dir STATE *extra``."""
    return ["run", *(["--once"] if once else []), "--bus", bus, "--config", str(config), "--state-dir", str(state),
            *extra]


def agent_argv(*args: str, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "agent", *args]


def sh_exec(*words: str) -> str:
    """A POSIX sh line exec'ing ``python -m agent`` with PYTHONPATH on this tree, then ``words`` as they are
    (sh words: quote them yourself), for a script a test hands to another program (a hook's PATH, a D-Bus
    service file)."""
    return " ".join([f"PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} -m agent", *words])


# --- another uid -------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """How to run a child as ``uid``: the setpriv prefix, an interpreter and a PYTHONPATH it can reach."""

    uid: int
    gid: int
    python: str
    pythonpath: str

    @property
    def prefix(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]

    def argv(self, *args: str) -> list[str]:
        """``python -m agent *args`` as this user."""
        return [*self.prefix, *agent_argv(*args, python=self.python)]

    def python_argv(self, *args: str) -> list[str]:
        """This user's interpreter with ``args`` (``-c SCRIPT ...``), standard library only."""
        return [*self.prefix, self.python, *args]

    def env(self, **kwargs: Any) -> dict[str, str]:
        return agent_env(pythonpath=self.pythonpath, **kwargs)


def as_user(uid: int = NOBODY, gid: int | None = None) -> User:
    """Run as ``uid``: the interpreter's real path (``/usr/bin/python3.X``, not a venv's symlink inside the
    clone) and PYTHONPATH on a fresh 0755 copy of the agent package and, in a venv, of its dependencies."""
    return User(uid, uid if gid is None else gid, os.path.realpath(sys.executable), str(_staged()))


@cache
def _staged() -> Path:
    """Once per process: a world-readable copy of what the daemon imports from outside /usr, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="factory-agent-as-user-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _copy(REPO / "agent", root / "agent")
    in_venv = sys.prefix != sys.base_prefix
    for name in RUNTIME if in_venv else ():
        source = _module_path(name)
        if source is not None and Path(sys.prefix) in source.parents:
            _copy(source, root / source.name)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.stat().st_mode & stat.S_IXUSR else 0o644)
    return root


def _module_path(name: str) -> Path | None:
    """The package directory (or single file) of module ``name``, found through its ``__file__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.origin in ("built-in", "frozen"):
        return None
    origin = Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), symlinks=False)
    else:
        shutil.copy2(source, target)


# --- running -----------------------------------------------------------------


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | str = REPO, timeout: float = 120,
        text: bool = True, **popen: Any) -> subprocess.CompletedProcess[Any]:
    """``argv`` (from :func:`agent_argv` or :meth:`User.argv`) to completion, stdout and stderr captured; on
    timeout the child is killed and reaped, and subprocess.TimeoutExpired raised."""
    return subprocess.run(list(argv), env=agent_env() if env is None else dict(env), cwd=cwd, capture_output=True,
                          text=text, timeout=timeout, check=False, **popen)


class Agent:
    """One running child: ``argv`` (default: ``python -m agent *args``), stderr read line by line as it comes
    (``lines``, with the monotonic time each was read) or written to ``stderr_file``.

    Popen's poll(), wait(), send_signal(), terminate(), kill(), pid and returncode work on it too.
    """

    def __init__(self, *args: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 wrapper: Sequence[str] = (), cwd: Path | str = REPO, stdin: Any = subprocess.DEVNULL,
                 stdout: Any = subprocess.DEVNULL, stderr_file: Path | None = None, **popen: Any) -> None:
        command = [*wrapper, *(agent_argv(*args) if argv is None else argv)]
        self.env = agent_env() if env is None else dict(env)
        self.stderr_file = stderr_file
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self.started = time.monotonic()
        err: IO[Any] | int = subprocess.PIPE
        if stderr_file is not None:
            err = open(stderr_file, "w")  # noqa: SIM115 (closed right after the start)
        try:
            self.proc = subprocess.Popen(command, cwd=cwd, env=self.env, stdin=stdin, stdout=stdout, stderr=err,
                                         text=True, **popen)
        finally:
            if stderr_file is not None:
                err.close()  # type: ignore[union-attr]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        if self.proc.stderr is not None:
            for line in self.proc.stderr:
                with self._changed:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                    self._changed.notify_all()
            self.proc.stderr.close()
        with self._changed:
            self._changed.notify_all()

    # --- Popen's -------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    # --- ours ----------------------------------------------------------------

    @property
    def stderr(self) -> str:
        """What it wrote to stderr so far (all of it, once it has exited and been reaped)."""
        if self.stderr_file is not None:
            return self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else ""
        with self._changed:
            return "".join(text + "\n" for _, text in self.lines)

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition") -> None:
        """Poll ``predicate`` until true; fail (with stderr) on timeout or if the child exits first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"the child exited ({self.proc.returncode}) before {what}; stderr:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; stderr:\n{self.stderr}")
            time.sleep(0.05)

    def wait_line(self, text: str, timeout: float = 30.0) -> str:
        """The first stderr line containing ``text``, waiting up to ``timeout`` seconds for it."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.stderr.splitlines() if text in line][:1]
            return bool(found)

        self.wait_for(seen, timeout, repr(text))
        return found[0]

    def wait_exit(self, timeout: float = 120.0) -> int:
        """The exit status; on timeout it is killed and reaped and the test fails, with its stderr."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the child did not exit within {timeout} s; stderr:\n{self.stderr}") from None
        self._reader.join(5)
        return code

    def stop(self, timeout: float = STOP_TIMEOUT, signum: int = signal.SIGTERM, check: bool = True) -> str:
        """``signum`` (SIGTERM), then SIGKILL if still running after ``timeout`` s; always reaped. Returns its
        stderr; with ``check``, a child that needed the SIGKILL fails the test."""
        self.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            if check:
                raise AssertionError(f"the child did not stop within {timeout} s of signal {signum}; stderr:\n"
                                     f"{self.stderr}") from None
        self._reader.join(5)
        return self.stderr

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(check=exc[0] is None)
