# mypy: allow-untyped-decorators, allow-subclassing-any, allow-untyped-calls
"""io.factoryagent.Agent1 on D-Bus: the technician's live view, Retry(), and the hook's settings.

The only module that imports a D-Bus library: dbus-fast, the maintained fork
of dbus-next, where it is installed (Debian 12 and 13 ship both); dbus-next
otherwise, which has had no release since 2021 and which Python 3.13 warns
about ($FACTORY_AGENT_DBUS=dbus_fast|dbus_next picks one). Handlers answer
at once and never let a traceback reach a caller: AgentErrors map to
io.factoryagent.Agent1.Error.<Name>, anything else to ...Error.Internal,
with the traceback in the journal only.

No caller can stop the daemon (issue 11): our own writer replaces the
libraries' (which die on a full socket, see _Writer), replies that would
wait past fixed caps are dropped, and a lost connection is made again.
"""

import asyncio
import importlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Protocol

from .errors import DBUS_ERROR_PREFIX, AgentError, BusError
from .registration import Event

log = logging.getLogger(__name__)

History = Sequence[Event]
BUS_NAME = INTERFACE = "io.factoryagent.Agent1"
OBJECT_PATH = "/io/factoryagent/Agent1"
# D-Bus property -> (signature, attribute of the status snapshot). Fixed: ARCHITECTURE.md §4.
PROPERTIES: dict[str, tuple[str, str]] = {
    "State": ("s", "state"),
    "Serial": ("s", "serial"),
    "Brand": ("s", "brand"),
    "Model": ("s", "model"),
    "DeviceKeyId": ("s", "device_key_id"),
    "Attempts": ("u", "attempts"),
    "LastError": ("s", "last_error"),
    "LastErrorMessage": ("s", "last_error_message"),
    "Action": ("s", "action"),
    "NextRetry": ("t", "next_retry"),
    "Identity": ("a{ss}", "identity"),
    "Version": ("s", "version"),
    "StateSince": ("t", "state_since"),
    "StartedAt": ("t", "started_at"),
    "LastAttemptAt": ("t", "last_attempt_at"),
    "RegisteredAt": ("t", "registered_at"),
    "WaitingFor": ("as", "waiting_for"),
    "Deadline": ("t", "deadline"),
}
# Back-pressure (issue 11): reply bytes that may wait in our queue to dbus-daemon. A real client
# waits for one reply at a time (Introspect and the serial, the largest, are a few KiB).
PEER_QUEUE_BYTES = 64 * 1024  # for one caller
QUEUE_BYTES = 1024 * 1024  # for all callers; past it only a caller with nothing waiting is answered
HARD_QUEUE_BYTES = 4 * 1024 * 1024  # past it nobody is: the bound on our memory, whatever the number of callers
DROP_LOG_INTERVAL = 60.0  # seconds between two "dropped replies" lines
# A lost bus connection: try again after 0.5 s, doubling to 30 s.
RECONNECT_FIRST, RECONNECT_CAP = 0.5, 30.0


