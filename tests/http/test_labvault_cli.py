"""`factory-agent lab-vault` as a factory rehearses with it: the real command, real HTTP(S) on 127.0.0.1,
and the real agent (`run --once`) registering through each rehearsed failure.

- ``--fail STATUS --times N [--retry-after S]``, ``--refuse CODE``, ``--delay S``, ``--endpoint E``:
  what the vault answers, what it logs, and what the agent then does;
- ``--rate R``: a vault at capacity, 429 with Retry-After past it, each busy second logged;
- ``--self-signed``: a private CA the agent trusts through vault.ca-file, kept across restarts;
- the progress lines while it makes its keys, and the usage errors.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from agent import labserve
from agent.labvault import refusal_reply
from tests.fakes import launcher
from tests.fakes.agentconf import copy_lab_keys, seed_key, write_agent_config
from tests.fakes.launcher import Agent, agent_argv, run_args


@pytest.fixture
def vault_dir(lab_dir: Path, tmp_path: Path) -> Path:
    """A fresh lab-vault directory holding the session's root and brand keys (no RSA-4096 to make)."""
    return copy_lab_keys(lab_dir, tmp_path / "vault")


class LabVaultCommand:
    """One `factory-agent lab-vault` child: its URL from the line it prints, its stderr as it comes."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.child = Agent("lab-vault", "--dir", str(directory), *args, stdout=subprocess.PIPE)
        assert self.child.proc.stdout is not None
        self.line = self.child.proc.stdout.readline()
        assert self.line.startswith("lab vault listening on "), (self.line, self.child.stderr)
        self.url = self.line.split()[4]
        self.api_key = (directory / "api-key").read_text().strip()

    def post(self, endpoint: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + endpoint, headers={"api-key": self.api_key}, timeout=30, **kwargs)

    def stop(self) -> str:
        return self.child.stop()


Start = Callable[..., LabVaultCommand]


@pytest.fixture
def start(vault_dir: Path) -> Iterator[Start]:
    started: list[LabVaultCommand] = []

    def _start(*args: str, directory: Path = vault_dir) -> LabVaultCommand:
        started.append(LabVaultCommand(directory, *args))
        return started[-1]

    yield _start
    for command in started:
        command.child.stop(check=False)


def _register(tmp_path: Path, vault: LabVaultCommand, *, vault_extra: str = "",
              timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`factory-agent run --once` with a pre-made device key against ``vault``."""
    state = tmp_path / "state"
    seed_key(state)
    config = write_agent_config(tmp_path, vault.url, vault.directory, template="R-{soc_serial}",
                                soc_serial="00000000000000r1", vault_extra=vault_extra)
    return launcher.run(agent_argv(*run_args(config, state, once=True)), timeout=timeout)


# --- --fail -------------------------------------------------------------------


def test_fail_503_three_times_then_the_real_answers(start: Start) -> None:
    vault = start("--fail", "503", "--times", "3", "--retry-after", "2")
    assert requests.get(vault.url + "version", timeout=10).status_code == 200  # the vault is up, but failing
    answers = [vault.post("request-id") for _ in range(4)]
    assert [a.status_code for a in answers] == [503, 503, 503, 200]
    assert all(a.headers["Retry-After"] == "2" and a.text == "503 Service Unavailable\n" for a in answers[:3])
    assert answers[3].json()["success"] is True and answers[3].json()["request-id"]
    stderr = vault.stop()
    assert "lab vault rehearsal: fail with HTTP 503 on the first 3 device requests, on request-id and serial" in stderr
    played = [line for line in stderr.splitlines() if "rehearsal: answered 503 to POST /v1/request-id" in line]
    assert [line.rsplit(" ", 3)[-3:] for line in played] == [["(1", "of", "3)"], ["(2", "of", "3)"], ["(3", "of", "3)"]]
    assert "all 3 rehearsed requests answered; answering normally from now on" in stderr
    assert vault.api_key not in stderr


def test_the_agent_rides_out_a_rehearsed_outage_and_registers(start: Start, tmp_path: Path) -> None:
    vault = start("--fail", "503", "--times", "2", "--retry-after", "1")
    done = _register(tmp_path, vault)
    assert done.returncode == 0, done.stderr
    assert "registered" in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "state" / "serial.assertion").read_bytes().startswith(b"type: serial\n")
    assert "(2 of 2)" in vault.stop()
    # What the agent said while it waited: the vault's side, and the URL it called.
    said = [line for line in done.stderr.splitlines() if "503" in line]
    assert said and all(vault.url in line for line in said), done.stderr


# --- --rate -------------------------------------------------------------------


