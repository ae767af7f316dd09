"""`factory-agent registration-settings`: what the prepare-device hook hands to snapd, from the running daemon.

It calls GetRegistrationSettings() on io.factoryagent.Agent1, and waits, within
``--timeout``, for a daemon that is being started or D-Bus-activated, or is still
gathering the identity. It prints one ``snapctl set`` argument per line,
``KEY=VALUE`` where VALUE is a JSON string: snapctl stores a value that parses as
JSON as that JSON, so a serial of digits stays a string (snapd wants strings)
and a multi-line body stays on one line. ``device-service.headers`` is the one
exception: its VALUE is a JSON object of strings (the relay's token), which
snapd reads as a map. The daemon's answer holds no api-key. The token is a
secret: this command prints it on stdout only (the hook's pipe), never on stderr.

Exit status: 0 printed; 1 the daemon refused (standalone mode, no usable
identity); 3 no settings within --timeout; 69 the bus itself cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

from . import dbus_service, status
from .errors import DBUS_ERROR_PREFIX, NotReadyError

EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 3, 69
KEYS = ("device-service.url", "device-service.headers", "registration.proposed-serial", "registration.body")
OPTIONAL = ("registration.body",)  # absent with secure onboarding: the prepare-serial-request hook sets it
OBJECT_KEYS = ("device-service.headers",)  # a JSON object (as text, on D-Bus); printed as that object
POLL_SECONDS = 0.5
# Answers that mean "not yet": no daemon (it may be starting), an activation under way or that failed
# (systemd may start it again), or a daemon still gathering the identity.
_NOT_YET = (*status.NO_OWNER, "org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Spawn.",
            NotReadyError.dbus_name)


class _Refused(Exception):
    pass


def format_lines(settings: dict[str, str]) -> str:
    """The snapctl set arguments, one per line, in KEYS order."""
    return "".join(f"{key}={settings[key] if key in OBJECT_KEYS else json.dumps(settings[key])}\n" for key in KEYS
                   if key in settings)


def check_settings(settings: Any) -> dict[str, str]:
    if not isinstance(settings, dict):
        raise _Refused("the daemon's answer is not a dictionary of settings")
    missing = [key for key in KEYS if key not in OPTIONAL and (not isinstance(settings.get(key), str) or not settings[key])]
    if missing:
        raise _Refused(f"the daemon's settings lack {', '.join(missing)}")
    for key in OBJECT_KEYS:
        try:
            value = json.loads(settings[key])
        except ValueError:
            value = None
        if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise _Refused(f"the daemon's {key} is not a JSON object of strings")
        settings = {**settings, key: json.dumps(value, separators=(",", ":"))}  # one line, whatever came
    return {key: settings[key] for key in KEYS if key in settings}


async def _ask(bus: Any) -> Any:
    """GetRegistrationSettings(); (error name, text) of an error reply."""
    error, body = await status.call_method(bus, dbus_service.BUS_NAME, dbus_service.OBJECT_PATH,
                                           dbus_service.INTERFACE, "GetRegistrationSettings")
    if error is not None:
        return (error, str(body[0]) if body else "")
    return body[0] if body else None


async def fetch(bus_kind: str, timeout: float) -> tuple[int, str]:
    """(exit status, the settings lines or the one-line reason)."""
    deadline = time.monotonic() + timeout
    bus, reason, reached = None, "no answer yet", False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                code = EXIT_TIMEOUT if reached else EXIT_UNREACHABLE
                return code, f"no registration settings from factory-agent within {timeout:g} s: {reason}"
            try:
                if bus is None:
                    bus = await asyncio.wait_for(status.connect_bus(bus_kind), remaining)
                    reached = True
                answer = await asyncio.wait_for(_ask(bus), remaining)
            except (OSError, ValueError, EOFError, TimeoutError) as exc:  # no bus (yet), or it went away
                bus, reason = _drop(bus), f"cannot reach the {bus_kind} bus: {exc or type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - dbus-next/dbus-fast errors have no common base we can name here
                bus, reason = _drop(bus), f"cannot talk to the {bus_kind} bus: {type(exc).__name__}: {exc}"
            else:
                if not isinstance(answer, tuple):
                    return EXIT_OK, format_lines(check_settings(answer))
                name, text = answer
                reason = f"{_short(name)}: {text}" if text else _short(name)
                if not name.startswith(_NOT_YET):
                    return EXIT_REFUSED, f"factory-agent cannot give registration settings: {reason}"
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    except _Refused as exc:
        return EXIT_REFUSED, str(exc)
    finally:
        _drop(bus)


def _drop(bus: Any) -> Any:
    """Disconnect ``bus`` (if any); None, to forget it."""
    if bus is not None:
        bus.disconnect()
    return None


def _short(name: str) -> str:
    return name[len(DBUS_ERROR_PREFIX):] if name.startswith(DBUS_ERROR_PREFIX) else name


def run(bus_kind: str, timeout: float, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    code, text = asyncio.run(fetch(bus_kind, timeout))
    if code != EXIT_OK:
        print(f"factory-agent: {text}", file=err)
        return code
    if as_json:
        settings = {line.partition("=")[0]: json.loads(line.partition("=")[2]) for line in text.splitlines()}
        print(json.dumps(settings, indent=2, sort_keys=True), file=out)
    else:
        out.write(text)
    out.flush()
    return code
