"""factory-agent: first-boot device registration with a brand's Serial Vault."""

__version__ = "0.1.0"
