"""systemd and D-Bus integration, checked by the real components.

- the unit: `systemd-analyze verify` (and a typo'd copy to prove it would notice),
  `systemd-analyze security --offline`, its contract directives, MemoryDenyWriteExecute;
- sd_notify: child processes send to a real AF_UNIX datagram socket (path and abstract),
  through python-systemd and through the fallback that needs no python-systemd;
- journald: a real socket at /run/systemd/journal/socket in a private mount namespace
  receives the native protocol from setup_logging()'s handler;
- the D-Bus policy: a private system-like dbus-daemon loads systemd/io.factoryagent.Agent1.conf,
  and a throwaway service owned by root is called as root and as nobody.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import systemd
from tests.conftest import REPO
from tests.environment import need_private_mounts

UNITS = REPO / "systemd"
UNIT = UNITS / "factory-agent.service"
NO_PYTHON_SYSTEMD = "import sys; sys.modules['systemd'] = None\n"  # makes `import systemd.*` fail
HAVE_PYTHON_SYSTEMD = systemd._python_systemd("daemon") is not None


def child_env(env: dict[str, str]) -> dict[str, str]:
    """This environment without systemd's variables, with agent importable, plus ``env``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    return {**base, "PYTHONPATH": str(REPO), **env}


def run_child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter of this leg."""
    return subprocess.run([sys.executable, "-c", code], env=child_env(env), capture_output=True, text=True,
                          timeout=30, check=False)


# ---- the unit -------------------------------------------------------------------------------


def unit_lines(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys repeat in units)."""
    section, found = "", []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.append((section, key.strip(), value.strip()))
    return found


def values(text: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_lines(text) if (s, k) == (section, key)]


def unit_copy(tmp_path: Path, text: str) -> Path:
    """The unit with only ExecStart's binary replaced by a stub, since /usr/bin/factory-agent
    is not installed here (verify checks that the binary exists); every directive stays."""
    stub = tmp_path / "factory-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "factory-agent.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/factory-agent ", f"ExecStart={stub} ", 1))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count("ExecStart=/usr/bin/factory-agent ") == 1
    if not any(Path(d, "dbus.socket").exists() for d in ("/usr/lib/systemd/system", "/lib/systemd/system")):
        pytest.skip("verify resolves Requires=dbus.socket: install dbus-system-bus-common")
    done = analyze("verify", "--man=no", str(unit_copy(tmp_path, text)))
    # verify exits 0 on unknown keys and bad values alike: it only warns. So: no output at all.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above means something here: a misspelt directive is reported."""
    text = UNIT.read_text().replace("\nProtectSystem=strict", "\nProtectSytem=strict", 1)
    done = analyze("verify", "--man=no", str(unit_copy(tmp_path, text)))
    assert "Unknown key" in done.stderr and "ProtectSytem" in done.stderr


def test_unit_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    """1.6 with systemd 252 (root, network, netlink and /proc/cpuinfo are what the job needs)."""
    copy = unit_copy(tmp_path, UNIT.read_text())
    done = analyze("security", "--offline=yes", "--threshold=20", "--no-pager", str(copy))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


def test_unit_contract() -> None:
    text = UNIT.read_text()
    expect = {
        ("Service", "Type"): ["notify"], ("Service", "NotifyAccess"): ["main"],
        ("Service", "ExecStart"): ["/usr/bin/factory-agent run --bus system"],
        ("Service", "StateDirectory"): ["factory-agent"], ("Service", "StateDirectoryMode"): ["0700"],
        ("Service", "Restart"): ["on-failure"], ("Service", "RestartPreventExitStatus"): ["78"],
        ("Service", "WatchdogSec"): ["60"], ("Service", "BusName"): ["io.factoryagent.Agent1"],
        ("Unit", "ConditionPathExists"): ["!/etc/factory-agent/disabled"],
        ("Unit", "ConditionKernelCommandLine"): ["!factory-agent=disabled"],
        ("Install", "WantedBy"): ["multi-user.target"],
    }
    for (section, key), expected in expect.items():
        assert values(text, section, key) == expected, key
    families = " ".join(values(text, "Service", "RestrictAddressFamilies")).split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    ordering = " ".join(v for s, k, v in unit_lines(text) if k in ("After", "Wants", "Requires", "Requisite"))
    assert "network-online.target" not in ordering and "udev-settle" not in ordering


