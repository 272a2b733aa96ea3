"""Provider conformance: the reusable contract (contract.py) and one module per provider type running it."""
