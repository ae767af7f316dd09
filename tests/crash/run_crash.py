"""`make crash`: every named kill point, then 200 SIGKILLs at random instants, and the figures as JSON.

The real daemon (``python -m agent run --once``) against a lab vault on
127.0.0.1, exactly as tests/crash/test_crash.py runs it, only more: each
named point (the extended ones too), then ``--kills`` random instants in
power-cut sequences of 1-3 kills per state directory, a share of them on a
fresh directory with real RSA-4096 key generation. Each recovery is checked
(see harness.py); the figures say where the kills landed, how often the
vault signed twice for one device, which temp files the kills left before
the restart removed them, how many restarts registration needed, and every
problem found. Exit status 1 if any invariant broke.

    python3 tests/crash/run_crash.py [--kills 200] [--seed N] [--fresh-share 0.25] [--exchange-share 0.25] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[0] = str(REPO)  # not tests/crash: run as a script, it must import agent and tests from the repository

from tests.crash import harness as H  # noqa: E402
from tests.crash import syscalls  # noqa: E402
from tests.fakes import launcher  # noqa: E402
from tests.fakes.agentconf import write_agent_config  # noqa: E402
from tests.fakes.faultyvault import FaultyVault  # noqa: E402
from tests.fakes.launcher import agent_argv, agent_env, run_args  # noqa: E402


def durability(lab: FaultyVault, work: Path) -> dict[str, object]:
    """One fresh registration under strace -f -y: per file, fsync before rename/link and directory fsync after."""
    strace = shutil.which("strace")
    if strace is None:
        return {"skipped": "strace is not installed (Debian package strace)"}
    work.mkdir()
    state, log = work / "state", work / "strace.log"
    config = write_agent_config(work, lab.url, lab.directory, template="ACME-{soc_serial}", soc_serial="00000000dec0de02")
    env = agent_env(drop_prefixes=("FACTORY_AGENT_",), PYTHONDONTWRITEBYTECODE="1")
    command = syscalls.strace_command(strace, str(log), agent_argv(*run_args(config, state, once=True)))
    done = launcher.run(command, env=env, timeout=300)
    calls, exits, _ = syscalls.parse(log.read_text(errors="replace"))
    replay = syscalls.replay(calls)
    reports, problems = syscalls.check_directory(replay, str(state), exits)
    return {"exit": done.returncode, "files": [asdict(r) for r in reports], "problems": problems + replay.mismatches,
            "directories_created_without_parent_fsync": [p for p, _ in replay.mkdirs]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="random-instant SIGKILLs (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random instants (default: random)")
    parser.add_argument("--fresh-share", type=float, default=0.25, help="share of random kills with real keygen")
    parser.add_argument("--exchange-share", type=float, default=0.25,
                        help="share of random kills in the vault exchange (first request to exit)")
    parser.add_argument("--window-runs", type=int, default=3, help="registrations timed to set the window")
    parser.add_argument("--no-named", action="store_true", help="random instants only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (state dirs, daemon logs)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    logging.disable(logging.WARNING)  # the lab vault's duplicate-assertion notes: the double signings are counted
    work = Path(tempfile.mkdtemp(prefix="factory-agent-crash-"))
    started = time.monotonic()
    lab = FaultyVault(work / "lab")
    lab.start()
    out: dict[str, object] = {"python": sys.executable, "seed": seed}
    failed = True
    try:
        h = H.Harness(lab, work / "runs")
        named_started = time.monotonic()
        named = [] if args.no_named else H.run_named(h)
        named_seconds = time.monotonic() - named_started
        random_started = time.monotonic()
        trials, windows = H.run_random(h, random.Random(seed), args.kills, args.fresh_share, args.exchange_share,
                                       args.window_runs)
        random_seconds = time.monotonic() - random_started
        out["named"] = {np.id: {"what": np.what, "phase": t.kills[0].phase, "temps": t.kills[0].temps,
                                "signed_in_killed_run": t.kills[0].signed_in_run, "double_signings": t.double_signings,
                                "orphaned_keygen_children": t.kills[0].orphans, "recovery_seconds": t.recovery_seconds,
                                "ok": not t.problems}
                        for np, t in zip(H.NAMED_POINTS, named)}
        out["named_figures"] = H.figures(named) if named else {}
        out["random_figures"] = H.figures(trials)
        out["windows_seconds"] = windows
        out["all_figures"] = H.figures(named + trials)
        out["durability"] = durability(lab, work / "strace")
        out["seconds"] = {"named": round(named_seconds, 1), "random": round(random_seconds, 1),
                          "total": round(time.monotonic() - started, 1)}
        failed = bool(out["all_figures"]["problems"] or out["durability"].get("problems"))  # type: ignore[index,union-attr]
    finally:
        lab.stop()
        if args.keep or failed:  # the state directories and daemon logs are the evidence
            out["work"] = str(work)
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
