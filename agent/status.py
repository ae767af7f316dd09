"""`factory-agent status`: the daemon's state for a technician or a test-station script.

It reads io.factoryagent.Agent1 over D-Bus (GetAll), and with --wait follows
PropertiesChanged until the device is registered or blocked: it subscribes
before reading, so no change is missed, and never polls the daemon. On a
terminal the wait is one live line; in a pipe, one plain line per change.

Exit status (fixed): 0 registered, 1 blocked, 2 still in progress, 3 --wait
timed out, 69 the daemon cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from . import dbus_service
from .errors import BusError
from .registration import State

EXIT_REGISTERED, EXIT_BLOCKED, EXIT_PENDING, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 69
JSON_SCHEMA = 1
# D-Bus property -> --json key. Append-only: scripts parse these.
JSON_KEYS = {
    "State": "state", "Serial": "serial", "Brand": "brand", "Model": "model", "DeviceKeyId": "device-key-id",
    "Attempts": "attempts", "LastError": "last-error", "LastErrorMessage": "last-error-message",
    "Action": "action", "NextRetry": "next-retry", "Identity": "identity", "Version": "version",
    "StateSince": "state-since", "StartedAt": "started-at", "LastAttemptAt": "last-attempt-at",
    "RegisteredAt": "registered-at", "WaitingFor": "waiting-for", "Deadline": "deadline",
}
_PROPS = "org.freedesktop.DBus.Properties"
_MATCH = (f"type='signal',sender='{dbus_service.BUS_NAME}',path='{dbus_service.OBJECT_PATH}',"
          f"interface='{_PROPS}',member='PropertiesChanged'")
_OWNER_MATCH = (f"type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{dbus_service.BUS_NAME}'")
NO_OWNER = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


def exit_code(props: dict[str, Any]) -> int:
    state = props.get("State", "")
    if state == State.REGISTERED:
        return EXIT_REGISTERED
    if state == State.BLOCKED:
        return EXIT_BLOCKED
    return EXIT_PENDING  # any other, or a state added later: still in progress


def to_json(props: dict[str, Any]) -> dict[str, Any]:
    """The stable --json document: {"schema": 1, "state": ..., ...}; next-retry in unix microseconds."""
    data: dict[str, Any] = {"schema": JSON_SCHEMA}
    data.update({key: props[name] for name, key in JSON_KEYS.items() if name in props})
    return data


def describe(props: dict[str, Any], now: float) -> list[str]:
    """The human report, one 'Name: value' line each."""
    lines = [f"State: {props.get('State', '?')}"]
    if props.get("Serial"):
        lines.append(f"Serial: {props['Serial']}")
    lines += [f"Brand: {props.get('Brand', '')}", f"Model: {props.get('Model', '')}",
              f"Device key: {props.get('DeviceKeyId') or '(none yet)'}", f"Attempts: {props.get('Attempts', 0)}"]
    if props.get("LastError"):
        lines.append(f"Last error: {props['LastError']}: {props.get('LastErrorMessage', '')}")
    if props.get("Action"):
        lines.append(f"Action: {props['Action']}")
    if props.get("NextRetry"):
        lines.append(f"Next retry: in {_countdown(props, now)}")
    if props.get("WaitingFor"):
        lines.append(f"Waiting for: {_waited(props, now)} (identity.required)")
    identity = props.get("Identity") or {}
    if identity:
        lines.append("Identity: " + ", ".join(f"{k}={v}" for k, v in identity.items()))
    return lines


def live_line(props: dict[str, Any], started: float, now: float) -> str:
    """One line: state, time in it (since StateSince; since ``started`` from an older daemon), attempts,
    countdown to the next retry, and the action when blocked."""
    since = props.get("StateSince", 0) / 1_000_000 or started
    parts = [props.get("State", "?"), f"{max(0, int(now - since))}s", f"attempts {props.get('Attempts', 0)}"]
    if props.get("State") == State.REGISTERED:
        parts.append(f"serial {props.get('Serial', '')}")
    elif props.get("NextRetry"):
        parts.append(f"retry in {_countdown(props, now)}")
    elif props.get("WaitingFor"):
        parts.append(f"waiting for {_waited(props, now)}")
    if props.get("LastError"):
        parts.append(f"{props['LastError']}: {props.get('LastErrorMessage', '')}")
    if props.get("State") == State.BLOCKED and props.get("Action"):
        parts.append(f"action: {props['Action']}")
    return " | ".join(parts)


def _countdown(props: dict[str, Any], now: float, name: str = "NextRetry") -> str:
    return f"{max(0, round(props[name] / 1_000_000 - now))}s"


def _waited(props: dict[str, Any], now: float) -> str:
    """"soc_serial, mac until 12:03:04 (27s left)": what identifying waits for, and until when."""
    fields = ", ".join(props["WaitingFor"])
    if not props.get("Deadline"):
        return fields
    until = time.strftime("%H:%M:%S", time.localtime(props["Deadline"] / 1_000_000))
    return f"{fields} until {until} ({_countdown(props, now, 'Deadline')} left)"


async def connect_bus(bus_kind: str) -> Any:
    """A connection to the system or session bus; the library's own exceptions when there is none."""
    lib, _, aio = dbus_service.backend()
    bus_type = lib.BusType.SYSTEM if bus_kind == "system" else lib.BusType.SESSION
    return await aio.MessageBus(bus_type=bus_type).connect()


