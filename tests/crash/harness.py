"""The crash harness: the real daemon against the lab vault, SIGKILLed at named points and at random instants.

A *named point* run starts ``python -m agent run --once --bus none`` with
tests/crash/inject on its PYTHONPATH and FACTORY_AGENT_CRASH_AT set (see
inject/sitecustomize.py): the daemon stops itself at the point, the harness
sees it stopped and kills it with SIGKILL. A *random instant* run starts the
plain daemon (no injection at all) and SIGKILLs it after a random delay
within the measured length of a registration. A *trial* is one state
directory through one or more kills (a power-cut sequence) and then one
plain ``run --once`` that must finish the registration.

What every recovery must show (:meth:`Harness.check_recovered`): exit 0 and
no traceback; exactly device-key.pem, serial.assertion and state.json in the
state directory (no temp files, nothing set aside); the key is byte for byte
the one that was on disk at the first kill that found one; state.json
parses and says registered with that key and serial; serial.assertion
verifies against the lab's brand.account-key, is for that key, and is one of
the serials the vault signed during the trial; every serial the vault signed
during the trial is for that key (one identity, never two). After each kill,
before the restart (:meth:`Harness.check_after_kill`): whatever is on disk
is whole (state.json parses, the key loads, a serial verifies).

The vault signing twice for one device is not a failure: a kill after the
vault signed but before the serial was durable makes the restart ask again.
It is counted (lab.signed, grouped by device key, per trial) and reported.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import assertions, keys, serials, store
from agent.registration import Phase, Progress
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import Agent, agent_argv, agent_env, run_args

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject"
VECTOR_KEY = REPO / "tests" / "data" / "device" / "device-key.pem"  # what seed_key puts in place
SOC_SERIAL = "00000000c0ffee42"
TEMPLATE = "ACME-{soc_serial}"
FINAL_FILES = {store.DEVICE_KEY_FILE, store.SERIAL_FILE, store.STATE_FILE}
POINT_TIMEOUT = 120.0  # RSA-4096 on a slow machine, then the point
KEYGEN_WAIT_LINE = "state generating-key"  # the daemon has nothing left to do but wait for the key
RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class NamedPoint:
    """A named kill point, and what the state directory and the vault must show right after the kill."""

    point: str
    fresh: bool  # a fresh state directory: real key generation in this run
    what: str
    phase: str | None  # Harness.phase_at_kill; None where it depends on a race the flow allows
    temps: tuple[str, ...] = ()  # the final names whose temp files the kill leaves
    signed: int = 0  # serials the vault signed during the killed run
    double: int = 0  # serials signed twice for the device over the trial
    extended: bool = False  # only in `make crash` (run_crash.py), to keep the default suite short
    canned_key: bool = False  # the keygen child hands over the test vector key instead of generating one
    racing: tuple[str, ...] = ()  # temp files the kill may or may not leave (a write the flow runs side by side)

    @property
    def id(self) -> str:
        return f"{self.point}-{'fresh' if self.fresh else 'seeded'}"


# "vault-holds" and "polling" need no injection: the lab vault holds the serial POST (faults.delay) and signs
# it after the kill, or answers it 202 (faults.accepted_times) and the kill comes while the agent waits to poll.
NAMED_POINTS: tuple[NamedPoint, ...] = (
    NamedPoint("keygen", True, "during key generation (the keygen child inside RSA generation)", "no-key"),
    NamedPoint("key-temp", True, "the key's temp written and fsynced, not linked: no durable key", "no-key",
               ("device-key.pem",), canned_key=True),
    NamedPoint("key-linked", True, "device-key.pem linked; its temp not unlinked, the directory not fsynced",
               "key-durable-unrecorded", ("device-key.pem",), canned_key=True),
    NamedPoint("key-durable", True, "the key durable, state.json does not record it", "key-durable-unrecorded",
               canned_key=True),
    NamedPoint("request-id", True, "after request-id, the key generated meanwhile (durable or not: a race)", None,
               extended=True),
    NamedPoint("request-id", False, "after request-id, the key recorded (the identity's state.json write runs beside it)",
               "key-recorded", racing=("state.json",)),
    NamedPoint("vault-holds", False, "while the vault holds the serial request (it signs after the kill)",
               "signed-not-stored", (), 1, 1),
    NamedPoint("polling", False, "the vault said 202, state.json says polling with the serial-request kept",
               "polling"),
    NamedPoint("serial-received", False, "the serial received, not yet durable", "signed-not-stored", (), 1, 1),
    NamedPoint("serial-temp", False, "the serial's temp written and fsynced, not renamed", "signed-not-stored",
               ("serial.assertion",), 1, 1),
    NamedPoint("serial-durable", False, "the serial durable, state.json does not say registered",
               "serial-durable-unrecorded", (), 1, 0),
    NamedPoint("serial-durable", True, "the same, on a fresh directory", "serial-durable-unrecorded", (), 1, 0,
               extended=True),
    NamedPoint("state-temp", False, "the first state.json temp written, not renamed", "key-durable-unrecorded",
               ("state.json",)),
    NamedPoint("state-registered-temp", False, "the serial durable, the temp of the registered state.json not renamed",
               "serial-durable-unrecorded", ("state.json",), 1, 0),
)

HOLD_SECONDS = 0.5
MAX_RESTARTS = 3


class HarnessError(AssertionError):
    """An invariant that did not hold, or a point that was never reached; the message says which and where."""


@dataclass
class Snapshot:
    """What a state directory holds, read without changing it."""

    key: bytes | None
    key_error: str
    state_raw: bytes | None
    progress: Progress | None
    state_error: str
    serial: bytes | None
    temps: list[str]
    others: list[str]

    @property
    def key_recorded(self) -> bool:
        return self.progress is not None and bool(self.progress.key_id)


def snapshot(state: Path) -> Snapshot:
    names = sorted(p.name for p in state.iterdir()) if state.is_dir() else []
    temps = [n for n in names if n.startswith(".") and n.endswith(store.TEMP_SUFFIX)]
    others = [n for n in names if n not in FINAL_FILES and n not in temps]
    key = _read(state / store.DEVICE_KEY_FILE)
    key_error = ""
    if key is not None:
        try:
            _load_key(key)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            key_error = f"{type(exc).__name__}: {exc}"
        mode = (state / store.DEVICE_KEY_FILE).stat().st_mode & 0o777
        if mode != 0o600:
            key_error += f" mode {mode:o}"
    raw = _read(state / store.STATE_FILE)
    progress, state_error = None, ""
    if raw is not None:
        try:
            progress = store.progress_from_json(json.loads(raw))
        except Exception as exc:  # noqa: BLE001
            state_error = f"{type(exc).__name__}: {exc}"
    return Snapshot(key, key_error, raw, progress, state_error, _read(state / store.SERIAL_FILE), temps, others)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=64)
def _load_key(pem: bytes) -> keys.DeviceKey:
    """keys.load_key, remembered: cryptography 38 spends ~0.25 s validating each RSA-4096 load."""
    return keys.load_key(pem)


def key_id_of(pem: bytes) -> str:
    return _load_key(pem).key_id


def keygen_children(daemon_pid: int) -> list[int]:
    """Live key generation children started by ``daemon_pid`` (the keygen's argv names its parent's pid)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            stat = (cmdline.parent / "stat").read_text()
        except OSError:
            continue
        if b"agent.keygen" in argv and str(daemon_pid).encode() in argv and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(cmdline.parent.name))
    return found


