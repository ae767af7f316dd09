"""Each driver in-process, against real fakes of its ports: the lab vault over HTTP on 127.0.0.1 (with the fault
knobs of tests/fakes/faultyvault.py), a real Store in a temporary directory, and a publisher that records every
Status. As snapd's devicestate tests run its state machine: no daemon, no D-Bus, no sleeping on real back-offs
(Retry() cuts a wait short, as a technician's does)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from agent import config, identity, keys, registration, store
from agent.errors import Code, IdentityError, VaultCode
from agent.registration import Phase, State
from agent.session import Session, Status
from agent.snapd import SnapdDriver
from agent.standalone import StandaloneDriver
from tests.conftest import DATA
from tests.fakes import snapdmode
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.snapd_client import Attempt, SnapdClient
from tests.fakes.snapdmode import write_snapd_config

SOC_SERIAL = "00000000drivers1"
DEVICE_KEY = keys.load_key((DATA / "device" / "device-key.pem").read_bytes())


class Recorder:
    """The Publisher port: every Status, in order, and a way to wait for one."""

    def __init__(self) -> None:
        self.statuses: list[Status] = []
        self.changed = asyncio.Event()

    def publish(self, status: Status) -> None:
        self.statuses.append(status)
        self.changed.set()

    def states(self) -> list[State]:
        """The State values as a watcher sees them change (repeats folded)."""
        seen: list[State] = []
        for status in self.statuses:
            if not seen or seen[-1] != status.state:
                seen.append(status.state)
        return seen

    async def until(self, wanted: Callable[[Status], bool], timeout: float = 30.0) -> Status:
        async def wait() -> Status:
            while True:
                if self.statuses and wanted(self.statuses[-1]):
                    return self.statuses[-1]
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(wait(), timeout)


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab vault's keys, made once for the module (RSA-4096 takes seconds)."""
    directory = tmp_path_factory.mktemp("lab") / "vault"
    FaultyVault(directory)
    return directory


@pytest.fixture
def vault(lab_dir: Path) -> Iterator[FaultyVault]:
    """A fresh lab vault on those keys for each test: no fault set, nothing signed yet."""
    with FaultyVault(lab_dir) as vault:
        yield vault


def standalone_config(tmp: Path, vault: FaultyVault, template: str = "DRV-{soc_serial}") -> config.Config:
    return config.load([write_agent_config(tmp, vault.url, vault.directory, template=template, soc_serial=SOC_SERIAL)])


def new_standalone(tmp: Path, cfg: config.Config, **ports: object) -> tuple[StandaloneDriver, Recorder]:
    recorder = Recorder()
    return StandaloneDriver(Session(cfg, store.Store(tmp / "state"), recorder), **ports), recorder  # type: ignore[arg-type]


@asynccontextmanager
async def running(driver: StandaloneDriver | SnapdDriver) -> AsyncIterator[asyncio.Task[registration.Progress]]:
    """``driver`` loaded and running (not once) in a TaskGroup, as daemon.main runs it; stopped at the end."""
    await driver.load()
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(driver.run(tg, once=False))
            try:
                yield task
            finally:
                for background in (task, *driver.background()):
                    background.cancel()
    finally:
        driver.close()
        driver.session.store.close()


async def run_once(driver: StandaloneDriver) -> registration.Progress:
    await driver.load()
    try:
        async with asyncio.TaskGroup() as tg:
            progress = await driver.run(tg, once=True)
            for background in driver.background():
                background.cancel()
        return progress
    finally:
        driver.close()
        driver.session.store.close()


# --- standalone ------------------------------------------------------------------