async def call_method(bus: Any, destination: str, path: str, interface: str, member: str, signature: str = "",
                      body: list[Any] | None = None) -> tuple[str | None, list[Any]]:
    """One method call: (None, reply body), or (error name, error body) for an error reply."""
    lib, _, _ = dbus_service.backend()
    reply = await bus.call(lib.Message(destination=destination, path=path, interface=interface, member=member,
                                       signature=signature, body=body or []))
    if reply.message_type == lib.MessageType.ERROR:
        return reply.error_name or "", list(reply.body or [])
    return None, list(reply.body or [])


class Client:
    """A connection to the bus that keeps a copy of the daemon's properties up to date."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.props: dict[str, Any] = {}
        self.changed = asyncio.Event()
        self.owner_changed = asyncio.Event()

    @classmethod
    async def connect(cls, bus_kind: str) -> Client:
        lib, _, _ = dbus_service.backend()
        try:
            bus = await connect_bus(bus_kind)
        except (OSError, ValueError, lib.errors.DBusError) as exc:
            raise BusError(f"cannot connect to the {bus_kind} bus: {exc}") from None
        return cls(bus)

    async def _call(self, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any]) -> Any:
        error, reply = await call_method(self.bus, destination, path, interface, member, signature, body)
        if error is not None:
            raise BusError(f"{error}: {reply[0] if reply else ''}")
        return reply

    async def follow(self) -> None:
        """Subscribe to PropertiesChanged (before the first read, so nothing is missed)."""
        self.bus.add_message_handler(self._on_message)
        for rule in (_MATCH, _OWNER_MATCH):
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule])

    async def read_all(self) -> dict[str, Any]:
        body = await self._call(dbus_service.BUS_NAME, dbus_service.OBJECT_PATH, _PROPS, "GetAll", "s",
                                [dbus_service.INTERFACE])
        self.props = {name: variant.value for name, variant in body[0].items()}
        return self.props

    async def history(self, err: TextIO) -> list[dict[str, Any]]:
        """GetHistory(), as state.json's "history" entries; [] (and why, on ``err``) from a daemon without it."""
        try:
            body = await self._call(dbus_service.BUS_NAME, dbus_service.OBJECT_PATH, dbus_service.INTERFACE,
                                    "GetHistory", "", [])
        except BusError as exc:
            print(f"factory-agent: the daemon gave no history: {exc}", file=err)
            return []
        events = []
        for at, step, detail, count, last_at in body[0]:
            event: dict[str, Any] = {"at": at, "step": step, "detail": detail}
            if count > 1:
                event.update({"count": count, "last-at": last_at})
            events.append(event)
        return events

    def _on_message(self, message: Any) -> None:
        if message.member == "NameOwnerChanged" and message.body and message.body[0] == dbus_service.BUS_NAME:
            self.owner_changed.set()
        if (message.member == "PropertiesChanged" and message.path == dbus_service.OBJECT_PATH
                and message.body and message.body[0] == dbus_service.INTERFACE):
            self.props.update({name: variant.value for name, variant in message.body[1].items()})
            self.changed.set()

    def close(self) -> None:
        self.bus.disconnect()


