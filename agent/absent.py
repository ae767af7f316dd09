"""What `factory-agent status` says when the daemon is not on the bus: why, in a sentence, and what to run.

Read from what is there without the daemon: the kill switches, the unit (when
systemd runs the machine: its state, result, exit status and last journal
line), and what state.json records. Nothing is changed and nothing is
trusted that the agent would not trust: state.json is read with the same
checks as the daemon's (store.read_owned), and a file that fails them is
reported, not read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store
from .errors import StoreError

UNIT = "factory-agent.service"
DISABLED_FILE = Path("/etc/factory-agent/disabled")
DISABLED_ARGUMENT = "factory-agent=disabled"
_QUERY_TIMEOUT = 5.0
_UNIT_PROPERTIES = ("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")


@dataclass(frozen=True, slots=True)
class Absence:
    """Everything known about an agent that is not on the bus."""

    reason: str  # one sentence: why there is no daemon, as far as can be told
    next: str  # the command to run next
    kill_switch: str = ""  # what turns the agent off ("" if nothing does)
    unit: dict[str, str] = field(default_factory=dict)  # systemd's view of the unit ({} without systemd)
    recorded: dict[str, Any] = field(default_factory=dict)  # what state.json records ({} if nothing)

    def to_json(self) -> dict[str, Any]:
        return {"daemon": "absent", "reason": self.reason, "next": self.next, "kill-switch": self.kill_switch,
                "unit": self.unit, "recorded": self.recorded}

    def lines(self, long: bool = False) -> list[str]:
        """The report; ``long`` adds the history state.json records."""
        out = ["Daemon: not running", f"Why: {self.reason}"]
        if self.kill_switch:
            out.append(f"Kill switch: {self.kill_switch}")
        if self.unit:
            unit = self.unit
            out.append(f"Unit: {unit.get('ActiveState', '?')} ({unit.get('SubState', '?')}), result "
                       f"{unit.get('Result', '?')}, exit status {unit.get('ExecMainStatus', '?')}, restarts "
                       f"{unit.get('NRestarts', '?')}")
            if unit.get("LastLine"):
                out.append(f"Last log line: {unit['LastLine']}")
        if self.recorded:
            out.append(f"Recorded: {describe_recorded(self.recorded)}")
        out.append(f"Next: {self.next}")
        if long:
            out += history_lines(self.recorded.get("history", []))
        return out


def kill_switch(disabled: Path = DISABLED_FILE, cmdline: Path = Path("/proc/cmdline")) -> str:
    if disabled.exists():
        return f"{disabled} exists (remove it to enable the agent)"
    try:
        arguments = cmdline.read_text(errors="replace").split()
    except OSError:
        arguments = []
    if DISABLED_ARGUMENT in arguments:
        return f"the kernel command line has {DISABLED_ARGUMENT}"
    return ""


def unit_state() -> dict[str, str]:
    """systemctl's view of the unit and its last journal line; {} when systemd does not run this machine."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return {}
    shown = _query([systemctl, "show", UNIT, "--property=" + ",".join(_UNIT_PROPERTIES)])
    unit = dict(line.partition("=")[::2] for line in shown.splitlines() if "=" in line)
    if not unit or unit.get("LoadState") == "not-found":
        return {}
    journalctl = shutil.which("journalctl")
    if journalctl is not None:
        last = _query([journalctl, "--unit", UNIT, "--lines", "1", "--output", "cat", "--no-pager", "--boot"])
        unit["LastLine"] = last.strip().splitlines()[-1] if last.strip() else ""
    return unit


def _query(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_QUERY_TIMEOUT, check=False,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def history_lines(events: list[dict[str, Any]]) -> list[str]:
    """The step history as ``status --long`` shows it, one line per step (as ``snap tasks`` does), local time."""
    if not events:
        return ["History: none recorded"]
    out = ["History:", f"  {'Time':<19}  {'Step':<17}  Detail"]
    for e in events:
        step, detail = e["step"], e["detail"]
        if e.get("count", 1) > 1:
            step += f" x{e['count']}"
            detail += f" (last at {_local(e['last-at'], date=False)})"
        out.append(f"  {_local(e['at'])}  {step:<17}  {detail}")
    return out


def _local(at_us: int, date: bool = True) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(at_us / 1_000_000))


