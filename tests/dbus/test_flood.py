"""A local user floods io.factoryagent.Agent1 with the calls the policy allows everyone (issue 11, item 2).

The daemon runs as root on a private system-like dbus-daemon that loads
systemd/io.factoryagent.Agent1.conf; the flooder runs as nobody (uid 65534)
with 16 raw connections that pipeline GetAll, GetSerialAssertion and
Introspect and never read a reply (or read them slowly). Meanwhile the
daemon must stay up, keep publishing to a root client, finish registering
against the lab vault, and keep its memory bounded. The vault answers 503
(Retry-After: 1) until the flood has provably been sending during the
registration, so the two overlap whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.labvault import API_PREFIX
from tests.conftest import REPO
from tests.dbus.conftest import BUS_NAME, PATH, Recorder, busctl, get_property, seed_key, wait_for, write_config
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import Agent, agent_env, run_args

NOBODY = 65534
CONNECTIONS = 16
FLOOD_SECONDS = 60.0  # the flooder's own limit; the test stops it much sooner
MIB = 1024 * 1024
SERIAL_PATH = API_PREFIX + "serial"
# The flood must have got this many calls onto the bus while the daemon was registering.
SENT_BEFORE_REGISTERING = 20_000

# The attacker: plain sockets and hand-made messages, so it needs nothing but /usr/bin/python3 and
# never reads a reply it does not choose to. Progress is one JSON line every 0.2 s on stdout;
# it stops on EOF on stdin or after FLOOD_SECONDS.
FLOODER = r'''
import collections, json, os, select, selectors, socket, struct, sys, time

path, connections, mode, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
NAME, OBJ = "io.factoryagent.Agent1", "/io/factoryagent/Agent1"

def call(serial, path, interface, member, destination, signature="", body=b""):
    fields = bytearray()
    items = [(1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination)]
    for code, kind, value in items + ([(8, "g", signature)] if signature else []):
        fields += b"\0" * (-len(fields) % 8) + bytes([code, 1]) + kind.encode() + b"\0"
        data = value.encode()
        if kind == "g":
            fields += bytes([len(data)]) + data + b"\0"
        else:
            fields += b"\0" * (-len(fields) % 4) + struct.pack("<I", len(data)) + data + b"\0"
    header = struct.pack("<cBBBIII", b"l", 1, 0, 1, len(body), serial, len(fields)) + fields
    return bytearray(header + b"\0" * (-len(header) % 8) + body)

def string(text):
    data = text.encode()
    return struct.pack("<I", len(data)) + data + b"\0"

CALLS = [call(1, OBJ, "org.freedesktop.DBus.Properties", "GetAll", NAME, "s", string(NAME)),
         call(1, OBJ, NAME, "GetSerialAssertion", NAME),
         call(1, OBJ, "org.freedesktop.DBus.Introspectable", "Introspect", NAME)]

class Conn:
    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            answer += self.sock.recv(1)
        assert answer.startswith(b"OK"), answer
        hello = call(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "org.freedesktop.DBus")
        self.sock.sendall(b"BEGIN\r\n" + hello)
        self.sock.setblocking(False)
        self.serial, self.out, self.inbuf = 1, bytearray(), b""
        self.ends, self.written = collections.deque(), 0  # where each queued message ends, bytes written
        self.sent = 0

    def write(self):
        if not self.out:
            for _ in range(300):
                self.serial += 1
                message = CALLS[self.serial % 3]
                struct.pack_into("<I", message, 8, self.serial)
                self.out += message
                self.ends.append(self.written + len(self.out))
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        del self.out[:n]
        self.written += n
        while self.ends and self.ends[0] <= self.written:
            self.ends.popleft()
            self.sent += 1
            stats["sent"] += 1  # counted once all of it is on the socket

    def read(self):
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        stats["received_bytes"] += len(data)
        self.inbuf += data
        while len(self.inbuf) >= 16:
            body, fields = struct.unpack_from("<I", self.inbuf, 4)[0], struct.unpack_from("<I", self.inbuf, 12)[0]
            size = 16 + fields + (-fields % 8) + body
            if len(self.inbuf) < size:
                break
            if self.inbuf[1] == 3:
                name = error_name(self.inbuf[16:16 + fields])
                errors[name] = errors.get(name, 0) + 1
            stats["returns"] += self.inbuf[1] == 2
            self.inbuf = self.inbuf[size:]

def error_name(fields):
    at = 0
    while at < len(fields):
        at += -at % 8
        code, length = fields[at], fields[at + 1]
        kind, at = chr(fields[at + 2]), at + 2 + length + 1
        if kind in "so":
            at += -at % 4
            n = struct.unpack_from("<I", fields, at)[0]
            if code == 4:
                return fields[at + 4:at + 4 + n].decode()
            at += 4 + n + 1
        elif kind == "g":
            at += 1 + fields[at] + 1
        else:  # u
            at += -at % 4 + 4
    return "?"

errors = {}
stats = {"sent": 0, "returns": 0, "received_bytes": 0, "connections": 0}
def connect():
    c = Conn()
    selector.register(c.sock, selectors.EVENT_WRITE, c)
    stats["connections"] += 1
    return c

selector = selectors.DefaultSelector()
conns = [connect() for _ in range(connections)]
started = last = last_read = time.time()
while time.time() - started < seconds:
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
        break
    for key, _ in selector.select(0.05):
        key.data.write()
    now = time.time()
    if mode == "slow" and now - last_read >= 0.02:
        last_read = now
        for c in conns:
            c.read()  # 4 KiB per connection every 20 ms at most: a slow reader
    if mode == "churn":  # a fresh connection gets fresh pending-reply slots on the bus
        for i, c in enumerate(conns):
            if c.sent >= 512 and not c.out:
                selector.unregister(c.sock)
                c.sock.close()
                conns[i] = connect()
    if now - last >= 0.2:
        last = now
        print(json.dumps({"t": now, **stats}), flush=True)
print(json.dumps({"t": time.time(), "done": True, **stats, "errors": errors}), flush=True)
'''


def bus_config(directory: Path, policy: Path = REPO / "systemd" / "io.factoryagent.Agent1.conf") -> str:
    """Debian's system.conf (its default-deny policy and limits) listening in ``directory``, plus ``policy``."""
    root = ET.parse("/usr/share/dbus-1/system.conf").getroot()
    dropped = {"user", "fork", "pidfile", "syslog", "listen", "include", "includedir",
               "servicedir", "standard_system_servicedirs", "servicehelper"}
    for element in [e for e in root if e.tag in dropped]:
        root.remove(element)
    ET.SubElement(root, "listen").text = f"unix:path={directory}/bus"
    ET.SubElement(root, "include").text = str(policy)
    return ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n' + ET.tostring(root, "unicode"))


