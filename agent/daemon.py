"""The daemon: performs what registration.py decides, and reports every step.

It owns the I/O: the store (in a thread), key generation (a child process),
identity (pyudev), the vault (requests, in a thread). Every task belongs to
one TaskGroup; blocking calls go through asyncio.to_thread and are bounded
by their own timeouts. Correctness never depends on a clean exit: the store's
write order and reconcile() make a SIGKILL at any instant safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from random import Random
from typing import Protocol, TypeVar

from typing import TYPE_CHECKING

from . import __version__, assertions, keys, registration, serials, store, systemd
from .config import Config, VaultConfig
from .errors import AgentError, ConfigError, DeviceKeyLostError, NotRegisteredError, SerialRejectedError, WrongModeError
from .registration import Phase, Progress, Step

if TYPE_CHECKING:  # imported when first needed: the status is published before they load
    from . import dbus_service, identity, vault

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Status:
    """Everything a technician sees; the D-Bus properties mirror it one to one."""

    state: str
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
    """Reports each change of state or error as one log line."""

    def __init__(self) -> None:
        self.last: Status | None = None

    def publish(self, status: Status) -> None:
        before, self.last = self.last, status
        if before and (before.state, before.last_error) == (status.state, status.last_error):
            return
        line = f"state {status.state}"
        if status.state == "registered":
            line += f": serial {status.serial}"
        elif status.last_error:
            line += f" ({status.last_error}: {status.last_error_message})"
            if status.action:
                line += f"; action: {status.action}"
        level = logging.WARNING if status.state == "blocked" else logging.INFO
        log.log(level, line, extra=systemd.journal_fields(status.state, status.last_error, status.serial))


def load_recorded(st: store.Store) -> Progress:
    """The state directory made ready, and the progress it records (blocking)."""
    removed = st.prepare()
    if removed:
        log.info("removed temporary files left by a crash: %s", ", ".join(removed))
    recorded, corrupt = st.load_progress()
    if corrupt:
        log.warning("state.json was corrupt; moved aside to %s and rebuilt from the files present", corrupt,
                    extra={"MESSAGE_ID": systemd.MESSAGE_ID_STATE_CORRUPT})
    return recorded


def adopt_mode(p: Progress, st: store.Store, mode: str) -> Progress:
    """``p`` for ``mode``; ConfigError when the state directory holds the other mode's registration.

    A standalone state is about the agent's own key, a snapd one about snapd's:
    carrying either into the other mode would report, or relay for, the wrong key.
    """
    other = "snapd" if mode == "standalone" else "standalone"
    pristine = p.phase is Phase.UNREGISTERED and not p.key_id and not p.serial
    if (p.mode != mode and not pristine) or (mode == "snapd" and st.has_key()):
        raise ConfigError(f"cannot start in {mode} mode: state directory {st.dir} holds a {other}-mode registration; "
                          f"set mode = \"{other}\" again, or move that directory's files aside to start over in {mode} mode")
    return p if p.mode == mode else replace(p, mode=mode)


def load_state(st: store.Store, cfg: Config) -> tuple[Progress, keys.DeviceKey | None]:
    """Read the state directory and reconcile it with the artifacts on disk (blocking)."""
    recorded = adopt_mode(load_recorded(st), st, cfg.mode)
    if recorded.phase is Phase.REGISTERED and st.has_artifacts():
        return recorded, None  # every later boot: nothing to load, nothing to sign
    if recorded.key_id and st.has_key() and st.read_serial() is None:
        return recorded, None  # the key is loaded (and checked against the record) in the background
    key = store.load_device_key(st.dir)  # a crash left something to adopt, or something is missing
    serial = _serial_on_disk(st, cfg, key)
    progress = registration.reconcile(recorded, key.key_id if key else None, serial)
    if progress != recorded:
        st.save_progress(progress)
    return progress, key


def _serial_on_disk(st: store.Store, cfg: Config, key: keys.DeviceKey | None) -> str | None:
    text = st.read_serial()
    if text is None or key is None:
        return None
    try:
        return check_serial_for(cfg, key.key_id, text).header("serial")
    except AgentError as exc:
        log.warning("ignoring %s: %s", st.dir / store.SERIAL_FILE, exc)
        return None


def check_serial_for(cfg: Config, key_id: str, body: bytes) -> assertions.Assertion:
    """The serial assertion ``body``, checked as this device's (brand, model, key) and trusted; else AgentError."""
    return serials.check_serial(body, brand=cfg.brand, model=cfg.model, key_id=key_id,
                                trusted=cfg.vault.trusted_account_keys, model_assertion=cfg.model_assertion)