def test_dbus_activation_file() -> None:
    lines = unit_lines((UNITS / "io.factoryagent.Agent1.service").read_text())
    assert lines == [("D-BUS Service", "Name", "io.factoryagent.Agent1"), ("D-BUS Service", "Exec", "/bin/false"),
                     ("D-BUS Service", "User", "root"), ("D-BUS Service", "SystemdService", "factory-agent.service")]
    assert (UNITS / "factory-agent.service").exists()


MDWE_CHILD = """
import contextlib, ctypes, mmap, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("no-mdwe"); sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X memory is still allowed: this check would prove nothing")
except PermissionError:
    pass
import ssl, requests, pyudev, dbus_next
with contextlib.suppress(ImportError):
    import systemd.daemon, systemd.journal
from agent import cli, keys, systemd as s
ssl.create_default_context()
s.setup_logging()
assert cli.main(["identity", "--json"]) == 0
key = keys.load_key(keys.generate_key_pem(2048))   # the keygen child inherits the restriction
key.sign(b"data")
print("ok")
"""


def test_runtime_works_with_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes is safe: the kernel's own form of it (prctl PR_SET_MDWE, which
    systemd >= 254 uses) refuses W+X memory, and imports, identity, TLS setup and keygen still work."""
    done = run_child(MDWE_CHILD, {})
    if done.stdout.strip() == "no-mdwe":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ---- sd_notify --------------------------------------------------------------------------------


@pytest.fixture(params=["python-systemd", "fallback"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "python-systemd" and not HAVE_PYTHON_SYSTEMD:
        pytest.skip("python-systemd is not installed in this leg")
    return "" if request.param == "python-systemd" else NO_PYTHON_SYSTEMD


@contextlib.contextmanager
def bound_socket(kind: str) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, like systemd's, and the $NOTIFY_SOCKET value naming it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, tempfile.TemporaryDirectory() as tmp:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd sees it
        if kind == "path":
            address = env = f"{tmp}/notify"  # short: sun_path holds 108 bytes
        else:
            env = f"@factory-agent-test-{os.getpid()}-{time.monotonic_ns()}"
            address = "\0" + env[1:]
        sock.bind(address)
        yield sock, env


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    with bound_socket(request.param) as bound:
        yield bound


def received(sock: socket.socket, child: subprocess.Popen[str]) -> list[tuple[str, int, float]]:
    """Every datagram until ``child`` exits: (text, sender pid, arrival time)."""
    found = []
    sock.settimeout(0.01)
    while True:
        exited = child.poll() is not None  # before reading: all it sent is queued by then
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            if exited:
                return found
            continue
        pid = next((struct.unpack("3i", d)[0] for level, kind, d in ancillary
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)), 0)
        found.append((data.decode(), pid, time.monotonic()))


def notify_child(code: str, env: dict[str, str], sock: socket.socket,
                 argv: list[str] | None = None) -> tuple[str, list[tuple[str, int, float]]]:
    """Run ``code`` (or ``argv``) and collect what it sends to ``sock`` as it sends it."""
    child = subprocess.Popen(argv or [sys.executable, "-c", code], env=child_env(env), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = received(sock, child)
    stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 0, stderr
    return stdout, got


NOTIFY_CHILD = """
import os
from agent import systemd as s
assert s.notify_ready("starting")
assert s.notify_status(s.status_line("blocked", "", "invalid-api-key", "check the api-key\\nREADY=1"))
assert s.notify_extend_timeout(90.5)
assert s.notify_stopping()
print(os.getpid())
"""


def test_ready_status_stopping_arrive(backend: str, notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    stdout, got = notify_child(backend + NOTIFY_CHILD, {"NOTIFY_SOCKET": address}, sock)
    assert [text for text, _, _ in got] == [
        "READY=1\nSTATUS=starting",
        "STATUS=blocked: invalid-api-key: check the api-key READY=1",
        "EXTEND_TIMEOUT_USEC=90500000",
        "STOPPING=1",
    ]
    assert {pid for _, pid, _ in got} == {int(stdout)}  # the main process itself: NotifyAccess=main


WATCHDOG_CHILD = """
import asyncio
from agent import systemd as s
print(s.watchdog_interval())
async def main():
    try:
        await asyncio.wait_for(s.watchdog_loop(), 0.6)
    except TimeoutError:
        pass
