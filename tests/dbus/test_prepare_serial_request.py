"""hooks/prepare-serial-request (and prepare-device) for secure onboarding in snapd mode, as snapd 2.74+ runs them:
a fake snapctl on PATH (its `get registration.request-id` prints the id and a newline, as snapd's does), the real
agent on a private bus, its hardware identity key the vectors' RSA-2048 key (PKCS#1 v1.5 is deterministic, so the
body must be byte for byte the one snapd 2.77.1 accepted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agent.labvault import LabVault
from tests.dbus.conftest import Daemon, owned, wait_for
from tests.fakes.snapdmode import SERIAL_HOOK, hook_env, run_hook, set_values, snapctl_calls, write_snapd_config

SO = Path(__file__).resolve().parents[1] / "data" / "secure-onboarding"


def _hardware_identity_config(tmp: Path, lab: LabVault) -> Path:
    """snapd mode, onboarding with the vectors' RSA-2048 hardware identity key, and no api-key."""
    key = tmp / "identity" / "hardware-key.pem"
    key.parent.mkdir(mode=0o700)
    shutil.copy(SO / "hwid-rsa2048" / "hwid-key.pem", key)
    key.chmod(0o600)
    return write_snapd_config(tmp, lab.url, lab.directory, hardware_key=f"file:{key}")


def test_prepare_device_unsets_the_body_and_the_hook_sets_the_signed_one(tmp_path: Path, bus_address: str,
                                                                         backend: str, lab: LabVault) -> None:
    daemon = Daemon(bus_address, backend, _hardware_identity_config(tmp_path, lab), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        device = run_hook(hook_env(tmp_path, bus_address, backend))
        assert device.returncode == 0, device.stderr
        request_id = "REQ-ID-SO-0002"  # the vectors' serial-request/body.json signs this one
        signed = run_hook(hook_env(tmp_path, bus_address, backend, SNAPCTL_REQUEST_ID=request_id), hook=SERIAL_HOOK)
    finally:
        daemon.stop()
    assert signed.returncode == 0 and signed.stdout == "" and signed.stderr == "", signed
    calls = snapctl_calls(tmp_path)
    first = set_values(calls[0])
    assert set(first) == {"device-service.url", "device-service.headers", "registration.proposed-serial"}
    assert calls[1] == ["unset", "registration.body"]  # what the last attempt's hook left: snapd 2.74-2.77 choke on it
    assert calls[2] == ["get", "registration.request-id"]
    assert calls[3][0] == "set" and len(calls[3]) == 2
    key, _, raw = calls[3][1].partition("=")
    assert key == "registration.body" and raw.encode() == (SO / "serial-request" / "body.json").read_bytes()
    body = json.loads(raw)  # set without -s: a JSON object, which is how snapctl stores it
    assert body["hardware-id-key-sha384"] == body["hardware-id-key-sha3-384"]
    assert "Traceback" not in daemon.stderr


def test_an_api_key_agent_makes_the_hook_fail_with_one_line(tmp_path: Path, bus_address: str, backend: str,
                                                           lab: LabVault) -> None:
    daemon = Daemon(bus_address, backend, write_snapd_config(tmp_path, lab.url, lab.directory), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        done = run_hook(hook_env(tmp_path, bus_address, backend, SNAPCTL_REQUEST_ID="R-1"), hook=SERIAL_HOOK)
    finally:
        daemon.stop()
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "WrongMode" in done.stderr and "onboards with the api-key" in done.stderr
    assert [c[0] for c in snapctl_calls(tmp_path)] == ["get"]  # nothing set


def test_no_agent_and_no_request_id_each_fail_with_one_line(tmp_path: Path, bus_address: str) -> None:
    none = run_hook(hook_env(tmp_path, bus_address, SNAPCTL_REQUEST_ID="R-1"), hook=SERIAL_HOOK)
    assert none.returncode == 1 and len(none.stderr.splitlines()) == 1 and "did not sign" in none.stderr, none
    empty = run_hook(hook_env(tmp_path, bus_address), hook=SERIAL_HOOK)
    assert empty.returncode == 1 and "snapd set no registration.request-id" in empty.stderr
    assert all(c[0] == "get" for c in snapctl_calls(tmp_path))
