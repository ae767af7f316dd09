"""A pytest plugin: the session fails when a process it started is still running after it.

Loaded by the Makefile for every pytest leg (``python -m pytest -p tests.leftover_check``). At the
start it notes every running process and puts a marker unique to this session in the environment,
which every child inherits unless its test hands it an environment of its own. At the end, once the
fixtures have stopped what they started, a process that was not there at the start is the suite's
when it descends from this pytest, carries the marker, or names this session's temporary directory
(pytest's basetemp) in its command line, working directory or environment: a daemon that detaches,
as gpg-agent does, loses its parent but keeps the other two. The processes of other sessions (another
run on the same machine) carry none of these. Each leftover is listed, then killed, and the session
exits 1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKER = "FACTORY_AGENT_TEST_SESSION"
GRACE = 5.0  # seconds for the processes that are exiting as the session ends (a SIGTERM being handled)
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    ppid: int
    started: int  # clock ticks after boot: a pid reused by a new process is another Process
    state: str
    args: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.args)


def read_process(pid: int) -> Process | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in (...) may hold spaces
    name = stat[stat.index("(") : stat.rindex(")") + 1]  # what ps shows for a kernel thread
    args = tuple(raw.rstrip(b"\0").decode(errors="replace").split("\0")) if raw else (name,)
    return Process(pid, int(fields[1]), int(fields[19]), fields[0], args)


def running() -> dict[int, Process]:
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (process := read_process(int(entry.name))) is not None:
            found[process.pid] = process
    return found


def _descends_from(process: Process, ancestor: int, table: dict[int, Process]) -> bool:
    seen: set[int] = set()
    while process.ppid not in seen and process.ppid > 1:
        if process.ppid == ancestor:
            return True
        seen.add(process.ppid)
        parent = table.get(process.ppid)
        if parent is None:
            return False
        process = parent
    return False


def _names(process: Process, marker: str, paths: list[str]) -> bool:
    """Whether ``process`` carries ``marker`` or names one of ``paths`` (each ending in '/')."""
    here = PROC / str(process.pid)
    try:
        environ = (here / "environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        environ = []
    try:
        cwd = os.readlink(here / "cwd") + "/"
    except OSError:
        cwd = ""
    if f"{MARKER}={marker}" in environ:
        return True
    texts = [cwd, *(arg + "/" for arg in process.args), *(value + "/" for value in environ)]
    return any(path in text for path in paths for text in texts)


def leftovers(before: set[tuple[int, int]], me: int, marker: str, paths: list[str]) -> list[Process]:
    """The live processes, not in ``before`` (pid, start time), that belong to the session."""
    table = running()
    return [
        process for process in table.values()
        if process.pid != me and (process.pid, process.started) not in before and process.state != "Z"
        and (_descends_from(process, me, table) or _names(process, marker, paths))
    ]


def _kill(process: Process) -> None:
    again = read_process(process.pid)
    if again is not None and again.started == process.started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller checks for the whole run
        return
    config.stash[_before] = {(process.pid, process.started) for process in running().values()}
    marker = f"{os.getpid()}-{secrets.token_hex(8)}"
    config.stash[_marker] = marker
    os.environ[MARKER] = marker


_before = pytest.StashKey[set[tuple[int, int]]]()
_marker = pytest.StashKey[str]()
_found = pytest.StashKey[list[Process]]()


def _basetemp(config: pytest.Config) -> list[str]:
    factory = getattr(config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None)  # None when no test asked for a temporary directory
    return [] if base is None else [str(Path(base).resolve()) + "/"]


@pytest.hookimpl(trylast=True)  # after pytest-xdist has stopped its workers
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if _marker not in config.stash:
        return
    args = (config.stash[_before], os.getpid(), config.stash[_marker], _basetemp(config))
    deadline = time.monotonic() + GRACE
    found = leftovers(*args)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = leftovers(*args)
    if found:
        config.stash[_found] = found
        for process in found:
            _kill(process)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    found = config.stash.get(_found, [])
    if found:
        terminalreporter.section("processes left running by the suite (now killed)", red=True, bold=True)
        for process in found:
            terminalreporter.line(f"pid {process.pid} (parent {process.ppid}): {process.cmdline}")
