"""The error tree every module raises from, and the stable names it is shown by.

Adapters catch library exceptions at their edge and raise one of these ``from``
the original; the daemon catches only :class:`AgentError`. Anything else is a
bug. ``str()`` of an error is the human message, in snapd's
"cannot <verb> <object>: <cause>" style; ``code`` is the stable kebab-case
value for ``LastError`` and ``dbus_name`` the D-Bus error name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from enum import StrEnum

DBUS_ERROR_PREFIX = "io.factoryagent.Agent1.Error."
# Control, format (bidi overrides, zero-width) and line/paragraph separator characters.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_concealed: set[str] = set()  # see conceal()


def conceal(values: Iterable[str]) -> None:
    """Secrets (the api-key) that no error message made from now on may carry: they show as "***".

    Messages quote what others wrote (the vault's refusal, a proxy's error page), and one that
    echoes the api-key it was sent would otherwise put it in LastErrorMessage, which anyone may read.
    """
    _concealed.update(stripped for value in values if (stripped := value.strip()))


def one_line(text: str) -> str:
    """``text`` with every character that could break or disguise a line escaped as Python does.

    An error's message ends up as the CLI's one stderr line, a journal MESSAGE and
    ``LastErrorMessage``; parts of it come from files, paths and the vault, which may hold
    newlines or terminal escapes.
    """
    if text.isprintable():  # the common case; isprintable() is False for every unsafe character
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _UNSAFE_CATEGORIES
                   else ch for ch in text)


class Code(StrEnum):
    """The agent's own ``LastError`` (and ``blocked-by``) values: a contract, append-only.

    The vault's refusals are shown by the vault's own error_code instead (:class:`VaultCode` names the ones
    the agent acts on); every other value here is one error class's ``code``.
    """

    INTERNAL = "internal"
    CONFIG = "config"
    IDENTITY = "identity"
    DEVICE_KEY = "device-key"
    DEVICE_KEY_LOST = "device-key-lost"
    STORE = "store"
    UNTRUSTED_FILE = "untrusted-file"
    STATE_LOCKED = "state-locked"
    ASSERTION_FORMAT = "assertion-format"
    ASSERTION_LOCAL = "assertion-local"
    ASSERTION_REMOTE = "assertion-remote"
    BAD_SIGNATURE = "bad-signature"
    VAULT = "vault"
    VAULT_UNAVAILABLE = "vault-unavailable"
    CLOCK_SKEW = "clock-skew"
    VAULT_TRANSIENT = "vault-transient"
    VAULT_REJECTED = "vault-rejected"
    SERIAL_REJECTED = "serial-rejected"
    SERIAL_NOT_PROPOSED = "serial-not-proposed"  # registered, with another serial than the proposed one
    NOT_REGISTERED = "not-registered"
    DBUS = "dbus"
    NOT_READY = "not-ready"
    WRONG_MODE = "wrong-mode"
    RELAY_REFUSED = "relay-refused"
    RELAY_BAD_REQUEST = "relay-bad-request"
    RELAY_WRONG_MODEL = "relay-wrong-model"
    RELAY_OTHER_DEVICE_KEY = "relay-other-device-key"
    RELAY = "relay"
    HARDWARE_KEY = "hardware-key"
    RELAY_SNAPD_TOO_OLD = "relay-snapd-too-old"


class VaultCode(StrEnum):
    """The Serial Vault's error_code values the agent decides on (serial-vault-api.md); any other is shown as
    the vault sent it."""

    INVALID_API_KEY = "invalid-api-key"
    INVALID_MODEL = "invalid-model"
    MISMATCHED_MODEL = "mismatched-model"
    CREATE_ASSERTION = "create-assertion"
    SIGNING_ASSERTION = "signing-assertion"
    INVALID_NONCE = "invalid-nonce"  # get a fresh request-id
    GENERATE_NONCE = "generate-nonce"  # the vault's own trouble: transient
    LOGGING_ASSERTION = "logging-assertion"  # the vault's own trouble: transient
    SERVER_ERROR = "server-error"  # the vault's own trouble: transient
    TLS_CERTIFICATE = "tls-certificate"  # named by the agent: the vault's certificate is not trusted here
    # Secure onboarding, as the lab Model Service (lab-vault --hardware-identity) names them: the Model
    # Service's own codes are not public (shared/reference/secure-onboarding.md §4).
    UNKNOWN_HARDWARE_IDENTITY = "unknown-hardware-identity"  # no hardware-identity assertion imported for the digest
    INVALID_REQUEST_ID_SIGNATURE = "invalid-request-id-signature"


class AgentError(Exception):
    """Base of every error the agent expects and reports; its message is always one line."""

    code = Code.INTERNAL
    dbus_name = DBUS_ERROR_PREFIX + "Internal"

    def __init__(self, message: str = "") -> None:
        for secret in sorted(_concealed, key=len, reverse=True):  # longest first: one may contain another
            message = message.replace(secret, "***")
        super().__init__(one_line(message))


class ConfigError(AgentError):
    """Bad or missing configuration: exit 78 (EX_CONFIG), systemd stops restarting."""

    code = Code.CONFIG
    dbus_name = DBUS_ERROR_PREFIX + "Config"


class SecretUnreadableError(ConfigError):
    """The api-key file cannot be opened or read now (absent, permissions): the environment's to fix, so the
    daemon stays up, blocked on it, and reads it again at Retry(); ``run --once`` exits 78 as for any config error."""


class IdentityError(AgentError):
    """The hardware identity lacks a required field."""

    code = Code.IDENTITY
    dbus_name = DBUS_ERROR_PREFIX + "Identity"


class DeviceKeyError(AgentError):
    """The device key cannot be generated, loaded or stored."""

    code = Code.DEVICE_KEY
    dbus_name = DBUS_ERROR_PREFIX + "DeviceKey"


class DeviceKeyLostError(DeviceKeyError):
    """The state records a device key that is gone or replaced: the identity is lost, a person must act."""

    code = Code.DEVICE_KEY_LOST
    dbus_name = DBUS_ERROR_PREFIX + "DeviceKeyLost"


class HardwareKeyError(AgentError):
    """The hardware identity key (secure onboarding) is missing, unusable or its token does not answer."""

    code = Code.HARDWARE_KEY
    dbus_name = DBUS_ERROR_PREFIX + "HardwareKey"


class StoreError(AgentError):
    """The state directory cannot be read or written safely."""

    code = Code.STORE
    dbus_name = DBUS_ERROR_PREFIX + "Store"


class UntrustedFileError(StoreError):
    """A file or directory the agent would trust is not its own: a symlink, a FIFO, another user's, writable by
    others, or too large. Nothing is read from it or changed; a person must fix it (exit 78 at start)."""

    code = Code.UNTRUSTED_FILE
    dbus_name = DBUS_ERROR_PREFIX + "UntrustedFile"


class StateLockedError(StoreError):
    """Another factory-agent process holds the state directory's lock."""

    code = Code.STATE_LOCKED
    dbus_name = DBUS_ERROR_PREFIX + "StateLocked"


