"""The simulator's seed data: what exists before any request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEED_FILE = Path(__file__).with_name("seed.json")


def load_seed(path: str | Path | None = None) -> dict[str, Any]:
    """The seed at ``path``, or the default one shipped beside this module."""
    with open(path or SEED_FILE, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def default_seed() -> dict[str, Any]:
    """The default lab seed: one organization, location, domain and environment, OpenShift groups."""
    return load_seed(None)
