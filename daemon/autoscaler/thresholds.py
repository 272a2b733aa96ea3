"""Scaling a role on the platform's own load: each role with an ``autoscale`` rule
(``[applications.APP.roles.ROLE.autoscale]``) has its PromQL query asked of the ``[prometheus]``
server every ``interval`` seconds.

- A value above ``scale_up_above`` that stays above it at every evaluation for ``scale_up_for``
  seconds asks for ``scale_up_step`` more hosts; one below ``scale_down_below`` for
  ``scale_down_for`` seconds asks for ``scale_down_step`` fewer. Between the two thresholds
  nothing is asked and both holds start again (hysteresis: the role cannot flap on a value
  that hovers around one threshold).
- What is asked is an ordinary scale request of the application (actor ``autoscale``), decided by
  its rules like any other: max_hosts and the providers' caps, the application's cooldown,
  approval, min_hosts, the deletion policy (and a drain before a host goes, where configured). The
  request carries the query, its value, the threshold and how long it held (``params.trigger``),
  so its audit event (``request-accepted``/``-declined``/``-pending``) says why it was made.
- After asking (whatever the rules decided) the rule waits ``cooldown`` seconds, and its holds
  start again from the moment it asked: a cap that declines is not asked again at every
  evaluation, and a load that stays high is met again once the cooldown is over.
- A query that fails (unreachable, refused, several series) or returns no data (no series, NaN)
  is never acted on, in either direction, and breaks both holds: a scrape gap cannot add up to a
  scale-down. It is logged (once while it lasts) and counted.
- ``dry_run``: the rule is evaluated the same way, and an action is logged and audited
  (``autoscale-dry-run``, with what the rules would decide now) instead of asked.

In a fleet only the leader evaluates, holding the ``autoscale`` job lease for each round. Holds
are the evaluating instance's own: after a failover the new leader starts them afresh (it waits
the whole hold again: late, never early). The cooldown survives it: it is read from the last
request the autoscaler made for the role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..fleet import AUTOSCALE, Busy
from ..store import log_failed
from .prometheus import NoData, PrometheusClient, QueryError

if TYPE_CHECKING:
    from ..config import AutoscaleRule, Config
    from ..fleet import Fleet
    from ..rules import Governor
    from ..store import Store

log = logging.getLogger(__name__)

#: the actor of the requests (and audit events) the autoscaler makes
ACTOR = "autoscale"
#: longest sleep of the loop between looking for due rules (a reload is taken at the next look)
TICK = 1.0


@dataclass
class Hold:
    """One role's evaluation state (the evaluating instance's own)."""

    #: since when the value has been above scale_up_above / below scale_down_below, at every evaluation
    above_since: float | None = None
    below_since: float | None = None
    #: when this rule last asked (or, dry, would have asked); None: never, or not read yet
    last_action: float | None = None
    #: whether last_action was read from the store since this instance began evaluating
    seeded: bool = False
    next_due: float = 0.0
    value: float | None = None
    #: the last evaluation's outcome: above, below, within, holding, cooldown, acted, no_data, error
    outcome: str | None = None
    error: str | None = None
    evaluated_at: float | None = None


class ThresholdScaler:
    """Evaluates every role's ``autoscale`` rule and asks the Governor to scale."""

    def __init__(self, governor: Governor, store: Store, config: Config, fleet: Fleet,
                 registry: CollectorRegistry) -> None:
        self.governor = governor
        self.store = store
        self.config = config
        self.fleet = fleet
        self.client = self._client(config)
        self.holds: dict[tuple[str, str], Hold] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self.evaluations = Counter(
            "governord_autoscale_evaluations_total",
            "Evaluations of roles' autoscale rules by outcome (above, below, within: the value against the "
            "thresholds; holding: not held long enough yet; cooldown; acted; dry_run; no_data; error)",
            ["app", "role", "outcome"], registry=registry)
        self.values = Gauge("governord_autoscale_value", "The last value of a role's autoscale query",
                            ["app", "role"], registry=registry)
        self.actions = Counter(
            "governord_autoscale_requests_total",
            "Scale requests the autoscaler made, by direction and the rules' decision (accepted, declined, pending; "
            "dry_run: only logged)", ["app", "role", "direction", "decision"], registry=registry)

    @staticmethod
    def _client(config: Config) -> PrometheusClient | None:
        return PrometheusClient(config.core.prometheus) if config.core.prometheus is not None else None

    def rules(self) -> dict[tuple[str, str], AutoscaleRule]:
        return {(app, role): section.autoscale for app, app_section in self.config.applications.items()
                for role, section in app_section.roles.items() if section.autoscale is not None}

    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="autoscale")

    async def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: rules that changed start their holds afresh."""
        old = self.rules()
        self.config = config
        new = self.rules()
        for key in list(self.holds):
            if key not in new or new[key] != old.get(key):
                del self.holds[key]
        client, self.client = self.client, self._client(config)
        if client is not None:
            await client.close()
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.client is not None:
            await self.client.close()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.fleet.is_leader:
                self.holds.clear()  # whoever leads now holds; if this instance leads again, it starts afresh
            elif any(time.monotonic() >= self._hold(key).next_due for key in self.rules()):
                try:
                    async with self.fleet.exclusive(AUTOSCALE) as lease:
                        await self.evaluate_due(lambda: lease.held and not self._stopping)
                except Busy as busy:
                    log.info("autoscale round skipped: %s", busy)
                except Exception as exc:  # noqa: BLE001 - a failed round must not end the later ones
                    log_failed(log, "evaluating autoscale rules", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=TICK)

    def _hold(self, key: tuple[str, str]) -> Hold:
        return self.holds.setdefault(key, Hold())

    async def evaluate_due(self, go_on: Any = lambda: True) -> None:
        """Evaluate each rule whose interval has passed (all at once: their queries run together)."""
        now = time.monotonic()
        due = [(key, rule) for key, rule in self.rules().items() if now >= self._hold(key).next_due]
        for key, rule in due:
            self._hold(key).next_due = now + rule.interval
        await asyncio.gather(*(self.evaluate(key[0], key[1], rule, go_on) for key, rule in due))

    # -- one rule -------------------------------------------------------------------------------

    async def evaluate(self, app: str, role: str, rule: AutoscaleRule, go_on: Any = lambda: True) -> str:
        """Evaluate one role's rule once, act if it says so; the outcome."""
        hold = self._hold((app, role))
        if not hold.seeded:
            hold.last_action = await self._last_request(app, role)
            hold.seeded = True
        now = time.time()
        hold.evaluated_at = now
        outcome = await self._judge(app, role, rule, hold, now)
        if outcome in ("up", "down"):
            if not go_on():  # the job lease was lost (or the daemon stops): the new holder judges afresh
                return "skipped"
            await self._act(app, role, rule, hold, outcome, now)
            outcome = "dry_run" if rule.dry_run else "acted"
        hold.outcome = outcome
        self.evaluations.labels(app, role, outcome).inc()
        return outcome

    async def _judge(self, app: str, role: str, rule: AutoscaleRule, hold: Hold, now: float) -> str:
        """Read the value and move the holds; "up"/"down" when the rule should act now."""
        if self.client is None:
            return "error"
        try:
            value = await self.client.value(rule.query)
        except QueryError as exc:
            hold.above_since = hold.below_since = None
            hold.value = None
            with contextlib.suppress(KeyError):  # no value is known: no series
                self.values.remove(app, role)
            outcome = "no_data" if isinstance(exc, NoData) else "error"
            if hold.error != str(exc):  # once while it lasts
                log.warning("autoscale %s/%s: %s, nothing is asked: %s", app, role,
                            "no data" if outcome == "no_data" else "the query failed", exc,
                            extra={"app": app, "role": role, "query": rule.query})
            hold.error = str(exc)
            return outcome
        if hold.error is not None:
            log.info("autoscale %s/%s: the query answers again (%g)", app, role, value, extra={"app": app, "role": role})
        hold.error = None
        hold.value = value
        self.values.labels(app, role).set(value)
        if value > rule.scale_up_above:
            hold.below_since = None
            hold.above_since = hold.above_since if hold.above_since is not None else now
            since, needed, outcome = hold.above_since, rule.scale_up_for, "above"
        elif value < rule.scale_down_below:
            hold.above_since = None
            hold.below_since = hold.below_since if hold.below_since is not None else now
            since, needed, outcome = hold.below_since, rule.scale_down_for, "below"
        else:
            hold.above_since = hold.below_since = None
            return "within"
        if hold.last_action is not None and now - hold.last_action < rule.cooldown:
            return "cooldown"
        if now - since < needed:
            return "holding"
        return "up" if outcome == "above" else "down"

    async def _act(self, app: str, role: str, rule: AutoscaleRule, hold: Hold, direction: str, now: float) -> None:
        since = hold.above_since if direction == "up" else hold.below_since
        assert since is not None and hold.value is not None
        add = rule.scale_up_step if direction == "up" else -rule.scale_down_step
        trigger = {"autoscale": {
            "query": rule.query, "value": hold.value, "direction": direction,
            "threshold": rule.scale_up_above if direction == "up" else rule.scale_down_below,
            "held_for": round(now - since, 3), "step": abs(add), "dry_run": rule.dry_run,
        }}
        hold.above_since = hold.below_since = None
        hold.last_action = now
        if rule.dry_run:
            plan = await self.governor.plan(app, role, add=add, count=None)
            log.info("autoscale %s/%s (dry run): %s=%g %s %g for %.0fs: would ask %+d host(s); the rules would "
                     "decide %s (%s: %s)", app, role, "value", hold.value, ">" if direction == "up" else "<",
                     trigger["autoscale"]["threshold"], now - since, add, plan["decision"], plan["rule"],
                     plan["reason"], extra={"app": app, "role": role, **trigger["autoscale"]})
            decided = {"decision": plan["decision"], "rule": plan["rule"], "reason": plan["reason"],
                       "hosts": [h["name"] for h in plan["hosts"]], "release": plan["release"]}
            await self.store.decide(lambda tx: tx.add_event("autoscale-dry-run", actor=ACTOR, detail={
                "app": app, "role": role, **trigger["autoscale"], **decided}))
            self.actions.labels(app, role, direction, "dry_run").inc()
            return
        decision = await self.governor.scale(app, role, add=add, actor=ACTOR, trigger=trigger)
        request = decision.request
        log.info("autoscale %s/%s: %g %s %g for %.0fs: asked %+d host(s), %s (%s)", app, role, hold.value,
                 ">" if direction == "up" else "<", trigger["autoscale"]["threshold"], now - since, add,
                 request["state"], request["reason"], extra={"app": app, "role": role, "request_id": request["id"]})
        self.actions.labels(app, role, direction, request["state"]).inc()

    async def _last_request(self, app: str, role: str) -> float | None:
        """When the autoscaler last asked for this role (its cooldown survives a restart or failover)."""
        for request in await self.store.list_requests(app=app, limit=200):
            if request["actor"] == ACTOR and request["params"].get("role") == role:
                return float(request["created_at"])
        return None

    # -- what operators see --------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each rule with its last evaluation, as this instance saw it (the leader's is the one that acts)."""
        out = []
        for (app, role), rule in sorted(self.rules().items()):
            hold = self.holds.get((app, role), Hold())
            out.append({
                "app": app, "role": role, "query": rule.query, "scale_up_above": rule.scale_up_above,
                "scale_down_below": rule.scale_down_below, "dry_run": rule.dry_run,
                "evaluating": self.fleet.is_leader, "value": hold.value, "outcome": hold.outcome,
                "error": hold.error, "evaluated_at": hold.evaluated_at, "above_since": hold.above_since,
                "below_since": hold.below_since, "last_action": hold.last_action,
            })
        return out