def backend() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(package, package.service, package.aio) of the chosen D-Bus library."""
    wanted = os.environ.get("FACTORY_AGENT_DBUS", "")
    names = [wanted] if wanted else ["dbus_fast", "dbus_next"]
    for name in names:
        try:
            return (importlib.import_module(name), importlib.import_module(f"{name}.service"),
                    importlib.import_module(f"{name}.aio"))
        except ImportError:
            continue
    raise BusError(f"cannot use D-Bus: none of {', '.join(names)} is installed")


_lib, _service, _aio = backend()


class Snapshot(Protocol):
    """What the daemon publishes (session.Status)."""

    @property
    def state(self) -> str: ...


def _signature(ret: str, **args: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Set the D-Bus signatures as the annotations (of the return, and of each argument), where both libraries
    read them."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__annotations__ = {**args, "return": ret}
        return fn

    return mark


def _dbus_error(exc: Exception) -> Exception:
    if isinstance(exc, AgentError):
        return _lib.DBusError(exc.dbus_name, str(exc))  # type: ignore[no-any-return]
    log.error("internal error in a D-Bus handler", exc_info=exc)
    return _lib.DBusError(DBUS_ERROR_PREFIX + "Internal", "internal error; the journal has the details")  # type: ignore[no-any-return]


class Agent1(_service.ServiceInterface):  # type: ignore[name-defined]
    """The exported interface; each member is a line or two delegating to the daemon."""

    def __init__(self, snapshot: Snapshot, get_serial: Callable[[], str], on_retry: Callable[[], None],
                 get_settings: Callable[[], dict[str, str]], get_history: Callable[[], History],
                 sign_request_id: Callable[[str], Awaitable[str]]) -> None:
        super().__init__(INTERFACE)
        self.snapshot, self._get_serial, self._on_retry = snapshot, get_serial, on_retry
        self._get_settings, self._get_history, self._sign_request_id = get_settings, get_history, sign_request_id

    def _value(self, name: str) -> Any:
        return getattr(self.snapshot, PROPERTIES[name][1])

    @_service.method()
    @_signature("s")
    def GetSerialAssertion(self) -> str:
        try:
            return self._get_serial()
        except Exception as exc:  # noqa: BLE001 - never a traceback to the caller
            raise _dbus_error(exc) from None

    @_service.method()
    @_signature("a(tssut)")
    def GetHistory(self) -> list[list[Any]]:
        try:
            return [[e.at, e.kind.value, e.detail, e.count, e.last_at] for e in self._get_history()]
        except Exception as exc:  # noqa: BLE001 - never a traceback to the caller
            raise _dbus_error(exc) from None

    # Retry and GetRegistrationSettings are answered by _RootOnly, which checks the caller's uid first; these
    # declare them (introspection) and are what a call would reach if that check were ever bypassed: a refusal.
    @_service.method()
    @_signature("")
    def Retry(self) -> None:
        raise _lib.DBusError("org.freedesktop.DBus.Error.AccessDenied", "Retry() is for root only")

    @_service.method()
    @_signature("a{ss}")
    def GetRegistrationSettings(self) -> dict[str, str]:
        raise _lib.DBusError("org.freedesktop.DBus.Error.AccessDenied", "GetRegistrationSettings() is for root only")

    @_service.method()
    @_signature("s", request_id="s")
    def SignRequestId(self, request_id: str) -> str:
        raise _lib.DBusError("org.freedesktop.DBus.Error.AccessDenied", "SignRequestId() is for root only")

    async def sign(self, request_id: str) -> str:
        return await self._sign_request_id(request_id)

    def retry(self) -> None:
        self._on_retry()

    def settings(self) -> dict[str, str]:
        return dict(self._get_settings())

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def State(self) -> str:
        return self._value("State")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def Serial(self) -> str:
        return self._value("Serial")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def Brand(self) -> str:
        return self._value("Brand")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def Model(self) -> str:
        return self._value("Model")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def DeviceKeyId(self) -> str:
        return self._value("DeviceKeyId")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("u")
    def Attempts(self) -> int:
        return self._value("Attempts")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def LastError(self) -> str:
        return self._value("LastError")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def LastErrorMessage(self) -> str:
        return self._value("LastErrorMessage")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def Action(self) -> str:
        return self._value("Action")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def NextRetry(self) -> int:
        return self._value("NextRetry")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("a{ss}")
    def Identity(self) -> dict[str, str]:
        return dict(self._value("Identity"))

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("s")
    def Version(self) -> str:
        return self._value("Version")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def StateSince(self) -> int:
        return self._value("StateSince")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def StartedAt(self) -> int:
        return self._value("StartedAt")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def LastAttemptAt(self) -> int:
        return self._value("LastAttemptAt")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def RegisteredAt(self) -> int:
        return self._value("RegisteredAt")  # type: ignore[no-any-return]

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("as")
    def WaitingFor(self) -> list[str]:
        return list(self._value("WaitingFor"))

    @_service.dbus_property(access=_service.PropertyAccess.READ)
    @_signature("t")
    def Deadline(self) -> int:
        return self._value("Deadline")  # type: ignore[no-any-return]


class _AnsweredErrors(logging.Filter):
    """Drops dbus-next's log of an error it has already sent as the reply.

    dbus-next 0.2.3 replies with the DBusError a handler raised, then lets the
    error escape its SendReply context (whose __exit__ drops the True that
    would swallow it) and logs it with a traceback as "got unexpected error
    processing a message": every NotRegistered answer would put a traceback
    in the journal. A real fault is logged by _dbus_error, traceback and all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("got unexpected error processing a message: ")
                    and text.rstrip().rsplit("\n", 1)[-1].startswith(f"{_lib.__name__}.errors.DBusError: "))


