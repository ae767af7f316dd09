"""One registration session: what every way to register shares, held (never subclassed) by each driver.

A driver (standalone.py: the agent's own key; snapd.py: snapd's key, through the
relay) decides *how* the exchanges with the vault happen. The session is the
rest, the same for all of them: the state directory loaded and its mode adopted,
a serial checked as this device's and stored before it is recorded, the verified
serial held in memory for GetSerialAssertion, each outcome turned into the next
Progress by registration.apply(), persisted, then published as one Status.

daemon.py wires a session, a driver and the reporters; a new way to register
is one more driver holding a Session, and nothing here or in the others changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from random import Random
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from . import __version__, assertions, registration, serials, store, systemd
from .config import Config, VaultConfig
from .errors import (
    AgentError,
    AssertionFormatError,
    Code,
    ConfigError,
    NotRegisteredError,
    SerialRejectedError,
    StateLockedError,
    StoreError,
    VaultError,
)
from .registration import Decision, Event, EventKind, Mode, Outcome, Phase, Progress, State

if TYPE_CHECKING:  # imported when first needed: the status is published before they load
    from . import identity, vault

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Status:
    """Everything a technician sees; the D-Bus properties mirror it one to one."""

    state: State
    serial: str
    brand: str
    model: str
    device_key_id: str
    attempts: int
    last_error: str
    last_error_message: str
    action: str
    next_retry: int  # unix microseconds, 0 if none
    identity: dict[str, str] = field(default_factory=dict)
    version: str = __version__
    state_since: int = 0  # unix microseconds: since when ``state`` has this value
    started_at: int = 0  # unix microseconds: this daemon's start
    last_attempt_at: int = 0  # unix microseconds: the last exchange with the vault, 0 if none
    registered_at: int = 0  # unix microseconds: the registration, 0 if not registered
    waiting_for: tuple[str, ...] = ()  # identifying: the required identity fields not found yet
    deadline: int = 0  # unix microseconds: when the wait of the state ends (identifying: the identity's), 0 if none


class Publisher(Protocol):
    def publish(self, status: Status) -> None: ...


class Publishers:
    """Fan one status out to every reporter (log, D-Bus, systemd)."""

    def __init__(self, *publishers: Publisher) -> None:
        self.publishers = list(publishers)

    def add(self, publisher: Publisher) -> None:
        self.publishers.append(publisher)

    def publish(self, status: Status) -> None:
        for publisher in self.publishers:
            publisher.publish(status)


class LogPublisher:
    """Reports each change of state or error as one log line; retries of one same error are collapsed.

    While the vault stays down the states cycle (requesting, waiting-retry...) with one same error, two lines
    every few seconds. After the first report of an error, its repeats are kept back and summed up in one
    "still ..." line at growing intervals (COLLAPSE_FIRST s, doubled each time up to COLLAPSE_MAX s), raised to
    warning once the error has lasted WARN_AFTER s. Another error, a block or a success is logged at once.
    """

    COLLAPSE_FIRST = 60.0
    COLLAPSE_MAX = 900.0
    WARN_AFTER = 600.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.last: Status | None = None
        self._clock = clock
        self._streak: tuple[str, str] | None = None  # (LastError, LastErrorMessage) being collapsed
        self._since = 0.0  # when the streak began
        self._tries = 0  # attempts seen in the streak
        self._next_summary, self._interval = 0.0, self.COLLAPSE_FIRST

    def publish(self, status: Status) -> None:
        before, self.last = self.last, status
        if before and (before.state, before.last_error) == (status.state, status.last_error):
            return
        now = self._clock()
        key = (status.last_error, status.last_error_message)
        ongoing = status.state not in (State.BLOCKED, State.REGISTERED)
        if self._streak and ongoing and (key == self._streak or (
                not status.last_error and status.state in (State.REQUESTING, State.POLLING))):
            self._tries += status.state is State.REQUESTING  # a new attempt of the same failing exchange
            if now >= self._next_summary and status.last_error:
                self._summary(status, now)
            return
        self._streak = key if status.last_error and ongoing else None
        self._since, self._tries = now, 1
        self._interval = self.COLLAPSE_FIRST
        self._next_summary = now + self._interval
        line = f"state {status.state}"
        if status.state is State.REGISTERED:
            line += f": serial {status.serial}"
        elif status.last_error:
            line += f" ({status.last_error}: {status.last_error_message})"
            if status.action:
                line += f"; action: {status.action}"
            line += self._next_try(status)
        level = logging.WARNING if status.state is State.BLOCKED else logging.INFO
        log.log(level, line, extra=systemd.journal_fields(status.state, status.last_error, status.serial))

    def _summary(self, status: Status, now: float) -> None:
        since = time.strftime("%H:%M:%S", time.localtime(self._since))
        word = "unreachable" if status.last_error == "vault-unavailable" else f"failing ({status.last_error})"
        line = f"still {word}: {self._tries} tries since {since}: {status.last_error_message}{self._next_try(status)}"
        level = logging.WARNING if now - self._since >= self.WARN_AFTER else logging.INFO
        log.log(level, line, extra=systemd.journal_fields(status.state, status.last_error, status.serial))
        self._interval = min(self._interval * 2, self.COLLAPSE_MAX)
        self._next_summary = now + self._interval

    @staticmethod
    def _next_try(status: Status) -> str:
        if not status.next_retry:
            return ""
        return "; next try at " + time.strftime("%H:%M:%S", time.localtime(status.next_retry / 1_000_000))


class Session:
    """The progress of one device's registration, and everything said about it."""

    def __init__(self, cfg: Config, st: store.Store, publisher: Publisher, rng: Random | None = None,
                 reload: Callable[[], Config] | None = None, stay_up: bool = False) -> None:
        self.cfg, self.store, self.publisher = cfg, st, publisher
        self.rng = rng or Random()
        self._reload = reload  # reads the configuration and its secrets again (Retry()); None: never
        # The daemon (not run --once) stays up, blocked, when the state directory cannot be written: a person
        # fixes the mount, the disk or the owner, then Retry() (a restart loop would fix nothing, every 5 s).
        self.stay_up = stay_up
        self.held: StoreError | None = None  # why the state directory cannot be used now (not persisted)
        self.progress = Progress()
        self.identity: identity.DeviceIdentity | None = None
        self.activity, self.next_retry = State.STARTING, 0.0  # next_retry: unix time, 0 if none
        self.lock = asyncio.Lock()  # one read-modify-write of progress at a time
        self.verified_serial: bytes | None = None  # what GetSerialAssertion serves: checked by this process
        self._serial_stat: tuple[int, int, int, int] | None = None  # serial.assertion when it was last seen
        self._serial_note = ""  # set when the vault signed another serial than the one proposed
        self.started_at = now_us()
        self.hardware_digest = ""  # secure onboarding: this device's hardware-id-key-sha3-384, once signed with
        self._shown: tuple[State, int] = (State.STARTING, self.started_at)  # the State published, and since when
        self._waiting: tuple[tuple[str, ...], float] = ((), 0.0)  # the identity's missing fields, until when

    # --- loading (blocking: called in a thread) ---------------------------------

    def load_recorded(self) -> Progress:
        """The state directory made ready, and the progress it records, for this mode."""
        removed = self.store.prepare()
        if removed:
            log.info("removed temporary files left by a crash: %s", ", ".join(removed))
        recorded, corrupt = self.store.load_progress()
        if corrupt:
            log.warning("state.json was corrupt; moved aside to %s and rebuilt from the files present", corrupt,
                        extra={"MESSAGE_ID": systemd.MESSAGE_ID_STATE_CORRUPT})
        recorded = adopt_mode(recorded, self.store, self.cfg.mode)
        recorded = with_event(recorded, EventKind.STARTED, f"factory-agent {__version__}, pid {os.getpid()}, "
                              f"{self.cfg.mode} mode")  # kept with the next write: a start alone writes nothing
        if recorded.blocked_by:  # a restart is a person's way to say "try again", as Retry() is
            log.info("blocked by %s before this start: trying again", recorded.blocked_by)
            recorded = with_event(registration.unblock(recorded), EventKind.RETRY,
                                  f"the restart ends the block by {recorded.blocked_by}: a fresh attempt")
        return recorded

    async def load_or_hold(self, load: Callable[[], Awaitable[None]]) -> bool:
        """The driver's ``load`` of the state directory: True when done; False when the daemon holds, blocked,
        on why the directory cannot be used (stay_up). ``run --once`` has it raised (one line, exit 1), and so
        does another copy holding the state lock: two daemons never serve one device."""
        try:
            await load()
        except StoreError as exc:
            if not self.stay_up or isinstance(exc, StateLockedError):
                raise
            self.progress = Progress()  # what state.json says is unknown: nothing is taken from a partial read
            self.hold(exc)
            return False
        self.held = None
        return True

    def serial_on_disk(self, key_id: str | None) -> str | None:
        """The serial of serial.assertion if it is this device's for ``key_id``; None (and a warning) if not."""
        text = self.store.read_serial()
        if text is None or not key_id:
            return None
        try:
            return self.check_serial(key_id, text).header("serial")
        except AgentError as exc:
            log.warning("ignoring %s: %s", self.store.dir / store.SERIAL_FILE, exc)
            return None

    def reconciled(self, progress: Progress, recorded: Progress) -> Progress:
        """``progress``, persisted if reconciling changed it from what was ``recorded``."""
        if progress != recorded:
            self.store.save_progress(progress)
        return progress

    # --- the serial ---------------------------------------------------------------

    def check_serial(self, key_id: str, body: bytes) -> assertions.Assertion:
        """The serial assertion ``body``, checked as this device's (brand, model, key) and trusted; else AgentError."""
        cfg = self.cfg
        return serials.check_serial(body, brand=cfg.brand, model=cfg.model, key_id=key_id,
                                    trusted=cfg.vault.trusted_account_keys, model_assertion=cfg.model_assertion)

    async def store_serial(self, key_id: str, request: bytes, body: bytes) -> registration.Registered:
        """The vault's answer ``body`` to the serial-request ``request``: checked, stored, held; the outcome."""
        serial = self.check_serial(key_id, body)
        await asyncio.to_thread(self.store.save_serial, serial.encode())  # the artifact before the record
        self.verified_serial = serial.encode()  # what is served from now on (GetSerialAssertion, the relay)
        self._serial_stat = file_identity(self.store.dir / store.SERIAL_FILE)
        self._serial_note = serial_note(request, serial.header("serial"))
        return registration.Registered(serial.header("serial"))

    def serial_assertion(self) -> str:
        """GetSerialAssertion(): the verified serial held in memory, once registered (blocking the first time).

        It is the one this process verified (at registration, or on the first call after a restart,
        from disk); a serial.assertion changed on disk afterwards is reported, and never served.
        """
        if self.progress.phase is not Phase.REGISTERED:
            raise NotRegisteredError(f"not registered yet (state {self.status().state})")
        if self.verified_serial is None:
            self.verified_serial = self._verify_stored_serial()
        else:
            self._notice_swapped_serial()
        return self.verified_serial.decode("utf-8")

    def _verify_stored_serial(self) -> bytes:
        path = self.store.dir / store.SERIAL_FILE
        text = self.store.read_serial()
        if text is None:
            raise NotRegisteredError(f"not registered: {path} is missing")
        try:
            serial = self.check_serial(self.progress.key_id, text)
        except AgentError as exc:
            log.error("refusing to serve %s: %s", path, exc)
            raise SerialRejectedError(f"cannot serve {path}: it is not this device's verified serial ({exc})") from None
        if serial.header("serial") != self.progress.serial:
            log.error("refusing to serve %s: it holds serial %s, the state records %s", path,
                      serial.header("serial"), self.progress.serial)
            raise SerialRejectedError(f"cannot serve {path}: it holds serial {serial.header('serial')}, "
                                      f"not the registered {self.progress.serial}")
        self._serial_stat = file_identity(path)
        return serial.encode()

    def _notice_swapped_serial(self) -> None:
        """Warn (once per change) when serial.assertion on disk is no longer the file that was verified."""
        path = self.store.dir / store.SERIAL_FILE
        now = file_identity(path)
        if self._serial_stat is not None and now != self._serial_stat:
            log.warning("%s changed on disk after it was verified; serving the verified serial %s, not the file",
                        path, self.progress.serial)
        self._serial_stat = now

    # --- progress ---------------------------------------------------------------

    async def record(self, outcome: Outcome, *, activity: State | None = None, wait: bool = False,
                     note: str = "") -> Decision:
        """Apply ``outcome``, persist, then publish (one PropertiesChanged); the decision, for its delay.

        ``activity`` is what the driver does next (None: as before). With ``wait`` a delay shows as
        waiting-retry or waiting-clock with NextRetry; snapd mode does not wait (snapd decides when).
        The outcome is one step of the history; ``note`` adds to what it says.
        """
        if isinstance(outcome, SerialRejectedError):
            log.error("rejected the vault's serial: %s", outcome)
        async with self.lock:
            decision = registration.apply(self.progress, outcome, self.rng)
            progress = self.with_identity(_stamped(decision.progress, outcome))
            if isinstance(outcome, registration.Registered) and self._serial_note:
                log.warning("%s", self._serial_note)
                progress = replace(progress, last_error=Code.SERIAL_NOT_PROPOSED, last_error_message=self._serial_note)
            event = self._event_for(outcome, progress, decision.delay, note)
            if event is not None:
                progress = with_event(progress, *event)
            self.activity, self.next_retry = activity or self.activity, 0.0
            if wait and 0 < decision.delay < math.inf:  # announced with the transition itself
                self.next_retry = time.time() + decision.delay
                clock = progress.last_error == Code.CLOCK_SKEW
                self.activity = State.WAITING_CLOCK if clock else State.WAITING_RETRY
            await self._commit(progress)
        return decision

    def _event_for(self, outcome: Outcome, p: Progress, delay: float, note: str) -> tuple[EventKind, str] | None:
        """The history's step for ``outcome`` (None: nothing new happened)."""
        noted = f", {note}" if note else ""
        if isinstance(outcome, registration.KeyReady):
            return (EventKind.KEY, f"device key {outcome.key_id}{noted}") if outcome.key_id != self.progress.key_id else None
        if isinstance(outcome, registration.GotRequestId):
            return EventKind.REQUEST_ID, f"request-id from {self.cfg.vault.url}{noted}"
        if isinstance(outcome, registration.Posted):
            return EventKind.SERIAL_REQUEST, f"attempt {p.attempts}{noted}"
        if isinstance(outcome, registration.Accepted):
            return EventKind.ACCEPTED, f"the vault accepted the serial-request (202): asking again in {delay:.0f} s"
        if isinstance(outcome, registration.Registered):
            return EventKind.REGISTERED, f"serial {outcome.serial}{noted}"
        kind = EventKind.BLOCKED if p.blocked_by else EventKind.ERROR
        return kind, f"{p.last_error}: {p.last_error_message}{noted}"

    def history(self) -> tuple[Event, ...]:
        return self.progress.history

    async def unblock(self) -> None:
        """A new attempt (snapd's): a block ends; an identity block gathers afresh."""
        async with self.lock:
            if not self.progress.blocked_by:
                return
            if self.progress.blocked_by == Code.IDENTITY:
                self.identity = None
            fresh = with_event(registration.unblock(self.progress), EventKind.RETRY,
                               f"snapd's new attempt ends the block by {self.progress.blocked_by}")
            await self._commit(fresh)

    async def start_over(self) -> bool:
        """Retry(): the configuration and its secrets read again, the block and the last error dropped, for a
        fresh attempt. False (and blocked on it) when the configuration no longer loads."""
        async with self.lock:
            if self.progress.blocked_by == Code.IDENTITY:
                self.identity = None
            was = f" (it ends the block by {self.progress.blocked_by})" if self.progress.blocked_by else ""
            await self._commit(with_event(registration.unblock(self.progress), EventKind.RETRY,
                                          f"Retry(): a fresh attempt{was}"))
        if self._reload is None:
            return True
        try:
            cfg = await asyncio.to_thread(self._reload)
            if cfg.mode != self.cfg.mode:
                raise ConfigError(f"cannot change mode from {self.cfg.mode} to {cfg.mode} without a restart: "
                                  f"set mode = \"{self.cfg.mode}\" again, or restart factory-agent")
        except ConfigError as exc:
            log.error("cannot read the configuration again: %s", exc)
            await self.record(exc)
            return False
        if cfg != self.cfg:
            files = ", ".join(str(path) for path in cfg.files)
            log.info("configuration read again: %s", files)
            async with self.lock:
                self.progress = with_event(self.progress, EventKind.CONFIG, f"read again, changed: {files}")
        self.cfg = cfg
        return True

    async def adopt_identity(self, found: identity.DeviceIdentity, activity: State | None = None,
                             took: float | None = None) -> None:
        """Hold the gathered identity; its fields are recorded (and published) with the progress at once."""
        async with self.lock:
            self.identity = found
            self.activity = activity or self.activity
            progress = self.with_identity(self.progress)
            if progress.identity != self.progress.identity or not progress.identity:
                fields = ", ".join(sorted(progress.identity)) or "no fields"
                spent = f" in {took:.1f} s" if took is not None else ""
                progress = with_event(progress, EventKind.IDENTITY, f"{fields}{spent}")
            await self._commit(progress)

    def waiting_for(self, missing: tuple[str, ...], until: float) -> None:
        """The identity waits for ``missing`` required fields until ``until`` (unix time); () when it is over."""
        if (missing, until) != self._waiting:
            self._waiting = (missing, until)
            self.publish()

    def with_identity(self, p: Progress) -> Progress:
        if self.identity is None:
            return p
        fields = self.identity.fields(self.cfg.identity.allow_weak)
        return p if p.identity == fields else replace(p, identity=fields)

    async def _commit(self, progress: Progress) -> None:
        """Persist, then publish: nobody hears of a state that a power cut could undo. A state that cannot be
        written is not taken: the daemon holds (stay_up) on the error instead, else it is raised."""
        if progress != self.progress:
            if not _only_recounted(self.progress, progress):  # a repeat's count waits for the next real change
                try:
                    await asyncio.to_thread(self.store.save_progress, progress)
                except StoreError as exc:
                    if not self.stay_up:
                        raise
                    self.hold(exc)
                    return
            self.held = None
            self.progress = progress
        self.publish()

    def hold(self, error: StoreError) -> None:
        """Blocked on ``error``, in memory only (the state directory cannot take a write): shown at once, and
        ended by Retry(), which writes again. What state.json holds stays as it was."""
        self.held = error  # published as blocked: the log line carries the error's MESSAGE_ID
        self.progress = replace(self.progress, blocked_by=error.code, last_error=error.code,
                                last_error_message=str(error))
        self.publish()

    def raise_if_held(self) -> None:
        """Before a step that must be recorded first (a serial-request posted): not taken while held."""
        if self.held is not None:
            raise self.held

    # --- status -----------------------------------------------------------------

    def set_activity(self, activity: State) -> None:
        self.activity, self.next_retry = activity, 0.0
        self.publish()

    def status(self) -> Status:
        p = self.progress
        state = registration.display_state(p, self.activity)
        if state != self._shown[0]:  # registered: since the registration, whenever this daemon started
            since = p.registered_at if state is State.REGISTERED and p.registered_at else now_us()
            self._shown = (state, since)
        return Status(
            state=state,
            serial=p.serial if p.phase is Phase.REGISTERED else "",
            brand=self.cfg.brand, model=self.cfg.model,
            device_key_id=p.key_id, attempts=p.attempts,
            last_error=p.last_error, last_error_message=p.last_error_message, action=self._action(p),
            next_retry=int(self.next_retry * 1_000_000),
            identity=self.identity.fields(self.cfg.identity.allow_weak) if self.identity else dict(p.identity),
            state_since=self._shown[1], started_at=self.started_at, last_attempt_at=p.last_attempt_at,
            registered_at=p.registered_at, **self._waited(state),
        )

    def _action(self, p: Progress) -> str:
        """The action, naming this device's hardware identity digest where it says what to import."""
        if self.hardware_digest:
            return p.action.replace("hardware-id-key-sha3-384 (", f"hardware-id-key-sha3-384 {self.hardware_digest} (")
        return p.action

    def _waited(self, state: State) -> dict[str, Any]:
        """What identifying waits for, shown while it is the State (the identity also runs beside requesting)."""
        missing, until = self._waiting
        if state is not State.IDENTIFYING or not missing:
            return {}
        return {"waiting_for": missing, "deadline": int(until * 1_000_000)}

    def publish(self) -> None:
        self.publisher.publish(self.status())