class SystemBus:
    """A private dbus-daemon configured like the system bus; stop() and start() again keep its address."""

    def __init__(self, directory: Path, policy: Path | None = None) -> None:
        self.directory = directory
        (directory / "bus.conf").write_text(bus_config(directory, *([policy] if policy else [])))
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> None:
        (self.directory / "bus").unlink(missing_ok=True)
        self.proc = subprocess.Popen(["dbus-daemon", f"--config-file={self.directory}/bus.conf", "--nofork",
                                      "--nopidfile", "--print-address=1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address, "dbus-daemon did not start"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def private_system_bus(policy_text: str | None = None) -> Iterator[SystemBus]:
    """A started SystemBus in a fresh 0755 directory, with our policy or ``policy_text``; skips where it cannot run."""
    if os.geteuid() != 0 or not all(map(shutil.which, ("dbus-daemon", "setpriv", "busctl"))):
        pytest.skip("needs root, dbus-daemon, setpriv and busctl")
    if not Path("/usr/share/dbus-1/system.conf").exists():
        pytest.skip("no system bus configuration to start from")
    directory = Path(tempfile.mkdtemp(prefix="fa-bus-"))
    directory.chmod(0o755)  # nobody reaches the socket and the flooder's script in here, and nothing else of ours
    policy = None
    if policy_text is not None:
        policy = directory / "policy.conf"
        policy.write_text(policy_text)
    bus = SystemBus(directory, policy)
    try:
        bus.start()
        yield bus
    finally:
        bus.stop()
        shutil.rmtree(directory)


@pytest.fixture
def system_bus() -> Iterator[SystemBus]:
    with private_system_bus() as bus:
        yield bus


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


class SystemDaemon:
    """`factory-agent run --bus system` as root (the launcher's Agent), its stderr in a file (a pipe nobody
    reads could block it)."""

    def __init__(self, bus: SystemBus, backend: str, config: Path, state: Path) -> None:
        self.log = state.parent / f"daemon-{backend}.log"
        self.agent = Agent(*run_args(config, state, bus="system"), stdout=None, stderr_file=self.log,
                           env=agent_env(backend=backend, DBUS_SYSTEM_BUS_ADDRESS=bus.address))
        self.proc = self.agent.proc

    def stderr(self) -> str:
        return self.agent.stderr

    def check_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"the daemon exited {code}:\n{self.stderr()[-3000:]}"

    def peak_rss(self) -> int:
        return peak_rss(self.proc.pid)

    def stop(self) -> str:
        return self.agent.stop(15, check=False)


class Flooder:
    """FLOODER as nobody, from a copy in the bus directory, with the system's own python3."""

    def __init__(self, bus: SystemBus, mode: str) -> None:
        script = bus.directory / "flood.py"
        script.write_text(FLOODER)
        script.chmod(0o644)
        self.progress: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", str(script),
             str(bus.directory / "bus"), str(CONNECTIONS), mode, str(FLOOD_SECONDS)],
            cwd=bus.directory, env={"PATH": "/usr/bin:/bin", "HOME": str(bus.directory)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.progress.append(json.loads(line))

    @property
    def sent(self) -> int:
        return self.progress[-1]["sent"] if self.progress else 0

    def check_running(self) -> None:
        code = self.proc.poll()
        assert code is None, f"the flooder exited {code}: {self.proc.stderr.read() if self.proc.stderr else ''}"

    def stop(self) -> dict[str, Any]:
        """Closes its stdin (it stops), and returns its last report."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)
        assert self.progress and self.progress[-1].get("done"), self.proc.stderr.read() if self.proc.stderr else ""
        return self.progress[-1]


async def until(predicate: Any, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def posts(lab: FaultyVault) -> int:
    """How many serial-requests the daemon has posted."""
    return lab.requests[("POST", SERIAL_PATH)]


def phase(state: Path) -> str:
    return str(json.loads((state / "state.json").read_text())["phase"])


def states(rec: Recorder) -> list[str]:
    return [s["State"] for s in rec.signals if "State" in s]


@pytest.mark.parametrize("mode", ["silent", "slow", "churn"])
def test_a_flood_from_nobody_neither_stops_nor_starves_the_daemon(tmp_path: Path, system_bus: SystemBus, backend: str,
                                                                 lab: FaultyVault, mode: str) -> None:
    state = tmp_path / "state"
    seed_key(state)
    gate = [Forced(503, retry_after="1") for _ in range(1000)]  # emptied once the flood has been seen sending
    lab.faults.status["serial"] = gate
    figures: dict[str, Any] = {"backend": backend, "mode": mode}

    async def scenario() -> None:
        async with Recorder(system_bus.address) as rec:
            daemon = SystemDaemon(system_bus, backend, write_config(tmp_path, lab), state)
            flood: Flooder | None = None
            try:
                await until(lambda: daemon.check_alive() or "waiting-retry" in states(rec), "the first 503")
                flood, attempts = Flooder(system_bus, mode), posts(lab)

                def flooding(count: int) -> bool:
                    daemon.check_alive()
                    flood.check_running()  # type: ignore[union-attr]
                    return flood.sent >= count  # type: ignore[union-attr]

                # the flood is on, and the daemon has gone on trying to register through it
                await until(lambda: flooding(SENT_BEFORE_REGISTERING) and posts(lab) >= attempts + 2,
                            f"{SENT_BEFORE_REGISTERING} calls sent and two more attempts to register")
                assert "registered" not in states(rec) and not (state / "serial.assertion").exists()
                signals_before, figures["sent_while_held"] = len(rec.signals), flood.sent
                gate.clear()  # the vault signs at the daemon's next attempt
                await until(lambda: flooding(0) and "registered" in states(rec), "registered during the flood")
                figures["sent_until_registered"] = sent = flood.sent
                assert len(rec.signals) > signals_before + 1, "no PropertiesChanged during the flood"
                seen = states(rec)  # in the order published, flood or not
                if seen[1:3] == ["identifying", "requesting"]:  # shown only while the daemon waits for it (a race)
                    del seen[1:3]
                retries = (len(seen) - 2) // 2
                assert seen == ["requesting", *["waiting-retry", "requesting"] * retries, "registered"], seen
                during = await asyncio.wait_for(rec.get_all(), 30)  # a quiet caller is answered mid-flood
                assert during["State"] == "registered" and during["Serial"] == "DBUS-0000000000dbus01"
                await until(lambda: flooding(sent + 5000), "the flood going on after the registration")
                daemon.check_alive()
                figures["flooder"] = flood.stop()
                daemon.check_alive()
                final = await asyncio.wait_for(rec.get_all(), 30)
                assert final["State"] == "registered" and final["Serial"] == "DBUS-0000000000dbus01"
                assert (state / "serial.assertion").exists()
                figures["peak_rss_mib"] = round(daemon.peak_rss() / MIB, 1)
                assert system_bus.proc is not None
                figures["bus_peak_rss_mib"] = round(peak_rss(system_bus.proc.pid) / MIB, 1)
            finally:
                if flood is not None and flood.proc.poll() is None:
                    flood.proc.kill()
                    flood.proc.wait()
                stderr = daemon.stop()
            figures["daemon_log"] = [line for line in stderr.splitlines() if "D-Bus" in line]
            assert "Traceback" not in stderr, stderr[-3000:]

    asyncio.run(scenario())
    print(f"\nflood figures: {json.dumps(figures)}")
    assert figures["peak_rss_mib"] < 100, figures


def test_the_daemon_owns_the_name_again_after_the_bus_restarts(tmp_path: Path, system_bus: SystemBus, backend: str,
                                                               lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    gate = [Forced(503, retry_after="1") for _ in range(1000)]
    lab.faults.status["serial"] = gate
    daemon = SystemDaemon(system_bus, backend, write_config(tmp_path, lab), state)

    def read_state() -> str | None:
        daemon.check_alive()
        done = busctl(system_bus.address, "get-property", BUS_NAME, PATH, BUS_NAME, "State")
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        wait_for(lambda: read_state() == 's "waiting-retry"' and posts(lab) >= 2)
        system_bus.stop()  # the bus goes away mid-registration; the daemon keeps going without it
        stopped = time.monotonic()
        gate.clear()
        wait_for(lambda: daemon.check_alive() or phase(state) == "registered")
        assert (state / "serial.assertion").exists()
        time.sleep(max(0.0, stopped + 3.0 - time.monotonic()))  # long enough for attempts at 0.5 s and 1.5 s to fail
        system_bus.start()
        wait_for(lambda: read_state() == 's "registered"', seconds=60)  # the backoff is capped at 30 s
        assert get_property(system_bus.address, "Serial") == 's "DBUS-0000000000dbus01"'
    finally:
        stderr = daemon.stop()
    assert stderr.count("lost the D-Bus connection") == 1, stderr  # one line, however many attempts
    again = re.findall(rf"owns {BUS_NAME} on the system bus again \(attempt (\d+)\)", stderr)
    assert len(again) == 1 and int(again[0]) > 1, stderr
    assert "Traceback" not in stderr, stderr