class Driver:
    """One registration, from whatever the state directory holds to registered (or blocked)."""

    def __init__(self, cfg: Config, st: store.Store, publisher: Publisher, rng: Random | None = None,
                 key_bits: int = keys.DEVICE_KEY_BITS) -> None:
        self.cfg, self.store, self.publisher = cfg, st, publisher
        self.rng = rng or Random()
        self.key_bits = key_bits
        self._vault: vault.Vault | None = None
        self.kick = asyncio.Event()
        self.progress = Progress()
        self.key: keys.DeviceKey | None = None
        self.identity: identity.DeviceIdentity | None = None
        self.request_id: tuple[str, float] | None = None  # (id, monotonic time fetched)
        self.activity, self.next_retry = "starting", 0.0
        self.serial_note = ""  # set when the vault signed another serial than the one proposed
        self.verified_serial: bytes | None = None  # what GetSerialAssertion serves: checked by this process
        self._serial_stat: tuple[int, int, int, int] | None = None  # serial.assertion when it was last seen
        # Background work returns its AgentError instead of raising it, so a
        # failure feeds the state machine instead of tearing down the TaskGroup.
        self.key_task: asyncio.Task[keys.DeviceKey | AgentError] | None = None
        self.identity_task: asyncio.Task[identity.DeviceIdentity | AgentError] | None = None

    def retry(self) -> None:
        """Retry(): unblock a refusal, or cut a wait short."""
        self.kick.set()

    def serial_assertion(self) -> str:
        """GetSerialAssertion(): the verified serial held in memory, once registered.

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
            serial = check_serial_for(self.cfg, self.progress.key_id, text)
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

    def registration_settings(self) -> dict[str, str]:
        """GetRegistrationSettings(): for snapd mode only (snapd.SnapdDriver)."""
        raise WrongModeError("the agent runs in standalone mode: it registers with its own device key and has no "
                             "settings for snapd (set mode = \"snapd\" on Ubuntu Core)")

    @property
    def vault(self) -> vault.Vault:
        if self._vault is None:
            from . import vault

            self._vault = vault.Vault(self.vault_config())
        return self._vault

    def vault_config(self) -> VaultConfig:
        """The vault client's settings (snapd mode shortens its timeout)."""
        return self.cfg.vault

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()

    async def load(self) -> None:
        self.progress, self.key = await asyncio.to_thread(load_state, self.store, self.cfg)

    async def run(self, tg: asyncio.TaskGroup, once: bool) -> Progress:
        self._publish()
        if self.progress.phase is not Phase.REGISTERED:
            # requests and pyudev take ~100 ms to import: in a thread, so D-Bus keeps answering meanwhile
            await asyncio.to_thread(import_adapters)
        while True:
            step = registration.next_step(self.progress, self._context())
            if step in (Step.DONE, Step.BLOCKED):
                self._publish()
                if once or not await self._wait_for_retry(step):
                    return self.progress
                continue
            outcome = await self._perform(step, tg)
            if outcome is not None:
                await self._apply(outcome)

    def _context(self) -> registration.Context:
        age = time.monotonic() - self.request_id[1] if self.request_id else None
        return registration.Context(key_ready=self.key is not None, identity_ready=self.identity is not None,
                                    request_id_age=age)

    async def _perform(self, step: Step, tg: asyncio.TaskGroup) -> registration.Outcome | None:
        try:
            if step is Step.FETCH_REQUEST_ID:
                self._start_background(tg)
                self._set_activity("requesting")
                self.request_id = (await asyncio.to_thread(self.vault.fetch_request_id), time.monotonic())
                return registration.GotRequestId()
            if step is Step.WAIT_IDENTITY:
                self._set_activity("identifying")
                self._start_background(tg)
                gathering, self.identity_task = self.identity_task, None  # a failed one starts afresh next time
                assert gathering is not None
                self.identity = _result(await gathering)
                return None
            if step is Step.WAIT_KEY:
                self._set_activity("generating-key" if not self.progress.key_id else self.activity)
                self._start_background(tg)
                generating, self.key_task = self.key_task, None
                assert generating is not None
                self.key = _result(await generating)
                return registration.KeyReady(self.key.key_id)
            return await self._exchange(step)
        except AgentError as exc:
            return exc

    def _start_background(self, tg: asyncio.TaskGroup) -> None:
        """Identity and key generation run while the request-id is fetched."""
        if self.identity is None and self.identity_task is None:
            from . import identity

            self.identity_task = tg.create_task(_captured(identity.gather_identity(self.cfg.identity)))
        if self.key is None and self.key_task is None:
            self.key_task = tg.create_task(_captured(self._generate_key()))

    async def _generate_key(self) -> keys.DeviceKey:
        """The recorded key, loaded off the loop (slow on cryptography 38), or a new one."""
        if self.progress.key_id:
            key = await asyncio.to_thread(store.load_device_key, self.store.dir)
            if key is None or key.key_id != self.progress.key_id:
                found = key.key_id if key else "none"
                raise DeviceKeyLostError(f"state records device key {self.progress.key_id} but device-key.pem holds {found}")
            return key
        pem = await keys.generate_key_pem_async(self.key_bits)
        return await asyncio.to_thread(store.save_device_key, self.store.dir, pem)

    async def _exchange(self, step: Step) -> registration.Outcome:
        if step is Step.POLL:
            self._set_activity("polling")
            request = self.progress.serial_request.encode()
        else:
            self._set_activity("requesting")
            request = self._serial_request()
        from . import vault

        answer = await asyncio.to_thread(self.vault.post_serial, self._stream(request))
        if isinstance(answer, vault.Pending):
            return registration.Accepted(request.decode(), answer.retry_after)
        serial = check_serial_for(self.cfg, self.progress.key_id, answer.body)
        await asyncio.to_thread(self.store.save_serial, serial.encode())  # the artifact before the record
        self.verified_serial, self._serial_stat = serial.encode(), file_identity(self.store.dir / store.SERIAL_FILE)
        self.serial_note = serial_note(request, serial.header("serial"))
        return registration.Registered(serial.header("serial"))

    def _serial_request(self) -> bytes:
        assert self.key is not None and self.identity is not None and self.request_id is not None
        from . import identity

        allow_weak = self.cfg.identity.allow_weak
        request = assertions.build_serial_request(
            brand=self.cfg.brand, model=self.cfg.model, request_id=self.request_id[0],
            device_key=self.key.public, signer=self.key.sign, created=int(time.time()),
            serial=identity.proposed_serial(self.identity, self.cfg.serial_template, allow_weak),
            body=identity.registration_body(self.identity, allow_weak),
        )
        return request.encode()

    def _stream(self, request: bytes) -> bytes:
        """The serial-request, then the model assertion after one empty line, as snapd posts it."""
        if self.cfg.model_assertion is None:
            return request
        return request + b"\n" + self.cfg.model_assertion.encode().rstrip(b"\n") + b"\n"

    async def _apply(self, outcome: registration.Outcome) -> None:
        if isinstance(outcome, SerialRejectedError):
            log.error("rejected the vault's serial: %s", outcome)
        decision = registration.apply(self.progress, outcome, self.rng)
        if decision.forget_request_id:
            self.request_id = None
        progress = decision.progress
        if self.identity is not None:
            progress = with_identity(progress, self.identity.fields(self.cfg.identity.allow_weak))
        if isinstance(outcome, registration.Registered) and self.serial_note:
            log.warning("%s", self.serial_note)
            progress = replace(progress, last_error=SERIAL_NOT_PROPOSED, last_error_message=self.serial_note)
        waiting = 0 < decision.delay < math.inf
        if waiting:  # announced with the transition itself: one PropertiesChanged, not two
            self.next_retry = time.time() + decision.delay
            self.activity = "waiting-clock" if progress.last_error == "clock-skew" else "waiting-retry"
        await self._commit(progress)
        if waiting:
            await self._sleep(decision.delay)

    async def _commit(self, progress: Progress) -> None:
        """Persist, then publish: nobody hears of a state that a power cut could undo."""
        if progress != self.progress:
            await asyncio.to_thread(self.store.save_progress, progress)
            self.progress = progress
        self._publish()

    async def _sleep(self, delay: float) -> None:
        self.kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.kick.wait(), delay)
        self.next_retry = 0.0

    async def _wait_for_retry(self, step: Step) -> bool:
        """Registered: serve status until stopped (SIGTERM); a Retry() then has nothing to do, and used to end
        the daemon (exit 0, which systemd does not restart). Blocked: wait for Retry(), then go on."""
        while True:
            self.kick.clear()
            await self.kick.wait()
            if step is Step.BLOCKED:
                await self._commit(registration.unblock(self.progress))
                self.identity = None if self.progress.blocked_by == "identity" else self.identity
                return True

    def _set_activity(self, activity: str) -> None:
        self.activity, self.next_retry = activity, 0.0
        self._publish()

    def status(self) -> Status:
        p = self.progress
        return Status(
            state=registration.display_state(p, self.activity),
            serial=p.serial if p.phase is Phase.REGISTERED else "",
            brand=self.cfg.brand, model=self.cfg.model,
            device_key_id=p.key_id, attempts=p.attempts,
            last_error=p.last_error, last_error_message=p.last_error_message, action=p.action,
            next_retry=int(self.next_retry * 1_000_000),
            identity=self.identity.fields(self.cfg.identity.allow_weak) if self.identity else dict(p.identity),
        )

    def _publish(self) -> None:
        self.publisher.publish(self.status())


