"""The lab Model Service's request-id signature check gives snapd 2.77.1's verdict on every vector it can
judge (verdicts.tsv: the agent's hashes, base64), accepted and rejected alike."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agent import assertions
from agent.labmodel import verify_request_id_signature
from agent.onboarding import Hash

SO = Path(__file__).resolve().parents[1] / "data" / "secure-onboarding"


def _rows() -> list[dict[str, str]]:
    with open(SO / "verdicts.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r for r in rows if r["hash"] in set(Hash) and r["encoding"] == "base64"]


ROWS = _rows()


def test_the_vectors_cover_both_verdicts() -> None:
    verdicts = [r["snapd verdict (asserts.(*HardwareIdentity).VerifyNonceSignature)"].split()[0] for r in ROWS]
    assert verdicts.count("ACCEPTED") >= 10 and verdicts.count("REJECTED") >= 8


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['file']}:{r['verified-against']}:{r['hash']}:{r['nonce']}")
def test_snapds_verdict(row: dict[str, str]) -> None:
    identity = assertions.decode((SO / row["verified-against"] / "hardware-identity.assert").read_bytes())
    nonce = (SO / row["nonce"]).read_bytes().decode()
    signature = (SO / row["file"]).read_text().strip()
    problem = verify_request_id_signature(identity, nonce, signature, row["hash"])
    accepted = row["snapd verdict (asserts.(*HardwareIdentity).VerifyNonceSignature)"].startswith("ACCEPTED")
    assert (problem == "") == accepted, (problem, row)
    if "ed25519" in row["verified-against"]:
        assert problem.startswith("unsupported algorithm type")


def test_a_weak_or_unknown_hash_is_refused_whatever_snapd_links_in() -> None:
    identity = assertions.decode((SO / "hwid-rsa2048" / "hardware-identity.assert").read_bytes())
    signature = (SO / "signatures/valid/rsa2048-sha256.b64").read_text().strip()
    assert verify_request_id_signature(identity, "REQ-ID-SO-0001", signature, "md5") == "unsupported hash 'md5'"
    assert verify_request_id_signature(identity, "REQ-ID-SO-0001", "not base64!", "sha256").startswith("cannot decode")