class Closable(Protocol):
    def close(self) -> None: ...


P = TypeVar("P", bound=Closable)


class VaultClient(Generic[P]):
    """A driver's vault client: made on first use, and made afresh when Retry() read another vault
    configuration; one handed in (a test's fake) is kept whatever the configuration."""

    def __init__(self, given: P | None, make: Callable[[VaultConfig], P]) -> None:
        self._client, self._fixed, self._make = given, given is not None, make
        self._made_from: VaultConfig | None = None

    def get(self, wanted: VaultConfig) -> P:
        if self._client is not None and not self._fixed and self._made_from != wanted:
            self._client.close()
            self._client = None
        if self._client is None:
            self._client, self._made_from = self._make(wanted), wanted
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def new_vault(cfg: VaultConfig) -> vault.Vault:
    """The real vault client (requests), imported when first needed."""
    from . import vault

    return vault.Vault(cfg)


def now_us() -> int:
    return time.time_ns() // 1000


MAX_EVENT_DETAIL = 1000  # characters of one history line: state.json stays small (store.MAX_STATE_BYTES)


def with_event(p: Progress, kind: EventKind, detail: str) -> Progress:
    """``p`` with one more step in its history, stamped now."""
    if len(detail) > MAX_EVENT_DETAIL:
        detail = detail[: MAX_EVENT_DETAIL - 3] + "..."
    return replace(p, history=registration.noted(p.history, Event(now_us(), kind, detail)))


