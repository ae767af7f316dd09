"""io.factoryagent.Agent1 served by the real daemon on a private bus, on dbus-next and on dbus-fast."""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.conftest import DATA
from tests.dbus.conftest import BUS_NAME, PATH, Daemon, Recorder, busctl, get_property, owned, seed_key, wait_for, write_config
from tests.fakes.faultyvault import FaultyVault, Forced

GOLDEN = DATA / "dbus" / "io.factoryagent.Agent1.xml"
PROPERTIES = ["State", "Serial", "Brand", "Model", "DeviceKeyId", "Attempts", "LastError", "LastErrorMessage",
              "Action", "NextRetry", "Identity", "Version", "StateSince", "StartedAt", "LastAttemptAt", "RegisteredAt",
              "WaitingFor", "Deadline"]


def test_busctl_reads_a_registered_daemon(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "registered"')
        assert get_property(bus_address, "Serial") == 's "DBUS-0000000000dbus01"'
        key_id = get_property(bus_address, "DeviceKeyId")
        assert key_id.startswith('s "') and len(key_id) == 64 + 4
        assert get_property(bus_address, "Brand") == 's "acme"' and get_property(bus_address, "Model") == 's "acme-gw"'
        assert get_property(bus_address, "Attempts") == "u 1"  # one serial-request posted
        assert get_property(bus_address, "NextRetry") == "t 0"
        assert get_property(bus_address, "Identity") == 'a{ss} 1 "soc_serial" "0000000000dbus01"'
        for name in PROPERTIES:  # every property readable by a plain client
            assert busctl(bus_address, "get-property", BUS_NAME, PATH, BUS_NAME, name).returncode == 0
        done = busctl(bus_address, "call", BUS_NAME, PATH, BUS_NAME, "GetSerialAssertion")
        assert done.returncode == 0 and "type: serial" in done.stdout
        history = busctl(bus_address, "--json=short", "call", BUS_NAME, PATH, BUS_NAME, "GetHistory")  # anyone may
        assert history.returncode == 0, history.stderr
        reply = json.loads(history.stdout)
        assert reply["type"] == "a(tssut)"
        steps = [step for _, step, _, _, _ in reply["data"][0]]
        assert steps[0] == "started" and steps[-2:] == ["serial-request", "registered"], steps
        assert sorted(steps[1:-2]) == ["identity", "key", "request-id"], steps  # the three run side by side
        times = [at for at, *_ in reply["data"][0]]
        assert times == sorted(times) and abs(times[-1] / 1e6 - time.time()) < 600
        assert reply["data"][0][-1][2] == "serial DBUS-0000000000dbus01"
    finally:
        assert "Traceback" not in daemon.stop()


def _members(xml: str) -> dict[str, object]:
    """What a client relies on: each method's argument types and directions, each property's type and access."""
    interface = next(i for i in ET.fromstring(xml).iter("interface") if i.get("name") == BUS_NAME)
    methods = {m.get("name"): [(a.get("direction", "in"), a.get("type")) for a in m.iter("arg")]
               for m in interface.iter("method")}
    properties = {p.get("name"): (p.get("type"), p.get("access")) for p in interface.iter("property")}
    signals = {s.get("name"): [a.get("type") for a in s.iter("arg")] for s in interface.iter("signal")}
    return {"methods": methods, "properties": properties, "signals": signals}


def test_introspection_matches_the_checked_in_contract(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        done = busctl(bus_address, "call", BUS_NAME, PATH, "org.freedesktop.DBus.Introspectable", "Introspect")
        assert done.returncode == 0
        exported = done.stdout.split(" ", 1)[1].strip().strip('"').encode().decode("unicode_escape")
        assert _members(exported) == _members(GOLDEN.read_text())
        assert sorted(_members(exported)["properties"]) == sorted(PROPERTIES)  # type: ignore[arg-type]
    finally:
        daemon.stop()


def test_properties_changed_sequence_over_a_registration_with_a_retry(tmp_path: Path, bus_address: str, backend: str,
                                                                      lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.status["serial"] = [Forced(503, retry_after="1")]

    async def scenario() -> tuple[list[dict], dict]:
        async with Recorder(bus_address) as rec:
            daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
            try:
                await rec.until(lambda: any(s.get("State") == "registered" for s in rec.signals))
                return rec.signals, await rec.get_all()
            finally:
                daemon.stop()

    signals, final = asyncio.run(scenario())
    seen = [s["State"] for s in signals if "State" in s]
    if seen[1:3] == ["identifying", "requesting"]:  # shown only while the daemon waits for it: a race with the request-id
        del seen[1:3]
    assert seen == ["requesting", "waiting-retry", "requesting", "registered"]
    assert all(signals), "an empty PropertiesChanged"
    retry = next(s for s in signals if s.get("State") == "waiting-retry")  # one signal for the whole transition
    assert retry["LastError"] == "vault-transient" and "HTTP 503" in retry["LastErrorMessage"]
    assert retry["Action"] and retry["NextRetry"] > 0
    posted = [s["Attempts"] for s in signals if "Attempts" in s]  # Attempts: serial-requests posted, as each goes
    assert posted == [1, 2] and final["Attempts"] == 2 and signals.index(retry) > next(
        i for i, s in enumerate(signals) if s.get("Attempts") == 1)
    done = signals[-1]
    assert done["Serial"] == "DBUS-0000000000dbus01" and done["LastError"] == "" and done["Action"] == ""
    replay: dict = {}
    for s in signals:
        replay.update(s)
    assert {k: final[k] for k in replay} == replay  # the signals alone tell the whole story


def test_get_serial_before_and_after_and_retry_unblocks(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.error_code["request-id"] = ["invalid-api-key"]  # refused once, then the vault accepts again

    async def scenario() -> None:
        async with Recorder(bus_address) as rec:
            daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
            try:
                await rec.until(lambda: any(s.get("State") == "blocked" for s in rec.signals))
                blocked = await rec.get_all()
                assert blocked["LastError"] == "invalid-api-key" and "api-key" in blocked["Action"]
                reply = await rec.call("GetSerialAssertion")
                assert reply.error_name == "io.factoryagent.Agent1.Error.NotRegistered"
                assert "Traceback" not in str(reply.body)
                await rec.call("Retry")
                await rec.until(lambda: any(s.get("State") == "registered" for s in rec.signals))
                reply = await rec.call("GetSerialAssertion")
                assert reply.body[0].encode() == (state / "serial.assertion").read_bytes()
            finally:
                daemon.stop()

    asyncio.run(scenario())


def test_a_second_instance_fails_clearly(tmp_path: Path, bus_address: str, backend: str, lab: FaultyVault) -> None:
    first = Daemon(bus_address, backend, write_config(tmp_path, lab), tmp_path / "one")
    try:
        wait_for(lambda: owned(bus_address))
        second = Daemon(bus_address, backend, write_config(tmp_path, lab), tmp_path / "two")
        stderr = second.stop() if second.proc.wait(timeout=30) is not None else ""
        assert second.proc.returncode == 1
        assert "another factory-agent is running" in stderr and "Traceback" not in stderr
    finally:
        first.stop()


def test_a_property_read_answers_within_50_ms_during_a_real_keygen(tmp_path: Path, bus_address: str, backend: str,
                                                                   lab: FaultyVault) -> None:
    lab.faults.status["request-id"] = [Forced(503, retry_after="60")]  # nothing else to do but generate the key
    state = tmp_path / "state"
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)

    async def measure() -> list[float]:
        async with Recorder(bus_address) as rec:
            await rec.until(lambda: owned(bus_address))
            latencies = []
            while not (state / "device-key.pem").exists():
                started = time.perf_counter()
                reply = await rec.call("Get", "ss", [BUS_NAME, "State"], interface="org.freedesktop.DBus.Properties")
                latencies.append(time.perf_counter() - started)
                assert reply.body
                await asyncio.sleep(0.01)
            return latencies

    try:
        latencies = asyncio.run(measure())
    finally:
        daemon.stop()
    assert len(latencies) >= 10, "the keygen finished before it could be measured"
    # 19 reads in 20 under 50 ms, and none stalled: a loop blocked by the keygen would stall every read for
    # seconds (the keygen's length); one read in a hundred held ~55 ms by the scheduler of this 2-core machine
    # (the client, dbus-daemon, the daemon and the keygen child share it) is not the daemon's doing.
    shown = f"{[round(x * 1000) for x in latencies]} ms"
    assert sorted(latencies)[len(latencies) * 19 // 20] < 0.050, f"more than 1 read in 20 over 50 ms: {shown}"
    assert max(latencies) < 0.500, f"a read stalled {max(latencies) * 1000:.0f} ms: {shown}"
