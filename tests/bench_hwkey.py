"""`make bench-hwkey`: how long the hardware identity key takes to sign a request-id, on each backend.

In-process medians of HardwareKey.sign (a file key, and a SoftHSM2 token through PKCS#11, which
opens a session and logs in for every signature, as the agent does), and the whole
`factory-agent hardware-identity sign-request-id` command, whose time is mostly Python starting.
Figures, not assertions. JSON on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not tests/: its http/ package would shadow the stdlib

from agent import hwkey  # noqa: E402
from agent.onboarding import Hash  # noqa: E402
from tests.fakes import softhsm, swtpm  # noqa: E402
from tests.fakes.launcher import agent_argv, agent_env  # noqa: E402

RUNS = int(os.environ.get("FACTORY_AGENT_BENCH_RUNS", "50"))
REQUEST_ID = b"a3f1c9e27b5d4e8f90a1b2c3d4e5f60718293a4b"  # the lab vault's request-ids are 40 hex digits


def median_ms(key: hwkey.HardwareKey, hash_name: Hash = Hash.SHA256) -> dict[str, float]:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        key.sign(REQUEST_ID, hash_name)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


def command_ms(uri: str, env: dict[str, str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(agent_argv("hardware-identity", "sign-request-id", "--key", uri, "--json",
                                         REQUEST_ID.decode()), env=env, capture_output=True, check=False)
        times.append((time.perf_counter() - started) * 1000)
        assert done.returncode == 0, done.stderr
    return round(statistics.median(times), 1)


def tpm_figures(directory: Path) -> dict[str, object]:
    """A software TPM through tpm2-pkcs11 (its keys made by children, as for SoftHSM2), each signature in it."""
    tpm = swtpm.SoftwareTpm(directory)
    figures: dict[str, object] = {}
    try:
        env = {**agent_env(), **{k: v for k, v in tpm.env.items() if k.startswith("TPM2_PKCS11_")}}
        os.environ.update({k: v for k, v in env.items() if k.startswith("TPM2_PKCS11_")})
        uris = {key_type: tpm.uri(key_type) + f"&module-path={tpm.module}" for key_type in ("p256", "rsa2048")}
        for key_type, uri in uris.items():  # all made before this process loads the module: it lists them once
            subprocess.run(agent_argv("hardware-identity", "init", "--key", uri, "--type", key_type), env=env,
                           capture_output=True, check=True)
        for key_type, uri in uris.items():
            figures[f"swtpm-{key_type}"] = median_ms(hwkey.open_key(uri))
        figures["swtpm-p256-command_ms"] = command_ms(tpm.uri("p256") + f"&module-path={tpm.module}", env)
    finally:
        tpm.stop()
    return figures


def main() -> int:
    results: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version(), "runs": RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        files = {t: hwkey.create_key(f"file:{base / t / 'key.pem'}", t)[0] for t in hwkey.KEY_TYPES}
        for key_type, key in files.items():
            results[f"file-{key_type}"] = median_ms(key)
        results["file-p256-command_ms"] = command_ms(files["p256"].uri, agent_env())
        if reason := softhsm.missing():
            results["softhsm2"] = f"skipped: {reason}"
        else:
            hsm = softhsm.SoftHsm(base / "softhsm")
            os.environ["SOFTHSM2_CONF"] = str(hsm.conf)  # before this process loads the module
            token = hsm.token("bench")
            env = {**agent_env(), "SOFTHSM2_CONF": str(hsm.conf)}
            for key_type in ("p256", "rsa2048"):  # made by children: this process has not loaded the module yet
                uri = token.uri(key_type, module_path=token.module)
                subprocess.run(agent_argv("hardware-identity", "init", "--key", uri, "--type", key_type), env=env,
                               capture_output=True, check=True)
            for key_type in ("p256", "rsa2048"):
                key = hwkey.open_key(token.uri(key_type), token.module)
                results[f"softhsm2-{key_type}"] = median_ms(key)
            results["softhsm2-p256-command_ms"] = command_ms(token.uri("p256", module_path=token.module), env)
        if reason := swtpm.missing():
            results["swtpm"] = f"skipped: {reason}"
        else:
            results.update(tpm_figures(base / "swtpm"))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