def process_state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/stat").read_text()).rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def ended(pid: int, within: float) -> bool:
    """Whether ``pid`` is gone or a zombie within ``within`` seconds: the SIGKILL that PDEATHSIG sends when
    the parent dies is delivered asynchronously, later still on a loaded machine."""
    deadline = time.monotonic() + within
    while process_state(pid) not in ("gone", "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass
class Kill:
    """One SIGKILL of a live daemon, and what the state directory held right after it."""

    how: str  # a named point, or "random"
    fresh: bool  # real key generation in this trial
    leg: str  # the named point's id, or the random leg (see run_random)
    phase: str  # what had happened when it died (see Harness.phase_at_kill)
    at: float  # seconds after the start
    temps: list[str]
    key_durable: bool
    signed_in_run: int  # serials the vault signed during this run
    orphans: int  # keygen children alive after the kill


@dataclass
class Trial:
    """One state directory: kills, then the recovery run."""

    how: str
    fresh: bool
    leg: str
    kills: list[Kill] = field(default_factory=list)
    missed: int = 0  # random instants that came after the daemon had already finished
    runs: int = 0  # daemon starts in this state directory, the recovery included
    restarts_needed: int = 0  # plain runs after the last kill until registered (1 unless something is wrong)
    signed: int = 0  # serials the vault signed for this device during the trial
    double_signings: int = 0  # signed - 1 per device key, summed
    recovery_seconds: float = 0.0
    seconds: float = 0.0  # the whole trial
    problems: list[str] = field(default_factory=list)


class Harness:
    """One lab vault (serving), one agent config, a work directory for state dirs, markers and logs."""

    def __init__(self, lab: FaultyVault, work: Path, python: str = sys.executable) -> None:
        self.lab, self.work, self.python = lab, work, python
        work.mkdir(parents=True, exist_ok=True)
        self.config = write_agent_config(work, lab.url, lab.directory, template=TEMPLATE, soc_serial=SOC_SERIAL)
        self.trusted = assertions.decode_stream((lab.directory / "brand.account-key").read_bytes())
        self.runs = 0
        self._inflight = 0
        self._idle = threading.Condition()
        self.request_times: list[float] = []  # monotonic time of each request the vault received
        self.request_walltimes: list[float] = []  # the same, wall clock (to compare with file mtimes)
        self._spy_on_vault()

    # --- the vault -----------------------------------------------------------

    def _spy_on_vault(self) -> None:
        """Count requests the vault is still working on, so a killed run's last request cannot leak into the next."""
        respond = self.lab.respond

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._idle:
                self._inflight += 1
                self.request_times.append(time.monotonic())
                self.request_walltimes.append(time.time())
            try:
                return respond(*args, **kwargs)
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._idle.notify_all()

        self.lab.respond = counted  # type: ignore[method-assign]

    def wait_vault_idle(self, timeout: float = 30.0) -> None:
        time.sleep(0.05)  # a request whose body is still arriving reaches respond() within this
        with self._idle:
            if not self._idle.wait_for(lambda: self._inflight == 0, timeout):
                raise HarnessError("the lab vault is still busy with a killed run's request")

    def signed_since(self, mark: int) -> list[assertions.Assertion]:
        return list(self.lab.signed[mark:])

    # --- processes -------------------------------------------------------------

    def new_state(self, fresh: bool) -> Path:
        self.runs += 1
        state = self.work / f"s{self.runs:04d}" / "state"
        if fresh:
            state.parent.mkdir(parents=True)
        else:
            seed_key(state)
        return state

    def _command(self, state: Path) -> list[str]:
        return agent_argv(*run_args(self.config, state, once=True), python=self.python)

    def _env(self, point: str | None = None, marker: Path | None = None, nth: int = 1,
             canned_key: bool = False) -> dict[str, str]:
        if point is None:
            return agent_env(drop_prefixes=("FACTORY_AGENT_",))
        env = agent_env(drop_prefixes=("FACTORY_AGENT_",), pythonpath=os.pathsep.join([str(REPO), str(INJECT)]),
                        FACTORY_AGENT_CRASH_AT=point, FACTORY_AGENT_CRASH_MARKER=str(marker),
                        FACTORY_AGENT_CRASH_NTH=str(nth))
        if canned_key:
            env["FACTORY_AGENT_CRASH_CANNED_KEY"] = str(VECTOR_KEY)
        return env

    def start(self, state: Path, point: str | None = None, nth: int = 1,
              canned_key: bool = False) -> tuple[Agent, Path, Path]:
        """The daemon, stderr to a log file (a stopped reader never blocks it); returns (process, marker, log)."""
        self.runs += 1
        marker = self.work / f"marker-{self.runs:05d}.json"
        log = self.work / f"run-{self.runs:05d}.log"
        proc = Agent(argv=self._command(state), env=self._env(point, marker, nth, canned_key), stderr_file=log)
        return proc, marker, log

    def run_once(self, state: Path) -> tuple[int, str, float]:
        """A plain run to completion: (exit status, stderr, seconds)."""
        started = time.monotonic()
        proc, _, log = self.start(state)
        try:
            status = proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise HarnessError(f"run --once did not finish in {RUN_TIMEOUT:g} s on {state}: {_tail(log)}") from None
        return status, log.read_text(errors="replace"), time.monotonic() - started

    def wait_for_point(self, proc: Agent, marker: Path, log: Path, point: str) -> dict[str, Any]:
        """The marker of ``point``, once the process that wrote it is stopped there (or blocked, for keygen)."""
        deadline = time.monotonic() + POINT_TIMEOUT
        while time.monotonic() < deadline:
            if marker.exists():
                info: dict[str, Any] = json.loads(marker.read_text())
                if info["pid"] != proc.pid:  # the keygen child, blocked inside the generation
                    # The daemon runs on meanwhile (request-id, identity, their state.json write): the point is
                    # reached once it waits on the key alone, which it says as "state generating-key".
                    if KEYGEN_WAIT_LINE in log.read_text(errors="replace"):
                        return info
                    if proc.poll() is not None:
                        break
                    time.sleep(0.005)
                    continue
                while process_state(proc.pid) not in ("T", "t"):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
                else:
                    return info
            if proc.poll() is not None:
                raise HarnessError(f"the daemon exited ({proc.returncode}) without reaching point {point!r}: {_tail(log)}")
            time.sleep(0.005)
        raise HarnessError(f"point {point!r} not reached within {POINT_TIMEOUT:g} s: {_tail(log)}")

    def kill(self, proc: Agent) -> int:
        """SIGKILL the daemon; returns how many of its keygen children are still alive 5 s later (PDEATHSIG)."""
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5.0
        while (alive := keygen_children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in alive:  # do not leave them burning CPU for the next runs
            os.kill(pid, signal.SIGKILL)
        return len(alive)

    # --- invariants ------------------------------------------------------------

    def check_after_kill(self, state: Path, snap: Snapshot, pinned: bytes | None) -> list[str]:
        """What must hold at any instant: whole files, and the first durable key never replaced."""
        problems = []
        if snap.state_error:
            problems.append(f"state.json does not parse after the kill: {snap.state_error}")
        if snap.key is not None and snap.key_error:
            problems.append(f"device-key.pem is not a usable key after the kill: {snap.key_error}")
        if pinned is not None and snap.key != pinned:
            problems.append("device-key.pem changed after a kill: a second key" if snap.key else "device-key.pem vanished")
        if snap.others:
            problems.append(f"unexpected files after the kill: {snap.others}")
        if snap.serial is not None and snap.key is not None and not snap.key_error:
            try:
                self._verify(snap.serial, key_id_of(snap.key))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"serial.assertion on disk does not verify after the kill: {exc}")
        return problems

    def check_recovered(self, state: Path, status: int, stderr: str, pinned: bytes | None, before: Snapshot,
                        signed: list[assertions.Assertion]) -> list[str]:
        """Every invariant of a finished recovery; returns the broken ones (empty: all hold)."""
        problems = []
        if status != 0:
            problems.append(f"run --once exited {status}: {stderr.strip().splitlines()[-3:]}")
        if "Traceback" in stderr:
            problems.append(f"traceback in the recovery's stderr: {stderr[-2000:]}")
        if before.temps and "removed temporary files left by a crash" not in stderr:
            problems.append(f"temp files {before.temps} were there but the restart did not report removing them")
        after = snapshot(state)
        names = sorted(p.name for p in state.iterdir())
        if set(names) != FINAL_FILES:
            problems.append(f"state directory holds {names}, expected exactly {sorted(FINAL_FILES)}")
        if after.key is None or after.key_error:
            problems.append(f"no usable device key after recovery: {after.key_error or 'missing'}")
            return problems
        key_id = key_id_of(after.key)
        if pinned is not None and after.key != pinned:
            problems.append(f"a second device key: {key_id} replaced {key_id_of(pinned)}, which was durable at a kill")
        if after.state_error or after.progress is None:
            problems.append(f"state.json after recovery: {after.state_error or 'missing'}")
        if after.serial is None:
            problems.append("serial.assertion missing after recovery")
            return problems
        try:
            serial = self._verify(after.serial, key_id)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"serial.assertion does not verify: {exc}")
            return problems
        if len(assertions.decode_stream(after.serial)) != 1:
            problems.append("serial.assertion holds more than one assertion")
        if after.progress is not None:
            p = after.progress
            if (p.phase, p.key_id, p.serial) != (Phase.REGISTERED, key_id, serial.header("serial")):
                problems.append(f"state.json says {p.phase.value}, key {p.key_id}, serial {p.serial!r}; "
                                f"expected registered, {key_id}, {serial.header('serial')!r}")
        encoded = {a.encode() for a in signed}
        if after.serial not in encoded:
            problems.append("serial.assertion is not one the vault signed during this trial")
        others = {a.header("device-key-sha3-384") for a in signed} - {key_id}
        if others:
            problems.append(f"the vault signed serials for other device keys of this device: {sorted(others)}")
        return problems

    def _verify(self, data: bytes, key_id: str) -> assertions.Assertion:
        return serials.check_serial(data, brand=self.lab.brand, model=self.lab.model, key_id=key_id, trusted=self.trusted)

    @staticmethod
    def phase_at_kill(snap: Snapshot, fresh: bool, posted: int, signed: int) -> str:
        """The furthest milestone a killed run reached, from the disk and the vault's counters."""
        if snap.progress is not None and snap.progress.phase is Phase.REGISTERED:
            return "registered"
        if snap.serial is not None:
            return "serial-durable-unrecorded"
        if signed:
            return "signed-not-stored"
        if snap.progress is not None and snap.progress.phase is Phase.POLLING:
            return "polling"
        if posted:
            return "serial-posted"
        if snap.key_recorded:
            return "key-recorded"
        if snap.key is not None:
            return "key-durable-unrecorded"
        return "no-key" if fresh else "start"

    # --- trials ------------------------------------------------------------------

    def _after_kill(self, trial: Trial, state: Path, how: str, at: float, orphans: int, pinned: bytes | None,
                    requests_mark: int, signed_mark: int) -> tuple[Kill, bytes | None]:
        self.wait_vault_idle()
        snap = snapshot(state)
        posted = self.lab.requests[("POST", "/v1/serial")] - requests_mark
        signed = len(self.lab.signed) - signed_mark
        phase = self.phase_at_kill(snap, trial.fresh, posted, signed)
        kill = Kill(how, trial.fresh, trial.leg, phase, round(at, 3), snap.temps, snap.key is not None, signed, orphans)
        trial.kills.append(kill)
        trial.problems += [f"after kill {len(trial.kills)} ({how}, {kill.phase}): {p}"
                           for p in self.check_after_kill(state, snap, pinned)]
        if orphans:
            trial.problems.append(f"{orphans} keygen child(ren) outlived the SIGKILLed daemon")
        if pinned is None and snap.key is not None and not snap.key_error:
            pinned = snap.key
        return kill, pinned

    def _recover(self, trial: Trial, state: Path, pinned: bytes | None, trial_mark: int) -> None:
        """Plain runs until one exits 0 (at most MAX_RESTARTS); the first one should do it."""
        before = snapshot(state)
        started = time.monotonic()
        stderr = ""
        for _ in range(MAX_RESTARTS):
            status, err, _ = self.run_once(state)
            stderr += err
            trial.runs += 1
            trial.restarts_needed += 1
            if status == 0:
                break
        trial.recovery_seconds = round(time.monotonic() - started, 3)
        if trial.restarts_needed > 1:
            trial.problems.append(f"registration needed {trial.restarts_needed} restarts after the last kill")
        signed = self.signed_since(trial_mark)
        trial.problems += self.check_recovered(state, status, stderr, pinned, before, signed)
        per_key = collections.Counter(a.header("device-key-sha3-384") for a in signed)
        trial.signed = len(signed)
        trial.double_signings = sum(n - 1 for n in per_key.values())
        explained = sum(k.phase == "signed-not-stored" for k in trial.kills)
        if trial.double_signings != explained:  # the vault may sign again only for a serial that never got stored
            trial.problems.append(f"the vault signed {trial.signed} serials for this device, {trial.double_signings} "
                                  f"more than one, but only {explained} kill(s) came between a signing and its storing")
        if trial.problems:
            trial.problems.append(f"state directory: {state}")

    def named(self, point: str, fresh: bool, nth: int = 1, canned_key: bool = False) -> Trial:
        """Kill at ``point`` (once), then recover."""
        trial = Trial(point, fresh, f"{point}-{'fresh' if fresh else 'seeded'}")
        state = self.new_state(fresh)
        trial_mark = len(self.lab.signed)
        requests_mark = self.lab.requests[("POST", "/v1/serial")]
        if point in ("vault-holds", "polling"):
            if point == "vault-holds":
                self.lab.faults.delay = HOLD_SECONDS
                reached = lambda: self.lab.requests[("POST", "/v1/serial")] > requests_mark  # noqa: E731
            else:
                self.lab.faults.accepted_times = 1
                reached = lambda: b'"phase": "polling"' in (_read(state / store.STATE_FILE) or b"")  # noqa: E731
            proc, _, log = self.start(state)
            trial.runs += 1
            started = time.monotonic()
            try:
                deadline = started + POINT_TIMEOUT
                while not reached():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise HarnessError(f"point {point!r} never reached: {_tail(log)}")
                    time.sleep(0.002)
            finally:
                self.lab.faults.delay = 0.0  # the held request keeps the delay it read
                self.lab.faults.accepted_times = 0
            orphans = self.kill(proc)
        else:
            proc, marker, log = self.start(state, point, nth, canned_key)
            trial.runs += 1
            started = time.monotonic()
            try:
                info = self.wait_for_point(proc, marker, log, point)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            child = info["pid"] if info["pid"] != proc.pid else None
            orphans = self.kill(proc)
            if child is not None and not ended(child, 5.0):
                trial.problems.append(f"the keygen child {child} outlived the daemon")
                os.kill(child, signal.SIGKILL)
        _, pinned = self._after_kill(trial, state, point, time.monotonic() - started, orphans, None, requests_mark, trial_mark)
        self._recover(trial, state, pinned, trial_mark)
        return trial

    def check_expected(self, np: NamedPoint, trial: Trial) -> list[str]:
        """What the kill at a named point must have left (proof that the kill landed where it is named)."""
        kill = trial.kills[0]
        got = (kill.phase if np.phase else None, sorted({_temp_kind(t) for t in kill.temps} - set(np.racing)), kill.signed_in_run,
               trial.double_signings)
        wanted = (np.phase, sorted(np.temps), np.signed, np.double)
        if got != wanted:
            return [f"{np.id}: (phase, temps, signed, double signings) {got}, expected {wanted}"]
        return []

    def random_trial(self, rng: random.Random, leg: str, window: float, max_kills: int) -> Trial:
        """A power-cut sequence on one state directory: up to ``max_kills`` kills at random instants, then recovery.

        The instant is uniform in [0, ``window``] after the start, or, in the
        "exchange" leg, after the first request of the run reaches the vault.
        """
        fresh = leg == "fresh"
        trial = Trial("random", fresh, leg)
        state = self.new_state(fresh)
        trial_mark = len(self.lab.signed)
        pinned: bytes | None = None
        for _ in range(max_kills):
            requests_mark, signed_mark = self.lab.requests[("POST", "/v1/serial")], len(self.lab.signed)
            first_request = len(self.request_times)
            proc, _, _ = self.start(state)
            trial.runs += 1
            started = time.monotonic()
            if leg == "exchange":
                while len(self.request_times) == first_request and proc.poll() is None:
                    time.sleep(0.001)
                if len(self.request_times) > first_request:
                    started = self.request_times[first_request]
            at = rng.uniform(0.0, window)
            time.sleep(max(0.0, started + at - time.monotonic()))
            if proc.poll() is not None:  # it finished first: nothing left to interrupt in this directory
                trial.missed += 1
                break
            orphans = self.kill(proc)
            _, pinned = self._after_kill(trial, state, "random", time.monotonic() - started, orphans, pinned,
                                         requests_mark, signed_mark)
        self._recover(trial, state, pinned, trial_mark)
        return trial

    def measure_window(self, fresh: bool, runs: int = 1) -> tuple[float, float]:
        """Of a whole registration, the means over ``runs``: (seconds from exec to exit, seconds from the first
        vault request to the registered state.json's mtime).

        Each run is checked like a recovery: a plain registration must pass before any kill means anything.
        """
        exchanges, durations = [], []
        for _ in range(runs):
            state = self.new_state(fresh)
            mark, requests = len(self.lab.signed), len(self.request_times)
            before = snapshot(state)
            status, stderr, seconds = self.run_once(state)
            problems = self.check_recovered(state, status, stderr, None, before, self.signed_since(mark))
            if problems or len(self.request_times) == requests:
                raise HarnessError(f"a plain registration fails: {problems or 'no request reached the vault'}")
            exchanges.append((state / store.STATE_FILE).stat().st_mtime - self.request_walltimes[requests])
            durations.append(seconds)
        return statistics.mean(durations), statistics.mean(exchanges)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- figures -----------------------------------------------------------------------


