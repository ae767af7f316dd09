"""snapd mode (Ubuntu Core): snapd owns the device key and the serial request; the agent relays, checks, reports.

The gadget's prepare-device hook gets the settings from GetRegistrationSettings():
the relay's URL for ``device-service.url``, the relay's token for
``device-service.headers`` (the second factor: only snapd holds it), the proposed
serial and the identity as YAML. snapd then calls the relay (relay.py), which
forwards each call to the vault with the api-key; the api-key never enters
snapd's configuration. What passes through feeds registration.apply() exactly as
in standalone mode, so D-Bus shows the same State, LastError and Action. No key
is generated here. The relay serves one device key: the first one snapd presents
with a valid, self-signed serial-request whose request-id the relay itself handed
out within the last 600 s, recorded durably before that request goes anywhere. A
serial coming back is checked as standalone checks it (serials.check_serial),
stored, held in memory, and only then handed to snapd; it is served again from
memory, never from a file that may have been changed since.

snapd retries on its own schedule (60 s inside an attempt, then 5 min doubling
to 24 h between attempts), so nothing here waits or retries; ``blocked`` ends when
snapd starts a new exchange, or at Retry().
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from . import registration, relay, serials
from .config import VaultConfig
from .errors import (
    AgentError,
    Code,
    IdentityError,
    NotReadyError,
    RelayRefusedError,
    RelaySnapdTooOld,
    VaultError,
    WrongModeError,
)
from .onboarding import Method
from .registration import Phase, Progress, State
from .session import Session, VaultClient, import_adapters, new_vault

if TYPE_CHECKING:
    from .vault import Exchange

log = logging.getLogger(__name__)

# snapd gives one whole HTTP exchange 30 s (snapd-device-protocol.md §3.4): the relay must answer
# before that, vault call included, or snapd gives up on an answer that was on its way.
RELAY_VAULT_TIMEOUT = 25.0
# A request-id binds a device key only within this long of the relay handing it out (the Serial
# Vault's nonce lifetime, and snapd's hardware-identity docs: 600 s).
REQUEST_ID_LIFETIME = 600.0
MAX_ISSUED_IDS = 32  # snapd fetches one per try; older ones are forgotten first
IDLE = State.WAITING_SNAPD  # between exchanges: settings available, snapd's move
# Secure onboarding: snapd 2.74-2.77 fail the attempt at their first poll after a 202 once the hook stored a JSON
# body (shared/reference/secure-onboarding.md §8). The relay polls the vault itself instead, answering snapd's
# one POST with the serial when it comes within ABSORB_SECONDS (snapd gives an exchange 30 s); past that it
# goes on polling in the background and serves the serial to snapd's next attempt from memory.
MIN_SNAPD_FOR_ONBOARDING = (2, 74)  # the first snapd with the prepare-serial-request hook
ABSORB_SECONDS = 15.0  # leaves one exchange's worth of snapd's 30 s for the last poll
ABSORB_POLL = (1.0, 5.0)  # seconds between polls: the vault's Retry-After, kept within these
BACKGROUND_POLLS = 120  # at most this many more polls (ABSORB_POLL[1] apart: 10 minutes) before giving up


class ForwardPort(Protocol):
    """What snapd mode asks of the vault: one call passed on (vault.Vault; a test may hand in its own)."""

    def forward(self, path: str, data: bytes | None, content_type: str | None = None,
                headers: dict[str, str] | None = None) -> Exchange: ...
    def close(self) -> None: ...


def load_state(session: Session) -> None:
    """The recorded progress, adopting a serial.assertion whose record a crash lost (blocking)."""
    recorded = session.load_recorded()
    serial = session.serial_on_disk(recorded.key_id)
    session.progress = session.reconciled(registration.reconcile_snapd(recorded, serial), recorded)


class SnapdDriver:
    """Serves the relay and the settings; every exchange is one Session.record()."""

    def __init__(self, session: Session, *, vault: ForwardPort | None = None) -> None:
        self.session = session
        self._vault: VaultClient[ForwardPort] = VaultClient(vault, new_vault)
        self.kick = asyncio.Event()
        self.relay: relay.Relay | None = None
        self.retry_requested = False
        self.issued_ids: dict[str, float] = {}  # request-id handed to snapd -> monotonic time
        self.pollers: set[asyncio.Task[None]] = set()  # secure onboarding: 202s still being polled

    @property
    def vault(self) -> ForwardPort:
        return self._vault.get(self.vault_config())

    def vault_config(self) -> VaultConfig:
        """The vault client's settings, its timeout within snapd's 30 s for one exchange."""
        cfg = self.session.cfg.vault
        return replace(cfg, timeout=min(cfg.timeout, RELAY_VAULT_TIMEOUT))

    def close(self) -> None:
        self._vault.close()

    def background(self) -> list[asyncio.Task[Any]]:
        return list(self.pollers)

    async def load(self) -> None:
        await asyncio.to_thread(load_state, self.session)  # a block recorded before this start is tried again

    def retry(self) -> None:
        self.retry_requested = True
        self.kick.set()

    def registration_settings(self) -> dict[str, str]:
        """GetRegistrationSettings(): what the hook hands to snapd with snapctl set."""
        session, cfg = self.session, self.session.cfg
        if session.identity is None:
            if session.progress.blocked_by == Code.IDENTITY:
                self.retry()  # the hook's call is snapd's new attempt: gather again, for the next one
                raise IdentityError(session.progress.last_error_message)
            raise NotReadyError(f"cannot give the registration settings yet: state {session.status().state}")
        if self.relay is None or not self.relay.url:
            raise NotReadyError("cannot give the registration settings yet: the relay is not listening")
        from . import identity

        allow_weak = cfg.identity.allow_weak
        settings = {
            "device-service.url": self.relay.url,
            "device-service.headers": relay.token_headers(self.relay.token),
            "registration.proposed-serial": identity.proposed_serial(session.identity, cfg.serial_template, allow_weak),
        }
        if cfg.onboarding.method is Method.HARDWARE_IDENTITY:
            return settings  # no body: the prepare-serial-request hook sets it, signed, for each request-id
        return {**settings, "registration.body": identity.registration_body(session.identity, allow_weak).decode("ascii")}

    async def sign_request_id(self, request_id: str) -> str:
        """SignRequestId(): the body the prepare-serial-request hook sets, signed by the hardware identity key
        (in a child process, agent/hwsign.py)."""
        settings = self.session.cfg.onboarding
        if settings.method is not Method.HARDWARE_IDENTITY:
            raise WrongModeError("the agent onboards with the api-key (onboarding.method): there is no request-id "
                                 "to sign; the gadget's prepare-serial-request hook has nothing to do")
        from . import hwkey, hwsign

        hwkey.check_request_id(request_id)
        signed = await hwsign.sign(settings, request_id)
        self.session.hardware_digest = signed.digest
        return signed.body.decode("utf-8")

    async def run(self, tg: asyncio.TaskGroup, once: bool) -> Progress:
        session = self.session
        session.publish()
        await asyncio.to_thread(import_adapters)
        self.relay = relay.Relay(self, await asyncio.to_thread(relay.load_token, session.store.dir))
        cfg = session.cfg.relay
        log.info("relay for snapd listening on %s", await self.relay.start(cfg.host, cfg.port))
        watching = tg.create_task(self.relay.watch())
        try:
            while True:
                if self.retry_requested:
                    self.retry_requested = False
                    await session.start_over()
                if session.identity is None and session.progress.blocked_by != Code.IDENTITY:
                    await self._gather_identity()
                if once and (session.progress.phase is Phase.REGISTERED or session.progress.blocked_by):
                    return session.progress
                self.kick.clear()
                await self.kick.wait()
        finally:
            watching.cancel()
            self.relay.close()

    async def _gather_identity(self) -> None:
        from . import identity

        session, cfg = self.session, self.session.cfg
        session.set_activity(State.IDENTIFYING)
        try:
            found = await identity.gather_identity(cfg.identity, session.waiting_for)
            identity.proposed_serial(found, cfg.serial_template, cfg.identity.allow_weak)  # usable?
        except IdentityError as exc:
            if session.progress.phase is Phase.REGISTERED:
                log.warning("cannot gather the identity: %s", exc)  # snapd needs no settings any more
            else:
                await self._record(exc)
            return
        finally:
            session.waiting_for((), 0.0)
        await session.adopt_identity(found, IDLE)

    # --- the relay's Handler --------------------------------------------------

    async def relay_request_id(self, headers: dict[str, str]) -> relay.Response:
        if self.session.progress.phase is Phase.REGISTERED:
            # snapd only wants a request-id to build the serial-request that relay_serial answers from memory;
            # a local one keeps that working when the vault is unreachable or refuses this device now.
            local = f"registered-{secrets.token_hex(8)}"
            self._issued(local)
            return relay.Response(200, json.dumps({"request-id": local}).encode(), relay.JSON_TYPE)
        await self._begin(State.REQUESTING)
        if (too_old := self._too_old_for_onboarding(headers.get("User-Agent", ""))) is not None:
            return await self._failed(too_old)
        try:
            answer = await asyncio.to_thread(self.vault.forward, "request-id", None, None, headers)
        except VaultError as exc:
            return await self._failed(exc)
        error = None if answer.status == 200 else answer.refusal()
        if error is None:
            self._issued(_request_id_in(answer.body))
        await self._record(error or registration.GotRequestId())
        return relay.passed_on(answer.status, answer.headers.get("Content-Type"), answer.body, error)

    def _too_old_for_onboarding(self, user_agent: str) -> RelaySnapdTooOld | None:
        """Secure onboarding needs snapd 2.74's prepare-serial-request hook: an older snapd (by its User-Agent,
        "snapd/2.73.1 (...)") would post a serial-request without the signed body, which the service refuses."""
        if self.session.cfg.onboarding.method is not Method.HARDWARE_IDENTITY:
            return None
        found = re.match(r"snapd/(\d+)\.(\d+)", user_agent)
        if found is None or (int(found[1]), int(found[2])) >= MIN_SNAPD_FOR_ONBOARDING:
            return None  # an unknown client is not judged by a header
        return RelaySnapdTooOld(f"snapd {found[1]}.{found[2]} runs no prepare-serial-request hook: secure onboarding "
                                f"(onboarding.method = hardware-identity) needs snapd "
                                f"{'.'.join(map(str, MIN_SNAPD_FOR_ONBOARDING))} or later")

    def _issued(self, request_id: str | None) -> None:
        """Remember a request-id handed to snapd, so that its serial-request may bind a key (relay_serial)."""
        if not request_id:
            return
        now = time.monotonic()
        self.issued_ids = {k: t for k, t in self.issued_ids.items() if now - t < REQUEST_ID_LIFETIME}
        self.issued_ids[request_id] = now
        while len(self.issued_ids) > MAX_ISSUED_IDS:
            del self.issued_ids[next(iter(self.issued_ids))]

    def _fresh(self, request_id: str) -> bool:
        issued = self.issued_ids.get(request_id)
        return issued is not None and time.monotonic() - issued < REQUEST_ID_LIFETIME

    async def relay_serial(self, body: bytes, headers: dict[str, str]) -> relay.Response:
        session, cfg = self.session, self.session.cfg
        await self._begin(State.POLLING if session.progress.phase is Phase.POLLING else State.REQUESTING)
        try:
            request = serials.check_serial_request(body, brand=cfg.brand, model=cfg.model,
                                                   key_id=session.progress.key_id)
            if session.progress.phase is Phase.REGISTERED:
                return await self._stored_serial()
            if not session.progress.key_id and not self._fresh(request.header("request-id") or ""):
                return self._not_ours(request.header("request-id") or "")
            if not session.progress.key_id:  # the one key served from now on: durable before it is used
                await session.record(registration.KeyReady(request.sign_key_id))
            from . import vault

            await session.record(registration.Posted(), note=f"snapd's, to {cfg.vault.url}")
            session.raise_if_held()  # an attempt not on record is not made
            answer = await asyncio.to_thread(self.vault.forward, "serial", body, vault.ASSERTION_TYPE, headers)
            return await self._answered(request.sign_key_id, request.encode(), answer, body, headers)
        except AgentError as exc:  # refused here, no answer, or an answer that is not this device's serial
            return await self._failed(exc)

    def _not_ours(self, request_id: str) -> relay.Response:
        """A serial-request that would bind a key, on a request-id the relay did not hand out lately: not bound,
        not forwarded, not recorded. 503, so that snapd (whose state may predate our restart) starts again
        with a fresh request-id in 60 s."""
        log.warning("relay: refused to bind a device key: request-id %s was not handed out by this relay in the "
                    "last %d s", relay.printable(request_id, 40), int(REQUEST_ID_LIFETIME))
        self.session.set_activity(IDLE)
        return relay.json_error(503, relay.Refusal.UNKNOWN_REQUEST_ID,
                                "the request-id was not handed out by this relay lately; ask for a new one")

    async def _stored_serial(self) -> relay.Response:
        """snapd asks again for the serial this device holds (its state lost it, or it never stored it): the
        verified serial held in memory (Session.serial_assertion: a serial.assertion changed on disk since is
        reported, never served), not a second one from a vault that may refuse duplicates."""
        from . import vault

        session = self.session
        text = await asyncio.to_thread(session.serial_assertion)
        log.info("relay: gave snapd the stored serial %s again", session.progress.serial)
        session.set_activity(IDLE)
        return relay.Response(200, text.encode("utf-8"), vault.ASSERTION_TYPE)

    async def _answered(self, key_id: str, request: bytes, answer: Exchange, body: bytes = b"",
                        headers: dict[str, str] | None = None) -> relay.Response:
        content_type = answer.headers.get("Content-Type")
        if answer.status in (200, 201):
            await self._record(await self.session.store_serial(key_id, request, answer.body))
            return relay.passed_on(answer.status, content_type, answer.body)
        if answer.status == 202 and body and self.session.cfg.onboarding.method is Method.HARDWARE_IDENTITY:
            return await self._absorb_202(key_id, request, answer, body, headers or {})
        if answer.status == 202:
            await self._record(registration.Accepted(request.decode("utf-8"), answer.retry_after))
            return relay.passed_on(answer.status, content_type, answer.body)
        error = answer.refusal()
        await self._record(error)
        return relay.passed_on(answer.status, content_type, answer.body, error)

    async def _absorb_202(self, key_id: str, request: bytes, answer: Exchange, body: bytes,
                          headers: dict[str, str]) -> relay.Response:
        """Secure onboarding: a 202 is polled here, not passed on (see ABSORB_SECONDS)."""
        await self._record(registration.Accepted(request.decode("utf-8"), answer.retry_after))
        self.session.set_activity(State.POLLING)
        deadline = time.monotonic() + ABSORB_SECONDS
        while answer.status == 202:
            pause = min(max(answer.retry_after or ABSORB_POLL[0], ABSORB_POLL[0]), ABSORB_POLL[1])
            if time.monotonic() + pause > deadline:
                poller = asyncio.get_running_loop().create_task(self._poll_on(key_id, request, body, headers, pause))
                self.pollers.add(poller)
                poller.add_done_callback(self.pollers.discard)
                log.info("relay: the vault is still signing after %g s; polling it on, for snapd's next attempt",
                         ABSORB_SECONDS)
                return relay.json_error(503, relay.Refusal.PENDING, "the vault accepted the serial-request and is "
                                        "still signing: the agent polls it, and gives the serial at the next attempt")
            await asyncio.sleep(pause)
            answer = await asyncio.to_thread(self.vault.forward, "serial", body, _assertion_type(), headers)
        return await self._answered(key_id, request, answer)

    async def _poll_on(self, key_id: str, request: bytes, body: bytes, headers: dict[str, str], pause: float) -> None:
        """Poll in the background until the serial (stored: the next attempt gets it from memory) or a refusal."""
        for _ in range(BACKGROUND_POLLS):
            await asyncio.sleep(pause)
            try:
                answer = await asyncio.to_thread(self.vault.forward, "serial", body, _assertion_type(), headers)
                if answer.status != 202:
                    await self._answered(key_id, request, answer)
                    return
            except AgentError as exc:
                await self._failed(exc)
                return
            pause = min(max(answer.retry_after or ABSORB_POLL[0], ABSORB_POLL[0]), ABSORB_POLL[1])
        log.warning("relay: the vault still answers 202 after %d more polls; snapd's next attempt starts again",
                    BACKGROUND_POLLS)

    async def _begin(self, activity: State) -> None:
        """A new exchange is snapd's retry: it ends a block (but not one on the identity or the configuration:
        those are ours, and end at Retry())."""
        if self.session.progress.blocked_by not in ("", Code.IDENTITY, Code.CONFIG):
            await self.session.unblock()
        self.session.set_activity(activity)

    async def _failed(self, error: AgentError) -> relay.Response:
        if self.session.progress.phase is Phase.REGISTERED:
            # Registration is over: a refused request (junk, another key) is the caller's problem, not the
            # device's, so it answers the caller and leaves State, LastError and Action as they are.
            log.warning("relay refused a request after registration: %s", error)
            self.session.set_activity(IDLE)
            return relay.error_response(error)
        if isinstance(error, RelayRefusedError):
            log.warning("relay refused snapd's request: %s", error)
        await self._record(error)
        return relay.error_response(error)

    async def _record(self, outcome: registration.Outcome) -> None:
        """One outcome recorded; snapd decides what comes next, so nothing waits here."""
        await self.session.record(outcome, activity=IDLE)
        self.kick.set()  # run(once=True) looks again


def _request_id_in(body: bytes) -> str | None:
    """The ``request-id`` of the vault's 200 answer, as snapd reads it; None if there is none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = data.get("request-id") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


def _assertion_type() -> str:
    from .vault import ASSERTION_TYPE  # the vault client loads with the adapters (import_adapters), not at start

    return ASSERTION_TYPE
