"""The fleet simulation (make fleet-sim) on a small line: its vault, its devices and its snapd model hold."""

from __future__ import annotations

import math

from agent import registration
from tests import fleet_sim as fs

LINE = fs.Scenario("line", 400, 5.0, 20.0)


def test_every_device_registers_and_the_vault_never_hands_out_more_than_its_capacity() -> None:
    for policy in fs.POLICIES.values():
        r = fs.simulate(LINE, policy, seed=3, horizon=48 * 3600.0)
        m = r.metrics
        assert m["failures"] == 0, r.policy
        assert m["serial_calls"] == LINE.devices  # one serial-request each: the admitted ones are never refused
        assert max(r.vault.accepted.values()) <= 2 * LINE.capacity  # the bucket's burst, then its rate
        assert sum(r.vault.accepted.values()) == LINE.devices
        assert m["all_registered_s"] >= LINE.ideal - 1.0  # nothing beats N / C (less the bucket's first burst)
        assert m["requests_per_device_mean"] >= 1.0


def test_the_agent_in_the_simulation_is_the_real_core() -> None:
    """A refused device waits what registration.apply() says for a 429: at least half the crowd window."""
    vault = fs.Vault(fs.Scenario("two", 2, 1.0, 1.0))
    agent = fs.Agent(vault, fs.Random(1))
    devices = [fs.Device(0.0, 0.0), fs.Device(0.0, 0.0)]
    for i, dev in enumerate(devices):
        agent.start(i, dev)
    assert agent.step(0, devices[0], 0.0) == 0.0  # a request-id at once
    assert agent.step(0, devices[0], 0.0) == 0.0  # the serial-request: registered
    assert agent.step(0, devices[0], 0.0) is None and devices[0].done_at == 0.0 and vault.serials == 1
    due = agent.step(1, devices[1], 0.0)  # the bucket is empty: 429
    assert due is not None and registration.CROWD_BASE / 2 <= due <= registration.CROWD_BASE
    assert agent.progress[1].failures == 1 and agent.progress[1].last_error == "vault-transient"


def test_snapd_after_a_429_waits_for_its_change_backoff_on_an_ensure_pass() -> None:
    vault = fs.Vault(fs.Scenario("one", 1, 1.0, 1.0))
    vault.tokens, vault.stamp = 0.0, 10.0
    snapd = fs.Snapd(vault, fs.Random(1))
    dev = fs.Device(10.0, 10.0)
    assert snapd.start(0, dev) == 10.0
    due = snapd.step(0, dev, 10.0)  # a 429 is a hard error: the change ends
    assert due == 10.0 + fs.SNAPD_BACKOFF  # 5 min after the attempt's start, on the ensure pass then
    due = snapd.step(0, dev, 10.0 + 0.5)  # refused again: 10 min after that attempt's start
    assert due is not None and math.isclose((due - dev.on) % fs.SNAPD_ENSURE, 0.0, abs_tol=1e-9)
