"""Recording a benchmark's numbers: one table row appended to its section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

#: the heading of each benchmark's section in RESULTS.md
SECTIONS = {
    "e2e": "## End to end on the lab",
    "engine-fleet": "## Engine on PostgreSQL, one and three instances",
    "api": "## API: authenticated scale requests over mTLS",
    "memory": "## Memory: daemon RSS at 10,000 hosts",
    "takeover": "## Takeover after kill -9",
    "api-fleet": "## API through one to three instances on PostgreSQL",
    "e2e-fleet": "## End to end at a vCenter's pace",
}


def machine_label() -> str:
    """``2 cores, 24 GiB, Python 3.11.7``: what the numbers were measured on."""
    kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
    return f"{os.cpu_count()} cores, {round(kib / 2**20)} GiB, Python {platform.python_version()}"


def append_row(section: str, cells: list[str]) -> None:
    """Append ``cells`` as the last row of the first table under the section's heading."""
    heading = SECTIONS[section]
    lines = RESULTS.read_text().splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise SystemExit(f"{RESULTS} has no section {heading!r}") from None
    index = start + 1
    while index < len(lines) and not lines[index].startswith("|"):
        index += 1
    while index < len(lines) and lines[index].startswith("|"):
        index += 1
    lines.insert(index, "| " + " | ".join(cells) + " |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"recorded in {RESULTS}")