async def _connect(bus_kind: str, err: TextIO) -> Client | None:
    """A client on ``bus_kind``; None (and why, on ``err``) when the bus cannot be reached."""
    try:
        return await Client.connect(bus_kind)
    except BusError as exc:
        print(f"factory-agent: cannot reach the daemon: {exc}", file=err)
        return None


async def run(bus_kind: str, *, wait: bool, timeout: float, as_json: bool, follow: bool = False,
              state_dir: Path | None = None, config_files: list[Path] | None = None, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr, long: bool = False) -> int:
    """One report; with ``wait`` until registered or blocked, with ``follow`` one line (or, with ``as_json``,
    one JSON object) per change until ``timeout`` or the daemon leaves. stdout carries only the report: what
    --wait shows meanwhile goes to stderr under --json. A reader that goes away (| head) ends it quietly,
    with the exit status of the state last read. No daemon: what can be told without it (absent.py).
    ``long`` adds the step history (GetHistory(); state.json's without a daemon) to the final report."""
    client = await _connect(bus_kind, err)
    if client is None:
        return _absent(bus_kind, state_dir, config_files, as_json, out, err, long)
    try:
        deadline = time.time() + timeout if timeout > 0 else float("inf")
        if wait or follow:
            await client.follow()
        try:
            props = await _first_read(client, wait or follow, deadline, bus_kind, err)
        except BusError as exc:
            if str(exc).startswith(NO_OWNER):
                return _absent(bus_kind, state_dir, config_files, as_json, out, err, long)
            print(f"factory-agent: cannot reach the daemon on the {bus_kind} bus: {exc}", file=err)
            return EXIT_UNREACHABLE
        code = exit_code(props)
        try:
            if follow:
                return await _follow(client, deadline, as_json, out)
            if wait:
                code = await _wait(client, deadline, err if as_json else out)
            history = await client.history(err) if long else None
            _report(client.props, as_json, out, wait, history)
        except BrokenPipeError:
            _quiet(out)
            return exit_code(client.props) if wait or follow else code
        return code
    finally:
        client.close()


def _absent(bus_kind: str, state_dir: Path | None, config_files: list[Path] | None, as_json: bool, out: TextIO,
            err: TextIO, long: bool = False) -> int:
    """No daemon: why, what state.json records, what to run next; one JSON document with --json. Exit 69."""
    from . import absent, store

    told = absent.explain(state_dir or store.DEFAULT_DIR, bus_kind, config_files)
    print(f"factory-agent: cannot reach the daemon: no factory-agent on the {bus_kind} bus", file=err)
    try:
        if as_json:
            print(json.dumps({"schema": JSON_SCHEMA, **told.to_json()}, indent=2, sort_keys=True), file=out)
        else:
            print("\n".join(told.lines(long)), file=out)
    except BrokenPipeError:
        _quiet(out)
    return EXIT_UNREACHABLE