class AssertionFormatError(AgentError):
    """Bytes that are not a valid assertion in snapd's format.

    The codec raises this class itself: it does not know where bytes came
    from. Callers that do know re-raise as Local (we built it: a bug) or
    Remote (the vault sent it: report and retry).
    """

    code = Code.ASSERTION_FORMAT
    dbus_name = DBUS_ERROR_PREFIX + "AssertionFormat"


class LocalFormatError(AssertionFormatError):
    """We built something invalid: a bug in the agent or in its input."""

    code = Code.ASSERTION_LOCAL
    dbus_name = DBUS_ERROR_PREFIX + "AssertionLocal"


class RemoteFormatError(AssertionFormatError):
    """The service sent something invalid or mismatched."""

    code = Code.ASSERTION_REMOTE
    dbus_name = DBUS_ERROR_PREFIX + "AssertionRemote"


class BadSignatureError(AssertionFormatError):
    """A signature that does not verify with the key it names."""

    code = Code.BAD_SIGNATURE
    dbus_name = DBUS_ERROR_PREFIX + "BadSignature"


class VaultError(AgentError):
    """Abstract: one exchange with the vault failed. ``retry_after`` is the vault's hint, in seconds."""

    code = Code.VAULT
    dbus_name = DBUS_ERROR_PREFIX + "Vault"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class VaultUnavailable(VaultError):
    """No network, DNS failure, connection refused: not the vault's answer, not counted."""

    code = Code.VAULT_UNAVAILABLE
    dbus_name = DBUS_ERROR_PREFIX + "VaultUnavailable"


