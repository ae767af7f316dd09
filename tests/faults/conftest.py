"""The fault matrix's lab vault keys: RSA-2048 root and brand keys, made in a fraction of a second.

The device key stays the RSA-4096 vector key (seed_key); what is under test is how the agent
reacts to a misbehaving vault, not the brand key's size, and RSA-4096 key generation on
cryptography 38 alone can take ten seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.labvault import LabVault

    directory = tmp_path_factory.mktemp("faults-lab")
    LabVault(directory, key_bits=2048)
    return directory
