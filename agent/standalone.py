"""Standalone mode: the agent generates its own device key and registers it with the vault.

It performs what registration.py decides, step by step, through its ports: the
vault client (requests, in a thread), key generation (a child process), the
identity (pyudev), the store (in a thread), all reported through the Session.
Every task belongs to the daemon's TaskGroup; blocking calls go through
asyncio.to_thread and are bounded by their own timeouts. Correctness never
depends on a clean exit: the store's write order and reconcile() make a SIGKILL
at any instant safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import assertions, keys, registration, store
from .errors import AgentError, DeviceKeyLostError, WrongModeError
from .onboarding import Method
from .registration import Phase, Progress, State, Step
from .session import Session, VaultClient, import_adapters, new_vault

if TYPE_CHECKING:
    from . import identity, vault

log = logging.getLogger(__name__)
T = TypeVar("T")


class VaultPort(Protocol):
    """What standalone mode asks of the vault (vault.Vault; a test may hand in its own)."""

    def fetch_request_id(self) -> str: ...
    def post_serial(self, stream: bytes) -> vault.Signed | vault.Pending: ...
    def close(self) -> None: ...


Identify = Callable[[], Awaitable["identity.DeviceIdentity"]]


def load_state(session: Session) -> keys.DeviceKey | None:
    """Read the state directory and reconcile it with the artifacts on disk (blocking); a key it had to load."""
    st = session.store
    recorded = session.load_recorded()
    session.progress = recorded
    if recorded.phase is Phase.REGISTERED and st.has_artifacts():
        return None  # every later boot: nothing to load, nothing to sign
    if recorded.key_id and st.has_key() and st.read_serial() is None:
        return None  # the key is loaded (and checked against the record) in the background
    key = store.load_device_key(st.dir)  # a crash left something to adopt, or something is missing
    serial = session.serial_on_disk(key.key_id if key else None)
    session.progress = session.reconciled(registration.reconcile(recorded, key.key_id if key else None, serial), recorded)
    return key


class StandaloneDriver:
    """One registration, from whatever the state directory holds to registered (or blocked)."""

    def __init__(self, session: Session, *, vault: VaultPort | None = None, identify: Identify | None = None,
                 key_bits: int = keys.DEVICE_KEY_BITS) -> None:
        self.session, self.key_bits = session, key_bits
        self._vault: VaultClient[VaultPort] = VaultClient(vault, new_vault)
        self._identify = identify
        self.kick = asyncio.Event()
        self.retry_requested = False
        self.key: keys.DeviceKey | None = None
        self.request_id: tuple[str, float] | None = None  # (id, monotonic time fetched)
        # Background work returns its AgentError instead of raising it, so a
        # failure feeds the state machine instead of tearing down the TaskGroup.
        self.key_task: asyncio.Task[keys.DeviceKey | AgentError] | None = None
        self.identity_task: asyncio.Task[identity.DeviceIdentity | AgentError] | None = None

    # --- what D-Bus asks ----------------------------------------------------------

    def retry(self) -> None:
        """Retry(): the configuration read again and a fresh attempt, from a block or a wait cut short."""
        self.retry_requested = True
        self.kick.set()

    async def sign_request_id(self, request_id: str) -> str:
        raise WrongModeError("the agent runs in standalone mode: it signs its own request-ids, for no hook "
                             "(set mode = \"snapd\" on Ubuntu Core)")

    def registration_settings(self) -> dict[str, str]:
        raise WrongModeError("the agent runs in standalone mode: it registers with its own device key and has no "
                             "settings for snapd (set mode = \"snapd\" on Ubuntu Core)")

    # --- the run ------------------------------------------------------------------

    @property
    def vault(self) -> VaultPort:
        return self._vault.get(self.session.cfg.vault)

    def close(self) -> None:
        self._vault.close()

    def background(self) -> list[asyncio.Task[Any]]:
        return [task for task in (self.key_task, self.identity_task) if task is not None]

    async def load(self) -> None:
        self.key = await asyncio.to_thread(load_state, self.session)

    async def run(self, tg: asyncio.TaskGroup, once: bool) -> Progress:
        session = self.session
        session.publish()
        if session.progress.phase is not Phase.REGISTERED:
            await asyncio.to_thread(import_adapters)
        while True:
            if self.retry_requested:
                self.retry_requested = False
                await session.start_over()
            step = registration.next_step(session.progress, self._context())
            if step in (Step.DONE, Step.BLOCKED):
                session.publish()
                if once or not await self._wait_for_retry(step):
                    return session.progress
                continue
            outcome = await self._perform(step, tg)
            if outcome is not None:
                await self._apply(outcome)

    def _context(self) -> registration.Context:
        age = time.monotonic() - self.request_id[1] if self.request_id else None
        return registration.Context(key_ready=self.key is not None, identity_ready=self.session.identity is not None,
                                    request_id_age=age)

    async def _perform(self, step: Step, tg: asyncio.TaskGroup) -> registration.Outcome | None:
        session = self.session
        try:
            if step is Step.FETCH_REQUEST_ID:
                self._start_background(tg)
                session.set_activity(State.REQUESTING)
                self.request_id = (await asyncio.to_thread(self.vault.fetch_request_id), time.monotonic())
                return registration.GotRequestId()
            # The identity and the key are recorded and published by their tasks as soon as they are done;
            # the daemon shows it waits for one only while it does.
            if step is Step.WAIT_IDENTITY:
                self._start_background(tg)
                gathering, self.identity_task = self.identity_task, None  # a failed one starts afresh next time
                assert gathering is not None
                if not gathering.done():
                    session.set_activity(State.IDENTIFYING)
                _result(await gathering)
                return None
            if step is Step.WAIT_KEY:
                self._start_background(tg)
                generating, self.key_task = self.key_task, None
                assert generating is not None
                if not generating.done():
                    session.set_activity(State.GENERATING_KEY)
                self.key = _result(await generating)
                return None
            return await self._exchange(step)
        except AgentError as exc:
            return exc

    def _start_background(self, tg: asyncio.TaskGroup) -> None:
        """Identity and key generation run while the request-id is fetched."""
        if self.session.identity is None and self.identity_task is None:
            self.identity_task = tg.create_task(_captured(self._gather_identity()))
        if self.key is None and self.key_task is None:
            self.key_task = tg.create_task(_captured(self._generate_key()))

    async def _gather_identity(self) -> identity.DeviceIdentity:
        started, session = time.monotonic(), self.session
        try:
            if self._identify is not None:
                found = await self._identify()
            else:
                from . import identity

                found = await identity.gather_identity(session.cfg.identity, session.waiting_for)
        finally:
            session.waiting_for((), 0.0)
        await session.adopt_identity(found, took=time.monotonic() - started)
        return found

    async def _generate_key(self) -> keys.DeviceKey:
        """The recorded key, loaded off the loop (slow on cryptography 38), or a new one."""
        recorded, directory = self.session.progress.key_id, self.session.store.dir
        if recorded:
            key = await asyncio.to_thread(store.load_device_key, directory)
            if key is None or key.key_id != recorded:
                found = key.key_id if key else "none"
                raise DeviceKeyLostError(f"state records device key {recorded} but device-key.pem holds {found}")
            return key
        started = time.monotonic()
        pem = await keys.generate_key_pem_async(self.key_bits)
        key = await asyncio.to_thread(store.save_device_key, directory, pem)
        took = time.monotonic() - started
        await self.session.record(registration.KeyReady(key.key_id), note=f"RSA-{self.key_bits} generated in {took:.1f} s")
        return key

    async def _exchange(self, step: Step) -> registration.Outcome:
        session = self.session
        if step is Step.POLL:
            session.set_activity(State.POLLING)
            request = session.progress.serial_request.encode()
        else:
            session.set_activity(State.REQUESTING)
            request = self._serial_request(await self._registration_body())
        from . import vault

        await session.record(registration.Posted(), note=f"to {self.session.cfg.vault.url}")
        session.raise_if_held()  # an attempt not on record is not made
        answer = await asyncio.to_thread(self.vault.post_serial, self._stream(request))
        if isinstance(answer, vault.Pending):
            return registration.Accepted(request.decode(), answer.retry_after)
        return await session.store_serial(session.progress.key_id, request, answer.body)

    async def _registration_body(self) -> bytes:
        """The serial-request's body: the identity as YAML, or with secure onboarding the request-id signed by the
        hardware identity key, in a child process (agent/hwsign.py): a token or a TPM takes its time."""
        found, cfg = self.session.identity, self.session.cfg
        assert found is not None and self.request_id is not None
        from . import identity

        if cfg.onboarding.method is not Method.HARDWARE_IDENTITY:
            return identity.registration_body(found, cfg.identity.allow_weak)
        from . import hwsign

        signed = await hwsign.sign(cfg.onboarding, self.request_id[0])
        self.session.hardware_digest = signed.digest
        return signed.body

    def _serial_request(self, body: bytes) -> bytes:
        found, cfg = self.session.identity, self.session.cfg
        assert self.key is not None and found is not None and self.request_id is not None
        from . import identity

        request = assertions.build_serial_request(
            brand=cfg.brand, model=cfg.model, request_id=self.request_id[0],
            device_key=self.key.public, signer=self.key.sign, created=int(time.time()),
            serial=identity.proposed_serial(found, cfg.serial_template, cfg.identity.allow_weak),
            body=body,
        )
        return request.encode()

    def _stream(self, request: bytes) -> bytes:
        """The serial-request, then the model assertion after one empty line, as snapd posts it."""
        model = self.session.cfg.model_assertion
        if model is None:
            return request
        return request + b"\n" + model.encode().rstrip(b"\n") + b"\n"

    async def _apply(self, outcome: registration.Outcome) -> None:
        decision = await self.session.record(outcome, wait=True)
        if decision.forget_request_id:
            self.request_id = None
        if 0 < decision.delay < math.inf:
            await self._sleep(decision.delay)

    async def _sleep(self, delay: float) -> None:
        self.kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.kick.wait(), delay)
        self.session.next_retry = 0.0

    async def _wait_for_retry(self, step: Step) -> bool:
        """Registered: serve status until stopped (SIGTERM); a Retry() then has nothing to do, and used to end
        the daemon (exit 0, which systemd does not restart). Blocked: wait for Retry(), then go on."""
        while True:
            self.kick.clear()
            await self.kick.wait()
            if step is Step.BLOCKED:
                return True
            self.retry_requested = False


async def _captured(work: Awaitable[T]) -> T | AgentError:
    try:
        return await work
    except AgentError as exc:
        return exc


def _result(value: T | AgentError) -> T:
    if isinstance(value, AgentError):
        raise value
    return value
