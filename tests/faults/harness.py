"""Helpers for the vault fault matrix: the real daemon as a child process (tests/fakes/launcher.py), a scripted
misbehaving proxy in front of the lab vault, and throw-away TLS certificates.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import Agent, agent_env, run_args
from tests.fakes.rawserver import read_request

# --- the daemon ----------------------------------------------------------------

# "factory-agent: state waiting-retry (vault-transient: POST .../v1/serial: the vault answered HTTP 503...); action: retrying;
# next try at 21:23:10" (the next try: only while a retry is scheduled)
_STATE_LINE = re.compile(r"^factory-agent: state (?P<state>[a-z-]+)"
                         r"(?: \((?P<code>[a-z0-9-]+): (?P<message>.*)\); action: (?P<action>.*?)"
                         r"(?:; next try at (?P<next_try>[0-9]{2}:[0-9]{2}:[0-9]{2}))?"
                         r"|: serial (?P<serial>\S+))?$")


@dataclass(frozen=True)
class StateLine:
    at: float  # time.monotonic() when the line was read
    state: str
    code: str
    message: str
    action: str
    serial: str
    text: str
    next_try: str = ""  # "HH:MM:SS" when the line names the next try


class Daemon(Agent):
    """``python -m agent run --bus none`` as a child process (the launcher's Agent), its stderr read line by line
    as it comes."""

    def __init__(self, config: Path, state_dir: Path, *, once: bool, wrapper: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        env = agent_env(drop=("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "FACTORY_AGENT_DEBUG"))
        super().__init__(*run_args(config, state_dir, once=once), env=env, wrapper=wrapper)

    def states(self) -> list[StateLine]:
        found = []
        with self._changed:
            lines = list(self.lines)
        for at, text in lines:
            match = _STATE_LINE.match(text)
            if match:
                found.append(StateLine(at, match["state"], match["code"] or "", match["message"] or "",
                                       match["action"] or "", match["serial"] or "", text, match["next_try"] or ""))
        return found

    def wait_state(self, state: str, code: str | None = None, timeout: float = 10.0) -> StateLine:
        """The first state line for ``state`` (and ``code``), waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.states():
                    if line.state == state and (code is None or line.code == code):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._reader.is_alive() and self.proc.poll() is not None):
                    raise AssertionError(f"no 'state {state} ({code}...)' line within {timeout} s; stderr:\n{self.stderr}")
                self._changed.wait(min(remaining, 0.2))

    def wait_exit(self, timeout: float = 12.0) -> int:
        return super().wait_exit(timeout)

    def terminate(self, timeout: float = 10.0) -> int:  # type: ignore[override]
        self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def state_json(self) -> dict[str, object]:
        return json.loads((self.state_dir / "state.json").read_text())