def run_named(h: Harness, points: tuple[NamedPoint, ...] = NAMED_POINTS) -> list[Trial]:
    """Each named point once; a trial whose kill did not leave what its name says gets a problem."""
    trials = []
    for np in points:
        began = time.monotonic()
        trial = h.named(np.point, np.fresh, canned_key=np.canned_key)
        trial.seconds = round(time.monotonic() - began, 3)
        trial.problems += h.check_expected(np, trial)
        trials.append(trial)
    return trials


FRESH_SHARE = 0.15
EXCHANGE_SHARE = 0.3


def random_legs(kills: int, fresh_share: float = FRESH_SHARE, exchange_share: float = EXCHANGE_SHARE) -> dict[str, int]:
    """How many of ``kills`` each leg gets."""
    fresh, exchange = round(kills * fresh_share), round(kills * exchange_share)
    return {"whole": kills - fresh - exchange, "exchange": exchange, "fresh": fresh}


def run_random(h: Harness, rng: random.Random, kills: int, fresh_share: float = FRESH_SHARE,
               exchange_share: float = EXCHANGE_SHARE, window_runs: int = 1,
               ) -> tuple[list[Trial], dict[str, float]]:
    """``kills`` random-instant SIGKILLs in power-cut sequences of 1-3 kills per state directory, in three legs.

    The windows are measured first (``window_runs`` plain registrations
    each): "whole" kills a seeded directory uniformly from exec to exit (the
    interpreter's start-up is most of it); "exchange" kills a seeded
    directory uniformly within the measured length of the vault exchange
    (from the first request reaching the vault to the registered state.json:
    request-id, serial-request, the vault signing, storing, where double
    signings can happen), counted from the run's own first request;
    "fresh" kills a fresh directory from exec to exit, with real RSA-4096
    key generation (most of it).
    """
    seeded, exchange = h.measure_window(False, window_runs)
    fresh, _ = h.measure_window(True, window_runs)
    windows = {"whole": seeded, "exchange": exchange, "fresh": fresh}
    trials: list[Trial] = []
    for leg, wanted in random_legs(kills, fresh_share, exchange_share).items():
        done = 0
        while done < wanted:
            sequence = min(wanted - done, rng.choice((1, 1, 2, 2, 3)))
            began = time.monotonic()
            trial = h.random_trial(rng, leg, windows[leg], sequence)
            trial.seconds = round(time.monotonic() - began, 3)
            trials.append(trial)
            done += len(trial.kills)
            if not trial.kills and len(trials) > 4 * kills:
                raise HarnessError("random instants keep missing the daemon: is the window right?")
    return trials, {leg: round(seconds, 3) for leg, seconds in windows.items()}


