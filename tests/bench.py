"""`make bench`: time-to-serial against the lab vault on loopback, and RSA-4096 generation side by side, as JSON.

Whole-process runs of `factory-agent run --once`: medians over several runs
with a fresh state directory (key generation included) and with a key
already on disk, the key generation child alone, and peak RSS. Figures, not
assertions: a noisy machine makes timed tests flaky, so no test checks them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not tests/: its http/ package would shadow the stdlib

import logging  # noqa: E402

from agent import rsakey  # noqa: E402
from agent.labvault import LabVault  # noqa: E402
from tests.fakes.agentconf import write_agent_config  # noqa: E402
from tests.fakes.launcher import agent_argv, agent_env, run_args  # noqa: E402

logging.disable(logging.WARNING)  # the lab vault's duplicate-assertion notes: every run re-uses one serial

ENV = agent_env()


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, the process or any child it waited for) of one run."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench run failed: {' '.join(cmd)}\n{stderr}")
    return elapsed, usage.ru_maxrss


def config(tmp: Path, lab: LabVault) -> Path:
    return write_agent_config(tmp, lab.url, lab.directory, template="BENCH-{soc_serial}", soc_serial="0000000000bench1")


def cold_start(tmp: Path, cfg: Path, state: Path, runs: int, name: str) -> dict[str, object]:
    """exec -> D-Bus name owned and READY=1 (the daemon sends READY only after owning the name)."""
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:dir={tmp}"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert bus.stdout is not None
    address = bus.stdout.readline().strip()
    samples = []
    try:
        for i in range(runs):
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = tmp / f"notify-{name}-{i}"
            notify.bind(str(path))
            notify.settimeout(30)
            env = agent_env(bus_address=address, NOTIFY_SOCKET=str(path))
            started = time.perf_counter()
            # Popen itself, not the launcher's Agent: os.wait4 below reaps it for its rusage.
            proc = subprocess.Popen(agent_argv(*run_args(cfg, state, bus="session")), cwd=REPO, env=env,
                                    stderr=subprocess.DEVNULL)
            while b"READY=1" not in notify.recv(4096):
                pass
            elapsed = time.perf_counter() - started
            proc.terminate()
            _, status, usage = os.wait4(proc.pid, 0)
            samples.append((elapsed, usage.ru_maxrss))
            notify.close()
    finally:
        bus.terminate()
        bus.wait()
    return summary(samples)


def summary(samples: list[tuple[float, int]]) -> dict[str, object]:
    seconds = [s for s, _ in samples]
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3), "runs": len(seconds), "peak_rss_kib": max(r for _, r in samples)}


SINGLE = ("from cryptography.hazmat.primitives.asymmetric import rsa; "
          "rsa.generate_private_key(65537, 4096)")


def keygen_side_by_side(tmp: Path, runs: int) -> dict[str, object]:
    """RSA-4096 the agent's way (its keygen child: a prime searcher per CPU), snapd's way (ssh-keygen as snapd
    runs it, overlord/devicestate/crypto.go) and one cryptography generation, each a whole process, in rounds
    whose order rotates: medians over ``runs`` each, and their ratios."""
    ssh = shutil.which("ssh-keygen")
    ways: dict[str, Callable[[int], list[str]]] = {
        "agent": lambda i: [sys.executable, "-m", "agent.keygen", "4096", str(os.getpid())],
        "cryptography_single": lambda i: [sys.executable, "-c", SINGLE],
    }
    if ssh:
        ways["snapd_ssh_keygen"] = lambda i: [ssh, "-t", "rsa", "-b", "4096", "-N", "", "-m", "PEM", "-q",
                                              "-f", str(tmp / f"ssh-{i}" / "rsa.key")]
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in ways}
    names = list(ways)
    for i in range(runs):
        (tmp / f"ssh-{i}").mkdir(mode=0o700)
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(timed(ways[name](i)))
    report: dict[str, object] = {"runs_each": runs, "searchers": rsakey.searchers()}
    report.update({name: summary(s) for name, s in samples.items()})
    agent = statistics.median(s for s, _ in samples["agent"])
    report["agent_per_cryptography_single"] = round(agent / statistics.median(s for s, _ in samples["cryptography_single"]), 2)
    if ssh:
        report["agent_per_snapd_ssh_keygen"] = round(agent / statistics.median(s for s, _ in samples["snapd_ssh_keygen"]), 2)
    else:
        report["snapd_ssh_keygen"] = "no ssh-keygen here (openssh-client)"
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keygen-runs", type=int, default=9, help="RSA-4096 generations of each way (at least 7)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="factory-agent-bench-"))
    try:
        lab = LabVault(tmp / "lab")
        lab.start()
        cfg = config(tmp, lab)
        fresh, with_key, keygen = [], [], []
        for i in range(args.runs):
            state = tmp / f"fresh-{i}"
            fresh.append(timed(agent_argv(*run_args(cfg, state, once=True))))
            seeded = tmp / f"seeded-{i}"
            seeded.mkdir(mode=0o700)
            shutil.copy2(state / "device-key.pem", seeded / "device-key.pem")
            with_key.append(timed(agent_argv(*run_args(cfg, seeded, once=True))))
            keygen.append(timed([sys.executable, "-m", "agent.keygen", "4096", str(os.getpid())]))
        registered = tmp / "fresh-0"
        cold_registered = cold_start(tmp, cfg, registered, args.runs, "registered")
        unregistered = tmp / "cold-unregistered"
        unregistered.mkdir(mode=0o700)
        shutil.copy2(registered / "device-key.pem", unregistered / "device-key.pem")
        cold_unregistered = cold_start(tmp, cfg, unregistered, 1, "unregistered")  # loads the key to adopt it, then READY
        lab.stop()
        report = {
            "machine": {"python": platform.python_version(), "arch": platform.machine(), "cpus": os.cpu_count()},
            "time_to_serial_fresh_state": summary(fresh),
            "key_generation_rsa4096_child": summary(keygen),
            "time_to_serial_key_on_disk": summary(with_key),
            "rest_beyond_keygen_median_s": round(statistics.median(s for s, _ in with_key), 3),
            "cold_start_to_dbus_name_and_ready_registered_device": cold_registered,
            "cold_start_to_dbus_name_and_ready_unrecorded_key_adopted": cold_unregistered,
            "rsa4096_generation_side_by_side": keygen_side_by_side(tmp, args.keygen_runs),
        }
        print(json.dumps(report, indent=2))
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
