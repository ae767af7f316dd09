"""The local adversary (issue 11): planted and odd files, a second instance, a crash that would dump secrets.

Each attack runs against the real `factory-agent run` process and the lab vault on 127.0.0.1, with
real files, FIFOs, symlinks and another uid (65534) owning them, and asserts the good outcome: the
planted thing is refused with its path and what is wrong, exit 78, nothing changed on disk and
nothing sent to the vault; a second instance exits without touching the first one's files; a
crashing daemon leaves no core and nothing of its secrets on disk.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO
from tests.fakes import launcher, peak
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import Agent, agent_argv, agent_env, run_args

NOBODY = 65534
EX_CONFIG = 78
SOC_SERIAL = "00000000a77ac401"
KEY_ID = (DATA / "device" / "device-key.id").read_text().strip()
ENV = agent_env()


def daemon_argv(config: Path, state: Path, *extra: str) -> list[str]:
    return agent_argv(*run_args(config, state, *extra))


def run_once(config: Path, state: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = launcher.run(daemon_argv(config, state, "--once"), env=ENV, timeout=timeout)
    return done, time.monotonic() - started


Snapshot = dict[str, tuple[int, int, int, int, bytes]]


def snapshot(state: Path) -> Snapshot:
    """Every entry (and the directory): type and mode, owner, group, size, and the bytes of regular files only
    (a FIFO is never opened, a sparse 600 MiB file is hashed by its size and first bytes)."""
    found: Snapshot = {}
    for path in [state, *sorted(state.iterdir())]:
        st = path.lstat()
        data = b""
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                data = f.read(64 * 1024)
        found["." if path == state else path.name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, data)
    return found


def refused(done: subprocess.CompletedProcess[str], *parts: str) -> str:
    """Exit 78 and one stderr line naming every part; no traceback."""
    lines = done.stderr.splitlines()
    assert done.returncode == EX_CONFIG and len(lines) == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture
def config(tmp_path: Path, lab: FaultyVault) -> Path:
    return write_agent_config(tmp_path, lab.url, lab.directory, template="ADV-{soc_serial}", soc_serial=SOC_SERIAL)


def partial_state(where: Path) -> Path:
    """Key and state.json (key-ready), as a boot that was cut short before registering leaves them."""
    seed_key(where)
    (where / "state.json").write_text(json.dumps({"schema": 1, "phase": "key-ready", "key-id": KEY_ID}) + "\n")
    (where / "state.json").chmod(0o600)
    return where


def vault_calls(lab: FaultyVault) -> int:
    return sum(lab.requests.values())


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: files of another uid")


# ---- attack 4: a state directory or key the agent does not own ------------------------------------


def _dir_0777(state: Path, tmp: Path) -> list[str]:
    state.chmod(0o777)
    return [f"cannot use state directory {state}: it is writable by others (mode 0777); run: chmod 0700 {state}"]


def _dir_of_nobody(state: Path, tmp: Path) -> list[str]:
    for path in (state, *state.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    return [f"cannot use state directory {state}: it is owned by uid {NOBODY}, not by the agent's uid 0"]


def _dir_symlink(state: Path, tmp: Path) -> list[str]:
    real = tmp / "elsewhere"
    state.rename(real)
    state.symlink_to(real)
    return [f"cannot use state directory {state}: it is a symbolic link"]


def _key_symlink_to_another_users_file(state: Path, tmp: Path) -> list[str]:
    """The attack: device-key.pem -> a key nobody owns and keeps (and so can read and use)."""
    planted = tmp / "nobodys-key.pem"
    shutil.copy(DATA / "brand" / "brand-key.pem", planted)
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o600)
    (state / "device-key.pem").unlink()
    (state / "device-key.pem").symlink_to(planted)
    return [f"cannot use {state / 'device-key.pem'}: it is a symbolic link"]


def _key_of_nobody(state: Path, tmp: Path) -> list[str]:
    os.chown(state / "device-key.pem", NOBODY, NOBODY)
    return [f"cannot use {state / 'device-key.pem'}: it is owned by uid {NOBODY}, not by the agent's uid 0"]


def _key_readable(state: Path, tmp: Path) -> list[str]:
    (state / "device-key.pem").chmod(0o644)
    return [f"cannot use {state / 'device-key.pem'}: it is readable by others (mode 0644); run: chmod 0600"]


def _state_json_of_nobody(state: Path, tmp: Path) -> list[str]:
    os.chown(state / "state.json", NOBODY, NOBODY)
    return [f"cannot use {state / 'state.json'}: it is owned by uid {NOBODY}"]


def _state_json_writable(state: Path, tmp: Path) -> list[str]:
    (state / "state.json").chmod(0o666)
    return [f"cannot use {state / 'state.json'}: it is writable by others (mode 0666); run: chmod go-w"]


PLANTED = {
    "state-dir-0777": _dir_0777, "state-dir-of-another-uid": _dir_of_nobody, "state-dir-symlink": _dir_symlink,
    "key-symlink-to-another-users-key": _key_symlink_to_another_users_file, "key-of-another-uid": _key_of_nobody,
    "key-readable-by-others": _key_readable, "state-json-of-another-uid": _state_json_of_nobody,
    "state-json-writable-by-others": _state_json_writable,
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_what_the_agent_does_not_own_is_refused_and_left_alone(case: str, tmp_path: Path, config: Path,
                                                               lab: FaultyVault) -> None:
    need_root()
    state = partial_state(tmp_path / "state")
    parts = PLANTED[case](state, tmp_path)
    before = snapshot(state)
    done, _ = run_once(config, state)
    refused(done, *parts)
    assert snapshot(state) == before  # nothing changed on disk, not a mode
    assert vault_calls(lab) == 0  # and nothing signed for a key the agent does not own


# ---- attack 8: files that are not what they seem ---------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


def _to_dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _huge(path: Path) -> None:
    with open(path, "wb") as f:  # sparse: 600 MiB to read, nothing on disk
        f.truncate(600 * 1024 * 1024)
    path.chmod(0o600)


HUNG = 30.0  # far beyond the ~0.1 s a refusal takes, and far short of "forever"
ODD = {"fifo": (_fifo, "it is a FIFO, not a regular file"), "dev-zero": (_to_dev_zero, "it is a symbolic link"),
       "600-mib": (_huge, "it is 629145600 bytes, more than the")}


@pytest.mark.parametrize("name", ["state.json", "device-key.pem", "serial.assertion"])
@pytest.mark.parametrize("odd", sorted(ODD))
def test_odd_files_are_refused_at_once_in_bounded_memory(name: str, odd: str, tmp_path: Path, config: Path,
                                                         lab: FaultyVault) -> None:
    """A FIFO used to hang the daemon forever with no log line; /dev/zero and 600 MiB ate gigabytes."""
    state = partial_state(tmp_path / "state")
    make, why = ODD[odd]
    make(state / name)
    before = snapshot(state)
    err = tmp_path / "stderr"
    started = time.monotonic()
    with open(err, "w") as stderr:
        proc = peak.run(daemon_argv(config, state, "--once"), tmp_path / "peak", cwd=REPO, env=ENV, stderr=stderr,
                        start_new_session=True)
        try:
            proc.wait(timeout=HUNG)  # a daemon stuck on the FIFO would otherwise stall the suite
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - started
    assert elapsed < HUNG, f"still running after {HUNG:g} s: killed"
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err.read_text())
    refused(done, str(state / name), why)
    assert snapshot(state) == before and vault_calls(lab) == 0
    peak_kib = peak.peak_kib(tmp_path / "peak")
    print(f"{name} {odd}: refused in {elapsed:.2f} s, peak RSS {peak_kib / 1024:.1f} MiB")
    assert peak_kib < 100 * 1024


# ---- attack 5: one agent per state directory -------------------------------------------------------


def start_daemon(config: Path, state: Path, stderr: Path) -> Agent:
    return Agent(*run_args(config, state), env=ENV, stdin=None, stdout=None, stderr_file=stderr)


def wait_for_line(path: Path, text: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


@pytest.fixture
def stop_all() -> Iterator[list[Agent]]:
    procs: list[Agent] = []
    yield procs
    for proc in procs:
        proc.kill()  # and reaped


def test_a_second_instance_beside_a_running_daemon_changes_nothing(tmp_path: Path, config: Path, lab: FaultyVault,
                                                                   stop_all: list[Agent]) -> None:
    """It used to delete the running daemon's in-flight temp file, which then died on "cannot write state.json"."""
    state = partial_state(tmp_path / "state")
    lab.faults.delay = 8.0  # the first daemon waits on its request-id meanwhile, mid-registration, writing nothing
    first = start_daemon(config, state, tmp_path / "first.err")
    stop_all.append(first)
    wait_for_line(tmp_path / "first.err", "state requesting")
    deadline = time.monotonic() + 30  # its identity, gathered beside the request-id, is recorded (one write)
    while '"step": "identity"' not in (state / "state.json").read_text():
        assert time.monotonic() < deadline, "the first daemon never recorded its identity"
        time.sleep(0.02)
    in_flight = state / ".state.json.inflight.tmp"  # as the first daemon's write_durable has it between open and rename
    in_flight.write_bytes(b"{}")
    before = snapshot(state)
    done, _ = run_once(config, state)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"factory-agent: another factory-agent holds {state}: one agent per state directory"], done.stderr
    assert in_flight.exists() and snapshot(state) == before
    assert first.poll() is None  # the first goes on
    lab.faults.delay = 0.0
    wait_for_line(tmp_path / "first.err", "state registered")
    assert first.poll() is None


