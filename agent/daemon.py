"""The daemon: wires one registration session, the driver of the configured mode, and the reporters.

session.py holds what every mode shares; standalone.py and snapd.py each drive
one way to register, holding a Session. Here: the signals, the reporters (log,
systemd, D-Bus), the TaskGroup every task belongs to, and the exit status.
Correctness never depends on a clean exit: the store's write order and
reconcile() make a SIGKILL at any instant safe.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import store, systemd
from .config import Config
from .errors import ConfigError
from .registration import Mode, Phase, Progress
from .session import LogPublisher, Publisher, Publishers, Session

log = logging.getLogger(__name__)
EXIT_TIMEOUT = 3  # run --once --timeout passed, as status --wait --timeout

if TYPE_CHECKING:  # imported when first needed: the status is published before they load
    from . import dbus_service


class Driver(Protocol):
    """One way to register, holding its Session: what the daemon and the D-Bus service ask of it."""

    session: Session

    async def load(self) -> None: ...
    async def run(self, tg: asyncio.TaskGroup, once: bool) -> Progress: ...
    def retry(self) -> None: ...
    def registration_settings(self) -> dict[str, str]: ...
    async def sign_request_id(self, request_id: str) -> str: ...
    def background(self) -> list[asyncio.Task[Any]]: ...
    def close(self) -> None: ...


def make_driver(session: Session) -> Driver:
    """The driver for the configured mode: a new way to register is one more entry here."""
    if session.cfg.mode is Mode.SNAPD:
        from .snapd import SnapdDriver

        return SnapdDriver(session)
    from .standalone import StandaloneDriver

    return StandaloneDriver(session)


async def main(cfg: Config, state_dir: Path, *, once: bool, bus: str = "none", publisher: Publisher | None = None,
               reload: Callable[[], Config] | None = None, blocked: ConfigError | None = None,
               timeout: float = 0.0) -> int:
    """Run until registered (``once``) or until SIGTERM/SIGINT; the exit status for the CLI.

    The status is published (D-Bus name owned) as soon as the state is
    loaded, before the modules the registration itself needs are imported.
    ``reload`` reads the configuration and its secrets again, at each Retry().
    The daemon (not ``once``) stays up, blocked, on what a person must fix in
    the environment: a state directory it cannot use, or ``blocked`` (the
    api-key file could not be read): a restart loop would fix neither.
    ``timeout`` (run --once --timeout): give up after that many seconds, exit 3.
    """
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, me.cancel)
    publishers = Publishers(publisher or LogPublisher(), systemd.StatusPublisher())
    session = Session(cfg, store.Store(state_dir), publishers, reload=reload, stay_up=not once)
    driver = make_driver(session)
    again = asyncio.Event()  # Retry() while the state directory could not be loaded
    loaded = await session.load_or_hold(driver.load)
    service = await _publish_on_bus(bus, driver, lambda: driver.retry() if loaded else again.set())
    if service is not None:
        publishers.add(service)
    first = session.status()  # ready = the state is loaded (or held) and the name owned; not "registered"
    systemd.notify_ready(systemd.status_line(first.state, first.serial, first.last_error, first.action))
    limit = asyncio.timeout(timeout or None)
    try:
        async with limit, asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(systemd.watchdog_loop())]
            if service is not None:
                helpers.append(tg.create_task(service.stay_connected()))  # a lost bus is reconnected, never fatal
            while not loaded:  # held: each Retry() tries the state directory again
                again.clear()
                await again.wait()
                if loaded := await session.load_or_hold(driver.load):
                    driver.retry()  # the Retry() asked for: the configuration and secrets read again too
            if blocked is not None:
                await session.record(blocked)  # blocked on it, recorded: Retry() reads the files again
            progress = await driver.run(tg, once)
            for task in (*helpers, *driver.background()):
                task.cancel()
    except TimeoutError:
        if not limit.expired():
            raise
        now = session.status()
        log.error("gave up after %g s (--timeout) in state %s%s", timeout, now.state,
                  f" ({now.last_error}: {now.last_error_message})" if now.last_error else "")
        return EXIT_TIMEOUT
    finally:
        systemd.notify_stopping()
        if service is not None:
            service.close()
        driver.close()
    return 0 if progress.phase is Phase.REGISTERED else 1


async def _publish_on_bus(bus: str, driver: Driver, retry: Callable[[], None]) -> dbus_service.Service | None:
    if bus == "none":
        return None
    from . import dbus_service

    session = driver.session
    return await dbus_service.publish(bus, session.status(), session.serial_assertion, retry,
                                      driver.registration_settings, session.history, driver.sign_request_id)