_ANSWERED_ERRORS = _AnsweredErrors()


def values(snapshot: Snapshot) -> dict[str, Any]:
    """The properties as the D-Bus libraries marshal them: an array ("as") must be a list, not the snapshot's tuple."""
    found = {name: getattr(snapshot, attr) for name, (_, attr) in PROPERTIES.items()}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in found.items()}


class _Writer:
    """Our bus connection's outgoing queue, in place of the library's ``_MessageWriter``.

    Library defect, worked around here (dbus-next 0.2.3, the last release; dbus-fast 1.84.2
    in Debian 12 and 5.2.0 on PyPI): ``aio.message_bus._MessageWriter.write_callback`` loops
    ``sock.send()`` on the non-blocking bus socket and takes the ``BlockingIOError`` (EAGAIN)
    of a full socket buffer for a fatal error: it finalizes the connection, and
    ``wait_for_disconnect()`` raises. The buffer fills as soon as callers ask faster than
    dbus-daemon takes our replies: 16 connections of one unprivileged user flooding the reads
    the policy allows everyone did it within seconds (tests/dbus/test_flood.py). dbus-fast 1.84.2 also sends the newest
    queued message first (``deque.pop()``), reordering PropertiesChanged under load. Here a
    full socket means "wait until it is writable", messages leave in the order sent, and the
    queue is bounded (see ``refuses``): a reply past the caps is dropped, never queued; a
    caller that gets none is one that is not reading, and dbus-daemon stops forwarding its calls
    after max_replies_per_connection (128 on the system bus) replies it still waits for.
    Signals and our own calls to the bus are never dropped: they are few and ours.
    """

    def __init__(self, bus: Any, old: Any) -> None:
        self.bus, self.sock, self.loop, self.fd = bus, bus._sock, bus._loop, bus._fd
        self.queue: deque[tuple[memoryview, str | None, asyncio.Future[None] | None]] = deque()
        self.offset = 0  # of queue[0], already sent
        self.waiting: dict[str, int] = {}  # reply bytes queued, per caller (unique name)
        self.reply_bytes = self.queued_bytes = 0
        self.armed = False  # the loop watches the socket for writability
        self.replies = self.dropped = self.peak_bytes = 0
        self._unlogged, self._logged_at = 0, -math.inf
        self.summarized = False
        for data, future in _leftovers(old):  # connect() leaves nothing in practice; kept in order if it does
            self.queue.append((memoryview(data), None, future))
            self.queued_bytes += len(data)

    def refuses(self, peer: str, size: int = 0) -> bool:
        """True if a reply of ``size`` bytes to ``peer`` is to be dropped rather than queued."""
        waiting = self.waiting.get(peer, 0)
        replies = self.reply_bytes + size
        if waiting and (waiting + size > PEER_QUEUE_BYTES or replies > QUEUE_BYTES):
            return True  # it has not taken what it already asked for
        return replies > HARD_QUEUE_BYTES

    def schedule_write(self, msg: Any = None, future: asyncio.Future[None] | None = None) -> None:
        """The libraries' entry point (MessageBus.send() and connect())."""
        if msg is not None and not self._enqueue(msg, future):
            _resolve(future)
        if self.bus.unique_name and self.queue and not self.armed:
            self._flush()
            if self.queue:
                self.loop.add_writer(self.fd, self._flush)
                self.armed = True

    def _enqueue(self, msg: Any, future: asyncio.Future[None] | None) -> bool:
        if not self.bus.connected:
            return False
        data = msg._marshall(False)  # we never negotiate unix fds
        peer = msg.destination if msg.message_type in (_lib.MessageType.METHOD_RETURN, _lib.MessageType.ERROR) else None
        if peer is not None:
            if self.refuses(peer, len(data)):
                self.note_dropped()
                return False
            self.waiting[peer] = self.waiting.get(peer, 0) + len(data)
            self.reply_bytes += len(data)
        self.queue.append((memoryview(data), peer, future))
        self.queued_bytes += len(data)
        self.peak_bytes = max(self.peak_bytes, self.queued_bytes)
        return True

    def _flush(self) -> None:
        while self.queue:
            data, peer, future = self.queue[0]
            try:
                self.offset += self.sock.send(data[self.offset:])
            except (BlockingIOError, InterruptedError):
                return  # full: the loop calls again once the socket is writable
            except OSError as exc:
                self._fail(exc)
                return
            if self.offset < len(data):
                return
            self.queue.popleft()
            self.offset = 0
            self._sent(data, peer)
            _resolve(future)
        if self.armed:
            self.loop.remove_writer(self.fd)
            self.armed = False

    def _sent(self, data: memoryview, peer: str | None) -> None:
        self.queued_bytes -= len(data)
        if peer is not None:
            self.replies += 1
            self.reply_bytes -= len(data)
            left = self.waiting.pop(peer) - len(data)
            if left:
                self.waiting[peer] = left

    def _fail(self, exc: OSError) -> None:
        for _, _, future in self.queue:
            _resolve(future)  # as the library does for a user disconnect; callers learn of it from _finalize
        self.queue.clear()
        self.waiting.clear()
        self.reply_bytes = self.queued_bytes = 0
        self.bus._finalize(exc)

    def note_dropped(self) -> None:
        """Counts one call left unanswered; one log line a minute at most."""
        self.dropped += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_INTERVAL:
            log.warning("D-Bus callers ask faster than they read: dropping the replies that would wait past %d KiB "
                        "for one caller or %d KiB for all (%d since the last such line); the agent goes on",
                        PEER_QUEUE_BYTES // 1024, QUEUE_BYTES // 1024, self._unlogged)
            self._unlogged, self._logged_at = 0, now

    def summary(self) -> str:
        return (f"{self.replies} replies sent, {self.dropped} dropped, at most {self.peak_bytes // 1024} KiB "
                "queued for the bus")


def _leftovers(old: Any) -> list[tuple[bytes, Any]]:
    """What the library's writer still holds, oldest first."""
    found = []
    if getattr(old, "buf", None) is not None:
        found.append((bytes(old.buf[old.offset:]), old.fut))
    messages = getattr(old, "messages", ())
    if isinstance(messages, asyncio.Queue):  # dbus-next
        messages = [messages.get_nowait() for _ in range(messages.qsize())]
    found.extend((bytes(buf), future) for buf, _, future in messages)
    return found


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Service:
    """A published Agent1: one PropertiesChanged per publish() that changes anything.

    The registration never depends on the bus: a lost connection is made again, and the
    name owned again, with backoff, while the daemon goes on.
    """

    def __init__(self, bus_kind: str, bus: Any, interface: Agent1) -> None:
        self.bus_kind, self.bus, self.interface = bus_kind, bus, interface
        self.closed = False

    def publish(self, snapshot: Snapshot) -> None:
        before, after = values(self.interface.snapshot), values(snapshot)
        self.interface.snapshot = snapshot
        changed = {name: value for name, value in after.items() if before[name] != value}
        if changed and self.bus.connected:
            self.interface.emit_properties_changed(changed)

    async def stay_connected(self) -> None:
        """Returns once close()d; until then keeps the name owned on the bus, reconnecting when it is lost."""
        delay = RECONNECT_FIRST
        while not self.closed:
            since = time.monotonic()
            try:
                await self.bus.wait_for_disconnect()
                cause = "closed by the bus"
            except Exception as exc:  # noqa: BLE001 - the library's error, whatever it is: the connection is gone
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.closed:
                return
            _log_summary(self.bus)
            log.warning("lost the D-Bus connection (%s); connecting again with backoff, the registration goes on",
                        cause)
            # a bus that keeps dropping us at once is not tried, nor logged, twice a second
            delay = RECONNECT_FIRST if time.monotonic() - since >= RECONNECT_CAP else delay
            delay = await self._reconnect(delay)

    async def _reconnect(self, delay: float) -> float:
        """Connected again (or closed); returns the delay to start from the next time."""
        attempts = 0
        while not self.closed:
            await asyncio.sleep(delay)
            attempts += 1
            delay = min(delay * 2, RECONNECT_CAP)
            try:
                bus = await _connect(self.bus_kind, self.interface)
            except Exception:  # noqa: BLE001 - BusError, or anything else the library raises: try again later
                continue
            if self.closed:
                bus.disconnect()
                break
            self.bus = bus
            log.info("owns %s on the %s bus again (attempt %d)", BUS_NAME, self.bus_kind, attempts)
            break
        return delay

    def close(self) -> None:
        self.closed = True
        _log_summary(self.bus)
        if self.bus.connected:
            self.bus.disconnect()


def _log_summary(bus: Any) -> None:
    writer = getattr(bus, "_writer", None)
    if isinstance(writer, _Writer) and writer.dropped and not writer.summarized:  # quiet unless something was dropped
        writer.summarized = True
        log.info("D-Bus connection ended: %s", writer.summary())


def _install_writer(bus: Any) -> None:
    """Our _Writer on ``bus``, and the filter that drops a call whose reply would be dropped, before any work."""
    try:
        writer = _Writer(bus, bus._writer)
    except (AttributeError, TypeError, ValueError):  # a later release reorganised its internals: it keeps its writer
        log.warning("cannot bound the D-Bus queue on this %s (its writer changed): a flood of calls may cut "
                    "the connection, which is then made again", _lib.__name__)
        return
    bus._writer = writer

    def shed(msg: Any) -> bool:
        if msg.message_type == _lib.MessageType.METHOD_CALL and msg.sender and writer.refuses(msg.sender):
            writer.note_dropped()
            return True
        return False

    bus.add_message_handler(shed)


# Methods only root may call. The project's bus policy already says so on Debian, but on Ubuntu Core the
# slot's policy is snapd's, which lets anyone send to the name: the agent checks the caller's uid itself.
ROOT_ONLY = {"Retry": "", "GetRegistrationSettings": "", "SignRequestId": "s"}  # member: its argument signature
MAX_ROOT_CHECKS = 32  # uid look-ups in flight; past that a caller is answered LimitsExceeded at once


class _RootOnly:
    """Answers the ROOT_ONLY members itself, after asking the bus for the caller's uid (GetConnectionUnixUser)."""

    def __init__(self, bus: Any, interface: Agent1) -> None:
        self.bus, self.interface = bus, interface
        self.checks: set[asyncio.Task[None]] = set()

    def intercept(self, msg: Any) -> Any:
        """A bus message handler: True (handled) for a ROOT_ONLY call, which is answered by a task; else False."""
        if msg.message_type != _lib.MessageType.METHOD_CALL or msg.path != OBJECT_PATH \
                or msg.interface != INTERFACE or msg.member not in ROOT_ONLY:
            return False
        if len(self.checks) >= MAX_ROOT_CHECKS:
            return _lib.Message.new_error(msg, "org.freedesktop.DBus.Error.LimitsExceeded", "too many calls at once")
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)
        return True

    async def _answer(self, msg: Any) -> None:
        if await self._caller_uid(msg.sender) not in (0, os.geteuid()):  # the agent's own user: a session bus
            log.warning("refused %s from %s: root only", msg.member, msg.sender)
            reply = _lib.Message.new_error(msg, "org.freedesktop.DBus.Error.AccessDenied",
                                           f"{msg.member}() is for root only")
        elif msg.signature != ROOT_ONLY[msg.member]:
            wanted = f"takes ({ROOT_ONLY[msg.member]})" if ROOT_ONLY[msg.member] else "takes no arguments"
            reply = _lib.Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", f"{msg.member}() {wanted}")
        else:
            reply = await self._call(msg)
        if not msg.flags & _lib.MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def _call(self, msg: Any) -> Any:
        try:
            if msg.member == "Retry":
                self.interface.retry()
                return _lib.Message.new_method_return(msg)
            if msg.member == "SignRequestId":
                return _lib.Message.new_method_return(msg, "s", [await self.interface.sign(str(msg.body[0]))])
            return _lib.Message.new_method_return(msg, "a{ss}", [self.interface.settings()])
        except Exception as exc:  # noqa: BLE001 - never a traceback to the caller
            error: Any = _dbus_error(exc)  # a DBusError of the chosen library
            return _lib.Message.new_error(msg, error.type, error.text)

    async def _caller_uid(self, sender: str | None) -> int | None:
        if not sender:
            return None
        ask = _lib.Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                           interface="org.freedesktop.DBus", member="GetConnectionUnixUser", signature="s", body=[sender])
        try:
            reply = await self.bus.call(ask)
        except Exception:  # noqa: BLE001 - the bus went away: nobody to answer, and no uid
            return None
        if reply is None or reply.message_type != _lib.MessageType.METHOD_RETURN:
            return None
        return int(reply.body[0])


