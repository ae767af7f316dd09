"""Secrets and permissions, checked on the real daemon (private D-Bus, umask 000, real lab vault).

- The api-key never shows: whole registrations with a recognisable key (success, the vault
  refusing the key, a vault that quotes the key back in its refusal, the vault answering 503,
  the vault down, an untrusted TLS certificate), and
  every output is searched: stderr, the journal (a private /run/systemd with its own journald
  socket), every PropertiesChanged and GetAll value on D-Bus, the replies (and errors) of
  GetSerialAssertion, `factory-agent status` and `status --json`, every file of the state
  directory, every execve (argv and environment) of the daemon and its children; and the
  configuration errors that quote a value.
- Permissions whatever the umask (000 and 277): the state directory 0700, device-key.pem and
  state.json 0600; directories it has to create above the state directory are not left writable
  by others.
- TLS verification is on by default: no ca-file means the system trust store, and a vault whose
  certificate that store does not know is refused (tls-certificate). Statically: nothing in
  agent/ turns verification off.
- Response sizes are capped: covered by tests/http/test_vault_client.py::test_oversized_answers_are_transient
  (Content-Length and chunked) and tests/system/test_run.py::test_an_oversized_answer_is_transient
  (the real daemon); test_the_size_cap_tests_exist keeps those references honest.
- No shell: statically, agent/ has no shell=True, os.system, os.popen, os.exec*/spawn*, no
  *_shell and no command given as a string; at run time, strace -f shows that no shell is ever
  executed, and that the only program the daemon runs is the keygen interpreter (and, with newer
  pyudev, `ldconfig -p` from ctypes' library lookup) (Debian package strace).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import vault
from agent.config import VaultConfig
from tests.conftest import REPO
from tests.dbus.conftest import Recorder, seed_key
from tests.environment import need_private_mounts
from tests.fakes import launcher
from tests.fakes.agentconf import write_agent_config
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import Agent, agent_argv, agent_env, run_args
from tests.fakes.rawserver import RawServer, http_reply

SECRET = "SECRET-API-KEY-d41d8cd98f00b204"  # the vault's key, and the agent's when it is right
WRONG = "SECRET-API-KEY-wrong-0cc175b9c0f1"  # the agent's key when the vault expects SECRET
NEEDLES = ("SECRET-API-KEY", "d41d8cd98f00b204", "0cc175b9c0f1")  # the key, or the distinctive part of it
AGENT = REPO / "agent"
SOC_SERIAL = "000000005ec0e701"


# ---- the pieces ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_lab_dir(lab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's lab keys, with SECRET as the vault's api-key."""
    directory = tmp_path_factory.mktemp("secret-lab")
    for name in ("root-key.pem", "brand-key.pem"):
        shutil.copy2(lab_dir / name, directory / name)
    FaultyVault(directory, api_key=SECRET)
    return directory


@pytest.fixture
def secret_lab(secret_lab_dir: Path) -> Iterator[FaultyVault]:
    lab = FaultyVault(secret_lab_dir)
    assert lab.api_key == SECRET
    lab.start()
    yield lab
    lab.stop()


def agent_config(tmp: Path, url: str, lab_dir: Path, api_key: str, extra: str = "") -> Path:
    key_file = tmp / "agent-api-key"
    key_file.write_text(api_key + "\n")
    key_file.chmod(0o600)
    return write_agent_config(tmp, url, lab_dir, template="SECRET-{soc_serial}", soc_serial=SOC_SERIAL,
                              api_key_file=key_file, vault_extra=extra)


