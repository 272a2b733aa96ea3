"""The lab engine's inventory: one data center, one cluster, the templates governord's lab uses.

A seed file (``--seed FILE``, JSON) has the same shape as :func:`default_seed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def default_seed() -> dict[str, Any]:
    """A fresh copy of the default inventory."""
    return {
        "version": "4.5.7",
        "dhcp_network": "192.0.2.0/24",
        "data_centers": [{"name": "Default"}],
        "clusters": [{"name": "Default", "data_center": "Default", "description": "The default server cluster"}],
        "templates": [
            {
                "name": "rhel9-template",
                "cluster": "Default",
                "memory_mb": 2048,
                "guaranteed_mb": 1024,
                "max_memory_mb": 8192,
                "cpus": 2,
                "os": "rhel_9x64",
                "description": "RHEL 9 with cloud-init and the guest agent",
            },
        ],
    }


def load_seed(path: str | Path | None) -> dict[str, Any]:
    """The seed in ``path`` (JSON), or the default one."""
    if path is None:
        return default_seed()
    return json.loads(Path(path).read_text(encoding="utf-8"))
