"""Whether this instance can reach its peers, and whether what its tags name exists there.

Every ``[health] interval`` each provider and registrar instance is asked one cheap
authenticated question (the ``governord_probe_peer`` hook; the core's answer is the instance's
:meth:`~governord.providers.ConfiguredInstance.probe`), under ``[health] timeout``. A peer is
``up`` when it answered, ``down`` when it failed or did not answer in time (the reason is kept),
``unchecked`` when nobody can ask it. Each instance of a fleet checks for itself: readiness is
this instance's.

Liveness and readiness are two answers: ``/healthz`` says the process serves and its store
answers (restart it if not); ``/readyz`` says it can do its work: the store answers, a round of
probes has run since the start or the last reload, and no peer is down (route work elsewhere,
or page someone, if not). ``governord_peer_up`` is the metric; `governord-ctl status` shows each
peer with how long it has been as it is.

The tag mappings are checked against the registrars (``[health] check_mappings``): what the
tags name (a Foreman hostgroup or Puppet class, a Satellite system group or activation key)
must exist at the peer before a host fails on it. At start, and again after each reload taken, a
missing one is a warning, logged and shown in `governord-ctl status` and
``governord_tag_mapping_problems``; a reload whose new
or changed mappings name a missing one is refused (mappings the running config already had are
reported, not refused: the reload may be the fix of something else). A registrar that cannot be
asked does not refuse anything: it is reported as unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ..config import Config
    from ..registrars import Registrar
    from . import Dispatcher

log = logging.getLogger(__name__)

PROBE_HOOK = "governord_probe_peer"


@dataclass
class Peer:
    """One provider or registrar instance as this instance last saw it."""

    kind: str
    name: str
    type: str
    #: True: answered its last probe; False: failed it; None: not probed yet, or nobody asks it
    up: bool | None = None
    probed: bool = False
    error: str | None = None
    #: when the last probe ended, and when ``up`` last changed (Unix time)
    checked_at: float | None = None
    since: float | None = None
    #: how long the last probe took
    seconds: float | None = None

    @property
    def state(self) -> str:
        if not self.probed:
            return "unknown"
        return {True: "up", False: "down", None: "unchecked"}[self.up]

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "type": self.type, "state": self.state, "error": self.error,
                "checked_at": self.checked_at, "since": self.since, "seconds": self.seconds}


@dataclass(frozen=True)
class MappingCheck:
    """What the registrars said of the tag mappings: missing things, and who could not be asked."""

    problems: list[ConfigError]
    #: "REGISTRAR: why" for each registrar that could not be asked
    unchecked: list[str]
    at: float
    #: how many of ``problems`` each registrar that was asked answered
    counts: dict[str, int]

    def view(self) -> dict[str, Any]:
        return {"at": self.at, "problems": [f"{p.key}: {p.message}" for p in self.problems],
                "unchecked": self.unchecked}


class PeerHealth:
    """This instance's probes of its peers (see the module's documentation)."""

    def __init__(self, dispatcher: Dispatcher, config: Config, registry: CollectorRegistry) -> None:
        self.dispatcher = dispatcher
        self.peers: dict[tuple[str, str], Peer] = {}
        #: the last check of the tag mappings (None: not yet)
        self.mappings: MappingCheck | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._mappings_due = True
        self.configure(config)
        registry.register(_PeerCollector(self))

    def configure(self, config: Config) -> None:
        """Take a (new) config: its instances are the peers; one of the same name and type keeps
        what is known of it, and a round of probes runs at once."""
        self.config = config
        peers: dict[tuple[str, str], Peer] = {}
        for kind, sections in (("provider", config.providers), ("registrar", config.registrars)):
            for name, section in sections.items():
                known = self.peers.get((kind, name))
                same = known is not None and known.type == section.type
                peers[(kind, name)] = known if same and known is not None else Peer(kind, name, section.type)
        for peer in peers.values():
            peer.probed = False  # the new instances are asked before this instance is ready again
        self.peers = peers
        self._mappings_due = True
        self._wake.set()

    def readiness(self, *, detail: bool = True) -> list[str]:
        """Why this instance is not ready, as far as its peers go (empty: ready); ``detail``: with
        each failure in its own words, else only which peer."""
        reasons = []
        for peer in self.peers.values():
            if not peer.probed:
                reasons.append(f"{peer.kind} {peer.name}: not probed yet")
            elif peer.up is False:
                reasons.append(f"{peer.kind} {peer.name}: {peer.error if detail else 'down'}")
        return reasons

    def view(self) -> list[dict[str, Any]]:
        return [peer.view() for peer in self.peers.values()]

    async def probe(self, peer: Peer) -> None:
        timeout = self.config.core.health.timeout
        started = time.monotonic()
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                outcomes = await self.dispatcher.collect(PROBE_HOOK, kind=peer.kind, name=peer.name)
        except TimeoutError:
            up: bool | None = False
            error = f"no answer within {timeout:g}s ([health] timeout)"
        else:
            failed = [o for o in outcomes if o.error is not None]
            if failed:
                up = False
                error = "; ".join(f"{o.error}" or type(o.error).__name__ for o in failed)
            else:
                up = True if any(o.value for o in outcomes) else None
        now = time.time()
        if peer.up is not up or not peer.probed:
            if up is False:
                log.warning("%s %s cannot be reached: %s", peer.kind, peer.name, error,
                            extra={"peer": peer.name, "kind": peer.kind})
            elif up and peer.up is False:
                log.info("%s %s answers again", peer.kind, peer.name, extra={"peer": peer.name, "kind": peer.kind})
            if peer.up is not up:
                peer.since = now
        peer.up, peer.error, peer.probed = up, error, True
        peer.checked_at, peer.seconds = now, time.monotonic() - started

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(peer) for peer in list(self.peers.values())))

    async def check_mappings(self, registrars: Mapping[str, Registrar], config: Config | None = None,
                             previous: Config | None = None) -> MappingCheck:
        """Ask each registrar whether what ``config``'s tags name for it exists (see the module's
        documentation). ``previous``: the running config; then only the mappings it did not
        have, or had otherwise, are in ``problems``, the rest is logged."""
        config = config or self.config
        problems: list[ConfigError] = []
        unchecked: list[str] = []
        counts: dict[str, int] = {}
        for name, registrar in registrars.items():
            mappings = {tag: d.mappings[name] for tag, d in config.tags.items() if name in d.mappings}
            if not mappings:
                continue
            try:
                async with asyncio.timeout(config.core.health.timeout):
                    await registrar.ensure_started()
                    found = await registrar.check_mappings(mappings)
            except Exception as exc:  # noqa: BLE001 - a registrar that cannot be asked refuses nothing
                unchecked.append(f"{name}: {exc or type(exc).__name__}")
                log.warning("could not check the tags' mappings at registrar %s: %s", name, exc)
                continue
            counts[name] = len(found)
            for (tag, key), why in found.items():
                error = ConfigError(config.path, f"tags.{tag}.{name}.{key}", why)
                old = previous.tags.get(tag) if previous is not None else None
                unchanged = (old is not None and old.mappings.get(name) == mappings[tag]
                             and previous is not None and previous.registrars.get(name) == config.registrars[name])
                if unchanged:
                    log.warning("the running config names what registrar %s does not have: %s", name, error)
                else:
                    problems.append(error)
        check = MappingCheck(problems, unchecked, time.time(), counts)
        if previous is None:
            self.mappings = check
            for problem in problems:
                log.warning("a tag names what its registrar does not have; hosts with it will fail: %s", problem)
            if not problems and not unchecked:
                log.info("every tag mapping names what its registrar has")
        return check

    # -- the periodic rounds ----------------------------------------------------------------------

    def start(self, registrars: Callable[[], Mapping[str, Registrar]]) -> None:
        """Probe at every interval, and at once after a reload; check the tags' mappings at start
        and after each reload taken (``registrars``: the instances of the config now)."""
        self._task = asyncio.create_task(self._run(registrars), name="peer-health")

    async def _run(self, registrars: Callable[[], Mapping[str, Registrar]]) -> None:
        while True:
            self._wake.clear()
            if self._mappings_due:
                self._mappings_due = False
                if self.config.core.health.check_mappings:
                    await self.check_mappings(registrars())
                else:
                    self.mappings = None
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - the checks go on
                log.exception("a round of peer probes failed")
            try:
                async with asyncio.timeout(self.config.core.health.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class _PeerCollector(Collector):
    """``governord_peer_up``, ``governord_peer_probe_duration_seconds`` and
    ``governord_tag_mapping_problems``, read at scrape time."""

    def __init__(self, health: PeerHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["kind", "name", "type"]
        up = GaugeMetricFamily("governord_peer_up", "1 if the provider or registrar instance answered its last "
                               "probe, 0 if it failed or timed out (none before the first probe, or where "
                               "nobody can ask it)", labels=labels)
        seconds = GaugeMetricFamily("governord_peer_probe_duration_seconds", "How long the last probe of the "
                                    "provider or registrar instance took", labels=labels)
        for peer in self.health.peers.values():
            if not peer.probed:
                continue
            if peer.up is not None:
                up.add_metric([peer.kind, peer.name, peer.type], 1.0 if peer.up else 0.0)
            if peer.seconds is not None:
                seconds.add_metric([peer.kind, peer.name, peer.type], peer.seconds)
        yield up
        yield seconds
        problems = GaugeMetricFamily("governord_tag_mapping_problems", "What the tags name that the registrar "
                                     "said it does not have, at the last check (start, or the last reload taken)", labels=["registrar"])
        check = self.health.mappings
        if check is not None:
            for registrar, count in check.counts.items():
                problems.add_metric([registrar], float(count))
        yield problems
