"""The man page's TROUBLESHOOTING table is what agent/registration.py says: every LastError with an action has a
meaning, and the page holds exactly the generated rows (python3 -m tests.gen_troubleshooting rewrites it)."""

from __future__ import annotations

from agent import registration
from tests import gen_troubleshooting as gen


def test_every_code_with_an_action_has_a_meaning() -> None:
    assert set(registration.ACTIONS) <= set(registration.MEANINGS), set(registration.ACTIONS) - set(registration.MEANINGS)


def test_the_man_page_table_is_the_generated_one() -> None:
    man = gen.MAN.read_text()
    assert man == gen.rendered(man), "stale TROUBLESHOOTING section: run python3 -m tests.gen_troubleshooting"
    for code, action in registration.ACTIONS.items():
        assert gen._roff(action) in man and f"\\fB{gen._roff(code)}\\fR" in man, code


def test_a_stale_row_is_caught(monkeypatch) -> None:
    man = gen.rendered(gen.MAN.read_text())
    monkeypatch.setitem(registration.ACTIONS, "config", "something else entirely")
    assert gen.rendered(man) != man
