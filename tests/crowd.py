#!/usr/bin/python3
"""make crowd: a rack of real agents (`factory-agent run --once`) against one lab vault at its capacity.

Each agent has its own state directory, configuration (its own SoC serial, so its own serial) and device
key: distinct RSA-4096 keys made once with `openssl genpkey` (as many at a time as there are cores) and kept
in the cache directory, outside the tree. The vault is a real `factory-agent lab-vault --rate R` on a
loopback port. Its outage is the process stopped (SIGTERM) and started again on the same port OUTAGE
seconds later: connections refused meanwhile, and the request-ids it had handed out forgotten, as a
restarted vault's are. Every agent is started at once: on a small machine, their start-up is the wave.

Prints JSON: failures; the vault's admitted, refused and serial-requests for each second (from its log);
the time until all registered against the ideal (N / R, plus the outage); the burst after the outage;
requests per device; the agents' peak total RSS and their CPU time. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not tests/: its http/ package would shadow the stdlib

from agent.labvault import LabVault  # noqa: E402
from tests.fakes.agentconf import copy_lab_keys, write_agent_config  # noqa: E402
from tests.fakes.launcher import agent_argv, agent_env, run_args  # noqa: E402

TALLY = re.compile(r"lab vault rate: second (\d+): (\d+) admitted, (\d+) refused, (\d+) serial-requests")


def device_keys(cache: Path, count: int) -> list[Path]:
    """``count`` distinct RSA-4096 PKCS#8 keys in ``cache``/keys, made once (the missing ones, in parallel)."""
    directory = cache / "keys"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    wanted = [directory / f"device-{n:04d}.pem" for n in range(count)]
    missing = [path for path in wanted if not path.exists()]

    def make(path: Path) -> None:
        part = path.with_suffix(".part")
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096",
                        "-out", str(part)], check=True, capture_output=True)
        part.chmod(0o600)
        os.replace(part, path)

    if missing:
        print(f"crowd: making {len(missing)} RSA-4096 device keys in {directory} (once)", file=sys.stderr, flush=True)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(make, missing))
    return wanted


def vault_keys(cache: Path) -> Path:
    """The lab vault's root and brand keys, made once in ``cache``/vault."""
    directory = cache / "vault"
    if not (directory / "brand-key.pem").exists():
        LabVault(directory)
    return directory


