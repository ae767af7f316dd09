"""Fixtures the HTTP tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.rawserver import RawServer


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    """serve(*replies): a RawServer on 127.0.0.1 answering one connection per reply, closed after the test."""
    servers: list[RawServer] = []

    def start(*replies: Any) -> RawServer:
        servers.append(RawServer(list(replies)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