def test_rate_admits_its_capacity_a_second_and_answers_429_with_retry_after_past_it(start: Start) -> None:
    vault = start("--rate", "3")
    answers = [vault.post("request-id") for _ in range(8)]  # well within a second: the bucket holds 3
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
    refused = [a for a in answers if a.status_code == 429]
    assert all(a.headers["Retry-After"] == "1" and a.text == "429 Too Many Requests\n" for a in refused)
    nonce = answers[0].json()["request-id"]
    time.sleep(1.1)  # three tokens again; a serial-request is never refused for load, even past the cap
    serials = [vault.post("serial", data=f"type: serial-request\nrequest-id: {nonce}\n".encode()) for _ in range(5)]
    assert 429 not in [a.status_code for a in serials]
    assert vault.post("request-id").status_code == 200
    assert requests.get(vault.url + "version", timeout=10).status_code == 200
    stderr = vault.stop()
    assert "lab vault rate: 3 registrations a second; request-ids over it answered 429 with Retry-After" in stderr
    tallies = [line.split("second ", 1)[1] for line in stderr.splitlines() if "lab vault rate: second " in line]
    counted = [tuple(int(word) for word in t.replace(",", "").split()[1:7:2]) for t in tallies]  # admitted refused serials
    assert sum(c[0] for c in counted) == 3 + 1 and sum(c[1] for c in counted) == len(refused)
    assert sum(c[2] for c in counted) == 5 and all("(cap 3/s)" in t for t in tallies)
    assert vault.api_key not in stderr


def test_rate_with_a_rehearsal_caps_first_then_plays_the_failure(start: Start) -> None:
    """The two compose (each is a class of its own over the lab vault): an admitted request meets the rehearsal."""
    vault = start("--rate", "5", "--fail", "503", "--times", "1", "--endpoint", "request-id")
    assert [vault.post("request-id").status_code for _ in range(2)] == [503, 200]
    stderr = vault.stop()
    admitted = sum(int(line.split(": ")[-1].split()[0]) for line in stderr.splitlines() if "lab vault rate: second " in line)
    assert "answered 503 to POST /v1/request-id" in stderr and admitted == 2 and " refused" in stderr


def test_a_line_of_agents_registers_through_a_capped_vault(start: Start, tmp_path: Path) -> None:
    """Three agents at once against a vault that admits one a second: each registers, the late ones after a 429
    (their wait is the crowd window of registration.crowded, not the vault's Retry-After: 1)."""
    vault = start("--rate", "1")
    runs = []
    for n in range(3):
        state = tmp_path / f"state{n}"
        seed_key(state)
        (tmp_path / f"d{n}").mkdir()
        config = write_agent_config(tmp_path / f"d{n}", vault.url, vault.directory, template="R-{soc_serial}",
                                    soc_serial=f"00000000000000r{n}")
        runs.append(Agent(*run_args(config, state, once=True)))
    codes = [run.wait_exit(timeout=120) for run in runs]
    assert codes == [0, 0, 0], [run.stderr for run in runs]
    stderr = vault.stop()
    refused = sum(int(line.split(" refused")[0].rsplit(" ", 1)[1]) for line in stderr.splitlines()
                  if "lab vault rate: second " in line)
    assert refused >= 1 and sum("HTTP 429" in run.stderr for run in runs) >= 1


def test_fail_on_the_serial_endpoint_only(start: Start) -> None:
    vault = start("--fail", "500", "--endpoint", "serial")
    assert vault.post("request-id").status_code == 200
    assert vault.post("serial", data=b"type: serial-request\n").status_code == 500
    assert "answered 500 to POST /v1/serial" in vault.stop()


# --- --refuse -----------------------------------------------------------------


def test_refuse_answers_the_real_vaults_body(start: Start) -> None:
    vault = start("--refuse", "invalid-model", "--times", "1")
    refused, then = vault.post("request-id"), vault.post("request-id")
    expected = refusal_reply("invalid-model")
    assert (refused.status_code, refused.content) == (400, expected.body)
    assert refused.headers["Content-Type"] == expected.content_type
    assert then.status_code == 200
    assert "the rehearsed request answered; answering normally" in vault.stop()


def test_a_rehearsed_refusal_blocks_the_agent_and_the_next_run_registers(start: Start, tmp_path: Path) -> None:
    """The technician's loop, rehearsed: blocked by invalid-api-key, fixed (here: the refusal was played once),
    run again, registered."""
    vault = start("--refuse", "invalid-api-key", "--times", "1")
    blocked = _register(tmp_path, vault)
    assert blocked.returncode == 1, blocked.stderr
    assert "invalid-api-key" in blocked.stderr and vault.url in blocked.stderr
    assert json.loads((tmp_path / "state" / "state.json").read_text())["blocked-by"]
    again = _register(tmp_path, vault)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "state" / "state.json").read_text())["phase"] == "registered"


# --- --delay ------------------------------------------------------------------