def _quiet(stream: TextIO) -> None:
    """The reader of ``stream`` went away: nothing more is written, not even at the interpreter's exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


async def _follow(client: Client, deadline: float, as_json: bool, out: TextIO) -> int:
    """One line, or one JSON object (NDJSON), per change; ends at ``deadline`` or when the daemon leaves."""
    def show() -> None:
        text = json.dumps(to_json(client.props), sort_keys=True) if as_json else _plain_text(client.props)
        print(text, file=out, flush=True)

    show()
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            return exit_code(client.props)
        client.changed.clear()
        client.owner_changed.clear()
        changed, gone = asyncio.ensure_future(client.changed.wait()), asyncio.ensure_future(client.owner_changed.wait())
        done, pending = await asyncio.wait({changed, gone}, timeout=min(remaining, 3600.0),
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if changed in done:
            show()
        if gone in done:
            try:
                await client.read_all()
            except BusError:
                return exit_code(client.props)  # the daemon left the bus: the state it last had


async def _first_read(client: Client, wait: bool, deadline: float, bus_kind: str, err: TextIO) -> dict[str, Any]:
    """GetAll; with --wait, a daemon that is not there yet is waited for (it may still be starting), and
    stderr says so once."""
    told = False
    while True:
        try:
            return await client.read_all()
        except BusError as exc:
            remaining = deadline - time.time()
            if not wait or not str(exc).startswith(NO_OWNER) or remaining <= 0:
                raise
        if not told:
            told = True
            print(f"factory-agent: waiting for the daemon to appear on the {bus_kind} bus "
                  "(is it started? systemctl status factory-agent)", file=err, flush=True)
        client.owner_changed.clear()
        with contextlib.suppress(TimeoutError):  # the signal, or a look every second in case it was missed
            await asyncio.wait_for(client.owner_changed.wait(), min(remaining, 1.0))


async def _wait(client: Client, deadline: float, out: TextIO) -> int:
    started = time.time()
    show: Callable[[bool], None] = _live(client, started, out) if out.isatty() else _plain(client, out)
    show(True)
    while exit_code(client.props) == EXIT_PENDING:
        remaining = deadline - time.time()
        if remaining <= 0:
            show(False)
            return EXIT_TIMEOUT
        client.changed.clear()
        try:  # a tick only redraws the clock on a terminal; the state itself comes from signals
            await asyncio.wait_for(client.changed.wait(), min(remaining, 1.0 if out.isatty() else remaining))
            show(True)
        except TimeoutError:
            show(False)
    return exit_code(client.props)


def _live(client: Client, started: float, out: TextIO) -> Callable[[bool], None]:
    def show(changed: bool) -> None:
        line = live_line(client.props, started, time.time())
        out.write("\r\x1b[K" + line + ("\n" if exit_code(client.props) != EXIT_PENDING else ""))
        out.flush()

    return show


def _plain_text(props: dict[str, Any]) -> str:
    line = live_line(props, time.time(), time.time()).split(" | ", 2)
    return " | ".join([line[0], *line[2:]])  # no elapsed counter: a line per change, not per tick


def _plain(client: Client, out: TextIO) -> Callable[[bool], None]:
    last: list[str] = []

    def show(changed: bool) -> None:
        text = _plain_text(client.props)
        if changed and last != [text]:
            last[:] = [text]
            print(text, file=out, flush=True)

    return show


def _report(props: dict[str, Any], as_json: bool, out: TextIO, waited: bool,
            history: list[dict[str, Any]] | None = None) -> None:
    """The final report; ``history`` (--long): the step history with it ("history" in JSON)."""
    from .absent import history_lines

    if as_json:
        data = to_json(props) if history is None else {**to_json(props), "history": history}
        print(json.dumps(data, indent=2, sort_keys=True), file=out)
        return
    lines = [] if waited else describe(props, time.time())
    if history is not None:
        lines += history_lines(history)
    if lines:
        print("\n".join(lines), file=out)


# --- factory-agent retry ----------------------------------------------------------

EXIT_RETRY_REFUSED = 1
_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


async def retry(bus_kind: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`factory-agent retry`: Retry() on the daemon, which reads its configuration and secrets again and starts
    a fresh attempt. Exit 0 asked, 1 refused (not root), 69 no daemon or no bus."""
    client = await _connect(bus_kind, err)
    if client is None:
        return EXIT_UNREACHABLE
    try:
        error, body = await call_method(client.bus, dbus_service.BUS_NAME, dbus_service.OBJECT_PATH,
                                        dbus_service.INTERFACE, "Retry")
    finally:
        client.close()
    if error is None:
        print("factory-agent: retrying: the daemon reads its configuration and secrets again and starts a fresh "
              "attempt; follow it with: factory-agent status --wait", file=out)
        return EXIT_REGISTERED
    if error.startswith(NO_OWNER):
        print(f"factory-agent: no factory-agent daemon on the {bus_kind} bus: start it (systemctl start "
              "factory-agent); a start makes a fresh attempt too", file=err)
        return EXIT_UNREACHABLE
    text = str(body[0]) if body else ""
    if error == _ACCESS_DENIED:
        print(f"factory-agent: Retry() is for root only ({text or 'access denied'}): run: sudo factory-agent retry",
              file=err)
        return EXIT_RETRY_REFUSED
    print(f"factory-agent: the daemon refused Retry(): {error}: {text}", file=err)
    return EXIT_RETRY_REFUSED