class Vault:
    """`factory-agent lab-vault --rate R` on one port, stopped and started again for the outage."""

    def __init__(self, directory: Path, rate: float, logs: Path) -> None:
        self.directory, self.rate, self.logs = directory, rate, logs
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.runs = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        self.runs += 1
        log = open(self.logs / f"vault-{self.runs}.log", "w")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            agent_argv("lab-vault", "--dir", str(self.directory), "--listen", f"127.0.0.1:{self.port}",
                       "--rate", f"{self.rate:g}"),
            cwd=REPO, env=agent_env(), stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("lab vault listening on "):
            raise SystemExit(f"crowd: the lab vault did not start: {line!r}")
        return line.split()[4]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None

    def tallies(self) -> dict[int, tuple[int, int, int]]:
        """Unix second -> (admitted, refused, serial-requests), over every run."""
        seen: dict[int, tuple[int, int, int]] = {}
        for n in range(1, self.runs + 1):
            for match in TALLY.finditer((self.logs / f"vault-{n}.log").read_text()):
                second, *counts = map(int, match.groups())
                old = seen.get(second, (0, 0, 0))
                seen[second] = (old[0] + counts[0], old[1] + counts[1], old[2] + counts[2])
        return seen


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--rate", type=float, default=5.0, help="the vault's registrations a second")
    ap.add_argument("--outage-at", type=float, default=20.0, help="seconds after the start of the wave")
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the vault is down (0: none)")
    ap.add_argument("--limit", type=float, default=900.0, help="an agent still running after this has failed")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("FACTORY_AGENT_CROWD_CACHE",
                                                                       "/var/cache/factory-agent-crowd")))
    args = ap.parse_args()
    keys = device_keys(args.cache, args.agents)
    with tempfile.TemporaryDirectory(prefix="factory-agent-crowd.") as tmp_name:
        tmp = Path(tmp_name)
        vault = Vault(copy_lab_keys(vault_keys(args.cache), tmp / "vault"), args.rate, tmp)
        url = vault.start()
        runs = []
        for n, key in enumerate(keys):
            home = tmp / f"agent-{n:04d}"
            (home / "state").mkdir(mode=0o700, parents=True)
            shutil.copy(key, home / "state" / "device-key.pem")
            config = write_agent_config(home, url, vault.directory, template="CROWD-{soc_serial}",
                                        soc_serial=f"c40d{n:012x}")  # all zeros is no serial
            runs.append((home, config))
        env = agent_env()
        started = time.monotonic()
        wall0 = time.time()
        procs = {}
        for home, config in runs:
            err = open(home / "stderr", "w")  # noqa: SIM115 (the child keeps it)
            proc = subprocess.Popen(agent_argv(*run_args(config, home / "state", once=True)), cwd=REPO, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            err.close()
            procs[proc.pid] = (proc, home)
        spawned = time.monotonic() - started
        live = dict(procs)
        ended: dict[int, tuple[int, float, float]] = {}  # pid -> exit status, seconds after the start, CPU s
        peak_rss, peak_at = 0, 0.0
        outage = [started + args.outage_at, started + args.outage_at + args.outage] if args.outage else []
        phase = 0
        while live and time.monotonic() - started < args.limit:
            now = time.monotonic()
            if outage and phase == 0 and now >= outage[0]:
                vault.stop()
                outage[0], phase = time.monotonic(), 1
            elif outage and phase == 1 and now >= outage[1]:
                vault.start()
                outage[1], phase = time.monotonic(), 2
            total = sum(rss_kib(pid) for pid in live)
            if total > peak_rss:
                peak_rss, peak_at = total, now - started
            for pid in list(live):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    ended[pid] = (os.waitstatus_to_exitcode(status), time.monotonic() - started,
                                  usage.ru_utime + usage.ru_stime)
                    del live[pid]
            time.sleep(0.25)
        for pid in live:  # past the limit: failed
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if phase == 1:
            vault.start()
        vault.stop()
        registered = [pid for pid, (code, _, _) in ended.items()
                      if code == 0 and (procs[pid][1] / "state" / "serial.assertion").exists()]
        failures = len(procs) - len(registered)
        failed = []
        for pid, (_proc, home) in procs.items():
            if pid not in registered:
                lines = (home / "stderr").read_text(errors="replace").splitlines()
                failed.append({"agent": home.name, "exit": ended[pid][0] if pid in ended else "killed at the limit",
                               "last_lines": lines[-3:]})
        last = max((ended[pid][1] for pid in registered), default=float("nan"))
        per_second = {second - int(wall0): counts for second, counts in sorted(vault.tallies().items())}
        offered = {s: a + r for s, (a, r, _) in per_second.items()}
        back = round(outage[1] - started) if args.outage else None
        after = [offered.get(s, 0) for s in range(back, back + 15)] if back is not None else []
        ideal = args.agents / args.rate + (args.outage if args.outage else 0.0)
        cpu = [c for _, _, c in ended.values()]
        refusals = [proc_text.count("HTTP 429") for proc_text in
                    ((procs[pid][1] / "stderr").read_text(errors="replace") for pid in ended)]
        result = {
            "agents": args.agents, "rate": args.rate, "spawn_s": round(spawned, 1),
            "outage": [round(outage[0] - started, 1), round(outage[1] - started, 1)] if args.outage else None,
            "failures": failures, "failed": failed[:10],
            "all_registered_s": round(last, 1), "ideal_s": round(ideal, 1), "completion_per_ideal": round(last / ideal, 2),
            "peak_admitted_per_s": max((a for a, _, _ in per_second.values()), default=0),
            "peak_offered_per_s": max(offered.values(), default=0),
            "peak_offered_per_rate": round(max(offered.values(), default=0) / args.rate, 2),
            "requests_per_device": round(sum(offered.values()) / args.agents, 2),
            "429_per_device": {"mean": round(statistics.fmean(refusals), 2) if refusals else None,
                               "max": max(refusals, default=None)},
            "after_outage_offered_per_s": after,
            "after_outage_peak_per_rate": round(max(after, default=0) / args.rate, 2) if after else None,
            "peak_total_rss_mib": round(peak_rss / 1024, 1), "peak_rss_at_s": round(peak_at, 1),
            "rss_per_agent_mib": round(peak_rss / 1024 / args.agents, 1),
            "agents_cpu_s": {"total": round(sum(cpu), 1), "median": round(statistics.median(cpu), 2) if cpu else None},
            "per_second": {s: {"admitted": a, "refused": r, "serials": k} for s, (a, r, k) in per_second.items()},
        }
        print(json.dumps(result, indent=1))
        down = f", down {args.outage:g} s from {outage[0] - started:.1f} s" if args.outage else ""
        print(f"crowd: {args.agents} agents, vault at {args.rate:g}/s{down}: "
              f"{failures} failed; all registered at {result['all_registered_s']} s (ideal {result['ideal_s']} s, "
              f"x{result['completion_per_ideal']}); peak admitted {result['peak_admitted_per_s']}/s, offered "
              f"{result['peak_offered_per_s']}/s ({result['peak_offered_per_rate']}x the cap); "
              f"{result['requests_per_device']} request-ids a device; after the outage peak "
              f"{result['after_outage_peak_per_rate']}x the cap; peak RSS {result['peak_total_rss_mib']} MiB in all")
        return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