def test_delay_answers_the_rehearsed_requests_late(start: Start) -> None:
    vault = start("--delay", "1.5", "--endpoint", "request-id", "--times", "1")
    started = time.monotonic()
    answer = vault.post("request-id")
    took = time.monotonic() - started
    assert answer.status_code == 200 and answer.json()["request-id"] and took >= 1.5, took
    assert vault.post("request-id").status_code == 200
    stderr = vault.stop()
    assert "rehearsal: answer 1.5 s late on the first device request, on request-id" in stderr
    assert "rehearsal: answered 200 to POST /v1/request-id 1.5 s late (1 of 1)" in stderr
    assert len([line for line in stderr.splitlines() if "rehearsal: answered" in line]) == 1  # the second: normal


def test_delay_with_a_failure_answers_the_failure_late(start: Start) -> None:
    vault = start("--fail", "504", "--delay", "1", "--times", "1")
    started = time.monotonic()
    assert vault.post("request-id").status_code == 504 and time.monotonic() - started >= 1
    assert "answered 504 to POST /v1/request-id 1 s late (1 of 1)" in vault.stop()


# --- --self-signed ------------------------------------------------------------


def test_self_signed_serves_https_the_agent_trusts_through_its_ca_file(start: Start, tmp_path: Path,
                                                                       vault_dir: Path) -> None:
    vault = start("--self-signed")
    ca = vault_dir / "ca.pem"
    assert vault.url.startswith("https://127.0.0.1:") and vault.line.rstrip().endswith(f"; vault.ca-file {ca}")
    assert (vault_dir / "url").read_text() == vault.url + "\n"
    assert requests.get(vault.url + "version", timeout=10, verify=str(ca)).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(vault.url + "version", timeout=10)  # the system store does not know the lab's CA
    modes = {p.name: p.stat().st_mode & 0o777 for p in vault_dir.iterdir()}
    assert modes["ca-key.pem"] == modes["tls-key.pem"] == 0o600 and modes["ca.pem"] == 0o644
    done = _register(tmp_path, vault, vault_extra=f'ca-file = "{ca}"')
    assert done.returncode == 0, done.stderr


def test_self_signed_keeps_its_ca_and_certificate_across_restarts(start: Start, vault_dir: Path) -> None:
    first = start("--self-signed")
    files = {name: (vault_dir / name).read_bytes() for name in ("ca.pem", "ca-key.pem", "tls-cert.pem", "tls-key.pem")}
    first.stop()
    second = start("--self-signed")
    assert {name: (vault_dir / name).read_bytes() for name in files} == files
    assert requests.get(second.url + "version", timeout=10, verify=str(vault_dir / "ca.pem")).status_code == 200


def test_self_signed_makes_a_new_server_certificate_for_another_host_or_near_its_end(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca, cert, _ = labserve.self_signed(tmp_path, "127.0.0.1", now)
    ca_pem, cert_pem = ca.read_bytes(), cert.read_bytes()
    assert labserve.self_signed(tmp_path, "127.0.0.1", now)[1].read_bytes() == cert_pem  # kept
    labserve.self_signed(tmp_path, "lab-vault.factory.test", now)
    renamed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = renamed.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert "lab-vault.factory.test" in names.get_values_for_type(x509.DNSName)
    assert ca.read_bytes() == ca_pem  # the same CA: agents that trust it keep trusting the vault
    late = now + datetime.timedelta(days=labserve.CERT_DAYS - 3)
    labserve.self_signed(tmp_path, "lab-vault.factory.test", late)
    renewed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert renewed.serial_number != renamed.serial_number and ca.read_bytes() == ca_pem


# --- progress and usage -------------------------------------------------------


def test_progress_lines_while_it_makes_its_keys_and_none_when_it_has_them(start: Start, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    stderr = start(directory=fresh).stop()
    assert "lab vault: making 2 RSA-4096 key(s), one child process each" in stderr
    assert "lab vault: keys made in " in stderr
    assert "making" not in start(directory=fresh).stop()


@pytest.mark.parametrize("args, says", [
    (["--times", "2"], "--times and --endpoint need --fail, --refuse or --delay"),
    (["--retry-after", "5", "--refuse", "invalid-nonce"], "--retry-after needs --fail"),
    (["--fail", "200"], "must be 202 or an HTTP error status from 400 to 599"),
    (["--fail", "503", "--times", "0"], "must be a whole number of at least 1"),
    (["--refuse", "no-such-code"], "is not one of the vault's error codes: invalid-api-key"),
    (["--fail", "503", "--refuse", "invalid-nonce"], "not allowed with argument"),
    (["--delay", "-1"], "must be a positive number of seconds"),
    (["--self-signed", "--tls-cert", "c.pem"], "--self-signed makes its own certificate"),
])
def test_usage_errors_exit_2_and_say_what_is_wrong(tmp_path: Path, args: list[str], says: str) -> None:
    done = launcher.run(agent_argv("lab-vault", "--dir", str(tmp_path / "v"), *args), timeout=30)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert not (tmp_path / "v").exists()  # refused before anything was made
