"""The error tree every module raises from, and the stable names it is shown by.

Adapters catch library exceptions at their edge and raise one of these ``from``
the original; the daemon catches only :class:`AgentError`. Anything else is a
bug. ``str()`` of an error is the human message, in snapd's
"cannot <verb> <object>: <cause>" style; ``code`` is the stable kebab-case
value for ``LastError`` and ``dbus_name`` the D-Bus error name.
"""

from __future__ import annotations

DBUS_ERROR_PREFIX = "io.factoryagent.Agent1.Error."


class AgentError(Exception):
    """Base of every error the agent expects and reports."""

    code = "internal"
    dbus_name = DBUS_ERROR_PREFIX + "Internal"


class ConfigError(AgentError):
    """Bad or missing configuration: exit 78 (EX_CONFIG), systemd stops restarting."""

    code = "config"
    dbus_name = DBUS_ERROR_PREFIX + "Config"


class IdentityError(AgentError):
    """The hardware identity lacks a required field."""

    code = "identity"
    dbus_name = DBUS_ERROR_PREFIX + "Identity"


class DeviceKeyError(AgentError):
    """The device key cannot be generated, loaded or stored."""

    code = "device-key"
    dbus_name = DBUS_ERROR_PREFIX + "DeviceKey"


class StoreError(AgentError):
    """The state directory cannot be read or written safely."""

    code = "store"
    dbus_name = DBUS_ERROR_PREFIX + "Store"


class AssertionFormatError(AgentError):
    """Bytes that are not a valid assertion in snapd's format.

    The codec raises this class itself: it does not know where bytes came
    from. Callers that do know re-raise as Local (we built it: a bug) or
    Remote (the vault sent it: report and retry).
    """

    code = "assertion-format"
    dbus_name = DBUS_ERROR_PREFIX + "AssertionFormat"


class LocalFormatError(AssertionFormatError):
    """We built something invalid: a bug in the agent or in its input."""

    code = "assertion-local"
    dbus_name = DBUS_ERROR_PREFIX + "AssertionLocal"


class RemoteFormatError(AssertionFormatError):
    """The service sent something invalid or mismatched."""

    code = "assertion-remote"
    dbus_name = DBUS_ERROR_PREFIX + "AssertionRemote"


class BadSignatureError(AssertionFormatError):
    """A signature that does not verify with the key it names."""

    code = "bad-signature"
    dbus_name = DBUS_ERROR_PREFIX + "BadSignature"