def test_two_agents_started_together_make_one_key_and_one_registration(tmp_path: Path, config: Path,
                                                                       lab: FaultyVault) -> None:
    """The loser used to loop making RSA-4096 keys on "already exists" and write unregistered over the winner."""
    state = tmp_path / "state"
    lab.faults.delay = 0.5  # each exchange takes a while: the two overlap
    procs = [Agent(*run_args(config, state, once=True), env=ENV, stdin=None, stdout=None) for _ in range(2)]
    results = []
    for proc in procs:
        results.append((proc.wait_exit(120), proc.stderr))
    locked = [r for r in results if r[0] == 1]
    won = [r for r in results if r[0] == 0]
    assert len(won) >= 1, results
    for _, stderr in locked:
        assert stderr.splitlines() == [f"factory-agent: another factory-agent holds {state}: one agent per state "
                                       "directory"], stderr
    assert all("Traceback" not in stderr for _, stderr in results)
    assert json.loads((state / "state.json").read_text())["phase"] == "registered"
    assert lab.requests[("POST", "/v1/serial")] == 1  # one key, one registration
    assert sorted(p.name for p in state.iterdir()) == ["device-key.pem", "serial.assertion", "state.json"]


# ---- attack 7: no core, nothing of the secrets on disk ---------------------------------------------


