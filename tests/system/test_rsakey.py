"""RSA keys made with every core (agent/rsakey.py): as good as OpenSSL's own, the searchers gone after.

Each key is checked by cryptography (it builds the key from its numbers) and by OpenSSL itself
(`openssl pkey -check`), and against FIPS 186-4 B.3.3's conditions on its primes.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent import rsakey
from tests.conftest import REPO


def _check(key, bits: int) -> None:  # type: ignore[no-untyped-def]
    numbers = key.private_numbers()
    p, q, d, e, n = numbers.p, numbers.q, numbers.d, numbers.public_numbers.e, numbers.public_numbers.n
    assert key.key_size == bits and n.bit_length() == bits and p * q == n and e == 65537
    assert p.bit_length() == q.bit_length() == bits // 2
    assert min(p, q) >= math.isqrt(2 * (1 << (bits - 2)))  # >= sqrt(2) * 2^(bits/2 - 1)
    assert abs(p - q) > 1 << (bits // 2 - 100)
    assert math.gcd(e, p - 1) == math.gcd(e, q - 1) == 1
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    assert d * e % lam == 1 and d > 1 << (bits // 2)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    checked = subprocess.run(["openssl", "pkey", "-check", "-noout"], input=pem, capture_output=True)
    assert checked.returncode == 0 and b"Key is valid" in checked.stdout + checked.stderr, checked.stderr


def _alive(pid: int) -> bool:
    """Running, not gone and not a zombie (an orphan's reaper may be slow, or no reaper at all in a chroot)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("searchers", [2, 3])
def test_keys_from_parallel_searchers_are_as_good_as_openssls(searchers: int) -> None:
    before = set(_children(os.getpid()))  # an xdist worker may hold other tests' children
    keys = [rsakey.generate(2048, searchers) for _ in range(3)]
    for key in keys:
        _check(key, 2048)
    assert len({key.private_numbers().p for key in keys} | {key.private_numbers().q for key in keys}) == 6
    assert set(_children(os.getpid())) <= before  # every searcher killed and reaped


def test_a_4096_bit_key_from_two_searchers() -> None:
    primes = rsakey.parallel_primes(4096, 2)
    assert primes is not None
    _check(rsakey._key_from_primes(*primes), 4096)


def test_without_libcrypto_cryptography_generates_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rsakey, "LIBCRYPTO_NAMES", ("libcrypto-that-is-not-there.so.0",))
    before = set(_children(os.getpid()))
    assert rsakey.parallel_primes(2048, 2) is None
    _check(rsakey.generate(2048, 2), 2048)
    assert set(_children(os.getpid())) <= before


@pytest.mark.parametrize(("p_minus_q", "ok"), [(0, False), (1 << 900, False), (1 << 1000, True)])
def test_primes_too_close_are_not_paired(p_minus_q: int, ok: bool) -> None:
    """FIPS 186-4's |p - q| > 2^(nlen/2 - 100), checked on numbers of the right size (primality aside)."""
    q = (1 << 1023) + (1 << 1022) + 1
    p = q + p_minus_q
    if math.gcd(p - 1, 65537) != 1 or math.gcd(q - 1, 65537) != 1:
        pytest.skip("e divides p - 1")
    assert rsakey._pair_ok(p, q, 2048, 65537) is (ok and pow(65537, -1, (p - 1) * (q - 1) // math.gcd(p - 1, q - 1))
                                                  > 1 << 1024)


def test_the_searchers_die_with_the_key_generation_child() -> None:
    """A SIGKILLed keygen child (its daemon SIGKILLed) leaves no searcher burning CPU."""
    child = subprocess.Popen([sys.executable, "-m", "agent.keygen", "16384", str(os.getpid())], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while len(searchers := _children(child.pid)) < min(2, rsakey.searchers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if rsakey.searchers() < 2:
            pytest.skip("one CPU: no searchers to fork")
        assert len(searchers) == rsakey.searchers(), searchers
        time.sleep(0.3)  # let them reach prctl()
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, searchers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, searchers)), "a searcher outlived its parent"
    finally:
        child.kill()
        child.wait()
