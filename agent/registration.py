"""The registration state machine: what to do next, and how long to wait first.

Pure: no I/O, no clock, no randomness of its own (the caller passes a Random).

Theory of operation
-------------------
``Progress`` is what survives a power cut; store.py persists exactly it, as
state.json. ``Context`` is what does not survive and need not: whether the
device key is loaded, the identity gathered, and how old the request-id in
hand is (a request-id is never persisted: the vault's are single use and
die after 600 s).

The daemon loops: ``next_step(progress, context)`` names the one thing to do;
the daemon does it and hands the outcome (a success value or an AgentError)
to ``apply(progress, outcome, rng)``, which returns the next Progress, the
delay before the next step, and whether the request-id in hand is spent.

Phases only move forward: unregistered -> key-ready -> (polling) ->
registered. Errors never change the phase except to drop a saved
serial-request whose request-id the vault no longer honours. Every retry
decision lives here, keyed on the error's type (and, for refusals, on the
vault's error_code), so it is tested as a table without an event loop.

In snapd mode snapd owns the key and its own retry schedule; the relay feeds
what passes through it to the same ``apply()`` (KeyReady when it binds the
one device key it serves, GotRequestId, Accepted, Registered, or the error),
so ``LastError``, ``Action`` and ``blocked`` mean what they mean standalone.
The delay is not used there: snapd decides when it comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from random import Random

from .errors import (
    AgentError,
    AssertionFormatError,
    Code,
    ConfigError,
    DeviceKeyLostError,
    HardwareKeyError,
    IdentityError,
    RelayBadRequest,
    RelayRefusedError,
    SerialRejectedError,
    UntrustedFileError,
    VaultClockSkew,
    VaultCode,
    VaultError,
    VaultRejected,
    VaultTransient,
    VaultUnavailable,
)

# The vault's request-ids die after 600 s; fetch a new one when ours is
# this old, leaving a margin for the serial call itself.
REQUEST_ID_MAX_AGE = 600.0 - 60.0
# No connection is not the vault's answer and is not counted as an attempt. The network may still be coming
# up: the first UNREACHABLE_QUICK tries come NO_NETWORK_DELAY apart. Past them the vault may be down for the
# whole line at once, and every device retrying every 5 s would meet its return as one burst (the line's
# backlog within 5 s): the wait doubles from NO_NETWORK_DELAY to UNREACHABLE_CAP, with equal jitter.
NO_NETWORK_DELAY = 5.0
UNREACHABLE_QUICK = 3
UNREACHABLE_CAP = 120.0
# Transient failures: full-jitter exponential backoff, 2 s doubling to a
# 5 min cap. snapd waits up to 24 h between attempts; a device on a factory
# line is watched by a person, so we stay responsive and let Retry-After
# (capped at one hour) slow us down when the vault asks for it.
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
BACKOFF_FLOOR = 1.0
RETRY_AFTER_CAP = 3600.0
# A 429 means the vault is pacing a crowd: a factory line asks all at once, and a rate-limiting front tells
# every device "Retry-After: 1"; honoured to the second, the crowd comes back as one herd (measured with 40
# agents: 25 requests per device, 9x the vault's capacity offered). Retry-After is then a floor: the device
# waits at least that, spread over a window that doubles with each refusal from CROWD_BASE to CROWD_CAP, in
# its upper half (equal jitter: no retry lands in the next second's crowd). The cap bounds how long the last
# devices wait after the vault has room again. A longer Retry-After (a vault that paces by its backlog) is
# honoured as it is, and so is a 5xx's (the vault's own estimate of when its trouble is over). make fleet-sim
# (tests/fleet_sim.py) drives this module for 10,000 and 100,000 devices against a capped vault.
CROWD_BASE = 16.0
CROWD_CAP = 90.0
# The vault said 202: ask again with the same serial-request.
POLL_DELAY = 30.0
# A clock that fails TLS may be fixed by NTP at any time: snapd's stepped
# schedule (2.58.3+), 30 s five times, then 60, 120, 240 s, retried forever.
CLOCK_SCHEDULE = (30.0,) * 5 + (60.0,) * 5 + (120.0,) * 5 + (240.0,)
# invalid-nonce means "get a fresh request-id", at once; a vault that keeps
# saying it is broken, and gets the ordinary backoff after this many.
MAX_NONCE_RETRIES = 3
# The step history kept in state.json: the newest this many events (identical consecutive ones are one).
HISTORY_MAX = 100
# Refusals the real vault sends for its own internal trouble.
TRANSIENT_VAULT_CODES = frozenset({VaultCode.GENERATE_NONCE, VaultCode.LOGGING_ASSERTION, VaultCode.SERVER_ERROR})

ACTIONS: dict[str, str] = {
    VaultCode.INVALID_API_KEY: "the vault does not accept this api-key: check vault.api-key-file, "
    "then run: factory-agent retry",
    VaultCode.INVALID_MODEL: "the vault has no active model for this brand, model and api-key: check brand and model, "
    "and the model's signing key in the vault, then run: factory-agent retry",
    VaultCode.MISMATCHED_MODEL: "the model assertion does not match brand/model: check model-assertion, "
    "then run: factory-agent retry",
    VaultCode.CREATE_ASSERTION: "the vault found no serial number in the request: check serial.template, "
    "then run: factory-agent retry",
    VaultCode.SIGNING_ASSERTION: "the vault cannot sign with its brand key: ask the vault's operator, "
    "then run: factory-agent retry",
    Code.SERIAL_REJECTED: "the vault's serial is not this device's or not signed by a trusted key: "
    "check vault.trusted-account-keys and the vault's brand and model, then run: factory-agent retry",
    Code.IDENTITY: "required identity fields are missing: check the board, identity.sources and identity.static, "
    "then run: factory-agent retry",
    VaultCode.TLS_CERTIFICATE: "the vault's TLS certificate is not trusted here: check vault.url and vault.ca-file, "
    "then run: factory-agent retry",
    Code.CLOCK_SKEW: "the device clock is wrong for the vault's TLS certificate: set the time (NTP or RTC); retrying",
    Code.DEVICE_KEY_LOST: "the state records a device key that is no longer on disk: the device identity is lost; "
    "reflash or clear the state directory",
    Code.DEVICE_KEY: "the device key cannot be generated or stored: check free space in the state directory; retrying",
    Code.UNTRUSTED_FILE: "a file in the state directory is not the agent's own (see LastErrorMessage): move it "
    "aside or fix its owner and mode, then run: factory-agent retry",
    Code.VAULT_UNAVAILABLE: "cannot reach the vault: check the network and vault.url; retrying",
    "http-404": "the vault has no such endpoint: vault.url must be the vault's API base ending in /v1/ "
    "(e.g. https://vault.example.com:8443/v1/); fix it, then run: factory-agent retry",
    # snapd mode: the relay's own refusals (snapd retries on its own schedule, up to 24 h apart)
    Code.RELAY_WRONG_MODEL: "snapd asked for a serial for another brand or model: check brand, model and "
    "model-assertion against the device's model (snap model), then run: factory-agent retry",
    Code.RELAY_OTHER_DEVICE_KEY: "snapd presented a device key other than the one this agent already serves: "
    "the device's identity changed (snapd state reset?); if intended, clear the agent's state directory and restart it",
    Code.CONFIG: "the configuration no longer loads (see LastErrorMessage): fix the file and key it names, "
    "then run: factory-agent retry",
    Code.STORE: "the state directory cannot be used (see LastErrorMessage): fix what it names (a read-only mount, "
    "a full disk, an owner or mode), then run: factory-agent retry",
    # secure onboarding (onboarding.method = "hardware-identity")
    Code.HARDWARE_KEY: "the hardware identity key cannot be used (see LastErrorMessage): make it with factory-agent "
    "hardware-identity init, or fix its token, PIN file or module, then run: factory-agent retry",
    VaultCode.UNKNOWN_HARDWARE_IDENTITY: "the Model Service does not know this device's hardware identity: import the "
    "hardware-identity assertion for its hardware-id-key-sha3-384 (factory-agent hardware-identity show), then run: "
    "factory-agent retry",
    Code.RELAY_SNAPD_TOO_OLD: "this snapd runs no prepare-serial-request hook: secure onboarding needs snapd 2.74 or "
    "later (refresh snapd, or the core snap that carries it); snapd's next attempt goes on",
    VaultCode.INVALID_REQUEST_ID_SIGNATURE: "the Model Service refused the request-id signature: check that its "
    "hardware-identity assertion is for this device's key and [onboarding] hash, then run: factory-agent retry",
}
# What each LastError means, for the man page's TROUBLESHOOTING table (tests/gen_troubleshooting.py writes it
# from this and ACTIONS; tests/unit/test_troubleshooting.py fails on a stale or missing row).
MEANINGS: dict[str, str] = {
    VaultCode.INVALID_API_KEY: "the vault refused the api-key (blocked)",
    VaultCode.INVALID_MODEL: "the vault has no such active model for this api-key (blocked)",
    VaultCode.MISMATCHED_MODEL: "the model assertion sent is not the configured brand/model (blocked)",
    VaultCode.CREATE_ASSERTION: "the vault could not make a serial from the request (blocked)",
    VaultCode.SIGNING_ASSERTION: "the vault could not sign with its brand key (blocked)",
    Code.SERIAL_REJECTED: "the vault's answer is not a trusted serial for this device (blocked)",
    Code.IDENTITY: "the identity lacks a field the template or the rules require (blocked)",
    VaultCode.TLS_CERTIFICATE: "the vault's TLS certificate is not trusted here (blocked)",
    Code.CLOCK_SKEW: "the vault's certificate is not valid at this device's time (waiting-clock)",
    Code.DEVICE_KEY_LOST: "the recorded device key is gone or replaced (blocked)",
    Code.DEVICE_KEY: "the device key could not be generated or stored (retried)",
    Code.UNTRUSTED_FILE: "a file in the state directory is not the agent's own (blocked)",
    Code.VAULT_UNAVAILABLE: "no connection to the vault: network, DNS or nothing listening (retried)",
    "http-404": "the vault answered 404: vault.url does not point at the vault's API",
    Code.RELAY_WRONG_MODEL: "snapd asked for another brand or model (snapd mode, blocked)",
    Code.RELAY_OTHER_DEVICE_KEY: "snapd presented another device key than the one served (snapd mode, blocked)",
    Code.CONFIG: "the configuration does not load: read again at Retry(), or an api-key file unreadable at start "
    "(blocked)",
    Code.STORE: "the state directory cannot be read or written: read-only, full, or not the agent's (the daemon "
    "stays up, blocked; run --once exits 1)",
    Code.VAULT_TRANSIENT: "the vault or the path to it failed for now: 5xx, 429, timeout (retried with backoff)",
    VaultCode.SERVER_ERROR: "the vault's own trouble (retried with backoff)",
    VaultCode.INVALID_NONCE: "the request-id was spent or expired (a fresh one at once)",
    Code.SERIAL_NOT_PROPOSED: "registered, but the vault signed another serial than the one proposed",
    Code.HARDWARE_KEY: "the hardware identity key is missing, or its token, PIN or module cannot be used (blocked)",
    Code.RELAY_SNAPD_TOO_OLD: "snapd is older than 2.74, which secure onboarding needs (snapd mode, blocked)",
    VaultCode.UNKNOWN_HARDWARE_IDENTITY: "the Model Service has no hardware-identity assertion for this device's key "
    "(the lab's code; blocked)",
    VaultCode.INVALID_REQUEST_ID_SIGNATURE: "the request-id signature did not verify with the imported key (the lab's "
    "code; blocked)",
}
DEFAULT_REFUSAL_ACTION = "the vault refused the request (see LastErrorMessage): fix the cause, then run: factory-agent retry"


class Phase(StrEnum):
    """Durable progress; append-only vocabulary (it is in state.json)."""

    UNREGISTERED = "unregistered"  # no durable device key yet
    KEY_READY = "key-ready"  # device key durable, key_id recorded
    POLLING = "polling"  # the vault said 202; serial_request kept for re-posting
    REGISTERED = "registered"  # serial assertion durable (terminal)


class State(StrEnum):
    """The D-Bus ``State`` (a fixed contract: append-only). The XML, ``status --json`` and STATUS= are checked
    against it (tests/unit/test_contracts.py)."""

    STARTING = "starting"  # loading the state directory
    IDENTIFYING = "identifying"  # gathering the hardware identity
    GENERATING_KEY = "generating-key"  # making the device key (standalone)
    REQUESTING = "requesting"  # an exchange with the vault: a request-id, or the serial-request
    POLLING = "polling"  # the vault said 202: asking again with the same serial-request
    WAITING_RETRY = "waiting-retry"  # backing off after a transient failure (NextRetry says until when)
    WAITING_CLOCK = "waiting-clock"  # the device clock is wrong for the vault's certificate
    WAITING_SNAPD = "waiting-snapd"  # snapd mode: the settings are ready, snapd's move
    REGISTERED = "registered"  # the serial assertion is durable (terminal)
    BLOCKED = "blocked"  # a refusal that needs a person: until Retry()


class Mode(StrEnum):
    """Whose device key the agent registers (config ``mode``, state.json ``mode``)."""

    STANDALONE = "standalone"  # the agent's own key and serial
    SNAPD = "snapd"  # snapd's key: the agent relays for it (Ubuntu Core)


class EventKind(StrEnum):
    """The steps of the history (``status --long``, History()); append-only vocabulary (it is in state.json)."""

    STARTED = "started"  # a daemon started on this state
    IDENTITY = "identity"  # the hardware identity gathered
    KEY = "key"  # the device key generated (or loaded, or bound in snapd mode)
    REQUEST_ID = "request-id"  # a request-id obtained from the vault
    SERIAL_REQUEST = "serial-request"  # a serial-request posted to the vault (one attempt)
    ACCEPTED = "accepted"  # the vault said 202: ask again later
    ERROR = "error"  # a failure that is retried
    BLOCKED = "blocked"  # a refusal that needs a person
    RETRY = "retry"  # Retry(), a restart or run --once ended a block: a fresh attempt
    CONFIG = "config"  # the configuration was read again
    REGISTERED = "registered"  # the serial assertion durable


@dataclass(frozen=True, slots=True)
class Event:
    """One step of the history. The adapters make them (with their clock); apply() never does."""

    at: int  # unix microseconds of the (first) occurrence
    kind: EventKind
    detail: str
    count: int = 1  # identical consecutive occurrences, collapsed into this one
    last_at: int = 0  # unix microseconds of the latest of them, when count > 1


def noted(history: tuple[Event, ...], event: Event) -> tuple[Event, ...]:
    """``history`` with ``event``: one more occurrence of the last one if identical, the oldest dropped past the bound."""
    if history and (history[-1].kind, history[-1].detail) == (event.kind, event.detail):
        last = history[-1]
        return (*history[:-1], replace(last, count=last.count + 1, last_at=event.at))
    return (*history, event)[-HISTORY_MAX:]


class Step(StrEnum):
    DONE = "done"
    BLOCKED = "blocked"
    FETCH_REQUEST_ID = "fetch-request-id"
    WAIT_IDENTITY = "wait-identity"
    WAIT_KEY = "wait-key"
    POST_SERIAL = "post-serial"
    POLL = "poll"


@dataclass(frozen=True, slots=True)
class Progress:
    """Exactly what store.py persists."""

    phase: Phase = Phase.UNREGISTERED
    key_id: str = ""
    serial: str = ""
    serial_request: str = ""  # only while POLLING
    identity: dict[str, str] = field(default_factory=dict)  # the fields the serial-request was built from
    attempts: int = 0  # serial-requests posted to the vault
    failures: int = 0  # consecutive counted failures: the backoff exponent
    clock_tries: int = 0  # consecutive TLS clock failures: the clock schedule position
    nonce_retries: int = 0  # consecutive invalid-nonce answers
    unreachable: int = 0  # consecutive attempts that reached no vault (not counted in failures)
    blocked_by: str = ""  # error code of a refusal that needs a person; cleared by unblock()
    last_error: str = ""
    last_error_message: str = ""
    mode: Mode = Mode.STANDALONE  # whose key this state is about
    last_attempt_at: int = 0  # unix microseconds of the last exchange with the vault (the caller's clock)
    registered_at: int = 0  # unix microseconds of the registration
    history: tuple[Event, ...] = ()  # the steps so far, oldest first (bounded: HISTORY_MAX)

    @property
    def action(self) -> str:
        """What the technician should do about the last error ("" if nothing)."""
        if self.phase is Phase.REGISTERED or not self.last_error:
            return ""
        if self.blocked_by:
            return ACTIONS.get(self.blocked_by, DEFAULT_REFUSAL_ACTION)
        return ACTIONS.get(self.last_error, "retrying")


@dataclass(frozen=True, slots=True)
class Context:
    """What the daemon holds in memory right now."""

    key_ready: bool
    identity_ready: bool
    request_id_age: float | None  # seconds since the request-id in hand was fetched; None: none


@dataclass(frozen=True, slots=True)
class KeyReady:
    key_id: str


@dataclass(frozen=True, slots=True)
class GotRequestId:
    pass


@dataclass(frozen=True, slots=True)
class Posted:
    """A serial-request is about to go to the vault: one attempt."""


@dataclass(frozen=True, slots=True)
class Accepted:
    serial_request: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    serial: str


Outcome = KeyReady | GotRequestId | Posted | Accepted | Registered | AgentError


@dataclass(frozen=True, slots=True)
class Decision:
    progress: Progress
    delay: float  # seconds before the next step; math.inf: until unblock()
    forget_request_id: bool


def next_step(p: Progress, ctx: Context) -> Step:
    """The one thing to do now. The request-id is fetched even while the key is being generated."""
    if p.phase is Phase.REGISTERED:
        return Step.DONE
    if p.blocked_by:
        return Step.BLOCKED
    if p.phase is Phase.POLLING:
        return Step.POLL
    if ctx.request_id_age is None or ctx.request_id_age >= REQUEST_ID_MAX_AGE:
        return Step.FETCH_REQUEST_ID
    if not ctx.identity_ready:
        return Step.WAIT_IDENTITY
    if not ctx.key_ready:
        return Step.WAIT_KEY
    return Step.POST_SERIAL


def apply(p: Progress, outcome: Outcome, rng: Random) -> Decision:
    """The next Progress after ``outcome``, and how long to wait before the next step."""
    if isinstance(outcome, KeyReady):
        phase = Phase.KEY_READY if p.phase is Phase.UNREGISTERED else p.phase
        return Decision(replace(p, phase=phase, key_id=outcome.key_id), 0.0, False)
    if isinstance(outcome, GotRequestId):
        return Decision(replace(p, unreachable=0) if p.unreachable else p, 0.0, False)
    if isinstance(outcome, Posted):
        return Decision(replace(p, attempts=p.attempts + 1), 0.0, False)
    if isinstance(outcome, Accepted):
        polled = _succeeded(p, phase=Phase.POLLING, serial_request=outcome.serial_request)
        return Decision(polled, _capped(outcome.retry_after) or POLL_DELAY, True)
    if isinstance(outcome, Registered):
        return Decision(_succeeded(p, phase=Phase.REGISTERED, serial=outcome.serial, serial_request=""), 0.0, True)
    return _failed(p, outcome, rng)


def _succeeded(p: Progress, **changes: object) -> Progress:
    return replace(p, failures=0, clock_tries=0, nonce_retries=0, unreachable=0,
                   last_error="", last_error_message="", **changes)  # type: ignore[arg-type]


def _failed(p: Progress, error: AgentError, rng: Random) -> Decision:
    # One replace() per decision: a fleet simulation makes millions of them.
    said: dict[str, object] = {"last_error": error_code(error), "last_error_message": str(error)}
    spent = isinstance(error, (VaultError, AssertionFormatError, SerialRejectedError))
    if isinstance(error, VaultUnavailable):
        tries = p.unreachable + 1
        if tries <= UNREACHABLE_QUICK:
            delay = NO_NETWORK_DELAY * rng.uniform(0.8, 1.2)
        else:
            delay = _equal_jitter(NO_NETWORK_DELAY * 2.0 ** min(tries - UNREACHABLE_QUICK, 32), UNREACHABLE_CAP, rng)
        return Decision(replace(p, unreachable=tries, **said), delay, spent)  # type: ignore[arg-type]
    if p.unreachable and isinstance(error, VaultError):  # the vault answered
        said["unreachable"] = 0
    if isinstance(error, VaultClockSkew):
        step = CLOCK_SCHEDULE[min(p.clock_tries, len(CLOCK_SCHEDULE) - 1)]
        return Decision(replace(p, clock_tries=p.clock_tries + 1, **said), step, spent)  # type: ignore[arg-type]
    if isinstance(error, VaultRejected) and error.error_code == VaultCode.INVALID_NONCE and p.nonce_retries < MAX_NONCE_RETRIES:
        fresh = replace(p, nonce_retries=p.nonce_retries + 1, **said)  # type: ignore[arg-type]
        return Decision(_drop_serial_request(fresh), 0.0, True)
    if needs_person(error):
        return Decision(replace(p, blocked_by=error_code(error), **said), math.inf, spent)  # type: ignore[arg-type]
    retry_after = _capped(error.retry_after if isinstance(error, VaultError) else None)
    if crowded(error):
        backoff = max(retry_after or 0.0, _equal_jitter(CROWD_BASE * 2.0 ** min(p.failures, 32), CROWD_CAP, rng))
    else:
        backoff = retry_after or _jitter(p.failures, rng)
    retry = replace(p, failures=p.failures + 1, **said)  # type: ignore[arg-type]
    if isinstance(error, VaultRejected):  # invalid-nonce past its retries: start over, slowly
        retry = _drop_serial_request(retry)
    return Decision(retry, backoff, spent)


def _drop_serial_request(p: Progress) -> Progress:
    if p.phase is Phase.POLLING:
        return replace(p, phase=Phase.KEY_READY, serial_request="")
    return p


def needs_person(error: AgentError) -> bool:
    """Refusals that retrying cannot fix: blocked until Retry() or a restart."""
    if isinstance(error, VaultRejected):
        return error.error_code not in TRANSIENT_VAULT_CODES and error.error_code != VaultCode.INVALID_NONCE
    if isinstance(error, RelayRefusedError):
        return not isinstance(error, RelayBadRequest)  # garbage is the sender's problem, not the device's
    return isinstance(error, (SerialRejectedError, IdentityError, DeviceKeyLostError, UntrustedFileError, ConfigError,
                              HardwareKeyError))


def crowded(error: AgentError) -> bool:
    """The vault is pacing a crowd: it answered 429 (Too Many Requests)."""
    return isinstance(error, VaultTransient) and error.status == 429


def error_code(error: AgentError) -> str:
    """The stable LastError value: the vault's own error_code for its refusals."""
    if isinstance(error, VaultRejected):
        return error.error_code
    if isinstance(error, VaultTransient) and error.error_code in TRANSIENT_VAULT_CODES:
        return error.error_code  # the vault's own name for its trouble (a 500 says server-error)
    if isinstance(error, AssertionFormatError):
        return VaultTransient.code  # a garbled answer: the vault's or the network's trouble
    return error.code