def _unlimited_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _core_files(where: Path) -> list[Path]:
    return [p for p in where.rglob("*") if p.name == "core" or p.name.startswith("core.")]


def _plain_core_pattern() -> bool:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    return not pattern.startswith("|") and "/" not in pattern


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_a_crashing_daemon_leaves_no_core_and_no_secret_on_disk(sig: signal.Signals, tmp_path: Path, config: Path,
                                                                lab: FaultyVault,
                                                                stop_all: list[Agent]) -> None:
    """The daemon holds the api-key and the device key (mid-registration) when it crashes, from a shell that
    allows cores; a plain process crashing the same way beside it does leave a core, so the check can fail."""
    if not _plain_core_pattern():
        pytest.skip("core_pattern is not a plain file name: cores would not land in the working directory")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    control = subprocess.run([sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"], cwd=cwd,
                             preexec_fn=_unlimited_core, check=False)
    assert control.returncode == -sig and _core_files(cwd), "the control process left no core: cannot test"
    for core in _core_files(cwd):
        core.unlink()
    state = partial_state(tmp_path / "state")
    lab.faults.accepted_times = 1000  # polling: the key is loaded and the api-key in every request
    daemon = Agent(*run_args(config, state), env=ENV, cwd=cwd, stdin=None, stdout=None,
                   stderr_file=tmp_path / "daemon.err", preexec_fn=_unlimited_core)
    stop_all.append(daemon)
    wait_for_line(tmp_path / "daemon.err", "state polling")
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"] for line in limits.splitlines())
    daemon.send_signal(sig)
    assert daemon.wait(timeout=30) == -sig
    assert _core_files(cwd) == [] and _core_files(state) == []
    secrets = [lab.api_key.encode(), (DATA / "device" / "device-key.pem").read_bytes().splitlines()[1]]
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        if path != state / "device-key.pem":
            assert not any(secret in data for secret in secrets), path


def test_the_key_generation_child_dumps_no_core_either(tmp_path: Path, config: Path,
                                                       stop_all: list[Agent]) -> None:
    state = tmp_path / "state"
    daemon = Agent(*run_args(config, state), env=ENV, cwd=tmp_path, stdin=None, stdout=None,
                   stderr_file=tmp_path / "daemon.err", preexec_fn=_unlimited_core)
    stop_all.append(daemon)
    deadline, child = time.monotonic() + 60, None
    while child is None:  # the child runs for seconds (RSA-4096): find it among the daemon's children
        assert time.monotonic() < deadline, "no key generation child seen"
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        for pid in children:
            try:
                if b"agent.keygen" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    child = pid
                    limits = Path(f"/proc/{pid}/limits").read_text()
            except FileNotFoundError:
                continue
        time.sleep(0.01)
    assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"] for line in limits.splitlines())
