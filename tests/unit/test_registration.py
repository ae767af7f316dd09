"""The registration core as tables: phase x outcome -> next progress and delay. No event loop."""

from __future__ import annotations

import math
from dataclasses import replace
from random import Random

import pytest

from agent import registration as r
from agent.errors import (
    DeviceKeyError,
    IdentityError,
    RemoteFormatError,
    SerialRejectedError,
    StoreError,
    VaultClockSkew,
    VaultRejected,
    VaultTransient,
    VaultUnavailable,
)

KEY = "k" * 64
FRESH = r.Progress()
READY = r.Progress(phase=r.Phase.KEY_READY, key_id=KEY)
POLLING = replace(READY, phase=r.Phase.POLLING, serial_request="type: serial-request...")
DONE = replace(READY, phase=r.Phase.REGISTERED, serial="S1")


def ctx(key=True, identity=True, age: float | None = 1.0) -> r.Context:
    return r.Context(key_ready=key, identity_ready=identity, request_id_age=age)


@pytest.mark.parametrize(
    ("progress", "context", "step"),
    [
        (DONE, ctx(), r.Step.DONE),
        (replace(READY, blocked_by="invalid-api-key"), ctx(), r.Step.BLOCKED),
        (POLLING, ctx(age=None), r.Step.POLL),
        (FRESH, ctx(key=False, identity=False, age=None), r.Step.FETCH_REQUEST_ID),  # in parallel with keygen
        (FRESH, ctx(key=False, identity=False), r.Step.WAIT_IDENTITY),
        (FRESH, ctx(key=False), r.Step.WAIT_KEY),
        (READY, ctx(), r.Step.POST_SERIAL),
        (READY, ctx(age=r.REQUEST_ID_MAX_AGE), r.Step.FETCH_REQUEST_ID),  # too old by the time it is used
        (READY, ctx(age=599.0), r.Step.FETCH_REQUEST_ID),
    ],
)
def test_next_step(progress, context, step) -> None:
    assert r.next_step(progress, context) is step


def test_request_id_lifetime_covers_the_vaults_600_s() -> None:
    assert 0 < r.REQUEST_ID_MAX_AGE < 600


RNG_SEED = 7


def apply(progress, outcome):
    return r.apply(progress, outcome, Random(RNG_SEED))


@pytest.mark.parametrize(
    ("progress", "outcome", "phase", "delay", "forget", "changes"),
    [
        (FRESH, r.KeyReady(KEY), r.Phase.KEY_READY, 0.0, False, {"key_id": KEY}),
        (READY, r.GotRequestId(), r.Phase.KEY_READY, 0.0, False, {"attempts": 0}),  # Attempts: serial-requests sent
        (READY, r.Posted(), r.Phase.KEY_READY, 0.0, False, {"attempts": 1}),
        (replace(READY, attempts=1), r.Accepted("REQ"), r.Phase.POLLING, r.POLL_DELAY, True,
         {"serial_request": "REQ", "attempts": 1}),
        (READY, r.Accepted("REQ", retry_after=12.0), r.Phase.POLLING, 12.0, True, {}),
        (POLLING, r.Registered("S1"), r.Phase.REGISTERED, 0.0, True, {"serial": "S1", "serial_request": ""}),
        (replace(READY, failures=3, last_error="x"), r.Registered("S1"), r.Phase.REGISTERED, 0.0, True,
         {"failures": 0, "last_error": "", "last_error_message": ""}),
    ],
)
def test_successes(progress, outcome, phase, delay, forget, changes) -> None:
    d = apply(progress, outcome)
    assert d.progress.phase is phase and d.delay == delay and d.forget_request_id is forget
    for name, value in changes.items():
        assert getattr(d.progress, name) == value


def test_no_network_is_short_and_not_counted() -> None:
    d = apply(READY, VaultUnavailable("down"))
    assert 0.8 * r.NO_NETWORK_DELAY <= d.delay <= 1.2 * r.NO_NETWORK_DELAY
    assert (d.progress.attempts, d.progress.failures, d.progress.unreachable) == (0, 0, 1)
    assert d.progress.last_error == "vault-unavailable" and d.progress.action


def test_a_vault_down_for_long_is_retried_ever_more_spread_out_up_to_a_cap() -> None:
    """The network coming up: a few quick tries. A vault down for the whole line: a doubling window, equal jitter,
    so that the line's backlog does not return in one burst when the vault is back."""
    p, windows = READY, []
    for n in range(1, 12):
        d = apply(p, VaultUnavailable("connection refused"))
        if n <= r.UNREACHABLE_QUICK:
            assert 0.8 * r.NO_NETWORK_DELAY <= d.delay <= 1.2 * r.NO_NETWORK_DELAY
        else:
            window = min(r.UNREACHABLE_CAP, r.NO_NETWORK_DELAY * 2 ** (n - r.UNREACHABLE_QUICK))
            assert window / 2 <= d.delay <= window
            windows.append(window)
        p = d.progress
    assert windows[0] == 2 * r.NO_NETWORK_DELAY and windows[-1] == r.UNREACHABLE_CAP
    assert (p.unreachable, p.failures, p.attempts) == (11, 0, 0)
    late = replace(READY, unreachable=9)
    assert len({r.apply(late, VaultUnavailable("x"), Random(seed)).delay for seed in range(20)}) > 10


