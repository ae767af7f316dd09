"""Under strace: every file the agent writes is fsynced before its rename/link, and its directory after.

A whole registration (fresh state directory, real RSA-4096 key generation,
the lab vault on 127.0.0.1) runs as ``strace -f -y`` of ``python -m agent
run --once``; tests/crash/syscalls.py replays the log (fd tables per
process and thread, unfinished/resumed halves) and checks each rename or
link into the state directory. The parser itself is checked on small
hand-written logs, including ones that break each rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.crash import syscalls
from tests.fakes import launcher
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv, agent_env, run_args

FINAL = {"device-key.pem", "serial.assertion", "state.json"}


def traced_run(tmp: Path, lab: FaultyVault, state: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: it is the Debian package strace (make deps installs it)")
    config = write_agent_config(tmp, lab.url, lab.directory, template="ACME-{soc_serial}", soc_serial="00000000dec0de01")
    log = tmp / "strace.log"
    command = syscalls.strace_command(strace, str(log), agent_argv(*run_args(config, state, once=True)))
    env = agent_env(drop_prefixes=("FACTORY_AGENT_",), PYTHONDONTWRITEBYTECODE="1")  # no .pyc writes in the trace
    done = launcher.run(command, env=env, timeout=300)
    return done, log


def check_trace(log: Path, state: Path) -> tuple[list[syscalls.FileReport], syscalls.Replay]:
    calls, exits, skipped = syscalls.parse(log.read_text(errors="replace"))
    assert not [line for line in skipped if str(state) in line], "lines about the state directory were not understood"
    replay = syscalls.replay(calls)
    assert replay.mismatches == [], "the fd tables replayed from openat disagree with strace -y"
    reports, problems = syscalls.check_directory(replay, str(state), exits)
    assert problems == [], "\n".join(problems)
    written = sorted(p for p in replay.written_paths if p.startswith("/") and not p.startswith("/dev/"))
    assert written and all(os.path.dirname(p) == str(state) for p in written), f"files written outside {state}: {written}"
    return reports, replay


@pytest.fixture(scope="module")
def first_boot(lab_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One whole registration under strace: fresh state directory, real RSA-4096 key generation."""
    lab = FaultyVault(lab_dir)
    lab.start()
    try:
        tmp = tmp_path_factory.mktemp("first-boot")
        state = tmp / "state"
        done, log = traced_run(tmp, lab, state)
    finally:
        lab.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "state registered" in done.stderr
    return log, state


def test_a_whole_registration_fsyncs_each_file_before_its_rename_and_the_directory_after(first_boot) -> None:
    log, state = first_boot
    reports, replay = check_trace(log, state)
    assert {r.target for r in reports} == FINAL
    assert [r.call for r in reports if r.target == "device-key.pem"] == ["link"]  # never replaces a key
    assert {r.call for r in reports if r.target != "device-key.pem"} == {"rename"}
    assert all(r.fsynced_before_publish and r.dir_fsynced_after and r.temp_writes >= 1 for r in reports)
    key_temps = [r.temp for r in reports if r.target == "device-key.pem"]
    assert [p for p, _ in replay.unlinks if os.path.basename(p) in key_temps] != []  # the key's temp name is removed
    print(json.dumps([asdict(r) for r in reports], indent=1))


def test_a_state_directory_the_agent_creates_is_made_durable_in_its_parent(first_boot) -> None:
    log, state = first_boot
    calls, _, _ = syscalls.parse(log.read_text(errors="replace"))
    replay = syscalls.replay(calls)
    made = [line for path, line in replay.mkdirs if path == str(state)]
    assert made, "the agent did not create the state directory"
    first_publish = min(p.start for p in replay.publishes if os.path.dirname(p.target) == str(state))
    assert any(d.path == str(state.parent) and made[0] < d.start and d.end < first_publish for d in replay.dir_syncs), \
        f"{state.parent} was not fsynced after mkdir {state} and before the first file was published in it"