@dataclass
class Exposure:
    """Everything the outside world could see of one run."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, value: Any) -> None:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "backslashreplace")
        self.texts[label] = value if isinstance(value, str) else repr(value)

    def leaks(self) -> dict[str, list[str]]:
        return {label: [n for n in NEEDLES if n in text] for label, text in self.texts.items()
                if any(n in text for n in NEEDLES)}


JOURNAL_RUNNER = r"""
import json, os, signal, socket, subprocess, sys
out, err_path, *argv = sys.argv[1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.bind("/run/systemd/journal/socket")   # journald's, in this mount namespace only
with open(err_path, "w") as err:
    st = os.fstat(err.fileno())
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    child = subprocess.Popen(argv, stderr=err, env=env)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
sock.settimeout(0.05)
datagrams = []
while True:
    exited = child.poll() is not None
    try:
        datagrams.append(sock.recv(1 << 20).hex())
    except (TimeoutError, InterruptedError):
        if exited:
            break
with open(out, "w") as f:
    json.dump({"returncode": child.returncode, "datagrams": datagrams}, f)
"""
# A private /run (not /run/systemd, which a root without systemd lacks) with journald's socket directory.
PRIVATE_RUN = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec "$0" "$@"'


class Run:
    """`factory-agent run --bus session` under umask 000, optionally under strace or a private journal."""

    def __init__(self, tmp: Path, address: str, config: Path, state: Path, *, strace: bool = False,
                 journal: bool = False) -> None:
        self.tmp, self.address = tmp, address
        self.env = agent_env(bus_address=address, drop=("JOURNAL_STREAM",))
        wrapper: list[str] = []
        self.strace_dir = tmp / "strace" if strace else None
        self.journal_out = tmp / "journal.json" if journal else None
        self.journal_err = tmp / "journal-stderr"
        if strace:  # -ff: one file per process, so that no execve line is split by another process's
            (tmp / "strace").mkdir()
            wrapper = ["strace", "-ff", "-qq", "-v", "-s", "65536", "-e", "trace=execve", "-o",
                       str(tmp / "strace" / "pid")]
        if journal:
            wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_RUN, sys.executable, "-c",
                       JOURNAL_RUNNER, str(self.journal_out), str(self.journal_err), *wrapper]
        self.proc = Agent(*run_args(config, state, bus="session"), wrapper=wrapper, env=self.env, stdin=None,
                          stdout=None, umask=0)

    def stop(self) -> tuple[int, str]:
        """SIGTERM to the daemon (or to the journal runner, which passes it on). Not to strace: strace
        would detach and leave the daemon running; it exits with its tracee instead."""
        if self.proc.poll() is None:
            targets = _children(self.proc.pid) if self.strace_dir else [self.proc.pid]
            for pid in targets:
                os.kill(pid, signal.SIGTERM)
        return self.proc.wait_exit(60), self.proc.stderr

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return launcher.run(agent_argv(*args), env=self.env, timeout=60)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def observe(run: Run, rec: Recorder, done: Any, exposure: Exposure, seconds: float = 240) -> dict[str, Any]:
    """Wait until ``done(signals)``, then read everything a client can: GetAll, GetSerialAssertion, status."""
    await rec.until(lambda: done(rec.signals) or run.proc.poll() is not None, seconds)
    assert done(rec.signals), f"the daemon ended ({run.proc.poll()}) first; stderr:\n{run.proc.stderr}"
    props = await rec.get_all()
    exposure.add("D-Bus GetAll", props)
    reply = await rec.call("GetSerialAssertion")
    exposure.add("D-Bus GetSerialAssertion", (reply.message_type.name, reply.error_name, reply.body))
    for args in (("status", "--json", "--bus", "session"), ("status", "--bus", "session")):
        done_cli = await asyncio.to_thread(run.cli, *args)
        exposure.add(" ".join(args), done_cli.stdout + done_cli.stderr)
    return props


def scenario(tmp: Path, address: str, config: Path, state: Path, until: Any, *, strace: bool = False,
             journal: bool = False) -> tuple[Exposure, dict[str, Any], list[dict[str, Any]]]:
    """One daemon run, observed; every output collected into an Exposure."""
    exposure = Exposure()

    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with Recorder(address) as rec:
            run = Run(tmp, address, config, state, strace=strace, journal=journal)
            try:
                props = await observe(run, rec, until, exposure)
            finally:
                returncode, stderr = run.stop()
                exposure.add("stderr", stderr)
            assert returncode == 0, stderr
            if journal:
                assert json.loads((tmp / "journal.json").read_text())["returncode"] == 0, stderr
            return props, rec.signals

    props, signals = asyncio.run(go())
    exposure.add("D-Bus PropertiesChanged", signals)
    for path in sorted(p for p in state.rglob("*") if p.is_file()):
        exposure.add(f"state file {path.name}", path.read_bytes())
    if journal:
        captured = json.loads((tmp / "journal.json").read_text())
        exposure.add("journal", b"".join(bytes.fromhex(d) for d in captured["datagrams"]))
        exposure.add("stderr under the journal", (tmp / "journal-stderr").read_text())
    if strace:
        for log in sorted((tmp / "strace").iterdir()):
            exposure.add(f"execve of {log.name} (argv and environment)", log.read_text())
    for label in ("stderr", "journal"):  # no traceback in the log: a D-Bus error reply is not a crash
        assert "Traceback" not in exposure.texts.get(label, ""), exposure.texts[label]
    return exposure, props, signals


def assert_no_leak(exposure: Exposure) -> None:
    assert exposure.texts, "nothing was collected"
    assert exposure.leaks() == {}


def saw(name: str, value: str) -> Any:
    return lambda signals: any(s.get(name) == value for s in signals)


# ---- the api-key never shows ---------------------------------------------------------------------


def test_a_registration_from_scratch_leaks_nothing_and_keeps_modes_under_umask_000(
        tmp_path: Path, bus_address: str, secret_lab: FaultyVault) -> None:
    """First boot under strace: RSA-4096 key made by the keygen child, stored, registered."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (Debian package strace)")
    state = tmp_path / "var" / "lib" / "state"  # two parents to create as well
    config = agent_config(tmp_path, secret_lab.url, secret_lab.directory, SECRET)
    exposure, props, _ = scenario(tmp_path, bus_address, config, state, saw("State", "registered"), strace=True)
    assert props["State"] == "registered" and props["Serial"] == f"SECRET-{SOC_SERIAL}"
    assert secret_lab.requests[("POST", "/v1/serial")] == 1  # SECRET did reach the vault: the search means something
    assert_no_leak(exposure)
    assert f"SECRET-{SOC_SERIAL}" in exposure.texts["stderr"]  # and the search does find what is there

    modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
    assert state.stat().st_mode & 0o777 == 0o700
    assert modes == {"device-key.pem": 0o600, "state.json": 0o600, "serial.assertion": 0o644}

    execs = [call for log in sorted((tmp_path / "strace").iterdir(), key=lambda p: int(p.suffix[1:]))
             for call in execve_calls(log.read_text())]
    assert not [e for e in execs if Path(e[0]).name in SHELLS or "-c" in e[1][1:2]], execs  # no shell, ever
    ours = [argv[1:4] for path, argv in execs if path == sys.executable]
    assert ours == [["-m", "agent", "run"], ["-m", "agent.keygen", "4096"]], execs
    # Newer pyudev finds libudev with ctypes.util.find_library, which runs `ldconfig -p` (a list, no shell).
    others = [(path, argv) for path, argv in execs if path != sys.executable]
    assert others in ([], [("/sbin/ldconfig", ["/sbin/ldconfig", "-p"])]), execs


