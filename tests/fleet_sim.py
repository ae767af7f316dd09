#!/usr/bin/python3
"""make fleet-sim: a factory's worth of devices against one vault, in simulated time.

Each simulated device runs the agent's own registration core (agent/registration.py, unchanged): the loop of
agent/standalone.py, ``next_step`` names the step, the step meets the simulated vault, ``apply`` decides what
comes next and how long to wait, with a seeded Random. Beside it, the same devices run a model of snapd's
policy, from shared/reference/snapd-device-protocol.md §3.5.

The vault: a token bucket of C registrations a second (a burst of C). The request-id call is the admission
(it takes a token); the serial-request that carries an admitted request-id is not refused (the vault finishes
what it admitted; refusing it would waste the nonce and the brand key's signature). Over the cap it answers
429 with Retry-After: the whole seconds until its next token, at least 1, as a rate-limiting front does.
During an outage nothing answers: connection refused, at once.

The network and the vault take no time here: a request and its answer happen at one instant; the figures
are about when the devices ask, not about round trips.

Prints a JSON document and a text table; with Debian's matplotlib (python3-matplotlib), also a PNG of
offered and accepted load over time per scenario.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from random import Random

if not __package__:  # run as a script: the tree, not tests/ (its http/ package would shadow the stdlib's)
    sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from agent import registration
from agent.errors import VaultTransient, VaultUnavailable
from agent.registration import Context, Phase, Progress, Step


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int
    capacity: float  # registrations a second (tokens a second; the bucket holds as many)
    window: float  # the devices power on uniformly over [0, window)
    outages: tuple[tuple[float, float], ...] = ()  # [start, end) when nothing answers
    keygen: tuple[float, float] = (0.0, 0.0)  # seconds of key generation after power on, uniform (0: made before)

    @property
    def ideal(self) -> float:
        """The shortest time to register every device: N / C (the outages added)."""
        return self.devices / self.capacity + sum(end - start for start, end in self.outages)


SCENARIOS = (
    Scenario("10k", 10_000, 50.0, 60.0),
    Scenario("10k, 5 min outage", 10_000, 50.0, 60.0, outages=((100.0, 400.0),)),
    Scenario("100k", 100_000, 50.0, 60.0),
)


class Vault:
    """The simulated vault: admission by token bucket, outages, and per-second counts of what it saw."""

    def __init__(self, sc: Scenario) -> None:
        self.rate, self.burst, self.outages = sc.capacity, sc.capacity, sc.outages
        self.tokens, self.stamp = self.burst, 0.0
        self.offered: dict[int, int] = {}  # request-ids asked for, a second
        self.accepted: dict[int, int] = {}  # request-ids handed out, a second
        self.retries: dict[int, int] = {}  # of the offered, those from devices that asked before
        self.unanswered: dict[int, int] = {}  # connections refused during an outage, a second
        self.serials = 0

    def down(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.outages)

    def admit(self, t: float, again: bool) -> float | None:
        """A request-id call at ``t`` (``again``: the device asked before): None when admitted, else the
        Retry-After it is told. Raises when down."""
        second = int(t)
        if self.down(t):
            self.unanswered[second] = self.unanswered.get(second, 0) + 1
            raise VaultUnavailable("connection refused")
        self.offered[second] = self.offered.get(second, 0) + 1
        if again:
            self.retries[second] = self.retries.get(second, 0) + 1
        self.tokens = min(self.burst, self.tokens + (t - self.stamp) * self.rate)
        self.stamp = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.accepted[second] = self.accepted.get(second, 0) + 1
            return None
        return max(1.0, math.ceil((1.0 - self.tokens) / self.rate))

    def serial(self, t: float) -> None:
        if self.down(t):
            self.unanswered[int(t)] = self.unanswered.get(int(t), 0) + 1
            raise VaultUnavailable("connection refused")
        self.serials += 1


@dataclass
class Device:
    on: float  # power on
    key_at: float  # the device key exists from then
    requests: int = 0  # request-id calls that reached the vault (answered)
    refused: int = 0  # connection refused (vault down)
    done_at: float = math.nan
    failed: str = ""


class Agent:
    """A device running agent/registration.py as agent/standalone.py drives it."""

    name = "factory-agent"

    def __init__(self, vault: Vault, rng: Random) -> None:
        self.vault, self.rng = vault, rng
        self.progress: dict[int, Progress] = {}
        self.request_id_at: dict[int, float] = {}

    def start(self, i: int, dev: Device) -> float:
        self.progress[i] = Progress()
        return dev.on

    @functools.cache  # noqa: B019 (one Agent per run)
    def _too_many(self, retry_after: float) -> VaultTransient:
        return VaultTransient("the vault answered HTTP 429", retry_after, status=429)

    def step(self, i: int, dev: Device, t: float) -> float | None:
        """One step of device ``i`` at ``t``: when its next step is due, or None when it is done."""
        p = self.progress[i]
        fetched = self.request_id_at.get(i)
        ctx = Context(key_ready=t >= dev.key_at, identity_ready=True,
                      request_id_age=None if fetched is None else t - fetched)
        step = registration.next_step(p, ctx)
        outcome: registration.Outcome
        if step is Step.FETCH_REQUEST_ID:
            try:
                retry_after = self.vault.admit(t, dev.requests + dev.refused > 0)
            except VaultUnavailable as exc:
                dev.refused += 1
                outcome = exc
            else:
                dev.requests += 1
                if retry_after is None:
                    self.request_id_at[i] = t
                    outcome = registration.GotRequestId()
                else:
                    outcome = self._too_many(retry_after)
        elif step is Step.WAIT_KEY:
            if p.phase is Phase.UNREGISTERED:
                self.progress[i] = registration.apply(p, registration.KeyReady("key"), self.rng).progress
            return max(t, dev.key_at)
        elif step is Step.POST_SERIAL:
            p = registration.apply(p, registration.Posted(), self.rng).progress
            try:
                self.vault.serial(t)
            except VaultUnavailable as exc:
                dev.refused += 1
                outcome = exc
            else:
                outcome = registration.Registered(f"serial-{i}")
        elif step is Step.DONE:
            dev.done_at = t
            return None
        else:
            dev.failed = f"unexpected step {step}"
            return None
        decision = registration.apply(p, outcome, self.rng)
        self.progress[i] = decision.progress
        if decision.forget_request_id:
            self.request_id_at.pop(i, None)
        if decision.delay == math.inf:
            dev.failed = f"blocked: {decision.progress.blocked_by}"
            return None
        return t + decision.delay


# snapd's policy (snapd-device-protocol.md §3.5): inside an attempt, a request-id that fails to connect is
# retried in 60 s while fewer than 15 were fetched; a 429 is neither 200 nor > 500: a hard error, the change
# ends. A new change starts on an ensure pass (every 5 min from snapd's start) once the backoff has passed since
# the previous attempt's start: 5 min, doubling, capped at 24 h.
SNAPD_RETRY = 60.0
SNAPD_TENTATIVES = 15
SNAPD_ENSURE = 300.0
SNAPD_BACKOFF = 300.0
SNAPD_BACKOFF_CAP = 24 * 3600.0


class Snapd:
    name = "snapd"

    def __init__(self, vault: Vault, rng: Random) -> None:
        self.vault = vault
        self.attempt: dict[int, tuple[float, int, int]] = {}  # started at, attempts so far, tentatives

    def start(self, i: int, dev: Device) -> float:
        # The first change starts on the first ensure pass, once the key exists (generate-device-key precedes
        # request-serial in the change).
        self.attempt[i] = (max(dev.on, dev.key_at), 1, 0)
        return max(dev.on, dev.key_at)

    def step(self, i: int, dev: Device, t: float) -> float | None:
        started, attempts, tentatives = self.attempt[i]
        try:
            retry_after = self.vault.admit(t, dev.requests + dev.refused > 0)
        except VaultUnavailable:
            dev.refused += 1
            if tentatives + 1 < SNAPD_TENTATIVES:
                self.attempt[i] = (started, attempts, tentatives + 1)
                return t + SNAPD_RETRY
            return self._next_change(i, dev, t)
        dev.requests += 1
        if retry_after is not None:
            return self._next_change(i, dev, t)
        try:
            self.vault.serial(t)
        except VaultUnavailable:  # the serial call: network errors retried in 60 s, without limit
            dev.refused += 1
            self.attempt[i] = (started, attempts, tentatives + 1)
            return t + SNAPD_RETRY
        dev.done_at = t
        return None

    def _next_change(self, i: int, dev: Device, t: float) -> float:
        started, attempts, _ = self.attempt[i]
        due = started + min(SNAPD_BACKOFF_CAP, SNAPD_BACKOFF * 2 ** (attempts - 1))
        ensure = dev.on + SNAPD_ENSURE * math.ceil((max(due, t) - dev.on) / SNAPD_ENSURE)
        self.attempt[i] = (ensure, attempts + 1, 0)
        return ensure


Policy = Callable[[Vault, Random], "Agent | Snapd"]
POLICIES: dict[str, Policy] = {Agent.name: Agent, Snapd.name: Snapd}
HORIZONS = {Agent.name: 4 * 3600.0, Snapd.name: 48 * 3600.0}  # a device not registered by then counts as failed


@dataclass
class Result:
    scenario: Scenario
    policy: str
    devices: list[Device]
    vault: Vault
    wall: float
    events: int
    metrics: dict[str, object] = field(default_factory=dict)


def simulate(sc: Scenario, make: Policy, seed: int, horizon: float) -> Result:
    rng = Random(seed)
    devices = []
    for _ in range(sc.devices):
        on = rng.uniform(0.0, sc.window)
        devices.append(Device(on, on + rng.uniform(*sc.keygen)))
    vault = Vault(sc)
    policy = make(vault, Random(seed + 1))
    queue = [(policy.start(i, dev), i) for i, dev in enumerate(devices)]
    heapq.heapify(queue)
    started, events = time.perf_counter(), 0
    while queue:
        t, i = heapq.heappop(queue)
        if t > horizon:
            devices[i].failed = "not registered within the horizon"
            continue
        events += 1
        due = policy.step(i, devices[i], t)
        if due is not None:
            heapq.heappush(queue, (due, i))
    result = Result(sc, policy.name, devices, vault, time.perf_counter() - started, events)
    result.metrics = measure(result)
    result.devices = []  # measured: not carried back from a worker process
    return result


def run(job: tuple[Scenario, str, int, float]) -> Result:
    sc, policy, seed, horizon = job
    return simulate(sc, POLICIES[policy], seed, horizon)


def measure(r: Result) -> dict[str, object]:
    sc, vault = r.scenario, r.vault
    done = [d.done_at for d in r.devices if not math.isnan(d.done_at)]
    per_device = sorted(d.requests for d in r.devices)
    first = max(1, math.ceil(min(d.on for d in r.devices)) + 1)  # the first whole second of the wave
    after_first = [n for s, n in vault.offered.items() if s >= first]
    retries = [n for s, n in vault.retries.items() if s >= first]
    recovery = {}
    for start, end in sc.outages:
        window = [vault.offered.get(s, 0) for s in range(int(end), int(end) + 120)]
        recovery = {"outage": [start, end], "peak_offered_after": max(window, default=0),
                    "peak_offered_after_per_capacity": round(max(window, default=0) / sc.capacity, 2)}
    wave_rate = sc.devices / sc.window
    last = max(done) if done else math.nan
    return {
        "devices": sc.devices, "capacity": sc.capacity, "window": sc.window,
        "failures": sum(1 for d in r.devices if d.failed),
        "peak_offered": max(after_first, default=0),
        "peak_offered_per_capacity": round(max(after_first, default=0) / sc.capacity, 2),
        "power_on_rate_per_capacity": round(wave_rate / sc.capacity, 2),
        "peak_retries_per_capacity": round(max(retries, default=0) / sc.capacity, 2),
        "peak_accepted": max(vault.accepted.values(), default=0),
        "all_registered_s": round(last, 1),
        "ideal_s": round(sc.ideal, 1),
        "completion_per_ideal": round(last / sc.ideal, 2),
        "requests_per_device_mean": round(sum(per_device) / len(per_device), 2),
        "requests_per_device_p99": per_device[min(len(per_device) - 1, int(0.99 * len(per_device)))],
        "refused_connections": sum(d.refused for d in r.devices),
        "serial_calls": vault.serials,
        **recovery,
        "events": r.events, "wall_s": round(r.wall, 2),
    }


GOALS = {  # the issue's, for the no-outage scenarios (recovery: any outage)
    "peak_offered_per_capacity": 1.5, "completion_per_ideal": 1.2, "requests_per_device_mean": 1.5,
    "peak_offered_after_per_capacity": 2.0,
}


def table(results: list[Result]) -> Iterator[str]:
    head = ("scenario", "policy", "fail", "peak/C", "on/C", "retry/C", "done s", "ideal s", "x ideal", "req/dev", "p99",
            "after outage/C")
    yield "  ".join(f"{h:>18}" if n < 2 else f"{h:>8}" for n, h in enumerate(head))
    for r in results:
        m = r.metrics
        row = (r.scenario.name, r.policy, m["failures"], m["peak_offered_per_capacity"],
               m["power_on_rate_per_capacity"], m["peak_retries_per_capacity"], m["all_registered_s"],
               m["ideal_s"], m["completion_per_ideal"], m["requests_per_device_mean"], m["requests_per_device_p99"],
               m.get("peak_offered_after_per_capacity", "-"))
        yield "  ".join(f"{v!s:>18}" if n < 2 else f"{v!s:>8}" for n, v in enumerate(row))


def plot(results: list[Result], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r.scenario.name for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        for r in (r for r in results if r.scenario.name == name):
            end = int(r.metrics["all_registered_s"]) + 2 if not math.isnan(r.metrics["all_registered_s"]) else 3600
            end = min(end, int(4 * r.scenario.ideal))
            xs = range(end)
            ax.plot(xs, [r.vault.offered.get(s, 0) for s in xs], label=f"{r.policy}: offered", lw=0.8)
            ax.plot(xs, [r.vault.accepted.get(s, 0) for s in xs], label=f"{r.policy}: accepted", lw=0.8)
        ax.axhline(results[0].scenario.capacity, color="k", ls=":", lw=0.8, label="capacity", zorder=0)
        ax.set_title(name)
        ax.set_xlabel("s")
        ax.set_ylabel("request-ids / s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="build/fleet-sim", help="directory for fleet-sim.json and fleet-sim.png")
    ap.add_argument("--only", help="run only the scenarios whose name contains this")
    args = ap.parse_args()
    jobs = [(sc, policy, args.seed, horizon) for sc in SCENARIOS if not args.only or args.only in sc.name
            for policy, horizon in HORIZONS.items()]
    # The largest first, one process a core: the 100,000-device run takes most of the time.
    jobs.sort(key=lambda job: -job[0].devices)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        done = dict(zip(map(id, jobs), pool.map(run, jobs), strict=True))
    results = [done[id(job)] for job in sorted(jobs, key=lambda job: (SCENARIOS.index(job[0]), job[1] != Agent.name))]
    os.makedirs(args.out, exist_ok=True)
    doc = {"model": __doc__.split("\n\n")[1:3], "goals": GOALS,
           "results": [{"scenario": r.scenario.name, "policy": r.policy, **r.metrics} for r in results]}
    with open(os.path.join(args.out, "fleet-sim.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc["results"], indent=1))
    for line in table(results):
        print(line)
    png = os.path.join(args.out, "fleet-sim.png")
    print(f"plot: {png}" if plot(results, png) else "plot: none (no python3-matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
