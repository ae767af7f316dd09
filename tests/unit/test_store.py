"""state.json: versioned, validated, corrupt files set aside, newer schemas left alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from agent import registration, store
from agent.errors import StoreError

FULL = registration.Progress(
    phase=registration.Phase.POLLING, key_id="k" * 64, serial_request="type: serial-request\n...",
    identity={"soc_serial": "00000000c0ffee01"}, attempts=3, failures=1, clock_tries=0, nonce_retries=1, unreachable=4,
    last_error="vault-transient", last_error_message="the vault answered HTTP 503",
    history=(registration.Event(1_700_000_000_000_000, registration.EventKind.STARTED, "factory-agent 1"),
             registration.Event(1_700_000_001_000_000, registration.EventKind.ERROR, "vault-transient: 503", 4,
                                1_700_000_009_000_000)),
)


def test_round_trip(tmp_path: Path) -> None:
    st = store.Store(tmp_path)
    st.save_progress(FULL)
    assert st.load_progress() == (FULL, None)
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["schema"] == store.SCHEMA and data["phase"] == "polling" and data["key-id"] == "k" * 64
    assert data["unreachable"] == 4
    assert data["history"] == [{"at": 1_700_000_000_000_000, "step": "started", "detail": "factory-agent 1"},
                               {"at": 1_700_000_001_000_000, "step": "error", "detail": "vault-transient: 503",
                                "count": 4, "last-at": 1_700_000_009_000_000}]
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600


def test_no_state_yet(tmp_path: Path) -> None:
    assert store.Store(tmp_path).load_progress() == (registration.Progress(), None)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"phase": "polling"}', '{"schema": 1, "phase": "flying"}',
                                  '{"schema": 1, "attempts": "3"}', '{"schema": 1, "identity": {"a": 1}}',
                                  '{"schema": 1, "history": {}}', '{"schema": 1, "history": [{"at": 1, "step": "flew"}]}',
                                  '{"schema": 1, "history": [{"at": "1", "step": "error", "detail": ""}]}'])
def test_corrupt_state_is_set_aside(tmp_path: Path, text: str) -> None:
    (tmp_path / "state.json").write_text(text)
    progress, aside = store.Store(tmp_path).load_progress()
    assert progress == registration.Progress() and aside is not None and aside.startswith("state.json.corrupt-")
    assert (tmp_path / aside).read_text() == text and not (tmp_path / "state.json").exists()


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    text = json.dumps({"schema": store.SCHEMA + 1, "phase": "teleported"})
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(StoreError, match="newer than this agent"):
        store.Store(tmp_path).load_progress()
    assert (tmp_path / "state.json").read_text() == text


def test_missing_fields_take_defaults(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"schema": 1, "phase": "key-ready", "key-id": "abc"}')
    progress, _ = store.Store(tmp_path).load_progress()
    assert progress == replace(registration.Progress(), phase=registration.Phase.KEY_READY, key_id="abc")


def test_serial_file(tmp_path: Path) -> None:
    st = store.Store(tmp_path)
    assert st.read_serial() is None
    st.save_serial(b"type: serial\n")
    assert st.read_serial() == b"type: serial\n"
    assert (tmp_path / "serial.assertion").stat().st_mode & 0o777 == 0o644


def test_prepare_creates_0700_and_clears_temps(tmp_path: Path) -> None:
    st = store.Store(tmp_path / "state")
    assert st.prepare() == []
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    (tmp_path / "state" / ".state.json.x1.tmp").write_text("{")
    assert st.prepare() == [".state.json.x1.tmp"]


def test_the_mode_is_recorded_and_absent_means_standalone(tmp_path: Path) -> None:
    st = store.Store(tmp_path)
    (tmp_path / "state.json").write_text('{"schema": 1, "phase": "key-ready", "key-id": "abc"}')  # an older file
    assert st.load_progress()[0].mode == "standalone"
    st.save_progress(registration.Progress(mode="snapd"))
    assert json.loads((tmp_path / "state.json").read_text())["mode"] == "snapd"
    assert st.load_progress()[0].mode == "snapd"
    (tmp_path / "state.json").write_text('{"schema": 1, "mode": "cloud"}')
    assert st.load_progress()[1] is not None  # not a mode we know: corrupt, moved aside
