"""Bounded bodies whatever the encoding: the vault client counts what it receives and decodes at most one layer,
capped, so that a compression bomb from the vault or anything on the path costs no memory (issue 11, attack 6)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from agent import vault
from agent.config import VaultConfig
from agent.errors import VaultTransient
from tests.conftest import REPO
from tests.fakes import peak
from tests.fakes.rawserver import http_reply

REQUEST_ID = b'{"success":true,"message":"","request-id":"abc123"}'
JSON = {"Content-Type": "application/json"}


def client(url: str) -> vault.Vault:
    return vault.Vault(VaultConfig(url=url, api_key="the-key", ca_file=None, allow_insecure_http=True,
                                   trusted_account_keys=(), connect_timeout=2.0, timeout=10.0))


def gzip_zeros(size: int) -> bytes:
    """``size`` zero bytes, gzipped without ever holding them: the first layer of a bomb."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block, out = bytes(1 << 20), []
    for _ in range(size >> 20):
        out.append(packer.compress(block))
    out.append(packer.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """``Content-Encoding: gzip, gzip``: 2 GiB of zeros in a few KB, as in the attack."""
    return gzip.compress(gzip_zeros(2 << 30), 9)


def test_the_client_asks_for_identity(serve) -> None:
    server = serve(http_reply("200 OK", REQUEST_ID, JSON))
    assert client(server.url).fetch_request_id() == "abc123"
    assert b"\r\nAccept-Encoding: identity\r\n" in server.requests[0]


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "identity", "gzip, identity"])
def test_one_layer_of_a_known_encoding_is_decoded(serve, coding: str) -> None:
    body = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress}.get(coding.split(",")[0],
                                                                                       lambda b: b)(REQUEST_ID)
    server = serve(http_reply("200 OK", body, {**JSON, "Content-Encoding": coding}))
    assert client(server.url).fetch_request_id() == "abc123"


def test_chained_encodings_are_a_transient_error_naming_them(serve, bomb: bytes) -> None:
    server = serve(http_reply("200 OK", bomb, {**JSON, "Content-Encoding": "gzip, gzip"}))
    with pytest.raises(VaultTransient, match=r"Content-Encoding 'gzip, gzip', which the agent does not decode"):
        client(server.url).fetch_request_id()


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br"])
def test_an_encoding_the_agent_does_not_decode_is_named(serve, coding: str) -> None:
    server = serve(http_reply("200 OK", b"\x00" * 64, {**JSON, "Content-Encoding": coding}))
    with pytest.raises(VaultTransient, match=rf"Content-Encoding '{coding}'"):
        client(server.url).fetch_request_id()


def test_one_layer_that_decodes_past_the_cap_is_refused(serve) -> None:
    body = gzip_zeros(64 << 20)  # 64 MiB of zeros in 64 KB: under the received-bytes cap, far over once decoded
    assert len(body) < vault.MAX_RESPONSE_BYTES
    server = serve(http_reply("200 OK", body, {**JSON, "Content-Encoding": "gzip"}))
    with pytest.raises(VaultTransient, match=r"too large once decoded \(gzip to over 1048576 bytes\)"):
        client(server.url).fetch_request_id()


def test_a_corrupt_encoding_is_transient(serve) -> None:
    server = serve(http_reply("200 OK", b"not gzip at all", {**JSON, "Content-Encoding": "gzip"}))
    with pytest.raises(VaultTransient, match=r"not valid gzip"):
        client(server.url).fetch_request_id()


CHILD = """
import sys
from agent import vault
from agent.config import VaultConfig
from agent.errors import VaultTransient
cfg = VaultConfig(url=sys.argv[1], api_key="k", ca_file=None, allow_insecure_http=True, trusted_account_keys=(),
                  connect_timeout=2.0, timeout=20.0)
try:
    getattr(vault.Vault(cfg), sys.argv[2])(*sys.argv[3:])
except VaultTransient as exc:
    print(exc)
"""


@pytest.mark.parametrize("coding", ["gzip, gzip", "gzip"])
def test_a_bomb_costs_a_process_under_100_mib(serve, tmp_path: Path, bomb: bytes, coding: str) -> None:
    """Peak RSS of a process that takes the bomb (the attack: 2.65 GiB, then MemoryError, exit 70)."""
    body = bomb if coding == "gzip, gzip" else gzip_zeros(1 << 30)[:1000 * 1024]  # a 1 GiB gzip cut at the cap
    server = serve(http_reply("200 OK", body, {**JSON, "Content-Encoding": coding}),
                   http_reply("200 OK", body, {"Content-Type": vault.ASSERTION_TYPE, "Content-Encoding": coding}))
    for call in (["fetch_request_id"], ["post_serial", "x"]):
        proc = peak.run([sys.executable, "-c", CHILD, server.url, *call], tmp_path / "peak", cwd=REPO, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
        message, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr
        assert "Content-Encoding 'gzip, gzip'" in message or "too large once decoded" in message, message
        peak_kib = peak.peak_kib(tmp_path / "peak")
        print(f"{coding} {call[0]}: peak RSS {peak_kib / 1024:.1f} MiB")
        assert peak_kib < 100 * 1024
