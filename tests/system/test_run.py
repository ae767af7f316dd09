"""`factory-agent run --once` as a real process against the real lab vault on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import assertions, registration, serials
from tests.conftest import DATA
from tests.fakes import launcher
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault, Forced
from tests.fakes.launcher import Agent, agent_argv, agent_env, run_args

SOC_SERIAL = "00000000c0ffee01"


def write_config(tmp: Path, url: str, lab_dir: Path, extra: str = "") -> Path:
    return write_agent_config(tmp, url, lab_dir, template="ACME-{soc_serial}", soc_serial=SOC_SERIAL, vault_extra=extra)


def run_once(config: Path, state: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv(*run_args(config, state, once=True)), timeout=timeout)


def assert_registered(done: subprocess.CompletedProcess[str], state: Path, lab: FaultyVault) -> assertions.Assertion:
    assert done.returncode == 0, done.stderr
    serial_text = (state / "serial.assertion").read_bytes()
    trusted = assertions.decode_stream((lab.directory / "brand.account-key").read_bytes())
    key_id = (DATA / "device" / "device-key.id").read_text().strip() if (state / "device-key.pem").read_bytes() == (
        DATA / "device" / "device-key.pem").read_bytes() else assertions.decode(serial_text).header("device-key-sha3-384")
    serial = serials.check_serial(serial_text, brand="acme", model="acme-gw", key_id=key_id, trusted=trusted)
    assert serial.header("serial") == f"ACME-{SOC_SERIAL}"
    assert f"state registered: serial ACME-{SOC_SERIAL}" in done.stderr
    assert "Traceback" not in done.stderr
    return serial


def test_first_boot_generates_the_key_and_registers(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    serial = assert_registered(done, state, lab)
    assert (state / "device-key.pem").stat().st_mode & 0o777 == 0o600
    assert serial.body == b'hardware:\n  soc-serial: "00000000c0ffee01"\n' or b"soc-serial" in serial.body
    assert lab.requests[("POST", "/v1/request-id")] == 1 and lab.requests[("POST", "/v1/serial")] == 1


def test_the_second_run_makes_no_request(tmp_path: Path, lab: FaultyVault) -> None:
    state, config = tmp_path / "state", write_config(tmp_path, lab.url, lab.directory)
    seed_key(state)
    assert_registered(run_once(config, state), state, lab)
    before = sum(lab.requests.values())
    lab.stop()  # not even reachable: a registered device does not need it
    started = time.monotonic()
    done = run_once(config, state)
    assert done.returncode == 0 and "state registered" in done.stderr
    assert sum(lab.requests.values()) == before and time.monotonic() - started < 10


def test_model_assertion_is_appended_after_one_empty_line(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    seen: list[bytes] = []
    original = lab.respond

    def spy(method, path, api_key, body):
        if path.endswith("/serial"):
            seen.append(body or b"")
        return original(method, path, api_key, body)

    lab.respond = spy  # type: ignore[method-assign]
    assert_registered(run_once(write_config(tmp_path, lab.url, lab.directory), state), state, lab)
    request, model = assertions.decode_stream(seen[0])
    assert (request.type, model.type) == ("serial-request", "model")
    assert seen[0].count(b"\n\ntype: model\n") == 1


def test_202_then_200(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.status["serial"] = [Forced(202, retry_after="1"), Forced(202, retry_after="1")]
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert_registered(done, state, lab)
    assert lab.requests[("POST", "/v1/serial")] == 3 and "state polling" in done.stderr


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_then_200(tmp_path: Path, lab: FaultyVault, status: int) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.status["request-id"] = [Forced(status, retry_after="1")]
    lab.faults.status["serial"] = [Forced(status)]
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert_registered(done, state, lab)
    assert f"HTTP {status}" in done.stderr and "state waiting-retry" in done.stderr


def test_429_waits_past_its_retry_after_in_the_crowd_window(tmp_path: Path, lab: FaultyVault) -> None:
    """A 429's Retry-After is a floor: the device spreads itself over the crowd window (registration.crowded)."""
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.status["request-id"] = [Forced(429, retry_after="2")]
    started = time.monotonic()
    assert_registered(run_once(write_config(tmp_path, lab.url, lab.directory), state), state, lab)
    assert time.monotonic() - started >= registration.CROWD_BASE / 2


