"""Scale decisions alone: ``Governor.scale`` called in-process, no HTTP, no TLS, engine stopped.

    .venv/bin/python -m bench.decisions --requests 40000 [--concurrency 32] [--chunk 5000]

Each request is ``add 1`` of the memory-plugin application with its own idempotency key, as the
API benchmark sends: persisted, decided by the rules, one host inserted. Prints the CPU time
(all threads) per decision for each chunk of requests, so that a cost growing with the hosts
already recorded shows as a rising column. The store is the daemon's own (SQLite in a temporary
state directory, decisions on its writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tomllib

from governord import testing
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.runtime import Runtime

from .common import DAEMON_CONFIG


async def run(requests: int, concurrency: int, chunk: int) -> list[tuple[int, float]]:
    """(requests so far, ms of CPU per decision in the chunk) for each chunk."""
    with tempfile.TemporaryDirectory() as tmp:
        plugins = PluginManager()
        plugins.register(testing.plugin, "testing")
        plugins.collect_types()
        raw = tomllib.loads(DAEMON_CONFIG.format(home=tmp, log_level="warning", workers=1, max_hosts=10 * requests))
        config = build_config("bench.toml", raw, plugins.providers, plugins.registrars, unavailable={})
        runtime = await Runtime.open(config, plugins)  # not started: no engine, no listeners
        done = 0
        results = []
        try:
            while done < requests:
                todo = list(range(done, min(requests, done + chunk)))
                size = len(todo)

                async def client(todo: list[int] = todo) -> None:
                    while todo:
                        key = f"bench-{todo.pop()}"
                        decision = await runtime.governor.scale("bench", "node", add=1, actor="bench",
                                                                idempotency_key=key)
                        assert decision.request["state"] == "accepted" and len(decision.hosts or []) == 1

                before = time.process_time()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                done += size
                results.append((done, 1000 * (time.process_time() - before) / size))
            live = await runtime.store.count_by_state()
            assert live == {"requested": requests}, live  # every decision really wrote its host
        finally:
            await runtime.store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    for done, ms in asyncio.run(run(args.requests, args.concurrency, args.chunk)):
        print(f"after {done:>7} decisions: {ms:.3f} ms CPU per decision")


if __name__ == "__main__":
    main()