def _capped(retry_after: float | None) -> float | None:
    if retry_after is None:
        return None
    return min(max(retry_after, BACKOFF_FLOOR), RETRY_AFTER_CAP)


def _jitter(failures: int, rng: Random) -> float:
    """Full jitter: uniform in [floor, min(cap, base * 2^failures)]."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures, 32))
    return max(BACKOFF_FLOOR, rng.uniform(0.0, ceiling))


def _equal_jitter(window: float, cap: float, rng: Random) -> float:
    """Equal jitter: uniform in the upper half of min(cap, window)."""
    ceiling = min(cap, window)
    return rng.uniform(ceiling / 2.0, ceiling)


def unblock(p: Progress) -> Progress:
    """Retry(), or a restart: a person says the cause is fixed; start the counters afresh.

    The last error goes with the block (its story stays in the history): a fresh attempt shows its own.
    """
    return replace(p, blocked_by="", failures=0, clock_tries=0, nonce_retries=0, unreachable=0, last_error="",
                   last_error_message="")


def reconcile(p: Progress, key_id_on_disk: str | None, serial_on_disk: str | None) -> Progress:
    """Adopt artifacts whose record a crash lost; notice an artifact that vanished.

    ``serial_on_disk`` is the serial of a serial.assertion already checked to
    be for the key on disk.
    """
    if key_id_on_disk and p.phase is Phase.UNREGISTERED:
        p = replace(p, phase=Phase.KEY_READY, key_id=key_id_on_disk)
    if key_id_on_disk and p.key_id and key_id_on_disk != p.key_id:
        return _lost(p, f"state records device key {p.key_id} but the key on disk is {key_id_on_disk}")
    if not key_id_on_disk and p.phase is not Phase.UNREGISTERED:
        return _lost(p, f"state records device key {p.key_id} but device-key.pem is missing")
    return reconcile_snapd(p, serial_on_disk)


def reconcile_snapd(p: Progress, serial_on_disk: str | None) -> Progress:
    """Adopt a serial.assertion whose record a crash lost: all of snapd mode's reconcile (snapd has the key
    file), and the last step of standalone's.

    ``serial_on_disk`` is the serial of a serial.assertion already checked to
    be for the device key recorded in ``p``.
    """
    if serial_on_disk and p.phase is not Phase.REGISTERED:
        return replace(p, phase=Phase.REGISTERED, serial=serial_on_disk, serial_request="")
    return p


def _lost(p: Progress, message: str) -> Progress:
    if p.phase is Phase.REGISTERED:
        return replace(p, last_error=Code.DEVICE_KEY_LOST, last_error_message=message)
    return replace(p, blocked_by=Code.DEVICE_KEY_LOST, last_error=Code.DEVICE_KEY_LOST, last_error_message=message)


def display_state(p: Progress, activity: State) -> State:
    """The D-Bus ``State``: registered and blocked win over what the daemon is doing."""
    if p.phase is Phase.REGISTERED:
        return State.REGISTERED
    if p.blocked_by:
        return State.BLOCKED
    return activity