async def publish(bus_kind: str, snapshot: Snapshot, get_serial: Callable[[], str], on_retry: Callable[[], None],
                  get_settings: Callable[[], dict[str, str]], get_history: Callable[[], History],
                  sign_request_id: Callable[[str], Awaitable[str]]) -> Service:
    """Connect to the ``system`` or ``session`` bus, export the object, then own the name (no queueing)."""
    logging.getLogger().addFilter(_ANSWERED_ERRORS)  # dbus-next logs through the root logger
    interface = Agent1(snapshot, get_serial, on_retry, get_settings, get_history, sign_request_id)
    return Service(bus_kind, await _connect(bus_kind, interface), interface)


async def _connect(bus_kind: str, interface: Agent1) -> Any:
    """A connection with our writer, ``interface`` exported, and the name owned; else BusError."""
    bus_type = _lib.BusType.SYSTEM if bus_kind == "system" else _lib.BusType.SESSION
    try:
        bus = await _aio.MessageBus(bus_type=bus_type).connect()
    except (OSError, ValueError, _lib.errors.DBusError) as exc:
        raise BusError(f"cannot connect to the {bus_kind} bus: {exc}") from None
    _install_writer(bus)
    bus.add_message_handler(_RootOnly(bus, interface).intercept)
    bus.export(OBJECT_PATH, interface)  # before the name: whoever sees the name finds the object
    try:
        reply = await bus.request_name(BUS_NAME, _lib.NameFlag.DO_NOT_QUEUE)
    except _lib.errors.DBusError as exc:
        bus.disconnect()
        raise BusError(f"cannot own {BUS_NAME} on the {bus_kind} bus: {exc.text}") from None
    if reply != _lib.RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise BusError(f"cannot own {BUS_NAME} on the {bus_kind} bus: another factory-agent is running")
    return bus