@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["umask-000", "umask-277"])
def test_modes_whatever_the_umask(tmp_path: Path, secret_lab: FaultyVault, umask: int) -> None:
    """A first boot (key generated) to registered under a permissive and a restrictive umask: the modes
    are the contract's, not the umask's. A 0777 parent would let anyone rename the state directory away
    and put their own in its place; a 0500 state directory would stop a non-root daemon."""
    state = tmp_path / "var" / "lib" / "state"
    config = agent_config(tmp_path, secret_lab.url, secret_lab.directory, SECRET)
    done = launcher.run(agent_argv(*run_args(config, state, once=True)), timeout=300, umask=umask)
    assert done.returncode == 0 and "state registered" in done.stderr, done.stderr
    assert state.stat().st_mode & 0o7777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o7777 for p in state.iterdir()}
    assert modes == {"device-key.pem": 0o600, "state.json": 0o600, "serial.assertion": 0o644}
    for parent in (tmp_path / "var", tmp_path / "var" / "lib"):
        assert parent.stat().st_mode & 0o022 == 0, f"{parent} is {parent.stat().st_mode & 0o777:o}"


SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox"}


def execve_calls(log: str) -> list[tuple[str, list[str]]]:
    """(path, argv) of every successful execve in an `strace -f -v -e trace=execve` log."""
    found = []
    for match in re.finditer(r'execve\("((?:[^"\\]|\\.)*)", \[((?:"(?:[^"\\]|\\.)*"(?:, )?)*)\], .*\) = 0$', log, re.M):
        found.append((match.group(1), re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(2))))
    return found


def test_a_refused_api_key_leaks_nothing_not_even_to_the_journal(
        tmp_path: Path, bus_address: str, secret_lab: FaultyVault) -> None:
    """The vault refuses the agent's key (invalid-api-key): blocked, with the journal as the log."""
    need_private_mounts()  # for a private /run/systemd
    from agent import systemd

    if systemd._python_systemd("journal") is None:
        pytest.skip("python-systemd is not installed in this leg: the daemon would log to stderr")
    state = tmp_path / "state"
    seed_key(state)
    config = agent_config(tmp_path, secret_lab.url, secret_lab.directory, WRONG)
    exposure, props, _ = scenario(tmp_path, bus_address, config, state, saw("State", "blocked"), journal=True)
    assert props["LastError"] == "invalid-api-key"
    assert_no_leak(exposure)
    journal = exposure.texts["journal"]
    assert "MESSAGE_ID=39144cba6cf74227a6058710934a932a" in journal and "invalid-api-key" in journal  # it was captured
    assert "NotRegistered" in exposure.texts["D-Bus GetSerialAssertion"]  # an error reply was searched too


