"""RSA key generation with every core: the two primes searched in parallel, in forked processes.

Almost all of an RSA key's time is the search for its two primes, and each
search is a run of random trials: one process finds one prime after the
other. With more than one CPU, ``generate`` forks a searcher per CPU (before
anything in the process has used OpenSSL's random generator, so each seeds
its own); each asks OpenSSL's libcrypto for primes of half the key's size,
one after another (``BN_generate_prime_ex2``: random candidates with the top
two bits set, a sieve, then Miller-Rabin with the rounds OpenSSL chooses for
the size: 64 at 2048 bits), and hands each over a pipe. The first two that
make a key under FIPS 186-4 B.3.3's conditions are kept (both at least
sqrt(2) * 2^(k-1), which the top two bits give, so the modulus has exactly
the bits asked; p - 1 and q - 1 prime to e; |p - q| > 2^(bits/2 - 100);
d > 2^(bits/2)); the searchers are killed at once and reaped. cryptography
then builds the key (with its own consistency check). Primes and key stay in
these processes and their pipes; the searchers write nothing anywhere else,
and die with the process that forked them (PR_SET_PDEATHSIG). Without a
usable libcrypto, or on one CPU, cryptography's own generation runs.

Only agent/keygen.py's child process calls this: forking a daemon with
threads would not be safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import select
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

PUBLIC_EXPONENT = 65537
_PR_SET_PDEATHSIG = 1
MAX_SEARCHERS = 16  # past this, forking costs more than one more searcher gains
LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so")


def searchers() -> int:
    """How many prime searchers: the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_SEARCHERS))


class _LibCrypto:
    """The few libcrypto calls a prime searcher makes, through ctypes."""

    def __init__(self) -> None:
        lib = None
        for name in LIBCRYPTO_NAMES:
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(name)
                break
        if lib is None:
            raise OSError("no libcrypto")
        self.lib = lib
        lib.BN_secure_new.restype = ctypes.c_void_p
        lib.BN_CTX_secure_new.restype = ctypes.c_void_p
        lib.BN_generate_prime_ex2.restype = ctypes.c_int
        lib.BN_generate_prime_ex2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.BN_bn2binpad.restype = ctypes.c_int
        lib.BN_bn2binpad.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]

    def primes(self, bits: int) -> Iterator[bytes]:
        """Primes of exactly ``bits`` bits, top two bits set, one after another, as big-endian bytes."""
        prime, ctx = self.lib.BN_secure_new(), self.lib.BN_CTX_secure_new()
        if not prime or not ctx:
            raise OSError("libcrypto: out of memory")
        out = ctypes.create_string_buffer(bits // 8)
        while True:
            if self.lib.BN_generate_prime_ex2(prime, bits, 0, None, None, None, ctx) != 1:
                raise OSError("libcrypto: BN_generate_prime_ex2 failed")
            if self.lib.BN_bn2binpad(prime, out, bits // 8) != bits // 8:
                raise OSError("libcrypto: BN_bn2binpad failed")
            yield out.raw


def follow_parent(parent: int) -> bool:
    """Be SIGKILLed when the parent process ends (PR_SET_PDEATHSIG); False if ``parent`` is already gone (it
    ended before the signal was armed). A key generation nobody will store must not burn CPU."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's closed pipe ends us later
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent


def _search(write_fd: int, bits: int, parent: int) -> None:
    """A forked searcher: primes to ``write_fd`` until killed; never returns into the parent's code."""
    try:
        if follow_parent(parent):  # else nobody wants our primes
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)  # the daemon reads the parent's stdout to its end: no searcher may hold it open
            for prime in _LibCrypto().primes(bits):
                os.write(write_fd, prime)
    except BaseException:  # noqa: BLE001 (a broken pipe: the parent has what it wanted)
        pass
    finally:
        os._exit(1)


def parallel_primes(bits: int, count: int, exponent: int = PUBLIC_EXPONENT) -> tuple[int, int] | None:
    """Two primes for a ``bits``-bit RSA key with ``exponent``, searched by ``count`` forked searchers; None when
    libcrypto cannot be used here."""
    half = bits // 2
    size = half // 8
    try:
        _LibCrypto()
    except (OSError, AttributeError):
        return None
    pids: list[int] = []
    pending: dict[int, bytes] = {}  # read end -> the part of a prime read so far
    try:
        for _ in range(count):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                for other in pending:
                    os.close(other)
                _search(write_fd, half, os.getppid())
            os.close(write_fd)
            pids.append(pid)
            pending[read_fd] = b""
        kept: list[int] = []
        while pending:
            ready, _, _ = select.select(list(pending), [], [])
            for fd in ready:
                chunk = os.read(fd, size - len(pending[fd]))
                if not chunk:  # a searcher failed
                    del pending[fd]
                    os.close(fd)
                    continue
                pending[fd] += chunk
                if len(pending[fd]) < size:
                    continue
                prime, pending[fd] = int.from_bytes(pending[fd], "big"), b""
                for other in kept:
                    if _pair_ok(prime, other, bits, exponent):
                        return prime, other
                if math.gcd(prime - 1, exponent) == 1:
                    kept.append(prime)
        return None
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for fd in pending:
            os.close(fd)


def _pair_ok(p: int, q: int, bits: int, exponent: int) -> bool:
    """FIPS 186-4 B.3.3's conditions on a pair of probable primes (each already prime to e - 1)."""
    if math.gcd(p - 1, exponent) != 1 or (p * q).bit_length() != bits:
        return False
    if abs(p - q) <= 1 << (bits // 2 - 100):
        return False
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    return pow(exponent, -1, lam) > 1 << (bits // 2)


def _key_from_primes(p: int, q: int, exponent: int = PUBLIC_EXPONENT) -> RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    if p < q:
        p, q = q, p
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    d = pow(exponent, -1, lam)
    numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                    rsa.RSAPublicNumbers(exponent, p * q))
    return numbers.private_key()


def generate(bits: int, count: int | None = None) -> RSAPrivateKey:
    """An RSA private key of ``bits`` bits: primes from ``count`` searchers (default: one per CPU), else
    cryptography's own generation."""
    count = searchers() if count is None else count
    primes = parallel_primes(bits, count) if count > 1 and bits % 16 == 0 else None
    if primes is not None:
        return _key_from_primes(*primes)
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(PUBLIC_EXPONENT, bits)
