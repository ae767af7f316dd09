"""snapd mode end to end: a client that behaves as snapd does drives the agent's relay against the lab vault.

The agent is the real daemon (`run --bus session`, mode = "snapd") on the private
bus; the settings come from the hook, through the fake snapctl, as snapd would
read them; the vault is the lab vault on 127.0.0.1. What snapd would see is
checked on the client's side, what the technician sees on D-Bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent import assertions, keys, registration, store
from agent.labvault import Forced, LabVault
from tests.dbus.conftest import Daemon, Recorder, owned, wait_for
from tests.fakes.snapd_client import USER_AGENT, Attempt, SnapdClient
from tests.fakes.snapdmode import SOC_SERIAL, hook_env, run_hook, set_values, snapctl_calls, write_snapd_config


class SnapdMode:
    """The agent in snapd mode, and the settings its hook gave snapd."""

    def __init__(self, tmp: Path, bus_address: str, backend: str, lab: LabVault, api_key_file: Path | None = None) -> None:
        self.tmp, self.bus_address, self.lab = tmp, bus_address, lab
        self.state, self.backend = tmp / "state", backend
        self.config = write_snapd_config(tmp, lab.url, lab.directory, api_key_file=api_key_file)
        self.start()
        self.model = assertions.decode((lab.directory / "model.assert").read_bytes())

    def start(self) -> None:
        """The daemon, then the hook as snapd runs it at each attempt (the relay's port is new each start)."""
        self.daemon = Daemon(self.bus_address, self.backend, self.config, self.state)
        wait_for(lambda: owned(self.bus_address))
        hook = run_hook(hook_env(self.tmp, self.bus_address, self.backend))
        assert hook.returncode == 0, hook.stderr
        self.settings = {k: str(v) for k, v in set_values(snapctl_calls(self.tmp)[-1]).items()}

    def restart(self) -> str:
        log = self.stop()
        wait_for(lambda: not owned(self.bus_address))
        self.start()
        return log

    def client(self, key: keys.DeviceKey) -> SnapdClient:
        return SnapdClient(self.settings, key, self.model)

    def register(self, key: keys.DeviceKey) -> tuple[Any, dict[str, Any]]:
        """One snapd registration through the relay, and the properties once State is registered."""
        attempt = self.client(key).register()
        return attempt, self.props(until=lambda p: p.get("State") == "registered")

    def props(self, until: Any = None) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            async with Recorder(self.bus_address) as rec:
                if until is not None:
                    box: dict[str, Any] = {}

                    async def check() -> bool:
                        box.update(await rec.get_all())
                        return bool(until(box))

                    deadline = asyncio.get_running_loop().time() + 20
                    while not await check():
                        assert asyncio.get_running_loop().time() < deadline, box
                        await asyncio.sleep(0.05)
                return await rec.get_all()

        return asyncio.run(read())

    def stop(self) -> str:
        log = self.daemon.stop()
        assert "Traceback" not in log and self.lab.api_key not in log
        return log


def _serial_posts(lab: LabVault) -> int:
    return lab.requests[("POST", "/v1/serial")]


def test_a_snapd_registration_through_the_relay(tmp_path: Path, bus_address: str, backend: str, lab: LabVault,
                                                device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt, props = mode.register(device_key)
    finally:
        mode.stop()
    assert attempt.error == "" and attempt.serial is not None
    assert [(endpoint, a.status) for endpoint, a in attempt.answers] == [("request-id", 200), ("serial", 200)]
    assert attempt.serial.header("serial") == f"SNAPD-{SOC_SERIAL}"  # the hook's proposed serial
    assert attempt.serial.body.decode() == mode.settings["registration.body"]  # the identity, in the serial
    assert props["State"] == "registered" and props["Serial"] == f"SNAPD-{SOC_SERIAL}"
    assert props["DeviceKeyId"] == device_key.key_id  # snapd's key, which the agent never held
    assert props["LastError"] == "" and props["Action"] == ""
    assert (mode.state / store.SERIAL_FILE).read_bytes() == attempt.serial.encode()  # recorded durably
    assert not (mode.state / store.DEVICE_KEY_FILE).exists()  # no key generated in snapd mode
    recorded = json.loads((mode.state / store.STATE_FILE).read_text())
    assert (recorded["phase"], recorded["key-id"]) == ("registered", device_key.key_id)
    (request,) = [a for a in lab.signed]
    assert request.header("device-key-sha3-384") == device_key.key_id


def test_a_registered_agent_answers_snapds_new_serial_request_from_disk(tmp_path: Path, bus_address: str, backend: str,
                                                                        lab: LabVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        first = mode.client(device_key).register()
        mode.props(until=lambda p: p.get("State") == "registered")
        mode.restart()
        lab.faults.status["serial"] = [Forced(400)] * 3  # a vault that refuses a second request for this device
        posts = _serial_posts(lab)
        again = mode.client(device_key).register()  # snapd lost its serial (or never stored it): a new attempt
        props = mode.props()
        posts_after = _serial_posts(lab)
    finally:
        mode.stop()
    assert first.serial is not None and again.error == "" and again.serial is not None
    assert again.serial.encode() == first.serial.encode()  # the very serial the agent holds
    (_, answer) = again.answers[-1]
    assert (answer.status, answer.content_type) == (200, "application/x.ubuntu.assertion")
    assert posts_after == posts  # the vault saw no new /serial call
    assert props["State"] == "registered" and props["LastError"] == ""


def test_snapds_capabilities_and_user_agent_reach_the_vault_but_no_client_api_key(
        tmp_path: Path, bus_address: str, backend: str, lab: LabVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        client = mode.client(device_key)
        client.extra_headers = {"Api-Key": "a-key-from-the-client", "X-Other": "not for the vault"}
        attempt = client.register()
    finally:
        mode.stop()
    assert attempt.error == "" and attempt.serial is not None
    seen = dict(lab.seen_headers)
    assert seen["/v1/request-id"]["user-agent"] == USER_AGENT and seen["/v1/serial"]["user-agent"] == USER_AGENT
    assert seen["/v1/serial"]["snap-device-capabilities"] == "serial-stream"
    assert seen["/v1/serial"]["content-type"] == "application/x.ubuntu.assertion"
    for headers in seen.values():
        assert headers["api-key"] == "valid" and "x-other" not in headers  # the agent's key, never the client's


def test_a_vault_refusal_reaches_snapd_as_json_and_shows_on_dbus(tmp_path: Path, bus_address: str, backend: str,
                                                                 lab: LabVault, device_key: keys.DeviceKey) -> None:
    wrong = tmp_path / "wrong-api-key"
    wrong.write_text("not-the-vaults-key\n")
    mode = SnapdMode(tmp_path, bus_address, backend, lab, api_key_file=wrong)
    try:
        attempt = mode.client(device_key).register()
        props = mode.props(until=lambda p: p.get("LastError") == "invalid-api-key")
    finally:
        mode.stop()
    (endpoint, answer), = attempt.answers
    assert (endpoint, answer.status, answer.content_type) == ("request-id", 400, "application/json")
    assert json.loads(answer.body)["message"] == "Invalid API key used"  # the vault's own words
    assert attempt.error == "cannot retrieve request-id for making a request for a serial: Invalid API key used"
    assert props["State"] == "blocked"
    assert props["Action"] == registration.ACTIONS["invalid-api-key"]
    assert "Invalid API key used" in props["LastErrorMessage"]


def test_the_relay_refuses_another_brand_and_a_second_device_key(tmp_path: Path, bus_address: str, backend: str,
                                                                 lab: LabVault, device_key: keys.DeviceKey,
                                                                 small_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        other_brand = mode.client(device_key).register(brand="other-brand")
        after_brand = mode.props(until=lambda p: p.get("LastError") == "relay-wrong-model")
        posts = _serial_posts(lab)
        registered = mode.client(device_key).register()
        second_key = mode.client(small_key).register()
        url = mode.settings["device-service.url"]
        junk = _raw_exchange(url, f"POST /v1/serial HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n"
                                  "Content-Type: application/x.ubuntu.assertion\r\n"
                                  "Content-Length: 4\r\n\r\njunk".encode())
        after_key = mode.props()
        posts_after = _serial_posts(lab)
    finally:
        log = mode.stop()
    _assert_refused(other_brand, "relay-wrong-model", "brand 'other-brand'")
    assert posts == 0  # it never reached the vault
    assert after_brand["State"] == "blocked" and after_brand["Action"] == registration.ACTIONS["relay-wrong-model"]
    assert registered.error == "" and registered.serial is not None  # snapd's next attempt unblocks and registers
    _assert_refused(second_key, "relay-other-device-key", small_key.key_id)
    assert posts_after == posts + 1  # the registration only
    assert junk.startswith(b"HTTP/1.1 400 ") and b'"relay-bad-request"' in junk
    # After registration a refused caller is not the device's error: nothing recorded, one log line each.
    assert after_key["State"] == "registered" and after_key["DeviceKeyId"] == device_key.key_id
    assert after_key["LastError"] == "" and after_key["LastErrorMessage"] == "" and after_key["Action"] == ""
    assert log.count("relay refused a request after registration") == 2


def _assert_refused(attempt: Attempt, code: str, detail: str) -> None:
    endpoint, answer = attempt.answers[-1]
    assert (endpoint, answer.status, answer.content_type) == ("serial", 400, "application/json")
    body = json.loads(answer.body)
    assert body["error_code"] == code and detail in body["message"]
    assert attempt.error == f"cannot deliver device serial request: {body['message']}"


def test_202_and_5xx_pass_through_so_snapd_polls_and_retries(tmp_path: Path, bus_address: str, backend: str,
                                                             lab: LabVault, device_key: keys.DeviceKey) -> None:
    lab.faults.status["serial"] = [Forced(503)]
    lab.faults.accepted_times = 1
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt, props = mode.register(device_key)
    finally:
        mode.stop()
    statuses = [(endpoint, a.status, a.content_type) for endpoint, a in attempt.answers]
    assert statuses == [("request-id", 200, "application/json; charset=UTF-8"),
                        ("serial", 503, "application/json"),  # the vault's text/plain 503, made JSON for snapd
                        ("request-id", 200, "application/json; charset=UTF-8"),
                        ("serial", 202, None), ("serial", 200, "application/x.ubuntu.assertion")]
    assert attempt.serial is not None and props["Serial"] == attempt.serial.header("serial")
    assert props["LastError"] == ""


def test_a_serial_the_agent_cannot_trust_is_not_handed_to_snapd(tmp_path: Path, bus_address: str, backend: str,
                                                                lab: LabVault, device_key: keys.DeviceKey) -> None:
    lab.faults.untrusted_key = True
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        attempt = mode.client(device_key).register()
        props = mode.props(until=lambda p: p.get("LastError") == "serial-rejected")
    finally:
        mode.stop()
    endpoint, answer = attempt.answers[-1]
    assert (endpoint, answer.status, answer.content_type) == ("serial", 400, "application/json")
    assert "not trusted" in json.loads(answer.body)["message"] and attempt.serial is None
    assert props["State"] == "blocked" and props["Action"] == registration.ACTIONS["serial-rejected"]
    assert not (mode.state / store.SERIAL_FILE).exists()


def _raw_exchange(url: str, data: bytes, half_close: bool = True) -> bytes:
    """Send ``data`` to the relay as any local process could, and read whatever comes back."""
    import socket

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


MALFORMED = [
    b"POST /v1/serial HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",  # int() of it raises ValueError
    b"\x00\xff GARBAGE \xfe\r\n\r\n",
    b"POST /v1/serial HTTP/1.1\r\nthis header has no colon\r\n\r\n",
    b"POST /v1/serial HTTP/1.1\r\nContent-Length: 100\r\n\r\ntruncated",
    "POST /v1/s\u00e9rial HTTP/1.1\r\nX-\u00e9: \u2603\r\nContent-Length: \u0663\r\n\r\n".encode("utf-8"),
]


def test_malformed_requests_neither_crash_the_daemon_nor_stop_it_serving(tmp_path: Path, bus_address: str, backend: str,
                                                                         lab: LabVault, device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        answers = [_raw_exchange(mode.settings["device-service.url"], data) for data in MALFORMED]
        alive = mode.daemon.proc.poll() is None
        attempt, props = mode.register(device_key)
    finally:
        log = mode.stop()
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] in (b"400", b"413"), answer
        assert b"Content-Type: application/json\r\n" in head and json.loads(body)["error_code"] == "relay-bad-request"
    assert alive and attempt.error == "" and props["State"] == "registered"
    assert "internal error" not in log and log.count("refused a malformed request") == len(MALFORMED)


NOBODY = 65534
CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
with socket.create_connection((host, port), timeout=10) as sock:
    sock.sendall(f"POST /v1/request-id HTTP/1.1\\r\\nHost: {host}:{port}\\r\\nContent-Length: 0\\r\\n\\r\\n".encode())
    sys.stdout.buffer.write(b"".join(iter(lambda: sock.recv(65536), b"")))
"""


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody (and the relay takes root only)")
def test_a_client_that_is_not_root_is_refused(tmp_path: Path, bus_address: str, backend: str, lab: LabVault,
                                              device_key: keys.DeviceKey) -> None:
    mode = SnapdMode(tmp_path, bus_address, backend, lab)
    try:
        where = urlsplit(mode.settings["device-service.url"])
        nobody = subprocess.run([sys.executable, "-c", CLIENT, str(where.hostname), str(where.port)],
                                preexec_fn=_as_nobody, capture_output=True, timeout=30, cwd="/")
        ids_after_nobody = lab.requests[("POST", "/v1/request-id")]
        attempt = mode.client(device_key).register()  # root, as snapd
    finally:
        log = mode.stop()
    head, _, body = nobody.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), nobody
    assert b"Content-Type: application/json\r\n" in head and json.loads(body)["error_code"] == "relay-forbidden"
    assert ids_after_nobody == 0  # nothing reached the vault
    assert attempt.error == "" and attempt.serial is not None
    assert "refused a process of uid 65534" in log
