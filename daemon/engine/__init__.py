"""The lifecycle engine: one durable state machine per host.

    requested -> provisioning -> registering -> configuring -> ready
    ready -> draining (a scale-down, where the application drains) -> retiring, or back to ready
    retiring -> deregistering -> deprovisioning -> cleaning -> gone
    any step -> failed (failed_step names it; retry resumes it)
    a bring-up step failed for good -> retiring ... -> gone, failed_step and error kept (rollback)

Every external call is preceded and followed by a committed write: the try counter and a
``step-started`` event are committed before the call, the result and the next state after it.
After ``kill -9`` the host stays in the same state, leased to the dead instance: the instance's
next start frees its leases at once (same instance name), or another instance of the fleet
claims the host when the lease runs out; either way the step runs again, and it is idempotent
(providers find the machine by its ownership marker, registrars upsert), so nothing is made twice.

Every claim increments the host's fencing token and every write names the token it claimed
with: an instance paused or cut off past its lease gets its late writes refused, and the lease
renewal tells it which hosts another instance took, so it stops working on them (see
:mod:`governord.store`).

While the store cannot be reached the engine keeps running: a round that cannot claim claims
nothing (the loop tries again each second), and a host whose write failed stays as last
committed; its lease is given back as soon as the store answers again (or runs out), and its
step runs again, as after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, case
from sqlalchemy.engine import Connection

from ..dispatch import Dispatcher, as_step_error, is_retryable, observe
from ..errors import PermanentError, StepError
from ..models import (
    PROVIDER_ID_FILE,
    PROVIDER_ID_PARAMETER,
    HostOrigin,
    HostState,
    Machine,
    MachineSpec,
    NetworkAssignment,
    provider_id,
)
from ..registrars import Phase
from ..store import Row, Store, host_view, log_failed, unavailable
from ..store.schema import hosts
from . import callbacks

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

#: Which step a working state performs; the failed host keeps this name in ``failed_step``.
STEP_OF_STATE = {
    HostState.REQUESTED: "classify",
    HostState.PROVISIONING: "provision",
    HostState.REGISTERING: "register",
    HostState.CONFIGURING: "configure",
    HostState.DRAINING: "drain",
    HostState.RETIRING: "retire",
    HostState.DEREGISTERING: "deregister",
    HostState.DEPROVISIONING: "deprovision",
    HostState.CLEANING: "clean",
}
STATE_OF_STEP = {step: state for state, step in STEP_OF_STATE.items()}
#: steps that only ask (readiness polls): they change nothing outside, so nothing brackets them
READ_ONLY_STEPS = frozenset({"configure", "drain"})
#: ready, unless a tag change arrived while the host was being configured: then register again
READY_UNLESS_RETAGGED = case(
    (hosts.c.tags_rev == bindparam("configured_tags_rev"), HostState.READY.value),
    else_=HostState.REGISTERING.value,
)
#: when a waiting host is asked again: at once if it was asked to retire meanwhile (a drain
#: confirmed, an operator's retire), else after its poll
NEXT_POLL_UNLESS_RETIRING = case((hosts.c.retire_requested, 0.0), else_=bindparam("next_poll"))
#: steps that bring a host up: what they made is undone when one fails for good (rollback)
BRING_UP_STEPS = frozenset({"classify", "provision", "register", "configure"})
_TEARDOWN_STATES = frozenset({HostState.RETIRING.value, HostState.DEREGISTERING.value,
                              HostState.DEPROVISIONING.value, HostState.CLEANING.value})


def rolling_back(row: Row) -> bool:
    """Is the host being taken down because bringing it up failed for good? Its ``failed_step``
    and ``error`` then keep the reason through the teardown, and stay on the gone host."""
    return row["failed_step"] is not None and row["state"] in _TEARDOWN_STATES


class NotReady(Exception):
    """The host is not configured yet: ask again after ``delay`` seconds (not a failure)."""

    def __init__(self, delay: float, waiting_for: list[str]) -> None:
        self.delay = delay
        self.waiting_for = waiting_for
        super().__init__(f"waiting for {', '.join(waiting_for)}")


@dataclass
class StepResult:
    """What a step asks the engine to commit."""

    state: HostState
    values: dict[str, Any]
    event: str
    detail: dict[str, Any]
    #: run in the same transaction as the transition, given the new row
    after: Callable[[Connection, Row], None] | None = None
    #: values for bind parameters of SQL expressions in ``values``
    binds: dict[str, Any] | None = None


class Engine:
    """Claims hosts with due work, runs their steps, commits every transition."""

    def __init__(self, store: Store, dispatcher: Dispatcher, config: Config, *, owner: str | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.config = config
        #: the lease owner of this instance's steps: ``INSTANCE/<incarnation>``
        self.owner = owner or f"{config.fleet.instance}/{uuid.uuid4().hex[:12]}"
        #: the instance's name (the fleet's ``[fleet] instance``)
        self.node = self.owner.rsplit("/", 1)[0]
        #: writes refused because the lease they were made under was lost (stale fencing token)
        self.fenced_out = 0
        #: steps stopped because the lease renewal found another instance holding their host
        self.taken_over = 0
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: the fencing token each host in ``_tasks`` was claimed with, while its lease is held
        #: (a task that released its host's lease is ending: nothing of it is renewed)
        self._tokens: dict[str, int] = {}
        #: hosts whose classify step failed after a registrar prepared them (while the step ends)
        self._prepared: set[str] = set()
        #: hosts whose current step was started by the commit that ended the step before
        self._started: set[str] = set()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.on_transition: list[Callable[[Row, str], None]] = []
        #: called after every run of a step with (the host as the step began, the step, its
        #: seconds, its outcome: "done", "waiting" (not configured yet), "retry" (failed, to be
        #: tried again) or "failed" (failed for good))
        self.on_step: list[Callable[[Row, str, float, str], None]] = []
        #: hosts whose task ended without giving its lease back (the store could not be
        #: reached): given back, fenced on the lease, once it can
        self._unreleased: set[str] = set()

    # -- running --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming work. (The fleet membership, joined before, has freed the leases of
        this instance's earlier incarnation.)"""
        self._runner = asyncio.create_task(self._run(), name="engine")
        self._renewer = asyncio.create_task(self._renew_leases(), name="engine-leases")

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def tasks_in_flight(self) -> list[asyncio.Task[None]]:
        """The hosts' tasks running now (each runs its host's steps until the host rests)."""
        return list(self._tasks.values())

    async def stop(self, grace: float) -> None:
        """Stop claiming; let running steps finish for ``grace`` seconds, then cancel them.

        A cancelled step leaves its host in its working state with the lease released, so the
        next start runs the step again (it is idempotent).
        """
        self._stopping = True
        self._wake.set()
        if self._runner:
            await self._runner
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks.values()), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._renewer:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        # leases of parked steps: free them so a restart need not wait for expiry
        try:
            await self.store.release_leases_of(self.owner)
        except Exception as exc:  # noqa: BLE001 - the store away: the leases expire, the next start frees them
            log_failed(log, "freeing the leases at stop", exc)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                if await self._claim():
                    continue  # every free worker got a host: there may be more due
                next_due = await self.store.next_due_at()
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the engine
                log_failed(log, "claiming work", exc)  # once a round: the store away, once a second
                next_due = None
            timeout = 1.0
            if next_due is not None:
                timeout = max(0.05, min(timeout, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _claim(self) -> bool:
        """Give back the leases of hosts whose tasks ended while the store was away (only those
        still ours: their steps run again now, not when the leases run out), then claim due
        hosts for the free workers and start them. True if it filled every free worker."""
        if self._unreleased:
            ids = sorted(self._unreleased)
            await self.store.release_leases(self.owner, ids)
            self._unreleased.difference_update(ids)
            log.info("gave back the leases of hosts interrupted while the store was away", extra={"hosts": len(ids)})
        free = self.config.engine.workers - len(self._tasks)
        if free <= 0:
            return False
        claimed = await self.store.claim_due(self.owner, free, self.config.engine.lease_seconds)
        for row in claimed:
            stale = self._tasks.get(row["id"])
            if stale is not None:
                # its lease ran out while this instance was paused: the step started
                # under the old token can write nothing more; the new claim goes on
                stale.cancel()
            task = asyncio.create_task(self._work(row), name=f"host-{row['name']}")
            self._tasks[row["id"]] = task
            self._tokens[row["id"]] = row["lease_token"]
            task.add_done_callback(functools.partial(self._finished, row["id"]))
        return len(claimed) == free

    def _finished(self, host_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(host_id) is task:
            del self._tasks[host_id]
            self._tokens.pop(host_id, None)
        self._wake.set()

    async def _renew_leases(self) -> None:
        interval = self.config.engine.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                tokens = dict(self._tokens)
                lost = await self.store.renew_leases(self.owner, tokens, self.config.engine.lease_seconds)
            except Exception as exc:  # noqa: BLE001
                log_failed(log, "renewing leases", exc)
                continue
            for host_id, holder in lost.items():
                # the lease ran out (this instance was paused or cut off) and another instance
                # claimed the host (and may be done with it already): stop working on it; its
                # writes would be refused anyway, but its calls outside would still be made
                task = self._tasks.get(host_id)
                # (unless this instance has claimed it again meanwhile: a new task, a new token)
                if task is not None and not task.done() and self._tokens.get(host_id) == tokens[host_id]:
                    self.taken_over += 1
                    log.warning("host %s was taken over by %s: its step here is stopped", host_id,
                                holder or "another instance (which has released it since)",
                                extra={"host_id": host_id, "holder": holder})
                    task.cancel()

    # -- one host ---------------------------------------------------------------------------

    async def _fence(self, row: Row, values: dict[str, Any], **kwargs: Any) -> Row | None:
        """Write ``values`` to the host of ``row`` if this instance still holds the lease it
        claimed the host with (owner and fencing token): the new row, or None if the lease
        is lost (the write changed nothing)."""
        new = await self.store.fenced_update(row["id"], self.owner, values, token=row["lease_token"], **kwargs)
        if new is not None and kwargs.get("release") and self._tokens.get(row["id"]) == row["lease_token"]:
            del self._tokens[row["id"]]
        if new is None:
            self.fenced_out += 1
            log.warning("host %s: lease lost, the write of a stale claim was refused", row["name"],
                        extra={"host": row["name"], "token": row["lease_token"]})
        return new


    async def _work(self, claimed: Row) -> None:
        """Run steps of one host until it rests (ready, gone, failed, or waiting to retry)."""
        row: Row | None = claimed
        try:
            while row is not None and not self._stopping:
                row = await self._advance(row)
        except asyncio.CancelledError:
            log.info("step stopped (shutdown, or its lease was lost)", extra={"host": row["name"] if row else None})
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the host leased forever
            if row is not None and (reason := unavailable(exc)) is not None:
                # as last committed; the step runs again once the store is back
                log.warning("host %s: the store is unreachable, its step runs again once it is back: %s",
                            row["name"], reason, extra={"host": row["name"]})
                self._unreleased.add(row["id"])
                return
            log.exception("engine error", extra={"host": row["name"] if row else None})
            if row is not None:
                try:
                    await self._fence(row, {"next_attempt_at": time.time() + 30}, release=True)
                except Exception as again:  # noqa: BLE001
                    log_failed(log, f"putting host {row['name']} aside", again)
                    self._unreleased.add(row["id"])
        finally:
            if row is not None:
                self._started.discard(row["id"])

    async def _advance(self, row: Row) -> Row | None:
        state = HostState(row["state"])
        prestarted = row["id"] in self._started
        self._started.discard(row["id"])
        if row["retire_requested"] and state in (HostState.REQUESTED, HostState.PROVISIONING, HostState.REGISTERING,
                                                 HostState.CONFIGURING, HostState.DRAINING):
            return await self._commit(row, self._begin_retirement(row))
        step = STEP_OF_STATE.get(state)
        if step is None:
            await self._fence(row, {}, release=True)
            return None
        if step in READ_ONLY_STEPS:
            started: Row | None = row  # asking is not acting: no try counted, no event per poll
        elif prestarted:
            started = row  # the transition into this state counted the try and logged the start
        else:
            attempt = row["attempts"] + 1
            started = await self._fence(
                row, {"attempts": attempt},
                event_kind="step-started", detail={"step": step, "attempt": attempt},
            )
        if started is None:
            return None  # lease lost: another process has the host now
        began = time.monotonic()
        try:
            try:
                result = await getattr(self, f"_step_{step}")(started)
            except NotReady as waiting:
                self._stepped(started, step, began, "waiting")
                # polling is not trying: no event per poll, and the try counter starts again
                await self._fence(
                    started, {"attempts": 0, "next_attempt_at": NEXT_POLL_UNLESS_RETIRING},
                    release=True, binds={"next_poll": time.time() + waiting.delay},
                )
                return None
            except Exception as exc:  # noqa: BLE001 - plugin errors arrive as StepError, others as bugs
                self._stepped(started, step, began, "retry" if self.will_retry(started, step, exc) else "failed")
                return await self._step_failed(started, step, exc)
            self._stepped(started, step, began, "done")
            return await self._commit(started, result)
        finally:
            self._prepared.discard(started["id"])

    def _stepped(self, row: Row, step: str, began: float, outcome: str) -> None:
        seconds = time.monotonic() - began
        observe(self.on_step, row, step, seconds, outcome)

    def will_retry(self, row: Row, step: str, exc: BaseException) -> bool:
        """Is this failure of the step tried again (passing, and tries left)?"""
        return is_retryable(exc) and row["attempts"] <= self.retry_policy(row, step)[0]

    async def _commit(self, row: Row, result: StepResult) -> Row | None:
        reason_kept = rolling_back(row)
        values = {
            "state": result.state.value,
            "attempts": 0,
            "next_attempt_at": 0.0,
            **({} if reason_kept else {"error": None, "failed_step": None}),
            **result.values,
        }
        rests = result.state in (HostState.READY, HostState.GONE, HostState.FAILED)
        detail = {"from": row["state"], "to": result.state.value, **result.detail}
        if reason_kept and result.state == HostState.GONE:
            detail["rolled_back"] = row["failed_step"]
        # The host goes straight on to its next step: start it in this same commit (half the
        # writes of a lifecycle). It is still committed before that step's external call.
        next_step = STEP_OF_STATE.get(result.state)
        start_next = not rests and next_step is not None and next_step not in READ_ONLY_STEPS
        new = await self._fence(
            row, values, event_kind=result.event, detail=detail,
            release=rests, binds=result.binds, after=result.after, start_step=next_step if start_next else None,
        )
        if new is None:
            return None
        if start_next and not new["retire_requested"]:
            self._started.add(new["id"])
        log.info("host %s: %s -> %s", new["name"], row["state"], new["state"], extra={"host": new["name"]})
        observe(self.on_transition, new, row["state"])
        await self.dispatcher.notify(
            "governord_host_event", host=host_view(new), event=new["state"], detail={"from": row["state"]}
        )
        if HostState(new["state"]) == HostState.READY and new["retire_requested"]:
            # asked to retire during its last step: that commit released the host (a resting
            # host is not claimed by anyone), so lease it again to begin the retirement now
            again = await self.store.reclaim(new["id"], self.owner, new["lease_token"],
                                             self.config.engine.lease_seconds)
            if again is None:
                return None  # changed meanwhile (an operator): left as it is now
            self._tokens[again["id"]] = again["lease_token"]
            return await self._commit(again, self._begin_retirement(again))
        return None if rests else new

    async def _step_failed(self, row: Row, step: str, exc: BaseException) -> Row | None:
        message = str(exc) if isinstance(exc, StepError) else f"{type(exc).__name__}: {exc}"
        _limit, backoff, backoff_max = self.retry_policy(row, step)
        if self.will_retry(row, step, exc):
            delay = min(backoff * (2 ** (row["attempts"] - 1)), backoff_max)
            values: dict[str, Any] = {"next_attempt_at": time.time() + delay}
            if not rolling_back(row):  # a rollback's error stays the reason it rolls back
                values["error"] = message
            await self._fence(
                row, values,
                event_kind="step-retry", detail={"step": step, "error": message, "delay": delay},
                release=True,
            )
            log.warning("host %s: %s failed, retrying in %.1fs: %s", row["name"], step, delay, message)
            return None
        if (self.config.engine.on_permanent_failure == "rollback" and step in BRING_UP_STEPS
                and not await self._was_ready(row)):
            return await self._roll_back(row, step, message)
        new = await self._fence(
            row,
            {"state": HostState.FAILED.value, "failed_step": step, "error": message, "next_attempt_at": 0.0},
            event_kind="step-failed", detail={"step": step, "error": message, "from": row["state"]},
            release=True,
        )
        log.error("host %s: %s failed: %s", row["name"], step, message)
        if new is not None:
            await self.dispatcher.notify(
                "governord_host_event", host=host_view(new), event="step-failed",
                detail={"step": step, "error": message},
            )
        return None

    async def _was_ready(self, row: Row) -> bool:
        """Was the host handed back once? Then the application uses it: never roll it back."""
        return bool(await self.store.list_events(host_id=row["id"], kind_prefix="ready", limit=1))

    async def _roll_back(self, row: Row, step: str, message: str) -> Row | None:
        """Undo what bringing the host up made: retire it at once, keeping ``failed_step`` and
        ``error`` as the reason (the request reports it), until it is gone. A host with nothing
        outside yet (its classification failed, or no registrar prepared it) is gone at once; one
        whose preparation failed after a registrar prepared it goes through the teardown, which
        undoes what that registrar made (each deregister is idempotent; the provider has no
        machine)."""
        reason = {"failed_step": step, "error": message, "retire_requested": False}
        detail = {"step": step, "error": message, "rollback": True}
        log.error("host %s: %s failed, rolling back: %s", row["name"], step, message)
        if row["state"] == HostState.REQUESTED.value and row["id"] not in self._prepared:
            result = StepResult(HostState.GONE, reason, "step-failed", detail, after=self._release_address)
        else:
            result = StepResult(HostState.RETIRING, reason, "step-failed", detail)
        new = await self._commit(row, result)
        await self.dispatcher.notify("governord_host_event", host=host_view({**row, **reason}), event="step-failed",
                                     detail=detail)
        return new

    def retry_policy(self, row: Row, step: str) -> tuple[int, float, float]:
        """(tries, first delay, longest delay) for a step: the provider instance's own settings
        for its steps where it has them, else the engine's."""
        engine = self.config.engine
        policy = (engine.retry_limit, engine.retry_backoff, engine.retry_backoff_max)
        provider = self.config.providers.get(row["provider"] or "")
        if provider is None or step not in ("provision", "deprovision"):
            return policy
        return (
            provider.retry_limit if provider.retry_limit is not None else policy[0],
            provider.retry_backoff if provider.retry_backoff is not None else policy[1],
            provider.retry_backoff_max if provider.retry_backoff_max is not None else policy[2],
        )

    # -- the steps ----------------------------------------------------------------------------

    async def classify(self, row: Row) -> dict[str, Any]:
        """Run tag and classify hooks; return the merged classification (no I/O of ours)."""
        view = host_view(row)
        tags = list(row["tags"])
        for outcome in await self.dispatcher.collect("governord_tag_host", host=view, tags=tuple(tags)):
            if outcome.ok and outcome.value:
                tags.extend(t for t in outcome.value if t not in tags)
        order = self.config.tag_order()
        ordered = tuple(sorted(tags, key=lambda t: order.index(t) if t in order else len(order)))
        classification: dict[str, Any] = {}
        for outcome in await self.dispatcher.collect("governord_classify_host", host=view, tags=ordered):
            if outcome.error is not None:
                raise PermanentError(f"classification failed in {outcome.plugin}: {outcome.error}")
            for system, value in (outcome.value or {}).items():
                if system in classification:
                    raise PermanentError(f"two plugins classify for {system!r}")
                classification[system] = value
        if (pid := self.provider_id(row)) is not None:
            # a registrar whose classification carries host parameters (Foreman's) sets this one too
            for value in classification.values():
                if isinstance(value, dict) and isinstance(value.get("parameters"), dict):
                    value["parameters"] = {**value["parameters"], PROVIDER_ID_PARAMETER: pid}
        return classification

    def provider_id(self, row: Row) -> str | None:
        """The providerID the host's Kubernetes node must carry, for a host of a Cluster
        Autoscaler node group ([autoscaler] node_groups); None for any other host."""
        section = self.config.core.autoscaler
        if section is None or (row["app"], row["role"]) not in section.groups():
            return None
        return provider_id(row["id"])

    async def _step_classify(self, row: Row) -> StepResult:
        classification = await self.classify(row)
        prepared = {**row, "classification": classification}
        registrations = dict(row["registrations"])
        outcomes = await self.dispatcher.collect("governord_prepare_host", host=host_view(prepared))
        failed = [outcome for outcome in outcomes if outcome.error is not None]
        if failed:
            # a registrar that answered with a record prepared something (a DNS record of a pool
            # address): a rollback of this step then takes the host through the teardown, which
            # undoes it, not straight to gone
            if any(outcome.value for outcome in outcomes if outcome.error is None):
                self._prepared.add(row["id"])
            raise as_step_error(failed)
        for outcome in outcomes:
            registrations.update(outcome.value or {})
        nxt = HostState.REGISTERING if row["origin"] == HostOrigin.ADOPTED.value else HostState.PROVISIONING
        return StepResult(
            nxt, {"classification": classification, "registrations": registrations}, "classified",
            {"classification": classification, "prepared": sorted(registrations)},
        )

    def machine_spec(self, row: Row) -> MachineSpec:
        network = NetworkAssignment()
        if row["network"] and row["address"]:
            net = self.config.networks[row["network"]]
            network = NetworkAssignment(
                address=row["address"],
                prefix_length=net.cidr.prefixlen,
                gateway=str(net.gateway) if net.gateway else None,
                dns_servers=tuple(str(d) for d in net.dns_servers),
                domain=net.domain,
            )
        domain = row["fqdn"][len(row["name"]) + 1 :] if row["fqdn"] != row["name"] else None
        if domain and network.domain is None:
            network = NetworkAssignment(domain=domain)
        return MachineSpec(
            host_id=row["id"], hostname=row["name"], fqdn=row["fqdn"], profile=dict(row["profile"]),
            network=network, tags=tuple(row["tags"]),
            user_data=cloud_config(row["registrations"], provider_id=self.provider_id(row)),
        )

    async def _step_provision(self, row: Row) -> StepResult:
        outcome = await self.dispatcher.first(
            "governord_provision_host", host=host_view(row), spec=self.machine_spec(row)
        )
        machine: Machine = outcome.value
        addresses = list(machine.addresses)
        if row["address"] and row["address"] in addresses:
            addresses.remove(row["address"])
            addresses.insert(0, row["address"])
        return StepResult(
            HostState.REGISTERING,
            {"machine_id": machine.machine_id, "addresses": addresses},
            "provisioned",
            {"machine_id": machine.machine_id, "addresses": addresses, "by": outcome.plugin},
        )

    async def _step_register(self, row: Row) -> StepResult:
        classification = await self.classify(row)
        row = {**row, "classification": classification}
        outcomes = await self.dispatcher.broadcast("governord_register_host", host=host_view(row))
        registrations: dict[str, Any] = {}
        for outcome in outcomes:
            registrations.update(outcome.value or {})
        # a system's register record is laid over what its prepare made (the token stays)
        registrations = {
            system: {**(row["registrations"].get(system) or {}), **(record or {})}
            for system, record in {**row["registrations"], **registrations}.items()
        }
        return StepResult(
            HostState.CONFIGURING,
            {"classification": classification, "registrations": registrations},
            "registered",
            {"registrations": registrations},
        )

    async def _step_configure(self, row: Row) -> StepResult:
        waited = time.time() - (row["state_since"] or row["updated_at"])
        waiting_for = []
        for outcome in await self.dispatcher.collect("governord_check_host_ready", host=host_view(row),
                                                     waited=waited):
            if outcome.error is not None:
                raise as_step_error([outcome])
            waiting_for += [system for system, ready in (outcome.value or {}).items() if not ready]
        if waiting_for:
            raise NotReady(self.config.engine.ready_poll_interval, waiting_for)
        # A tag change that arrived meanwhile makes the host register again.
        return StepResult(HostState.READY, {"state": READY_UNLESS_RETAGGED}, "ready", {"waited": round(waited, 3)},
                          binds={"configured_tags_rev": row["tags_rev"]})

    async def _step_drain(self, row: Row) -> StepResult:
        """Ask the drain hooks whether the host drained; at the deadline, the application's
        ``on_timeout`` decides. Otherwise wait (released, like a host being configured) until
        the next poll, or the deadline when no plugin answers drain questions."""
        section = self.config.applications.get(row["app"] or "")
        drain = section.drain if section is not None else None
        timeout = drain.timeout if drain is not None else 0.0
        since = row["state_since"] or row["updated_at"]
        deadline = since + timeout
        asked = self.dispatcher.implemented("governord_drain_host")
        for outcome in await self.dispatcher.collect("governord_drain_host", host=host_view(row)):
            if outcome.error is not None:  # a drain that fails is a drain not done yet
                log.warning("host %s: drain hook %s failed: %s", row["name"], outcome.plugin, outcome.error,
                            extra={"host": row["name"], "plugin": outcome.plugin})
            elif outcome.value is True:
                return StepResult(HostState.RETIRING, {"retire_requested": False}, "drained",
                                  {"by": f"hook:{outcome.plugin}", "waited": round(time.time() - since, 3)})
        now = time.time()
        if now >= deadline:
            if drain is None or drain.on_timeout == "proceed":
                return StepResult(HostState.RETIRING, {"retire_requested": False}, "drained",
                                  {"by": "timeout", "timeout": timeout})
            log.warning("host %s: not drained within %.0fs: kept (on_timeout = keep), its retirement dropped",
                        row["name"], timeout, extra={"host": row["name"]})
            return StepResult(HostState.READY, {}, "drain-timed-out", {"timeout": timeout, "kept": True},
                              after=functools.partial(self._drain_cancelled, drain.callback_url, timeout))
        poll = self.config.engine.ready_poll_interval
        raise NotReady(min(poll, deadline - now) if asked else deadline - now, ["drain"])

    @staticmethod
    def _drain_cancelled(url: str | None, timeout: float, conn: Connection, row: Row) -> None:
        """Owe the application a ``drain-cancelled`` notification (in the commit that keeps the host)."""
        if url is not None and row["app"] is not None:
            callbacks.enqueue_event(conn, app=row["app"], url=url, host_id=row["id"], event="drain-cancelled",
                                    detail={"host": callbacks.event_host(row),
                                            "reason": f"not drained within {timeout:g}s: the host is kept"})

    def _begin_retirement(self, row: Row) -> StepResult:
        values = {"retire_requested": False}
        if row["state"] == HostState.REQUESTED.value:
            # nothing external exists yet: no machine, no registration
            return StepResult(HostState.GONE, values, "gone", {"reason": "retired before provisioning"},
                              after=self._release_address)
        detail = {"drain": "confirmed or cut short"} if row["state"] == HostState.DRAINING.value else {}
        return StepResult(HostState.RETIRING, values, "retiring", detail)

    async def _step_retire(self, row: Row) -> StepResult:
        return StepResult(HostState.DEREGISTERING, {}, "deregistering", {})

    async def _step_deregister(self, row: Row) -> StepResult:
        await self.dispatcher.broadcast("governord_deregister_host", host=host_view(row),
                                        phase=Phase.BEFORE_MACHINE.value)
        if row["origin"] == HostOrigin.ADOPTED.value:
            # no machine of ours: nothing to destroy, its after-machine records go now
            return StepResult(HostState.CLEANING, {}, "deregistered", {"reason": "adopted host released"})
        return StepResult(HostState.DEPROVISIONING, {}, "deregistered", {})

    async def _step_deprovision(self, row: Row) -> StepResult:
        outcome = await self.dispatcher.first("governord_deprovision_host", host=host_view(row))
        return StepResult(HostState.CLEANING, {}, "deprovisioned", {"by": outcome.plugin})

    async def _step_clean(self, row: Row) -> StepResult:
        await self.dispatcher.broadcast("governord_deregister_host", host=host_view(row),
                                        phase=Phase.AFTER_MACHINE.value)
        return StepResult(HostState.GONE, {"registrations": {}}, "gone", {}, after=self._release_address)

    def _release_address(self, conn: Connection, row: Row) -> None:
        self.store.release_address(conn, row["id"])


def cloud_config(registrations: dict[str, Any], *, provider_id: str | None = None) -> str | None:
    """The cloud-init user data the registrars asked for in ``prepare`` (their ``cloud_config``
    fragments merged), or None. JSON is YAML, so the document is written as JSON. With
    ``provider_id`` (a node group's host) the machine also gets it in PROVIDER_ID_FILE, for its
    configuration to give the kubelet (``--provider-id``)."""
    merged: dict[str, Any] = {}
    for record in registrations.values():
        if isinstance(record, dict) and isinstance(record.get("cloud_config"), dict):
            merged.update(record["cloud_config"])
    if provider_id is not None:
        found = merged.get("write_files")
        written: list[Any] = found if isinstance(found, list) else []
        merged["write_files"] = [*written, {"path": PROVIDER_ID_FILE, "content": provider_id + "\n",
                                            "permissions": "0644", "owner": "root:root"}]
    return "#cloud-config\n" + json.dumps(merged, sort_keys=True) if merged else None


def address_range(cidr: ipaddress.IPv4Network, first: Any, last: Any) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The usable range of a network: configured bounds, else all host addresses."""
    hosts_iter = list(cidr.hosts()) if cidr.num_addresses <= 65536 else None
    lo = first or (hosts_iter[0] if hosts_iter else cidr.network_address + 1)
    hi = last or (hosts_iter[-1] if hosts_iter else cidr.broadcast_address - 1)
    return lo, hi