asyncio.run(main())
"""


@pytest.mark.parametrize("watchdog_pid", ["unset", "own", "other"])
def test_watchdog_pings_from_the_loop(watchdog_pid: str) -> None:
    """The rate and the $WATCHDOG_PID rule (the sending itself is covered above, on every backend)."""
    with bound_socket("path") as (sock, address):
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        if watchdog_pid == "other":
            env["WATCHDOG_PID"] = str(os.getpid())  # ours, not the child's
        # "own": the shell's pid is the child's, since exec keeps it
        argv = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" -c "$1"', sys.executable, WATCHDOG_CHILD]
        stdout, got = notify_child(WATCHDOG_CHILD, env, sock, argv if watchdog_pid == "own" else None)
    pings = [arrival for text, _, arrival in got if text == "WATCHDOG=1"]
    if watchdog_pid == "other":
        assert (stdout.strip(), got) == ("None", [])
        return
    assert stdout.strip() == "0.1"
    assert 4 <= len(pings) <= 8, len(pings)  # one at once, then every 0.1 s for 0.6 s
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 0.07 <= gaps[len(gaps) // 2] <= 0.2, gaps


# ---- journald ---------------------------------------------------------------------------------

JOURNAL_CHILD = r"""
import json, logging, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")   # journald's, in this mount namespace only
from agent import systemd as s
s.setup_logging()
print(json.dumps({"under_journal": s.under_journal(),
                  "handler": type(logging.getLogger().handlers[-1]).__name__}), flush=True)
log = logging.getLogger("agent.daemon")
s.redact(["s3cret-api-key"])
log.info("state registered: serial ACME-1", extra={s.FIELD_STATE: "registered", s.FIELD_SERIAL: "ACME-1",
         s.FIELD_ERROR: "", "MESSAGE_ID": s.MESSAGE_ID_REGISTERED})
log.warning("state blocked (invalid-api-key: %s refused)", "s3cret-api-key",
            extra={s.FIELD_STATE: "blocked", s.FIELD_ERROR: "invalid-api-key", "MESSAGE_ID": s.MESSAGE_ID_BLOCKED})
log.error("loaded\n-----BEGIN PRIVATE KEY-----\nMIIJQgIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----")
try:
    raise ValueError("api-key s3cret-api-key")
except ValueError:
    log.exception("internal error")
sock.setblocking(False)
datagrams = []
while True:
    try:
        datagrams.append(sock.recv(65536).hex())
    except BlockingIOError:
        break