class VaultClockSkew(VaultError):
    """The vault's TLS certificate is not yet valid or expired for us: our clock is wrong."""

    code = Code.CLOCK_SKEW
    dbus_name = DBUS_ERROR_PREFIX + "ClockSkew"


class VaultTransient(VaultError):
    """Timeouts, 5xx, 429, truncated or oversized answers: retried with backoff.

    ``error_code`` is the vault's own, when its JSON body named one (``server-error`` on a 500).
    """

    code = Code.VAULT_TRANSIENT
    dbus_name = DBUS_ERROR_PREFIX + "VaultTransient"

    def __init__(self, message: str, retry_after: float | None = None, error_code: str = "", status: int = 0) -> None:
        super().__init__(message, retry_after)
        self.error_code = error_code
        self.status = status  # the HTTP status when the vault answered one (429: too many requests), else 0


class VaultRejected(VaultError):
    """The vault refused (4xx): carries its own ``error_code`` and message."""

    code = Code.VAULT_REJECTED
    dbus_name = DBUS_ERROR_PREFIX + "VaultRejected"

    def __init__(self, message: str, error_code: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.error_code = error_code


class SerialRejectedError(AgentError):
    """The vault signed something that is not this device's serial, or not by a trusted key."""

    code = Code.SERIAL_REJECTED
    dbus_name = DBUS_ERROR_PREFIX + "SerialRejected"


class NotRegisteredError(AgentError):
    """Asked for the serial before there is one."""

    code = Code.NOT_REGISTERED
    dbus_name = DBUS_ERROR_PREFIX + "NotRegistered"


class BusError(AgentError):
    """The D-Bus connection failed, or another instance owns the name."""

    code = Code.DBUS
    dbus_name = DBUS_ERROR_PREFIX + "Bus"


class NotReadyError(AgentError):
    """Asked for something the daemon is still gathering (the registration settings before the identity)."""

    code = Code.NOT_READY
    dbus_name = DBUS_ERROR_PREFIX + "NotReady"


class WrongModeError(AgentError):
    """Asked for a snapd-mode service of an agent that runs standalone (or the reverse)."""

    code = Code.WRONG_MODE
    dbus_name = DBUS_ERROR_PREFIX + "WrongMode"


class RelayRefusedError(AgentError):
    """snapd mode: the relay refused to forward a serial-request; the subclass (its ``code``) says why."""

    code = Code.RELAY_REFUSED
    dbus_name = DBUS_ERROR_PREFIX + "RelayRefused"


class RelayBadRequest(RelayRefusedError):
    """Not a valid, self-signed serial-request stream: the sender's problem, never the device's."""

    code = Code.RELAY_BAD_REQUEST


class RelayWrongModel(RelayRefusedError):
    """A serial-request for another brand or model than the configured ones."""

    code = Code.RELAY_WRONG_MODEL


class RelaySnapdTooOld(RelayRefusedError):
    """Secure onboarding through a snapd older than 2.74, which never runs the prepare-serial-request hook."""

    code = Code.RELAY_SNAPD_TOO_OLD


class RelayOtherDeviceKey(RelayRefusedError):
    """A serial-request signed by a device key other than the one the relay already serves."""

    code = Code.RELAY_OTHER_DEVICE_KEY


class RelayError(AgentError):
    """snapd mode: the relay cannot listen (its port is taken); the daemon exits and systemd tries again."""

    code = Code.RELAY
    dbus_name = DBUS_ERROR_PREFIX + "Relay"