def recorded_state(state_dir: Path) -> dict[str, Any]:
    """What state.json records, the fields a technician needs; {"unreadable": why} if it cannot be trusted."""
    path = state_dir / store.STATE_FILE
    try:
        data = store.read_owned(path, store.MAX_STATE_BYTES)
    except StoreError as exc:
        return {"unreadable": str(exc)}
    if data is None:
        return {}
    try:
        progress = store.progress_from_json(json.loads(data))
    except (ValueError, TypeError, StoreError) as exc:
        return {"unreadable": f"{path} is not a state file this agent reads: {exc}"}
    return {"phase": progress.phase.value, "serial": progress.serial, "device-key-id": progress.key_id,
            "blocked-by": progress.blocked_by, "last-error": progress.last_error,
            "last-error-message": progress.last_error_message, "mode": progress.mode.value,
            "state-file": str(path), "history": [store.event_to_json(e) for e in progress.history]}


def describe_recorded(recorded: dict[str, Any]) -> str:
    if "unreadable" in recorded:
        return f"cannot read the state: {recorded['unreadable']}"
    if recorded.get("phase") == "registered":
        return f"registered with serial {recorded.get('serial', '')}"
    if recorded.get("blocked-by"):
        return (f"blocked by {recorded['blocked-by']}: {recorded.get('last-error-message', '')} (a start tries again)")
    if recorded.get("last-error"):
        return f"{recorded.get('phase', '?')}, last error {recorded['last-error']}: {recorded.get('last-error-message', '')}"
    return f"{recorded.get('phase', '?')}, no error recorded"


def config_problem(files: list[Path] | None) -> str:
    """The ConfigError the daemon would stop on (exit 78), "" if the configuration loads."""
    from . import config
    from .errors import ConfigError, UntrustedFileError

    try:
        config.load(files)
    except (ConfigError, UntrustedFileError) as exc:
        return str(exc)
    return ""


def explain(state_dir: Path, bus_kind: str, config_files: list[Path] | None = None) -> Absence:
    """Why there is no daemon on ``bus_kind``, and what to do, from what this machine shows."""
    switch, unit, recorded = kill_switch(), unit_state(), recorded_state(state_dir)
    if switch:
        return Absence(f"the agent is turned off: {switch}", "remove the kill switch, then run: systemctl start "
                       "factory-agent", switch, unit, recorded)
    problem = config_problem(config_files)
    if problem:
        return Absence(f"the configuration does not load, so the daemon cannot start: {problem}",
                       "fix the file and key it names, then run: systemctl restart factory-agent (or factory-agent "
                       "run)", switch, unit, recorded)
    if unit:
        active, result = unit.get("ActiveState", ""), unit.get("Result", "")
        if active == "failed" or result not in ("", "success"):
            return Absence(f"the unit {UNIT} failed ({result or active}, exit status "
                           f"{unit.get('ExecMainStatus', '?')})", f"read its log: journalctl -u {UNIT} -b; fix the "
                           "cause, then run: systemctl restart factory-agent", switch, unit, recorded)
        if active in ("activating", "reloading"):
            return Absence(f"the unit {UNIT} is starting", "wait for it: factory-agent status --wait", switch, unit,
                           recorded)
        return Absence(f"the unit {UNIT} is {active or 'not running'}", "start it: systemctl start factory-agent",
                       switch, unit, recorded)
    if recorded.get("phase") == "registered":
        return Absence(f"no factory-agent on the {bus_kind} bus; the device is registered already",
                       "nothing to do (start it to serve the status: factory-agent run)", switch, unit, recorded)
    return Absence(f"no factory-agent on the {bus_kind} bus, and no systemd unit to ask",
                   "start it: factory-agent run (or systemctl start factory-agent)", switch, unit, recorded)
