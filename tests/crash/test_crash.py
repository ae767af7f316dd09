"""Crash injection: the real daemon SIGKILLed at each named point of a registration and at random instants.

After each kill a plain restart must finish the registration with the key
that was durable at the kill (never a second one), exactly one serial that
verifies, a state.json that parses and says registered, and no temp file
left (see tests/crash/harness.py for every invariant). Named points are hit
deterministically by tests/crash/inject/sitecustomize.py (tests only; the
agent's code is not touched). The number of random instants is
FACTORY_AGENT_CRASH_KILLS (default 30: 15 % of them on a fresh directory
with real key generation, 30 % within the vault exchange, the rest anywhere
from exec to exit; FACTORY_AGENT_CRASH_SEED fixes the instants' seed).
``make crash`` runs 200 and prints the figures (tests/crash/run_crash.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.crash import harness as H
from tests.fakes import launcher
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv, run_args

KILLS = int(os.environ.get("FACTORY_AGENT_CRASH_KILLS", "30"))


@pytest.fixture(scope="module")
def crash(lab_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    lab = FaultyVault(lab_dir)
    lab.start()
    try:
        yield H.Harness(lab, tmp_path_factory.mktemp("crash"))
    finally:
        lab.stop()


DEFAULT_POINTS = [np for np in H.NAMED_POINTS if not np.extended]


@pytest.mark.parametrize("np", DEFAULT_POINTS, ids=[np.id for np in DEFAULT_POINTS])
def test_a_kill_at_a_named_point_recovers(crash: H.Harness, np: H.NamedPoint) -> None:
    trial = crash.named(np.point, np.fresh, canned_key=np.canned_key)
    problems = trial.problems + crash.check_expected(np, trial)
    assert problems == [], "\n".join(problems)
    assert trial.restarts_needed == 1 and trial.kills[0].orphans == 0


def test_random_instants_recover(crash: H.Harness) -> None:
    seed = int(os.environ.get("FACTORY_AGENT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    trials, windows = H.run_random(crash, random.Random(seed), KILLS)
    figures = H.figures(trials)
    figures.update(seed=seed, windows=windows)
    print(json.dumps(figures, indent=1))
    assert figures["problems"] == [], f"seed {seed}:\n" + "\n".join(figures["problems"])
    assert figures["kills_random"] == KILLS
    assert figures["kills_random_by_leg"] == {leg: n for leg, n in H.random_legs(KILLS).items() if n}
    assert figures["orphaned_keygen_children"] == 0


def test_the_injection_changes_nothing_without_its_variable(crash: H.Harness, tmp_path: Path) -> None:
    """On the path but unset: no hook, nothing wrapped, the shadowed sitecustomize still run, a normal registration."""
    probe = """if True:
        import json, os, sys
        import sitecustomize, agent.store as store, agent.vault as vault
        others = [os.path.join(p or os.getcwd(), "sitecustomize.py") for p in sys.path]
        ours = os.path.dirname(sitecustomize.__file__)
        others = [p for p in others if os.path.isfile(p) and os.path.dirname(os.path.abspath(p)) != ours]
        print(json.dumps({
            "ours": sitecustomize.__file__,
            "hooks": [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "sitecustomize"],
            "store_os": store.os is os,
            "wrapped": [f.__qualname__ for f in (store.write_durable, store.save_device_key, store.Store.save_serial,
                        store.Store.save_progress, vault.Vault.fetch_request_id, vault.Vault.post_serial)
                        if hasattr(f, "__wrapped__")],
            "shadowed_ran": "_shadowed_sitecustomize" in sys.modules or not others,
        }))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_AGENT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(H.INJECT)])
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert Path(seen["ours"]).parent == H.INJECT
    assert seen["hooks"] == [] and seen["store_os"] and seen["wrapped"] == [] and seen["shadowed_ran"]

    state = crash.new_state(fresh=False)
    run = launcher.run(agent_argv(*run_args(crash.config, state, once=True)), env=env, timeout=120)
    assert run.returncode == 0 and "state registered" in run.stderr and "Traceback" not in run.stderr


def test_an_unknown_point_fails_loudly(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(H.INJECT)]), FACTORY_AGENT_CRASH_AT="nowhere",
               FACTORY_AGENT_CRASH_MARKER=str(tmp_path / "marker"))
    done = subprocess.run([sys.executable, "-c", "print('ran')"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown FACTORY_AGENT_CRASH_AT='nowhere'" in done.stderr and "ran" not in done.stdout