def figures(trials: list[Trial]) -> dict[str, Any]:
    """The report: kills by point and by phase, double signings, temp files, restarts, orphans, problems."""
    kills = [k for t in trials for k in t.kills]
    named = collections.Counter(f"{k.how} ({'fresh' if k.fresh else 'seeded'})" for k in kills if k.how != "random")
    random_kills = [k for k in kills if k.how == "random"]
    signed_twice = [t for t in trials if t.double_signings]
    return {
        "kills": len(kills),
        "kills_named": dict(sorted(named.items())),
        "kills_random": len(random_kills),
        "kills_random_by_leg": dict(collections.Counter(k.leg for k in random_kills)),
        "kills_random_fresh_keygen": sum(k.fresh for k in random_kills),
        "kills_random_by_phase": dict(collections.Counter(k.phase for k in random_kills).most_common()),
        "random_instants_after_exit": sum(t.missed for t in trials),
        "trials": len(trials),
        "recoveries": len(trials),
        "recoveries_failed": sum(bool(t.problems) for t in trials),
        "restarts_needed_after_last_kill": dict(sorted(collections.Counter(t.restarts_needed for t in trials).items())),
        "daemon_runs_per_trial": dict(sorted(collections.Counter(t.runs for t in trials).items())),
        "double_signings": sum(t.double_signings for t in trials),
        "double_signings_by_cause": dict(collections.Counter(
            k.leg for t in signed_twice for k in t.kills if k.phase == "signed-not-stored").most_common()),
        "serials_signed": sum(t.signed for t in trials),
        "kills_leaving_temp_files": sum(bool(k.temps) for k in kills),
        "temp_files_seen_before_restart": sum(len(k.temps) for k in kills),
        "temp_files_by_name": dict(collections.Counter(_temp_kind(n) for k in kills for n in k.temps)),
        "kills_with_durable_key": sum(k.key_durable for k in kills),
        "orphaned_keygen_children": sum(k.orphans for k in kills),
        "seconds_by_leg": {leg: round(sum(t.seconds for t in trials if t.leg == leg), 1)
                           for leg in sorted({t.leg for t in trials})},
        "recovery_seconds_median": round(statistics.median([t.recovery_seconds for t in trials]), 3) if trials else 0,
        "problems": [p for t in trials for p in t.problems],
    }


def _temp_kind(name: str) -> str:
    """'.state.json.k2j3h.tmp' -> 'state.json'."""
    return name[1:].rsplit(".", 2)[0]


def trial_dicts(trials: list[Trial]) -> list[dict[str, Any]]:
    return [asdict(t) for t in trials]