def test_standalone_first_boot_generates_a_key_and_stores_the_verified_serial(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    driver, recorder = new_standalone(tmp_path, cfg, key_bits=2048)
    progress = asyncio.run(run_once(driver))
    assert (progress.phase, progress.serial) == (Phase.REGISTERED, f"DRV-{SOC_SERIAL}")
    assert (vault.requests[("POST", "/v1/request-id")], vault.requests[("POST", "/v1/serial")]) == (1, 1)
    states = recorder.states()
    assert states[0] is State.STARTING and states[-1] is State.REGISTERED
    assert {State.REQUESTING, State.GENERATING_KEY} <= set(states) and State.BLOCKED not in states
    on_disk = store.Store(tmp_path / "state")
    assert on_disk.load_progress()[0] == progress  # persisted before it was published
    key = store.load_device_key(on_disk.dir)
    assert key is not None and key.key_id == progress.key_id == recorder.statuses[-1].device_key_id
    served = driver.session.serial_assertion()
    assert served.encode() == on_disk.read_serial() == vault.signed[-1].encode()
    assert recorder.statuses[-1].identity == {"soc_serial": SOC_SERIAL}
    last = recorder.statuses[-1]
    assert 0 < last.started_at <= last.last_attempt_at <= last.registered_at == last.state_since == progress.registered_at
    assert last.registered_at == last.last_attempt_at  # the serial exchange was the last one
    assert recorder.statuses[0].state_since == last.started_at  # starting, since the start
    for before, after in zip(recorder.statuses, recorder.statuses[1:], strict=False):  # moves when State moves
        assert (after.state_since > before.state_since) if after.state != before.state else (
            after.state_since == before.state_since), (before, after)


def test_standalone_times_survive_a_restart(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    first, _ = new_standalone(tmp_path, cfg)
    registered = asyncio.run(run_once(first))
    again, recorder = new_standalone(tmp_path, cfg)
    asyncio.run(run_once(again))
    shown = recorder.statuses[-1]
    assert (shown.registered_at, shown.last_attempt_at) == (registered.registered_at, registered.last_attempt_at)
    assert shown.started_at > registered.registered_at and shown.state_since == registered.registered_at


def test_standalone_identity_block_ends_at_retry_and_gathers_afresh(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    calls: list[int] = []

    async def identify() -> identity.DeviceIdentity:
        calls.append(1)
        if len(calls) == 1:
            raise IdentityError("cannot gather the identity: required soc_serial is missing")
        return await identity.gather_identity(cfg.identity)

    driver, recorder = new_standalone(tmp_path, cfg, identify=identify)

    async def scenario() -> None:
        async with running(driver) as task:
            blocked = await recorder.until(lambda s: s.state is State.BLOCKED)
            assert (blocked.last_error, blocked.action) == (Code.IDENTITY, registration.ACTIONS[Code.IDENTITY])
            assert store.Store(tmp_path / "state").load_progress()[0].blocked_by == Code.IDENTITY
            driver.retry()
            await recorder.until(lambda s: s.state is State.REGISTERED)
            assert not task.done()  # registered: serves status until stopped

    asyncio.run(scenario())
    assert len(calls) == 2


def test_standalone_refusal_blocks_without_retrying_until_retry(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    vault.faults.error_code["serial"] = [VaultCode.INVALID_API_KEY]
    driver, recorder = new_standalone(tmp_path, cfg)

    async def scenario() -> None:
        async with running(driver):
            blocked = await recorder.until(lambda s: s.state is State.BLOCKED)
            assert blocked.last_error == VaultCode.INVALID_API_KEY
            assert blocked.action == registration.ACTIONS[VaultCode.INVALID_API_KEY]
            asked = sum(vault.requests.values())
            await asyncio.sleep(0.5)
            assert sum(vault.requests.values()) == asked  # blocked: nothing is retried on its own
            driver.retry()
            done = await recorder.until(lambda s: s.state is State.REGISTERED)
            assert (done.last_error, done.action) == ("", "")

    asyncio.run(scenario())


def test_standalone_transient_failure_waits_with_next_retry_and_retry_cuts_it_short(tmp_path: Path,
                                                                                   vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    vault.faults.status["serial"] = [500]
    driver, recorder = new_standalone(tmp_path, cfg)

    async def scenario() -> None:
        async with running(driver):
            waiting = await recorder.until(lambda s: s.state is State.WAITING_RETRY)
            assert waiting.next_retry > 0 and waiting.last_error == Code.VAULT_TRANSIENT
            assert waiting.action == "retrying"
            driver.retry()
            done = await recorder.until(lambda s: s.state is State.REGISTERED)
            assert done.next_retry == 0

    asyncio.run(scenario())


def test_standalone_serial_for_another_key_is_rejected_and_never_stored(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    vault.faults.other_device_key = True
    driver, recorder = new_standalone(tmp_path, cfg)
    progress = asyncio.run(run_once(driver))
    assert (progress.phase, progress.blocked_by) == (Phase.KEY_READY, Code.SERIAL_REJECTED)
    assert recorder.statuses[-1].state is State.BLOCKED
    assert store.Store(tmp_path / "state").read_serial() is None
    assert driver.session.verified_serial is None


def test_standalone_adopts_a_serial_whose_record_a_crash_lost_without_asking_the_vault(tmp_path: Path,
                                                                                      vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    first, _ = new_standalone(tmp_path, cfg)
    registered = asyncio.run(run_once(first))
    st = store.Store(tmp_path / "state")
    st.save_progress(replace(registered, phase=Phase.KEY_READY, serial=""))  # as if the power went before the record
    vault.requests.clear()
    again, recorder = new_standalone(tmp_path, cfg)
    progress = asyncio.run(run_once(again))
    assert (progress.phase, progress.serial) == (Phase.REGISTERED, registered.serial)
    assert st.load_progress()[0].phase is Phase.REGISTERED
    assert not vault.requests and recorder.states() == [State.REGISTERED]


def test_standalone_obeys_a_vault_that_assigns_its_own_serial_and_says_so(tmp_path: Path, vault: FaultyVault) -> None:
    cfg = standalone_config(tmp_path, vault)
    seed_key(tmp_path / "state")
    vault.faults.assigned_serial = "VAULT-0001"
    driver, recorder = new_standalone(tmp_path, cfg)
    progress = asyncio.run(run_once(driver))
    assert (progress.phase, progress.serial, progress.last_error) == (Phase.REGISTERED, "VAULT-0001",
                                                                     Code.SERIAL_NOT_PROPOSED)
    assert f"not the proposed DRV-{SOC_SERIAL}" in recorder.statuses[-1].last_error_message


def test_standalone_has_no_snapd_settings(tmp_path: Path, vault: FaultyVault) -> None:
    from agent.errors import WrongModeError

    driver, _ = new_standalone(tmp_path, standalone_config(tmp_path, vault))
    with pytest.raises(WrongModeError):
        driver.registration_settings()


# --- snapd -----------------------------------------------------------------------


def new_snapd(tmp: Path, vault: FaultyVault, template: str | None = None) -> tuple[SnapdDriver, Recorder]:
    path = write_snapd_config(tmp, vault.url, vault.directory)
    if template is not None:
        text = path.read_text().replace('template = "SNAPD-{soc_serial}"', f'template = "{template}"')
        path.write_text(text.replace("wait-seconds = 0", 'wait-seconds = 0\nsources = ["soc-serial"]'))  # this host's own
        # fields (its DMI serial, say) must not make the template's field present
    recorder = Recorder()
    return SnapdDriver(Session(config.load([path]), store.Store(tmp / "state"), recorder)), recorder


def client_for(driver: SnapdDriver, vault: FaultyVault, key: keys.DeviceKey = DEVICE_KEY) -> SnapdClient:
    from agent import assertions

    model = assertions.decode((vault.directory / "model.assert").read_bytes())
    return SnapdClient(driver.registration_settings(), key, model)


def test_snapd_driver_relays_one_registration_and_then_serves_the_serial_from_memory(tmp_path: Path,
                                                                                     vault: FaultyVault) -> None:
    driver, recorder = new_snapd(tmp_path, vault)

    async def scenario() -> None:
        async with running(driver):
            await recorder.until(lambda s: s.state is State.WAITING_SNAPD)
            settings = driver.registration_settings()
            assert driver.relay is not None and settings["device-service.url"] == driver.relay.url
            assert settings["registration.proposed-serial"] == f"SNAPD-{snapdmode.SOC_SERIAL}"
            client = client_for(driver, vault)
            attempt = await asyncio.to_thread(client.register)
            assert not attempt.error and attempt.serial is not None
            done = await recorder.until(lambda s: s.state is State.REGISTERED)
            assert (done.serial, done.device_key_id) == (f"SNAPD-{snapdmode.SOC_SERIAL}", DEVICE_KEY.key_id)
            st = store.Store(tmp_path / "state")
            assert st.load_progress()[0].key_id == DEVICE_KEY.key_id
            (st.dir / store.SERIAL_FILE).write_bytes(b"swapped on disk\n")
            vault.requests.clear()
            again = await asyncio.to_thread(client.register)  # snapd lost its serial: the verified one again
            assert again.serial is not None and again.serial.encode() == attempt.serial.encode()
            assert not vault.requests  # answered from memory, the vault not asked

    asyncio.run(scenario())


def test_snapd_driver_binds_no_key_on_a_request_id_it_did_not_hand_out(tmp_path: Path, vault: FaultyVault) -> None:
    driver, recorder = new_snapd(tmp_path, vault)

    async def scenario() -> None:
        async with running(driver):
            await recorder.until(lambda s: s.state is State.WAITING_SNAPD)
            client = client_for(driver, vault)
            answer = await asyncio.to_thread(client.post_serial, client.serial_request("made-up-id"), _attempt())
            assert answer.status == 503
            assert json.loads(answer.body)["error_code"] == "relay-unknown-request-id"
            assert driver.session.progress.key_id == "" and not vault.requests[("POST", "/v1/serial")]
            assert recorder.statuses[-1].state is State.WAITING_SNAPD

    asyncio.run(scenario())


def test_snapd_driver_blocks_on_another_device_key_until_snapd_tries_again(tmp_path: Path, vault: FaultyVault) -> None:
    driver, recorder = new_snapd(tmp_path, vault)
    other = keys.load_key(keys.generate_key_pem(2048))

    async def scenario() -> None:
        async with running(driver):
            await recorder.until(lambda s: s.state is State.WAITING_SNAPD)
            vault.faults.status["serial"] = [503] * 5  # every round of snapd's attempt: the key is bound, no serial
            first = await asyncio.to_thread(client_for(driver, vault).register)
            assert first.error == "gave up after too many rounds" and not vault.faults.status["serial"]
            assert driver.session.progress.key_id == DEVICE_KEY.key_id
            attempt = await asyncio.to_thread(client_for(driver, vault, other).register)
            assert "device key" in (attempt.error or "")
            blocked = recorder.statuses[-1]
            assert (blocked.state, blocked.last_error) == (State.BLOCKED, Code.RELAY_OTHER_DEVICE_KEY)
            retried = await asyncio.to_thread(client_for(driver, vault).register)  # snapd's next attempt
            assert retried.serial is not None
            await recorder.until(lambda s: s.state is State.REGISTERED)

    asyncio.run(scenario())


def test_snapd_driver_passes_a_vault_500_on_as_503_and_does_not_block(tmp_path: Path, vault: FaultyVault) -> None:
    driver, recorder = new_snapd(tmp_path, vault)

    async def scenario() -> None:
        async with running(driver):
            await recorder.until(lambda s: s.state is State.WAITING_SNAPD)
            client = client_for(driver, vault)
            attempt = _attempt()
            stream = client.serial_request(await asyncio.to_thread(client.request_id, attempt))
            vault.faults.status["serial"] = [500]
            answer = await asyncio.to_thread(client.post_serial, stream, attempt)
            assert answer.status == 503  # snapd retries a 503 within its attempt, in 60 s
            status = recorder.statuses[-1]
            assert (status.state, status.last_error, status.action) == (State.WAITING_SNAPD, Code.VAULT_TRANSIENT,
                                                                        "retrying")
            assert driver.session.progress.blocked_by == ""

    asyncio.run(scenario())


def test_snapd_driver_identity_block_is_retried_by_the_hooks_next_call(tmp_path: Path, vault: FaultyVault) -> None:
    driver, recorder = new_snapd(tmp_path, vault, template="SNAPD-{dmi_board_serial}")

    async def scenario() -> None:
        async with running(driver):
            blocked = await recorder.until(lambda s: s.state is State.BLOCKED)
            assert blocked.last_error == Code.IDENTITY and "board_serial" in blocked.last_error_message
            count = len(recorder.statuses)
            with pytest.raises(IdentityError):
                driver.registration_settings()  # the hook's call: snapd's new attempt, so gather again
            await recorder.until(lambda s: len(recorder.statuses) > count and s.state is State.BLOCKED)
            assert State.IDENTIFYING in [s.state for s in recorder.statuses[count:]]

    asyncio.run(scenario())


def _attempt() -> Attempt:
    return Attempt()