print(json.dumps(datagrams))
"""


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: FIELD=value lines, or FIELD\\n<le64 size><bytes>\\n."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name, size = line, struct.unpack("<Q", data[end + 1:end + 9])[0]
            value, i = data[end + 9:end + 9 + size], end + 9 + size + 1
        fields[name.decode()] = value.decode()
    return fields


def journal_run(tmp_path: Path, prelude: str, journal_stream: str) -> tuple[dict[str, object], list[bytes], str]:
    """JOURNAL_CHILD in a private mount namespace with its own journald socket; its stderr is a
    file, and $JOURNAL_STREAM names that file ("stderr"), another one, or is unset ("")."""
    need_private_mounts()  # for a private /run/systemd
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        st = os.fstat(stderr.fileno())
        stream = {"stderr": f"{st.st_dev}:{st.st_ino}", "other": f"{st.st_dev}:{st.st_ino + 1}"}.get(journal_stream)
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        env.update({"PYTHONPATH": str(REPO), **({"JOURNAL_STREAM": stream} if stream else {})})
        # a private /run (a root without systemd has no /run/systemd to mount on)
        script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec "$0" -c "$1"'
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                               sys.executable, prelude + JOURNAL_CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=30, check=False)
    if done.returncode != 0 and not done.stdout and "Traceback" not in err.read_text():
        pytest.skip(f"cannot set up a private /run/systemd here: {err.read_text().strip()}")
    assert done.returncode == 0, err.read_text()
    first, last = done.stdout.splitlines()
    return json.loads(first), [bytes.fromhex(d) for d in json.loads(last)], err.read_text()


def test_journal_gets_structured_fields_and_no_secret(tmp_path: Path) -> None:
    if not HAVE_PYTHON_SYSTEMD:
        pytest.skip("python-systemd is not installed in this leg")
    info, raw, stderr = journal_run(tmp_path, "", "stderr")
    assert info == {"under_journal": True, "handler": "JournalHandler"}
    assert stderr == ""
    assert len(raw) == 4
    assert not any(b"s3cret-api-key" in d or b"MIIJQgIBADAN" in d for d in raw)
    registered, blocked, pem, failure = (parse_native(d) for d in raw)
    assert {k: registered[k] for k in ("MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER",
                                       "FACTORY_AGENT_STATE", "FACTORY_AGENT_SERIAL")} == {
        "MESSAGE": "state registered: serial ACME-1", "MESSAGE_ID": systemd.MESSAGE_ID_REGISTERED,
        "PRIORITY": "6", "SYSLOG_IDENTIFIER": "factory-agent",
        "FACTORY_AGENT_STATE": "registered", "FACTORY_AGENT_SERIAL": "ACME-1"}
    assert "FACTORY_AGENT_ERROR" not in registered  # empty fields are left out
    assert {k: blocked[k] for k in ("MESSAGE", "MESSAGE_ID", "PRIORITY", "FACTORY_AGENT_ERROR")} == {
        "MESSAGE": "state blocked (invalid-api-key: *** refused)", "MESSAGE_ID": systemd.MESSAGE_ID_BLOCKED,
        "PRIORITY": "4", "FACTORY_AGENT_ERROR": "invalid-api-key"}
    assert pem["MESSAGE"] == "loaded\n[PRIVATE KEY redacted]" and pem["PRIORITY"] == "3"
    assert "ValueError: api-key ***" in failure["EXCEPTION_TEXT"]
    for fields in (registered, blocked, pem, failure):  # only real journal fields: no LogRecord internals
        assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in fields), sorted(fields)
        assert "CODE_ARGS" not in fields and "EXCEPTION_INFO" not in fields
        assert fields["LOGGER"] == "agent.daemon" and fields["CODE_FUNC"]


@pytest.mark.parametrize(("prelude", "journal_stream"), [
    pytest.param("", "", id="no-JOURNAL_STREAM"),
    pytest.param("", "other", id="stderr-is-not-the-journal-stream"),
    pytest.param(NO_PYTHON_SYSTEMD, "stderr", id="no-python-systemd"),
])
def test_plain_stderr_lines_elsewhere(tmp_path: Path, prelude: str, journal_stream: str) -> None:
    info, raw, stderr = journal_run(tmp_path, prelude, journal_stream)
    assert info == {"under_journal": journal_stream == "stderr", "handler": "StreamHandler"}
    assert raw == []
    lines = stderr.splitlines()
    assert lines[:4] == ["factory-agent: state registered: serial ACME-1",
                         "factory-agent: state blocked (invalid-api-key: *** refused)",
                         "factory-agent: loaded", "[PRIVATE KEY redacted]"]
    assert "s3cret-api-key" not in stderr and "ValueError: api-key ***" in stderr


# ---- the D-Bus policy -------------------------------------------------------------------------

SERVICE = """
import asyncio, sys
from dbus_next import PropertyAccess
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, dbus_property, method