def test_a_vault_quoting_the_key_in_its_refusal_leaks_nothing(tmp_path: Path, bus_address: str,
                                                             secret_lab_dir: Path) -> None:
    """A vault (or a proxy in front of it) that says which key it refused: its message is shown to the
    technician, on D-Bus where anyone may read it, and in state.json; the key in it is not."""
    def echo(conn: socket.socket, request: bytes) -> None:
        head = request.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        key = next(line.split(":", 1)[1].strip() for line in head if line.lower().startswith("api-key:"))
        body = json.dumps({"error_code": "invalid-api-key", "message": f"Invalid API key used: {key!r} (x-{key}-x)"})
        http_reply("400 Bad Request", body.encode(), {"Content-Type": "application/json"})(conn, request)

    server = RawServer([echo] * 5)
    try:
        state = tmp_path / "state"
        seed_key(state)
        config = agent_config(tmp_path, server.url, secret_lab_dir, SECRET)
        exposure, props, _ = scenario(tmp_path, bus_address, config, state, saw("State", "blocked"))
    finally:
        server.close()
    assert SECRET.encode() in server.requests[0]  # the vault was sent the key, and quoted it back
    assert props["LastError"] == "invalid-api-key" and "Invalid API key used: '***' (x-***-x)" in props["LastErrorMessage"]
    assert_no_leak(exposure)


def test_the_vault_answering_503_leaks_nothing(tmp_path: Path, bus_address: str, secret_lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    secret_lab.faults.status["request-id"] = [Forced(503, retry_after="1")]
    secret_lab.faults.status["serial"] = [Forced(503, retry_after="1")]
    config = agent_config(tmp_path, secret_lab.url, secret_lab.directory, SECRET)
    exposure, props, signals = scenario(tmp_path, bus_address, config, state, saw("State", "registered"))
    assert any(s.get("LastError") == "vault-transient" for s in signals)
    assert_no_leak(exposure)


def test_the_vault_down_leaks_nothing(tmp_path: Path, bus_address: str, secret_lab_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1/"  # nobody listens once the probe is closed
    state = tmp_path / "state"
    seed_key(state)
    config = agent_config(tmp_path, url, secret_lab_dir, SECRET)
    exposure, props, _ = scenario(tmp_path, bus_address, config, state, saw("LastError", "vault-unavailable"))
    assert "cannot reach the vault" in props["LastErrorMessage"]
    assert_no_leak(exposure)


def test_an_untrusted_tls_certificate_is_refused_by_default_and_leaks_nothing(
        tmp_path: Path, bus_address: str, secret_lab_dir: Path) -> None:
    """No ca-file: the system trust store, which does not know the vault's CA: blocked, tls-certificate."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    lab = FaultyVault(secret_lab_dir)
    url = lab.start(ssl_context=context)
    try:
        state = tmp_path / "state"
        seed_key(state)
        config = agent_config(tmp_path, url, secret_lab_dir, SECRET)
        assert "ca-file" not in config.read_text()  # the default: the system trust store
        exposure, props, _ = scenario(tmp_path, bus_address, config, state, saw("State", "blocked"))
    finally:
        lab.stop()
    assert props["LastError"] == "tls-certificate"
    assert sum(lab.requests.values()) == 0  # not one request got through the handshake
    assert_no_leak(exposure)


@pytest.mark.parametrize("value", [f'["{SECRET}"]', f'{{ key = "{SECRET}" }}', "7357735773577357"])
def test_a_config_error_about_the_api_key_does_not_quote_it(tmp_path: Path, secret_lab_dir: Path, value: str) -> None:
    """`api-key = <not a string>` (an unquoted all-digit key is the likely one): exit 78, value not shown."""
    config = agent_config(tmp_path, "https://vault.example/v1/", secret_lab_dir, SECRET)
    text = config.read_text()
    start = text.index("api-key-file = ")
    config.write_text(text[:start] + f"api-key = {value}\n" + text[text.index("\n", start) + 1:])
    done = launcher.run(agent_argv(*run_args(config, tmp_path / "state", once=True)), timeout=60)
    assert done.returncode == 78 and "'vault.api-key'" in done.stderr, done.stderr
    assert SECRET not in done.stderr and "7357735773577357" not in done.stderr, done.stderr


@pytest.mark.parametrize("bad", ["\u20ac", "\x01", "\x7f", "\x1b[2J", "\tx", "\r\nx"],
                         ids=["non-latin-1", "control", "del", "escape", "tab", "crlf"])
def test_an_api_key_no_http_header_can_carry_is_a_config_error(tmp_path: Path, secret_lab: FaultyVault, bad: str) -> None:
    """A key with a character outside latin-1 cannot be sent at all (the daemon died of it: exit 70,
    UnicodeEncodeError from http.client); control characters go out as they are, and a server refuses
    the request or the key. It is the configuration's fault: 78 at load, one line, key not shown."""
    state = tmp_path / "state"
    seed_key(state)
    config = agent_config(tmp_path, secret_lab.url, secret_lab.directory, SECRET + bad)
    done = launcher.run(agent_argv(*run_args(config, state, once=True)), timeout=60)
    assert done.returncode == 78 and len(done.stderr.splitlines()) == 1 and "'vault.api-key" in done.stderr, done.stderr
    assert SECRET not in done.stderr


def test_configuration_objects_do_not_show_the_key(secret_lab_dir: Path) -> None:
    cfg = VaultConfig(url="https://vault.example/v1/", api_key=SECRET, ca_file=None, allow_insecure_http=False,
                      trusted_account_keys=(), connect_timeout=1.0, timeout=1.0)
    client = vault.Vault(cfg)
    try:
        assert SECRET not in repr(cfg) and SECRET not in str(cfg) and SECRET not in repr(client)
        assert client.verify == vault.system_ca_bundle() and client.verify  # verification on, system store
    finally:
        client.close()


# ---- TLS verification and the size cap, statically -----------------------------------------------


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: "subprocess.run", "os.system", "asyncio.create_subprocess_exec"."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_nothing_in_agent_turns_tls_verification_off() -> None:
    for path in sorted(AGENT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            for kw in call.keywords:
                assert not (kw.arg == "verify" and isinstance(kw.value, ast.Constant) and kw.value.value in (False, None)), \
                    f"{path.name}:{call.lineno}: verify={kw.value.value}"
            assert "_create_unverified_context" not in _name(call.func), f"{path.name}:{call.lineno}"
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr in ("CERT_NONE", "check_hostname")
                        and path.name != "labvault.py"), f"{path.name}:{node.lineno}: {node.attr}"


def test_the_size_cap_tests_exist() -> None:
    """The response-size cap is tested elsewhere; this keeps the references in the docstring true."""
    assert vault.MAX_RESPONSE_BYTES <= 1024 * 1024
    assert "def test_oversized_answers_are_transient" in (REPO / "tests/http/test_vault_client.py").read_text()
    assert "def test_an_oversized_answer_is_transient" in (REPO / "tests/system/test_run.py").read_text()


# ---- no shell ------------------------------------------------------------------------------------

SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
               "asyncio.create_subprocess_shell", "pty.spawn", "commands.getoutput"}
PROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                 "subprocess.check_output", "asyncio.create_subprocess_exec"}