@pytest.mark.parametrize("answer", [r.GotRequestId(), VaultTransient("503"), VaultRejected("stale", "invalid-nonce"),
                                    r.Registered("S1")])
def test_any_answer_from_the_vault_ends_the_unreachable_count(answer) -> None:
    assert apply(replace(READY, unreachable=6), answer).progress.unreachable == 0


def test_unblock_ends_the_unreachable_count() -> None:
    assert r.unblock(replace(READY, unreachable=6, blocked_by="invalid-api-key")).unreachable == 0


def test_transient_backoff_grows_with_full_jitter_and_is_capped() -> None:
    p, ceilings = READY, []
    for n in range(12):
        d = apply(p, VaultTransient("503"))
        ceiling = min(r.BACKOFF_CAP, r.BACKOFF_BASE * 2**n)
        assert r.BACKOFF_FLOOR <= d.delay <= max(ceiling, r.BACKOFF_FLOOR)
        ceilings.append(ceiling)
        p = d.progress
    assert p.failures == 12 and p.attempts == 0 and ceilings[-1] == r.BACKOFF_CAP  # attempts: Posted() counts them
    delays = {r.apply(replace(READY, failures=5), VaultTransient("x"), Random(seed)).delay for seed in range(20)}
    assert len(delays) > 10  # jittered: devices that failed together do not retry together


@pytest.mark.parametrize(("retry_after", "delay"), [(600.0, 600.0), (10**6, r.RETRY_AFTER_CAP)])
def test_a_long_retry_after_is_honoured_within_bounds(retry_after, delay) -> None:
    assert apply(READY, VaultTransient("429", retry_after=retry_after, status=429)).delay == delay
    assert apply(READY, VaultTransient("503", retry_after=retry_after, status=503)).delay == delay


@pytest.mark.parametrize("retry_after", [1.0, 0.0, 7.0, None])
def test_a_crowd_told_a_short_retry_after_spreads_itself(retry_after) -> None:
    """A rate-limiting front tells every device of the line "Retry-After: 1": honoured to the second, the line
    comes back as one herd. Retry-After is a floor; the device spreads over a window of its own."""
    error = VaultTransient("429", retry_after=retry_after, status=429)
    assert r.crowded(error)
    delays = [r.apply(READY, error, Random(seed)).delay for seed in range(50)]
    assert all(max(retry_after or 0, r.CROWD_BASE / 2) <= d <= r.CROWD_BASE for d in delays)
    assert len(set(delays)) == 50


def test_the_crowd_window_doubles_with_each_refusal_up_to_its_cap() -> None:
    p, windows = READY, []
    for n in range(8):
        d = apply(p, VaultTransient("429", retry_after=1.0, status=429))
        window = min(r.CROWD_CAP, r.CROWD_BASE * 2**n)
        assert window / 2 <= d.delay <= window
        windows.append(window)
        p = d.progress
    assert windows[-1] == r.CROWD_CAP and p.failures == 8 and p.attempts == 0


def test_a_lone_transient_failure_keeps_the_short_backoff() -> None:
    """A 502 or a timeout without Retry-After is not a crowd: the first retry comes within BACKOFF_BASE."""
    for error in (VaultTransient("502", status=502), VaultTransient("timed out")):
        assert not r.crowded(error)
        assert apply(READY, error).delay <= r.BACKOFF_BASE


@pytest.mark.parametrize(("retry_after", "delay"), [(7.0, 7.0), (0.0, r.BACKOFF_FLOOR)])
def test_a_5xx_retry_after_is_the_vaults_own_estimate_and_honoured(retry_after, delay) -> None:
    error = VaultTransient("503", retry_after=retry_after, status=503)
    assert not r.crowded(error) and apply(READY, error).delay == delay


def test_invalid_nonce_gets_a_fresh_request_id_at_once_then_backs_off() -> None:
    p = POLLING
    for _ in range(r.MAX_NONCE_RETRIES):
        d = apply(p, VaultRejected("stale", "invalid-nonce"))
        assert d.delay == 0.0 and d.forget_request_id and not d.progress.blocked_by
        assert d.progress.phase is r.Phase.KEY_READY and d.progress.serial_request == ""
        p = d.progress
    d = apply(p, VaultRejected("stale", "invalid-nonce"))
    assert d.delay >= r.BACKOFF_FLOOR and not d.progress.blocked_by


