"""Crash points for tests/crash: the real daemon stops at a named point of its flow; the harness SIGKILLs it there.

Tests only. This directory goes on the PYTHONPATH of the daemon that the
crash harness starts (and so of its key generation child, which inherits
the environment). With ``FACTORY_AGENT_CRASH_AT`` unset nothing is wrapped:
the only effect of this file is that it runs the sitecustomize it shadows
(Debian's, if any), as Python would have.

With ``FACTORY_AGENT_CRASH_AT=<point>`` (and ``FACTORY_AGENT_CRASH_MARKER=<file>``;
``FACTORY_AGENT_CRASH_NTH=<n>`` picks the n-th time the point is reached,
default 1), an import hook wraps the agent functions around that point when
their modules load. At the point the process writes the marker (JSON:
point, pid) and sends SIGSTOP to its own thread: the process stops there, and
the harness, which waits for the marker and the stopped state, kills it with
a real SIGKILL. Nothing else changes: the wrapped functions do exactly what
they did, and the agent's code is not touched.

Points (the name says what is durable when the process dies):

``keygen``          in the key generation child, inside the RSA generation (the
                    child blocks there, as a slow armhf generation would; the
                    harness kills the daemon and checks the child follows it)
``key-temp``        the device key's temp file written and fsynced, not linked
``key-linked``      device-key.pem linked, its temp not yet unlinked, directory not fsynced
``key-durable``     save_device_key returned: the key is durable, state.json does not record it
``request-id``      the vault's request-id received (fetch_request_id returned)
``serial-received`` the vault's answer to the serial POST received, not yet checked or stored
``serial-temp``     serial.assertion's temp file written and fsynced, not renamed
``serial-durable``  save_serial returned: serial.assertion durable, state.json not registered
``state-temp``      a state.json temp written and fsynced, not renamed (FACTORY_AGENT_CRASH_NTH: which)
``state-registered-temp``  the temp of the state.json that says registered, written and fsynced, not renamed

``FACTORY_AGENT_CRASH_CANNED_KEY=<pem file>``, for points after key
generation where the generation itself is not what is tested: the keygen
child hands that key to the daemon instead of generating one (it still runs
as a child, and the daemon still stores the key itself). Saves seconds of
RSA-4096 per run on cryptography 38.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import threading
import time

ENV_POINT = "FACTORY_AGENT_CRASH_AT"
ENV_MARKER = "FACTORY_AGENT_CRASH_MARKER"
ENV_NTH = "FACTORY_AGENT_CRASH_NTH"
ENV_CANNED_KEY = "FACTORY_AGENT_CRASH_CANNED_KEY"
POINTS = ("keygen", "key-temp", "key-linked", "key-durable", "request-id", "serial-received", "serial-temp",
          "serial-durable", "state-temp", "state-registered-temp")
KEYGEN_BLOCK_SECONDS = 300.0  # a harness that never kills: the child gives up (and PDEATHSIG covers the rest)


def _chain_shadowed_sitecustomize() -> None:
    """Run the sitecustomize this one hides (Debian ships one), so that being on the path changes nothing."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        directory = os.path.abspath(entry or os.getcwd())
        if directory == here:
            continue
        candidate = os.path.join(directory, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            if spec is None or spec.loader is None:
                return
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:  # as site.py does: a broken sitecustomize must not stop the interpreter
                pass
            return


class _Point:
    """Counts arrivals at the configured point and stops the process at the n-th."""

    def __init__(self, name: str, marker: str, nth: int) -> None:
        self.name, self.marker, self.nth, self.seen = name, marker, nth, 0

    def reached(self, name: str) -> bool:
        if name != self.name:
            return False
        self.seen += 1
        return self.seen == self.nth

    def announce(self) -> None:
        """The marker, atomically: the harness reads the whole JSON or nothing."""
        part = f"{self.marker}.{os.getpid()}.part"
        with open(part, "w", encoding="utf-8") as f:
            json.dump({"point": self.name, "pid": os.getpid(), "nth": self.nth}, f)
        os.replace(part, self.marker)

    def stop_here(self, name: str) -> None:
        if self.reached(name):
            self.announce()
            # To this thread, not the process: a process-directed SIGSTOP is taken by whichever thread
            # the kernel picks (the event loop's, usually), and this one would run on meanwhile, past
            # the point. Taken by this thread, it stops here before the call returns; the group stop
            # then stops every other thread too, and the harness SIGKILLs the process.
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
            # Only a harness that sent SIGCONT gets here: go on as if nothing happened.


def _after(point: _Point, name: str, func):  # type: ignore[no-untyped-def]
    @functools.wraps(func)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = func(*args, **kwargs)
        point.stop_here(name)
        return result

    return wrapper


class _StoreOs:
    """What agent.store sees as ``os``: the real module, with the rename and link of write_durable observed."""

    def __init__(self, real, point: _Point) -> None:  # type: ignore[no-untyped-def]
        self._real, self._point = real, point

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._real, name)

    @staticmethod
    def _kind(dst) -> str | None:  # type: ignore[no-untyped-def]
        kinds = {"device-key.pem": "key", "serial.assertion": "serial", "state.json": "state"}
        return kinds.get(os.path.basename(os.fspath(dst)))

    def replace(self, src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        kind = self._kind(dst)
        if kind == "state" and self._point.name == "state-registered-temp":
            with open(src, "rb") as f:
                if json.loads(f.read()).get("phase") == "registered":
                    self._point.stop_here("state-registered-temp")
        if kind:
            self._point.stop_here(f"{kind}-temp")
        return self._real.replace(src, dst, *args, **kwargs)

    def link(self, src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        kind = self._kind(dst)
        if kind:
            self._point.stop_here(f"{kind}-temp")
        result = self._real.link(src, dst, *args, **kwargs)
        if kind:
            self._point.stop_here(f"{kind}-linked")
        return result


def _patch_store(module, point: _Point) -> None:  # type: ignore[no-untyped-def]
    module.os = _StoreOs(module.os, point)
    module.save_device_key = _after(point, "key-durable", module.save_device_key)
    module.Store.save_serial = _after(point, "serial-durable", module.Store.save_serial)


def _patch_vault(module, point: _Point) -> None:  # type: ignore[no-untyped-def]
    module.Vault.fetch_request_id = _after(point, "request-id", module.Vault.fetch_request_id)
    post_serial = module.Vault.post_serial

    @functools.wraps(post_serial)
    def posted(self, stream):  # type: ignore[no-untyped-def]
        answer = post_serial(self, stream)
        if isinstance(answer, module.Signed):
            point.stop_here("serial-received")
        return answer

    module.Vault.post_serial = posted


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader, patch) -> None:  # type: ignore[no-untyped-def]
        self.real, self.patch = real, patch

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        self.real.exec_module(module)  # type: ignore[attr-defined]
        self.patch(module)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.real, name)