class Agent(ServiceInterface):
    def __init__(self):
        super().__init__("io.factoryagent.Agent1")

    @method()
    def Retry(self):
        pass

    @method()
    def GetSerialAssertion(self) -> "s":
        return "type: serial\\n"

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return "registered"

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    bus.export("/io/factoryagent/Agent1", Agent())
    print((await bus.request_name("io.factoryagent.Agent1")).name, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin

asyncio.run(main())
"""

CLIENT = """
import asyncio, json, sys
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError

NAME, PATH, PROPS = "io.factoryagent.Agent1", "/io/factoryagent/Agent1", "org.freedesktop.DBus.Properties"
CALLS = {
    "Get": (PROPS, "Get", "ss", [NAME, "State"]),
    "GetAll": (PROPS, "GetAll", "s", [NAME]),
    "Set": (PROPS, "Set", "ssv", [NAME, "State", Variant("s", "blocked")]),
    "Introspect": ("org.freedesktop.DBus.Introspectable", "Introspect", "", []),
    "Ping": ("org.freedesktop.DBus.Peer", "Ping", "", []),
    "GetSerialAssertion": (NAME, "GetSerialAssertion", "", []),
    "Retry": (NAME, "Retry", "", []),
    "Retry without interface": (None, "Retry", "", []),
}

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    out = {}
    for label, (interface, member, signature, body) in CALLS.items():
        reply = await bus.call(Message(destination=NAME, path=PATH, interface=interface, member=member,
                                       signature=signature, body=body))
        out[label] = reply.error_name if reply.message_type == MessageType.ERROR else "ok"
    try:
        out["own"] = (await bus.request_name(NAME)).name
    except DBusError as exc:
        out["own"] = exc.type
    reply = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus", member="ListActivatableNames"))
    out["activatable"] = NAME in reply.body[0]
    print(json.dumps(out))

asyncio.run(main())
"""

DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def bus_config(directory: Path) -> str:
    """Debian's system.conf (its default-deny policy), listening in ``directory``, with our policy
    and activation file and nothing else from this machine."""
    root = ET.parse("/usr/share/dbus-1/system.conf").getroot()
    dropped = {"user", "fork", "pidfile", "syslog", "listen", "include", "includedir",
               "servicedir", "standard_system_servicedirs", "servicehelper"}
    for element in [e for e in root if e.tag in dropped]:
        root.remove(element)
    services = directory / "services"
    services.mkdir()
    shutil.copy(UNITS / "io.factoryagent.Agent1.service", services)
    ET.SubElement(root, "listen").text = f"unix:path={directory}/bus"
    ET.SubElement(root, "servicedir").text = str(services)
    ET.SubElement(root, "include").text = str(UNITS / "io.factoryagent.Agent1.conf")
    return ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n' + ET.tostring(root, "unicode"))


@pytest.fixture
def system_like_bus() -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0 or not all(map(shutil.which, ("dbus-daemon", "setpriv"))):
        pytest.skip("needs root, dbus-daemon and setpriv")
    if not Path("/usr/share/dbus-1/system.conf").exists():
        pytest.skip("no system bus configuration to start from")
    directory = Path(tempfile.mkdtemp(prefix="fa-bus-"))
    directory.chmod(0o755)  # nobody connects to the socket and reads the scripts in here
    (directory / "bus.conf").write_text(bus_config(directory))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={directory}/bus.conf", "--nofork", "--nopidfile",
                               "--print-address=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = daemon.stdout.readline().strip() if daemon.stdout else ""
        assert address, daemon.stderr.read() if daemon.stderr else ""
        yield address, directory
    finally:
        daemon.kill()
        daemon.wait()
        shutil.rmtree(directory)


def call_as(uid: int, address: str, directory: Path) -> dict[str, object]:
    script = directory / "client.py"
    script.write_text(CLIENT)
    script.chmod(0o644)
    as_user = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    done = subprocess.run([*as_user, sys.executable, str(script), address], capture_output=True, text=True,
                          timeout=30, check=False, cwd=directory, env={**os.environ, "HOME": str(directory)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_dbus_policy_lets_anyone_read_and_only_root_act(system_like_bus: tuple[str, Path]) -> None:
    pytest.importorskip("dbus_next")
    address, directory = system_like_bus
    service = subprocess.Popen([sys.executable, "-c", SERVICE, address], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert service.stdout and service.stdout.readline().strip() == "PRIMARY_OWNER"  # root may own it
        nobody = call_as(65534, address, directory)
        root = call_as(0, address, directory)
    finally:
        service.communicate(timeout=10)  # closing stdin ends it
    assert nobody == {
        "Get": "ok", "GetAll": "ok", "Introspect": "ok", "Ping": "ok", "GetSerialAssertion": "ok",
        "Set": DENIED, "Retry": DENIED, "Retry without interface": DENIED, "own": DENIED,
        "activatable": True,
    }
    assert root == {
        "Get": "ok", "GetAll": "ok", "Introspect": "ok", "Ping": "ok", "GetSerialAssertion": "ok",
        "Set": "org.freedesktop.DBus.Error.PropertyReadOnly",  # the bus let it through; the service said no
        "Retry": "ok", "own": "IN_QUEUE", "activatable": True,
        "Retry without interface": "org.freedesktop.DBus.Error.UnknownMethod",  # passed the bus; dbus-next wants one
    }