T = TypeVar("T")

# LastError of a registered device whose serial is not the one it proposed. The Serial Vault signs the
# proposed serial; a service that assigns its own (the Model Service may) is obeyed: the signed serial is
# the device's, and the technician is told which label it does not match.
SERIAL_NOT_PROPOSED = "serial-not-proposed"


def serial_note(request: bytes, signed: str) -> str:
    """What to say when the vault signed ``signed`` for the serial-request ``request``: "" if it was proposed."""
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
    import importlib

    for name in ("agent.identity", "agent.vault"):
        importlib.import_module(name)


async def _captured(work: Awaitable[T]) -> T | AgentError:
    try:
        return await work
    except AgentError as exc:
        return exc


def _result(value: T | AgentError) -> T:
    if isinstance(value, AgentError):
        raise value
    return value


def with_identity(p: Progress, fields: dict[str, str]) -> Progress:
    return p if p.identity == fields else replace(p, identity=fields)


async def main(cfg: Config, state_dir: Path, *, once: bool, bus: str = "none", publisher: Publisher | None = None,
               on_driver: Callable[[Driver], None] | None = None) -> int:
    """Run until registered (``once``) or until SIGTERM/SIGINT; the exit status for the CLI.

    The status is published (D-Bus name owned) as soon as the state is
    loaded, before the modules the registration itself needs are imported.
    """
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, me.cancel)
    publishers = Publishers(publisher or LogPublisher(), systemd.StatusPublisher())
    driver = _driver_class(cfg)(cfg, store.Store(state_dir), publishers)
    if on_driver:
        on_driver(driver)
    await driver.load()
    service = await _publish_on_bus(bus, driver)
    if service is not None:
        publishers.add(service)
    first = driver.status()  # ready = the state is loaded and the name owned; not "registered"
    systemd.notify_ready(systemd.status_line(first.state, first.serial, first.last_error, first.action))
    try:
        async with asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(systemd.watchdog_loop())]
            if service is not None:
                helpers.append(tg.create_task(service.stay_connected()))  # a lost bus is reconnected, never fatal
            progress = await driver.run(tg, once)
            for task in (*helpers, driver.key_task, driver.identity_task):
                if task is not None:
                    task.cancel()
    finally:
        systemd.notify_stopping()
        if service is not None:
            service.close()
        driver.close()
    return 0 if progress.phase is Phase.REGISTERED else 1


def _driver_class(cfg: Config) -> type[Driver]:
    if cfg.mode == "snapd":
        from .snapd import SnapdDriver

        return SnapdDriver
    return Driver


async def _publish_on_bus(bus: str, driver: Driver) -> dbus_service.Service | None:
    if bus == "none":
        return None
    from . import dbus_service

    return await dbus_service.publish(bus, driver.status(), driver.serial_assertion, driver.retry,
                                      driver.registration_settings)