def test_a_recovery_that_adopts_a_key_and_clears_a_stale_temp_writes_the_same_way(tmp_path: Path, lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)  # a key whose record a crash lost
    (state / ".state.json.k1ll3d.tmp").write_bytes(b'{"schema": 1, "pha')  # a temp a crash left
    done, log = traced_run(tmp_path, lab, state)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed temporary files left by a crash: .state.json.k1ll3d.tmp" in done.stderr
    reports, replay = check_trace(log, state)
    assert {r.target for r in reports} == {"state.json", "serial.assertion"}
    stale = [line for path, line in replay.unlinks if path.endswith(".k1ll3d.tmp")]
    assert stale and any(d.start > stale[0] and d.path == str(state) for d in replay.dir_syncs)


# --- the parser on hand-written logs ---------------------------------------------------

D = "/s"
GOOD = f"""\
100 clone3({{flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, exit_signal=0}}, 88) = 101
101 openat(AT_FDCWD</w>, "{D}/.state.json.ab.tmp", O_RDWR|O_CREAT|O_EXCL|O_CLOEXEC, 0600 <unfinished ...>
100 write(2<pipe:[9]>, "x", 1) = 1
101 <... openat resumed>) = 7</s/.state.json.ab.tmp>
101 write(7</s/.state.json.ab.tmp>, "{{\\"schema\\": 1, \\"phase\\": \\"key-ready\\"}}"..., 40) = 40
101 fsync(7</s/.state.json.ab.tmp> <unfinished ...>
100 --- SIGCHLD {{si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=55, si_uid=0, si_status=0}} ---
101 <... fsync resumed>) = 0
100 close(7</s/.state.json.ab.tmp>) = 0
101 rename("{D}/.state.json.ab.tmp", "{D}/state.json") = 0
101 openat(AT_FDCWD</w>, "{D}", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 7</s>
101 fsync(7</s>) = 0
101 close(7</s>) = 0
100 +++ exited with 0 +++
"""


def _problems(log: str) -> list[str]:
    calls, exits, _ = syscalls.parse(log)
    replay = syscalls.replay(calls)
    assert replay.mismatches == []
    return syscalls.check_directory(replay, D, exits)[1]


def test_parser_follows_threads_and_unfinished_calls() -> None:
    calls, exits, skipped = syscalls.parse(GOOD)
    assert skipped == [] and [e.pid for e in exits] == [100]
    fsync = next(c for c in calls if c.name == "fsync" and c.pid == 101 and c.args[0].startswith("7</s/."))
    assert (fsync.start, fsync.end) == (5, 7)
    close = next(c for c in calls if c.name == "close" and c.pid == 100)
    assert syscalls.fd_arg(close.args[0]) == (7, "/s/.state.json.ab.tmp")  # thread 100 shares 101's table
    assert _problems(GOOD) == []


def test_without_y_decorations_the_openat_replay_maps_the_fds() -> None:
    """The same log as strace without -y prints it: fds are resolved through openat results per fd table."""
    plain = re.sub(r"(?<=\d)<[^<>]*>|(?<=AT_FDCWD)<[^<>]*>", "", GOOD)
    assert "</s" not in plain and "<unfinished ...>" in plain
    calls, exits, _ = syscalls.parse(plain)
    replay = syscalls.replay(calls)
    life = replay.files["/s/.state.json.ab.tmp"]
    assert len(life.writes) == 1 and len(life.syncs) == 1 and [d.path for d in replay.dir_syncs] == ["/s"]
    assert syscalls.check_directory(replay, D, exits)[1] == []


def test_the_replay_and_the_decorations_must_agree() -> None:
    wrong = GOOD.replace("101 write(7</s/.state.json.ab.tmp>", "101 write(7</s/elsewhere>")
    calls, _, _ = syscalls.parse(wrong)
    assert any("fd 7 is /s/elsewhere by -y, /s/.state.json.ab.tmp by replay" in m for m in syscalls.replay(calls).mismatches)


