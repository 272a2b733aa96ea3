"""File descriptors: the daemon raises its soft limit to the hard one at start, and a
configuration whose connection cap does not fit under the limit is refused (exit 2 naming
``api.max_connections``). Kept apart from the API code: ``governord --check`` needs it, and no
aiohttp."""

from __future__ import annotations

import resource

#: descriptors kept for everything but the application API's connections: the database, the
#: admin socket and its clients, the log, the plugins' connections to their peers, the thread pools
RESERVED_DESCRIPTORS = 64


def descriptor_limit() -> int | None:
    """The most descriptors this process can have (the hard limit), None if unlimited."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if hard == resource.RLIM_INFINITY else hard


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit to the hard one (systemd's LimitNOFILE= sets both; a shell
    usually gives a low soft one); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # unlimited hard limit above the kernel's nr_open
            pass
    return soft


def descriptor_shortfall(max_connections: int, limit: int | None) -> str | None:
    """Why ``max_connections`` cannot be held under the descriptor limit, or None if it can."""
    needed = max_connections + RESERVED_DESCRIPTORS
    if limit is None or needed <= limit:
        return None
    return (f"{max_connections} connections and {RESERVED_DESCRIPTORS} descriptors for the rest need a "
            f"descriptor limit of {needed}; this process may open {limit} (raise LimitNOFILE= in the unit, "
            f"or lower max_connections to {max(limit - RESERVED_DESCRIPTORS, 0)})")