def test_agent_never_involves_a_shell() -> None:
    spawners: dict[str, list[str]] = {}
    for path in sorted(AGENT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "asyncio", "pty"):
                imported = {f"{node.module}.{alias.name}" for alias in node.names}
                assert not imported & (SHELL_CALLS | PROCESS_CALLS), f"{path.name}:{node.lineno}: from-import of {imported}"
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{path.name}:{call.lineno}: {name}"
            assert name not in SHELL_CALLS, where
            assert not re.fullmatch(r"os\.(exec|spawn|posix_spawn)\w*", name), where
            assert not name.endswith(("subprocess_shell", "create_subprocess_shell")), where
            for kw in call.keywords:
                assert not (kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)), where
            if name in PROCESS_CALLS:
                command = call.args[0] if call.args else None
                assert isinstance(command, (ast.List, ast.Tuple, ast.Starred, ast.Name)), f"{where}: command is not a list"
                spawners.setdefault(path.stem, []).append(f"{name}:{call.lineno}")
    # the places that start a program, each looked at: keys (the keygen interpreter, the daemon's one child) and
    # absent (`status` with no daemon asks systemctl and journalctl: the CLI only, never the daemon, argv
    # lists with a fixed environment) and bundle (`support-bundle`, the CLI only: this agent's own status, check
    # and identity as `python -m agent`, journalctl and systemctl, argv lists, stdin closed, each with a timeout)
    # and hwsign (secure onboarding: this interpreter as `-m agent.hwsign`, an argv list, the order as JSON on
    # stdin, bounded by SIGN_TIMEOUT and killed when cancelled); a new one needs a look, then a line here
    assert set(spawners) == {"keys", "absent", "bundle", "hwsign"}, spawners