def _only_recounted(before: Progress, after: Progress) -> bool:
    """``after`` differs from ``before`` only in the count (and time) of a repeated step and of the last attempt:
    not worth a write each (a vault down for an hour would cost hundreds); the next change carries it."""
    if len(before.history) != len(after.history) or not after.history:
        return False
    same = replace(after, history=before.history, last_attempt_at=before.last_attempt_at) == before
    b, a = before.history[-1], after.history[-1]
    return same and before.history[:-1] == after.history[:-1] and (b.kind, b.detail) == (a.kind, a.detail)


def _stamped(p: Progress, outcome: Outcome) -> Progress:
    """``p`` with the time of an exchange with the vault (LastAttemptAt) and of the registration (RegisteredAt)."""
    exchanged = isinstance(outcome, registration.GotRequestId | registration.Posted | registration.Accepted
                           | registration.Registered | VaultError | AssertionFormatError | SerialRejectedError)
    if not exchanged:
        return p
    now = now_us()
    registered = now if isinstance(outcome, registration.Registered) else p.registered_at
    return replace(p, last_attempt_at=now, registered_at=registered)


def adopt_mode(p: Progress, st: store.Store, mode: Mode) -> Progress:
    """``p`` for ``mode``; ConfigError when the state directory holds the other mode's registration.

    A standalone state is about the agent's own key, a snapd one about snapd's:
    carrying either into the other mode would report, or relay for, the wrong key.
    """
    other = Mode.SNAPD if mode is Mode.STANDALONE else Mode.STANDALONE
    pristine = p.phase is Phase.UNREGISTERED and not p.key_id and not p.serial
    if (p.mode != mode and not pristine) or (mode is Mode.SNAPD and st.has_key()):
        raise ConfigError(f"cannot start in {mode} mode: state directory {st.dir} holds a {other}-mode registration; "
                          f"set mode = \"{other}\" again, or move that directory's files aside to start over in {mode} mode")
    return p if p.mode == mode else replace(p, mode=mode)


def serial_note(request: bytes, signed: str) -> str:
    """What to say when the vault signed ``signed`` for the serial-request ``request``: "" if it was proposed.

    The Serial Vault signs the proposed serial; a service that assigns its own (the Model Service may) is
    obeyed: the signed serial is the device's, and LastError serial-not-proposed tells the technician which
    label it does not match.
    """
    proposed = assertions.decode(request).headers.get("serial", "")
    if not isinstance(proposed, str) or not proposed or proposed == signed:
        return ""
    return f"the vault signed serial {signed}, not the proposed {proposed}: the signed one is this device's"


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """Which file is at ``path`` (device, inode, size, mtime), to notice it being replaced; None if none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def import_adapters() -> None:
    """requests and pyudev take ~100 ms to import: done in a thread, so D-Bus keeps answering meanwhile."""
    import importlib

    for name in ("agent.identity", "agent.vault"):
        importlib.import_module(name)