def test_a_closed_fd_reused_by_another_thread_before_the_close_returns() -> None:
    """close frees the number on entry: thread 102 may get it before thread 101's close returns."""
    log = GOOD.replace("101 close(7</s>) = 0\n", "101 close(7</s> <unfinished ...>\n"
                       '102 openat(AT_FDCWD</w>, "/sys/x", O_RDONLY|O_CLOEXEC) = 7</sys/x>\n'
                       "101 <... close resumed>) = 0\n"
                       "102 write(7</sys/x>, \"1\", 1) = 1\n")
    log = "100 clone3({flags=CLONE_VM|CLONE_FILES|CLONE_THREAD, exit_signal=0}, 88) = 102\n" + log  # one fd table
    calls, exits, _ = syscalls.parse(log)
    replay = syscalls.replay(calls)
    assert replay.mismatches == [] and "/sys/x" in replay.written_paths
    assert syscalls.check_directory(replay, D, exits)[1] == []


def test_parser_reads_strings_with_commas_parentheses_and_escapes() -> None:
    args, rest = syscalls.split_args('7</a/b, (c)>, "x, \\"y\\") z", 5) = 5')
    assert args == ['7</a/b, (c)>', '"x, \\"y\\") z"', "5"] and rest.strip() == "= 5"
    assert syscalls.unquote('"a\\"b\\\\c\\n"') == 'a"b\\c\n'


def test_a_missing_fsync_before_the_rename_is_found() -> None:
    log = GOOD.replace("101 fsync(7</s/.state.json.ab.tmp> <unfinished ...>\n", "")
    log = log.replace("101 <... fsync resumed>) = 0\n", "")
    assert any("not fsynced after its last write" in p for p in _problems(log))


def test_an_fsync_that_returns_after_the_rename_started_is_not_enough() -> None:
    log = GOOD.replace("101 <... fsync resumed>) = 0\n", "").replace(
        f'101 rename("{D}/.state.json.ab.tmp", "{D}/state.json") = 0\n',
        f'102 rename("{D}/.state.json.ab.tmp", "{D}/state.json") = 0\n101 <... fsync resumed>) = 0\n')
    assert any("not fsynced" in p for p in _problems(log))


def test_a_missing_directory_fsync_is_found() -> None:
    log = GOOD.replace("101 fsync(7</s>) = 0\n", "")
    assert any("was not fsynced after the rename" in p for p in _problems(log))


def test_a_directory_fsync_that_started_before_the_rename_returned_is_not_enough() -> None:
    log = GOOD.replace(f'101 rename("{D}/.state.json.ab.tmp", "{D}/state.json") = 0\n',
                       f'101 rename("{D}/.state.json.ab.tmp", "{D}/state.json" <unfinished ...>\n'
                       f'102 openat(AT_FDCWD</w>, "{D}", O_RDONLY|O_DIRECTORY) = 8</s>\n102 fsync(8</s>) = 0\n'
                       '101 <... rename resumed>) = 0\n').replace("101 fsync(7</s>) = 0\n", "")
    assert any("was not fsynced after the rename" in p for p in _problems(log))


def test_an_fsync_of_a_non_directory_fd_is_not_a_directory_fsync() -> None:
    log = GOOD.replace('"/s", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 7</s>', '"/s", O_RDONLY|O_CLOEXEC) = 7</s>')
    assert any("was not fsynced after the rename" in p for p in _problems(log))


def test_writing_a_final_name_in_place_and_leftover_temps_are_found() -> None:
    log = GOOD + (f'101 openat(AT_FDCWD</w>, "{D}/state.json", O_WRONLY|O_TRUNC|O_CLOEXEC) = 9</s/state.json>\n'
                  f'101 openat(AT_FDCWD</w>, "{D}/.serial.assertion.zz.tmp", O_RDWR|O_CREAT|O_EXCL, 0600) '
                  '= 10</s/.serial.assertion.zz.tmp>\n')
    problems = _problems(log)
    assert any("opened for writing in place" in p for p in problems)
    assert any(".serial.assertion.zz.tmp was created and never renamed or removed" in p for p in problems)