def hosts_file_only(directory: Path) -> tuple[str, ...] | None:
    """An argv prefix that runs the command in a private mount namespace where host names come
    from ``directory``/hosts only (nsswitch ``hosts: files``; resolv.conf names 127.0.0.1
    besides), so a name lookup fails without a packet leaving, until the test appends the name
    to that file. None without root, unshare(1) or the right to mount."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nsswitch.conf").write_text("hosts: files\n")
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (directory / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    script = ('for f in nsswitch.conf resolv.conf hosts; do mount --bind "$0/$f" "/etc/$f" || exit 1; done;'
              ' exec "$@"')
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory))
    probe = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10, check=False)
    return wrapper if probe.returncode == 0 else None  # e.g. a container without CAP_SYS_ADMIN


# --- the lab vault, watched --------------------------------------------------------


@dataclass
class Call:
    at: float  # time.time() when answered
    endpoint: str
    body: bytes
    status: int


def spy(vault: FaultyVault) -> list[Call]:
    """Every request ``vault`` answers from now on, with its wall-clock time and status."""
    seen: list[Call] = []
    original = vault.respond

    def respond(method, path, api_key, body):  # type: ignore[no-untyped-def]
        reply = original(method, path, api_key, body)
        seen.append(Call(time.time(), path.partition("?")[0].rpartition("/")[2], body or b"", reply.status))
        return reply

    vault.respond = respond  # type: ignore[method-assign]
    return seen


class Env:
    """One device against one lab vault of its own: a seeded state directory, a config, the daemon.

    A scenario function receives an Env, sets the vault's faults, starts the daemon and drives
    it; ``run_batch`` runs many such scenarios at once, each Env independent of the others.
    """

    def __init__(self, tmp: Path, lab_dir: Path, *, soc_serial: str, extra: str) -> None:
        self.tmp, self.lab_dir, self.soc_serial, self.extra = tmp, lab_dir, soc_serial, extra
        self.state = tmp / "state"
        seed_key(self.state)
        self.vault = FaultyVault(lab_dir)
        self.calls = spy(self.vault)
        self.url = self.vault.start()
        self.api_key_file: Path | None = None
        self.model_assertion: Path | None = None
        self.daemon: Daemon | None = None
        self.rc: int | None = None
        self.notes: dict[str, object] = {}

    def config(self) -> Path:
        path = write_agent_config(self.tmp, self.url, self.lab_dir, template="ACME-{soc_serial}",
                                  soc_serial=self.soc_serial, api_key_file=self.api_key_file, vault_extra=self.extra)
        if self.model_assertion is not None:
            path.write_text(path.read_text().replace(str(self.lab_dir / "model.assert"), str(self.model_assertion)))
        return path

    def start(self, once: bool = True) -> Daemon:
        self.daemon = Daemon(self.config(), self.state, once=once)
        return self.daemon

    def finish(self, timeout: float = 12.0) -> int:
        assert self.daemon is not None
        self.rc = self.daemon.wait_exit(timeout)
        return self.rc

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        self.vault.stop()


def run_batch(scenarios: dict[str, Callable[[], Env]], workers: int = 6) -> tuple[ThreadPoolExecutor, dict[str, Future[Env]]]:
    """Start every scenario at once (``workers`` at a time); each future holds its finished Env."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scenario")
    return pool, {name: pool.submit(run) for name, run in scenarios.items()}


# --- a scripted proxy in front of the lab vault ----------------------------------

Handler = Callable[[socket.socket, bytes, Callable[[bytes], bytes]], None]
"""(client socket, the full request, forward(request) -> the upstream's full answer)."""


@dataclass
class Connection:
    at: float
    endpoint: str
    handler: str
    request: bytes
    ended: float | None = None


@dataclass
class FaultProxy:
    """A loopback HTTP proxy: each connection to an endpoint ("request-id", "serial") takes the next
    handler of ``script[endpoint]``; once that is empty, the request goes to ``upstream`` unchanged."""

    upstream: tuple[str, int]
    script: dict[str, list[Handler]] = field(default_factory=dict)
    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = read_request(conn)
            except OSError:
                return
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            path = line.split(" ")[1] if line.count(" ") >= 2 else ""
            endpoint = path.rpartition("/")[2]
            with self._lock:
                queue = self.script.get(endpoint)
                handler: Handler = queue.pop(0) if queue else _forward_as_is
                record = Connection(time.monotonic(), endpoint, getattr(handler, "__name__", "?"), request)
                self.connections.append(record)
            try:
                handler(conn, request, self._forward)
            except OSError:
                pass
            finally:
                record.ended = time.monotonic()

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=10) as up:
            up.sendall(request)
            chunks = []
            while chunk := up.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._sock.close()


def _forward_as_is(conn: socket.socket, request: bytes, forward: Callable[[bytes], bytes]) -> None:
    conn.sendall(forward(request))


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


# --- a port whose SYNs are dropped: the connect times out, on loopback -------------


class BlackholePort:
    """A listening socket with listen(0) whose accept queue is filled and never drained:
    further SYNs are dropped by the kernel, so a client's connect() times out."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(filler)
        time.sleep(0.05)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
        except TimeoutError:
            pass
        else:
            raise RuntimeError("the accept queue is not full: SYNs are not dropped here")
        finally:
            probe.close()

    def close(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()