def test_invalid_nonce_then_success(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.error_code["serial"] = ["invalid-nonce"]
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert_registered(done, state, lab)
    assert lab.requests[("POST", "/v1/request-id")] == 2  # a fresh request-id, at once


def test_invalid_api_key_blocks_with_the_vaults_message(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    config = write_config(tmp_path, lab.url, lab.directory)
    (tmp_path / "wrong-key").write_text("not-the-key\n")
    (tmp_path / "wrong-key").chmod(0o600)
    config.write_text(config.read_text().replace(f'"{lab.directory / "api-key"}"', f'"{tmp_path / "wrong-key"}"'))
    done = run_once(config, state)
    assert done.returncode == 1
    assert "invalid-api-key: Invalid API key used" in done.stderr and "check vault.api-key-file" in done.stderr
    assert "not-the-key" not in done.stderr and "Traceback" not in done.stderr
    assert not (state / "serial.assertion").exists()


@pytest.mark.parametrize(
    ("fault", "message"),
    [("other_device_key", "does not match"), ("bad_signature", "does not verify"), ("untrusted_key", "not trusted"),
     ("wrong_brand", "does not match")],
)
def test_a_serial_that_is_not_ours_is_rejected_never_stored(tmp_path: Path, lab: FaultyVault, fault: str, message: str) -> None:
    state = tmp_path / "state"
    seed_key(state)
    setattr(lab.faults, fault, "other-brand" if fault == "wrong_brand" else True)
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert done.returncode == 1 and "serial-rejected" in done.stderr and message in done.stderr
    assert not (state / "serial.assertion").exists()


def test_an_oversized_answer_is_transient(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    huge = b"type: serial\n" + b"x" * (2 * 1024 * 1024)
    lab.faults.status["serial"] = [Forced(200, body=huge, content_type="application/x.ubuntu.assertion")]
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert_registered(done, state, lab)
    assert "too large" in done.stderr and "vault-transient" in done.stderr
    assert lab.requests[("POST", "/v1/serial")] == 2


def test_vault_down_then_up(tmp_path: Path, lab_dir: Path) -> None:
    state = tmp_path / "state"
    seed_key(state)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, f"http://127.0.0.1:{port}/v1/", lab_dir)
    vault = FaultyVault(lab_dir)
    starter = threading.Timer(2.0, vault.start, kwargs={"port": port})
    starter.start()
    try:
        done = run_once(config, state)
    finally:
        starter.cancel()
        vault.stop()
    assert_registered(done, state, vault)
    assert "vault-unavailable" in done.stderr and "cannot reach the vault" in done.stderr


def _tls_setup(tmp: Path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


def test_https_with_the_test_ca_and_without_it(tmp_path: Path, lab_dir: Path) -> None:
    context, ca_file = _tls_setup(tmp_path)
    vault = FaultyVault(lab_dir)
    url = vault.start(ssl_context=context)
    try:
        assert url.startswith("https://")
        state = tmp_path / "state"
        seed_key(state)
        config = write_config(tmp_path, url, lab_dir, extra=f'ca-file = "{ca_file}"')
        assert_registered(run_once(config, state), state, vault)

        other = tmp_path / "other"
        other.mkdir()
        seed_key(other / "state")
        done = run_once(write_config(other, url, lab_dir), other / "state")  # system trust store only
        assert done.returncode == 1 and "tls-certificate" in done.stderr and "check vault.url and vault.ca-file" in done.stderr
    finally:
        vault.stop()


def _daemon(config: Path, state: Path) -> Agent:
    return Agent(*run_args(config, state), stdin=None, stdout=None)


def _wait_for(predicate, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [15, 2])
def test_the_daemon_keeps_serving_once_registered_and_stops_cleanly(tmp_path: Path, lab: FaultyVault, signum: int) -> None:
    state = tmp_path / "state"
    seed_key(state)
    proc = _daemon(write_config(tmp_path, lab.url, lab.directory), state)
    try:
        _wait_for(lambda: (state / "serial.assertion").exists() and b'"registered"' in (state / "state.json").read_bytes())
        time.sleep(0.3)
        assert proc.poll() is None  # without --once it stays up (to serve its status)
        stderr = proc.stop(10, signum)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr


def test_sigterm_during_key_generation_stops_at_once_and_leaves_no_key(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    lab.faults.status["request-id"] = [Forced(503, retry_after="60")]  # keep it busy with nothing else
    proc = _daemon(write_config(tmp_path, lab.url, lab.directory), state)
    try:
        _wait_for(lambda: (state / "state.json").exists() or lab.requests[("POST", "/v1/request-id")] > 0)
        time.sleep(0.2)  # the keygen child is running now
        started = time.monotonic()
        stderr = proc.stop(10)
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr
    leftovers = [p.name for p in state.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not _keygen_children(proc.pid)


def _keygen_children(parent: int) -> list[int]:
    """Key generation children of ``parent`` still alive (the keygen child is passed its parent's pid)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent.keygen" in argv and str(parent).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def test_a_config_error_names_file_and_key_and_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('brand = "acme"\nmodel = "acme-gw"\n[vault]\nurl = "http://vault.example/v1/"\n')
    done = run_once(config, tmp_path / "state")
    assert done.returncode == 78
    assert done.stderr.strip() == (f"factory-agent: {config}: 'vault.url' is http://: set vault.allow-insecure-http = true "
                                   "for a lab vault")


def test_sd_notify_ready_status_watchdog_and_stopping_from_the_real_daemon(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = agent_env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    proc = Agent(*run_args(write_config(tmp_path, lab.url, lab.directory), state), env=env, stdin=None, stdout=None)
    messages: list[str] = []
    try:
        while not any(m.startswith("STATUS=registered") for m in messages):
            messages += notify.recv(4096).decode().splitlines()
        time.sleep(0.5)  # the watchdog keeps pinging while it serves
        proc.terminate()
        proc.wait(timeout=10)
        notify.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                messages += notify.recv(4096).decode().splitlines()
    finally:
        proc.kill()
        notify.close()
    assert messages[0] == "READY=1" and messages[1].startswith("STATUS=")  # ready before any network
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert "STATUS=requesting" in statuses and statuses[-1] == f"STATUS=registered: serial ACME-{SOC_SERIAL}"
    assert messages.count("WATCHDOG=1") >= 2 and messages[-1] == "STOPPING=1"


def _record(state: Path, key_id: str) -> None:
    (state / "state.json").write_text(json.dumps({"schema": 1, "phase": "key-ready", "key-id": key_id}))


def test_a_recorded_key_is_loaded_in_the_background_and_used(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    _record(state, (DATA / "device" / "device-key.id").read_text().strip())
    assert_registered(run_once(write_config(tmp_path, lab.url, lab.directory), state), state, lab)


def test_a_key_file_that_is_not_the_recorded_key_blocks(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    _record(state, "x" * 64)
    done = run_once(write_config(tmp_path, lab.url, lab.directory), state)
    assert done.returncode == 1 and "device-key-lost" in done.stderr and "reflash" in done.stderr
    assert not (state / "serial.assertion").exists()
    assert (state / "device-key.pem").read_bytes() == (DATA / "device" / "device-key.pem").read_bytes()  # untouched


def test_run_once_timeout_gives_up_with_exit_3_naming_the_state(tmp_path: Path, lab: FaultyVault) -> None:
    """A vault that never answers (nothing listens on its port): --once alone would retry forever."""
    with socket.socket() as s:  # a port nothing listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_agent_config(tmp_path, f"http://127.0.0.1:{port}/v1/", lab.directory, template="T-{soc_serial}",
                                soc_serial="00000000000000t1")
    state = tmp_path / "state"
    seed_key(state)
    started = time.monotonic()
    done = launcher.run(agent_argv(*run_args(config, state, once=True), "--timeout", "3"), timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 3 and took < 30, (done.returncode, took, done.stderr)
    gave_up = [line for line in done.stderr.splitlines() if "gave up after 3 s (--timeout)" in line]
    assert len(gave_up) == 1 and "vault-unavailable" in gave_up[0] and gave_up[0] == done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
    recorded = json.loads((state / "state.json").read_text())  # left whole: the normal stop path
    assert recorded["phase"] == "key-ready" and recorded["serial"] == ""


def test_run_timeout_without_once_is_a_usage_error(tmp_path: Path) -> None:
    done = launcher.run(agent_argv("run", "--bus", "none", "--timeout", "3"), timeout=30)
    assert done.returncode == 2 and "--timeout needs --once" in done.stderr