def test_clock_skew_follows_the_stepped_schedule_forever() -> None:
    p, delays = READY, []
    for _ in range(20):
        d = apply(p, VaultClockSkew("not yet valid"))
        delays.append(d.delay)
        p = d.progress
    assert delays[:5] == [30.0] * 5 and delays[5:10] == [60.0] * 5 and delays[-1] == 240.0
    assert not p.blocked_by and p.last_error == "clock-skew" and "clock" in p.action


@pytest.mark.parametrize("code", ["invalid-api-key", "invalid-model", "mismatched-model", "create-assertion",
                                  "signing-assertion", "invalid-assertion", "http-404", "tls-certificate", "unknown-new-code"])
def test_refusals_that_need_a_person_block(code) -> None:
    d = apply(READY, VaultRejected(f"the vault refused: {code}", code))
    assert math.isinf(d.delay) and d.progress.blocked_by == code
    assert d.progress.last_error == code and d.progress.action
    assert r.next_step(d.progress, ctx()) is r.Step.BLOCKED


@pytest.mark.parametrize("code", sorted(r.TRANSIENT_VAULT_CODES))
def test_vault_internal_trouble_is_retried(code) -> None:
    d = apply(READY, VaultRejected("try later", code))
    assert not d.progress.blocked_by and 0 < d.delay < math.inf


@pytest.mark.parametrize(
    ("error", "blocked"),
    [
        (SerialRejectedError("another key"), "serial-rejected"),
        (IdentityError("no mac"), "identity"),
        (RemoteFormatError("garbage"), ""),
        (DeviceKeyError("keygen died"), ""),
        (StoreError("disk full"), ""),
    ],
)
def test_other_errors(error, blocked) -> None:
    d = apply(READY, error)
    assert d.progress.blocked_by == blocked
    assert (math.isinf(d.delay)) is bool(blocked)
    assert d.progress.phase is r.Phase.KEY_READY  # an error never moves the phase forward


def test_unblock_clears_the_refusal_and_counters() -> None:
    blocked = apply(replace(READY, failures=4), VaultRejected("no", "invalid-api-key")).progress
    p = r.unblock(blocked)
    assert not p.blocked_by and p.failures == 0 and r.next_step(p, ctx()) is r.Step.POST_SERIAL
    # issue 13: a fresh attempt drops the previous error (it stays in the history), so the live line and
    # D-Bus never show the old refusal on the new attempt
    assert (p.last_error, p.last_error_message, p.action) == ("", "", "")


@pytest.mark.parametrize(
    ("recorded", "key_on_disk", "serial_on_disk", "expected"),
    [
        (FRESH, None, None, FRESH),
        (FRESH, KEY, None, READY),  # key durable, record lost: adopt
        (READY, KEY, "S1", replace(DONE, serial="S1")),  # serial durable, record lost: adopt
        (POLLING, KEY, "S1", replace(DONE, serial="S1")),
        (DONE, KEY, "S1", DONE),
    ],
)
def test_reconcile_adopts_artifacts(recorded, key_on_disk, serial_on_disk, expected) -> None:
    assert r.reconcile(recorded, key_on_disk, serial_on_disk) == expected


def test_reconcile_never_replaces_a_lost_key_silently() -> None:
    p = r.reconcile(READY, None, None)
    assert p.blocked_by == "device-key-lost" and "missing" in p.last_error_message
    p = r.reconcile(READY, "o" * 64, None)
    assert p.blocked_by == "device-key-lost"
    assert r.reconcile(DONE, None, None).phase is r.Phase.REGISTERED


def test_display_state() -> None:
    assert r.display_state(DONE, "requesting") == "registered"
    assert r.display_state(replace(READY, blocked_by="x"), "requesting") == "blocked"
    assert r.display_state(READY, "polling") == "polling"


def test_the_history_collapses_identical_steps_and_keeps_the_newest() -> None:
    h: tuple[r.Event, ...] = ()
    for at in (1, 2, 3):
        h = r.noted(h, r.Event(at, r.EventKind.ERROR, "vault-unavailable: down"))
    assert h == (r.Event(1, r.EventKind.ERROR, "vault-unavailable: down", count=3, last_at=3),)
    h = r.noted(h, r.Event(4, r.EventKind.REQUEST_ID, "from x"))
    assert [e.kind for e in h] == [r.EventKind.ERROR, r.EventKind.REQUEST_ID] and h[1].count == 1
    for at in range(5, 5 + 2 * r.HISTORY_MAX):
        h = r.noted(h, r.Event(at, r.EventKind.SERIAL_REQUEST, f"attempt {at}"))
    assert len(h) == r.HISTORY_MAX and h[-1].at == 4 + 2 * r.HISTORY_MAX and h[0].at == h[-1].at - r.HISTORY_MAX + 1
