# mypy: allow-untyped-decorators, allow-subclassing-any, allow-untyped-calls
"""io.factoryagent.Agent1 on D-Bus: the technician's live view, Retry(), and the hook's settings.

The only module that imports dbus-next, which Debian 12 ships but which has
had no release since 2021; it runs unchanged on dbus-fast, its maintained
fork ($FACTORY_AGENT_DBUS=dbus_fast|dbus_next picks one; default: dbus-next
if installed). Handlers answer at once and never let a traceback reach a
caller: AgentErrors map to io.factoryagent.Agent1.Error.<Name>, anything
else to ...Error.Internal, with the traceback in the journal only.
"""

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from .errors import DBUS_ERROR_PREFIX, AgentError, BusError

log = logging.getLogger(__name__)

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
}


def backend() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(package, package.service, package.aio) of the chosen D-Bus library."""
    wanted = os.environ.get("FACTORY_AGENT_DBUS", "")
    names = [wanted] if wanted else ["dbus_next", "dbus_fast"]
    for name in names:
        try:
            return (importlib.import_module(name), importlib.import_module(f"{name}.service"),
                    importlib.import_module(f"{name}.aio"))
        except ImportError:
            continue
    raise BusError(f"cannot use D-Bus: none of {', '.join(names)} is installed")


_lib, _service, _aio = backend()


class Snapshot(Protocol):
    """What the daemon publishes (daemon.Status)."""

    @property
    def state(self) -> str: ...


def _signature(ret: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Set the D-Bus signature as the return annotation, where both libraries read it."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__annotations__ = {"return": ret}
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
                 get_settings: Callable[[], dict[str, str]]) -> None:
        super().__init__(INTERFACE)
        self.snapshot, self._get_serial, self._on_retry = snapshot, get_serial, on_retry
        self._get_settings = get_settings

    def _value(self, name: str) -> Any:
        return getattr(self.snapshot, PROPERTIES[name][1])

    @_service.method()
    @_signature("s")
    def GetSerialAssertion(self) -> str:
        try:
            return self._get_serial()
        except Exception as exc:  # never a traceback to the caller
            raise _dbus_error(exc) from None

    @_service.method()
    @_signature("")
    def Retry(self) -> None:
        try:
            self._on_retry()
        except Exception as exc:
            raise _dbus_error(exc) from None

    @_service.method()
    @_signature("a{ss}")
    def GetRegistrationSettings(self) -> dict[str, str]:
        try:
            return dict(self._get_settings())
        except Exception as exc:
            raise _dbus_error(exc) from None

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
    return {name: getattr(snapshot, attr) for name, (_, attr) in PROPERTIES.items()}


class Service:
    """A published Agent1: one PropertiesChanged per publish() that changes anything."""

    def __init__(self, bus: Any, interface: Agent1) -> None:
        self.bus, self.interface = bus, interface

    def publish(self, snapshot: Snapshot) -> None:
        before, after = values(self.interface.snapshot), values(snapshot)
        self.interface.snapshot = snapshot
        changed = {name: value for name, value in after.items() if before[name] != value}
        if changed:
            self.interface.emit_properties_changed(changed)

    async def fail_on_disconnect(self) -> None:
        """Returns never; raises when the bus goes away (the daemon exits, systemd restarts it)."""
        await self.bus.wait_for_disconnect()
        raise BusError("lost the D-Bus connection")

    def close(self) -> None:
        self.bus.disconnect()


async def publish(bus_kind: str, snapshot: Snapshot, get_serial: Callable[[], str], on_retry: Callable[[], None],
                  get_settings: Callable[[], dict[str, str]]) -> Service:
    """Connect to the ``system`` or ``session`` bus, export the object, then own the name (no queueing)."""
    bus_type = _lib.BusType.SYSTEM if bus_kind == "system" else _lib.BusType.SESSION
    logging.getLogger().addFilter(_ANSWERED_ERRORS)  # dbus-next logs through the root logger
    try:
        bus = await _aio.MessageBus(bus_type=bus_type).connect()
    except (OSError, ValueError, _lib.errors.DBusError) as exc:
        raise BusError(f"cannot connect to the {bus_kind} bus: {exc}") from None
    interface = Agent1(snapshot, get_serial, on_retry, get_settings)
    bus.export(OBJECT_PATH, interface)  # before the name: whoever sees the name finds the object
    try:
        reply = await bus.request_name(BUS_NAME, _lib.NameFlag.DO_NOT_QUEUE)
    except _lib.errors.DBusError as exc:
        bus.disconnect()
        raise BusError(f"cannot own {BUS_NAME} on the {bus_kind} bus: {exc.text}") from None
    if reply != _lib.RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise BusError(f"cannot own {BUS_NAME} on the {bus_kind} bus: another factory-agent is running")
    return Service(bus, interface)
