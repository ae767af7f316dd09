"""RFC 7512 URIs for the hardware identity key in a token: what the agent reads of them, and what it refuses."""

from __future__ import annotations

import pytest

from agent import pkcs11
from agent.errors import ConfigError


def test_path_and_query_attributes_percent_decoded() -> None:
    uri = pkcs11.parse_uri("pkcs11:token=Factory%20Line%201;object=hw%2Did;id=%01%ab;serial=c598"
                           "?pin-source=file:/etc/factory-agent/token-pin&module-path=/usr/lib/softhsm/libsofthsm2.so")
    assert uri.path == {"token": b"Factory Line 1", "object": b"hw-id", "id": b"\x01\xab", "serial": b"c598"}
    assert uri.query == {"pin-source": "file:/etc/factory-agent/token-pin",
                         "module-path": "/usr/lib/softhsm/libsofthsm2.so"}
    assert uri.label == "hw-id"


@pytest.mark.parametrize("text, message", [
    ("pkcs11:token=t;object=o?pin-value=1234", "pin-source=file:/PATH"),
    ("pkcs11:token=t;object=o;x-vendor=1", "unknown attribute 'x-vendor'"),
    ("pkcs11:token=t", "name the key with object=LABEL"),
    ("pkcs11:token=t;object=o;type=public", "type= must be private"),
    ("pkcs11:token=t;object=o?module-name=softhsm2", "unknown attribute 'module-name'"),
    ("file:/k.pem", "not a pkcs11: URI"),
])
def test_what_is_refused_and_why(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        pkcs11.parse_uri(text)
    assert "1234" not in str(caught.value)  # a PIN, even a refused one, is never repeated
