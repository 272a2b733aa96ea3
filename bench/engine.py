"""Engine throughput: full lifecycles (provision, register, retire) of N hosts against the
in-process zero-latency provider and registrar (governord.testing), on SQLite in a temp dir.

    .venv/bin/python -m bench.engine --hosts 1000 [--workers 64]

Prints hosts per second for the scale-up (requested -> ready) and the retirement (-> gone),
and the daemon's peak RSS. Results are recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
import tomllib

from governord import testing
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.runtime import Runtime

from .common import DAEMON_CONFIG


def cpu_seconds() -> float:
    """CPU time of this process, all threads: steadier than wall time on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Arrivals:
    """Counts hosts arriving in a state, from the engine's own transition callbacks (polling
    the database would load the very store being measured)."""

    def __init__(self, runtime: Runtime) -> None:
        self.counts: dict[str, int] = {}
        self.changed = asyncio.Event()
        runtime.engine.on_transition.append(self._seen)

    def _seen(self, row: dict[str, object], _before: str) -> None:
        state = str(row["state"])
        self.counts[state] = self.counts.get(state, 0) + 1
        self.changed.set()

    async def wait(self, state: str, total: int) -> None:
        while self.counts.get(state, 0) < total:
            self.changed.clear()
            await self.changed.wait()


async def run(hosts: int, workers: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        plugins = PluginManager()
        plugins.register(testing.plugin, "testing")
        plugins.collect_types()
        # the API and memory benchmarks' daemon; its listeners are configured but not started here
        raw = tomllib.loads(DAEMON_CONFIG.format(home=tmp, log_level="warning", workers=workers, max_hosts=hosts))
        config = build_config("bench.toml", raw, plugins.providers, plugins.registrars, unavailable={})
        runtime = await Runtime.open(config, plugins)
        await runtime.start()
        arrivals = Arrivals(runtime)
        try:
            cpu_before = cpu_seconds()
            started = time.perf_counter()
            for _ in range(0, hosts, batch):
                await runtime.governor.scale("bench", "node", add=min(batch, hosts), actor="bench")
            accepted = time.perf_counter()
            await arrivals.wait("ready", hosts)
            ready = time.perf_counter()
            await runtime.governor.scale("bench", "node", count=0, actor="bench")
            await arrivals.wait("gone", hosts)
            counts = await runtime.store.count_by_state()
            assert counts == {"gone": hosts}, counts  # every host really went the whole way
            gone = time.perf_counter()
        finally:
            await runtime.stop()
    return {
        "hosts": hosts,
        "accept_s": accepted - started,
        "up_s": ready - started,
        "down_s": gone - ready,
        "total_s": gone - started,
        "lifecycles_per_s": hosts / (gone - started),
        "cpu_s": cpu_seconds() - cpu_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100, help="hosts per scale request")
    args = parser.parse_args()
    result = asyncio.run(run(args.hosts, args.workers, args.batch))
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