class _CrashFinder(importlib.abc.MetaPathFinder):
    """Finds agent.store and agent.vault as usual, then patches them once executed."""

    def __init__(self, patches) -> None:  # type: ignore[no-untyped-def]
        self.patches = patches

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def _block_keygen(point: _Point) -> None:
    """In the key generation child: stop inside the generation until the harness kills our parent. With
    several CPUs that is inside the real parallel search, once two primes are in and the searchers it
    forked are still searching; on one CPU, inside cryptography's generation."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from agent import rsakey

    def blocking(real):  # type: ignore[no-untyped-def]
        @functools.wraps(real)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            if point.reached("keygen"):
                point.announce()
                deadline = time.monotonic() + KEYGEN_BLOCK_SECONDS
                while time.monotonic() < deadline:  # PR_SET_PDEATHSIG is armed by now: our parent's death ends us
                    time.sleep(0.05)
                raise SystemExit("crash harness: nobody killed the daemon")
            return real(*args, **kwargs)

        return wrapper

    rsakey._pair_ok = blocking(rsakey._pair_ok)
    rsa.generate_private_key = blocking(rsa.generate_private_key)


def _canned_keygen(path: str) -> None:
    """In the key generation child: "generate" the key in ``path``."""
    from cryptography.hazmat.primitives import serialization

    from agent import rsakey

    with open(path, "rb") as f:
        pem = f.read()

    def canned(*args, **kwargs):  # type: ignore[no-untyped-def]
        return serialization.load_pem_private_key(pem, password=None)

    rsakey.generate = canned


def _install() -> None:
    name = os.environ.get(ENV_POINT, "")
    if not name:
        return
    if name not in POINTS:
        sys.stderr.write(f"crash harness: unknown {ENV_POINT}={name!r}; points: {', '.join(POINTS)}\n")
        os._exit(2)
    point = _Point(name, os.environ[ENV_MARKER], int(os.environ.get(ENV_NTH, "1")))
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "agent.keygen" in argv:
        if name == "keygen":
            _block_keygen(point)
        elif os.environ.get(ENV_CANNED_KEY):
            _canned_keygen(os.environ[ENV_CANNED_KEY])
        return
    sys.meta_path.insert(0, _CrashFinder({
        "agent.store": lambda module: _patch_store(module, point),
        "agent.vault": lambda module: _patch_vault(module, point),
    }))


_chain_shadowed_sitecustomize()
_install()
