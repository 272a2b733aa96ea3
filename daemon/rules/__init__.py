"""What applications and operators can ask of the Governor, decided and persisted.

Both APIs (the applications' HTTPS API and the operators' admin socket) call these methods;
they hold no HTTP. Every request is persisted with its idempotency key before anything else
happens; a repeat of the key returns the original request. Decisions about one application are
made one at a time (on SQLite by the store's single writer, on PostgreSQL under an advisory lock
per application that every process sharing the database respects) and count hosts still in
flight, so concurrent requests cannot overshoot a cap.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from .. import autosign
from ..config import Config, DrainSection, Placement, WebhookRule
from ..dispatch import observe
from ..engine import STATE_OF_STEP, STEP_OF_STATE, Engine, address_range, callbacks
from ..models import ACTIVE_STATES, HostOrigin, HostState
from ..outbound import Policy
from ..registrars import application_view
from ..store import AmbiguousId, NameTaken, Row, Store, Transaction, app_lock, host_view, network_lock
from ..store.schema import hosts

log = logging.getLogger(__name__)

HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


#: on their way out: a scale-down does not pick them again, min_hosts counts them gone
_LEAVING = {HostState.DRAINING.value, HostState.RETIRING.value, HostState.DEREGISTERING.value, HostState.DEPROVISIONING.value,
            HostState.CLEANING.value}


#: states a host moves on to once it drained (a confirmation after these is a repeat)
_AFTER_DRAIN = {HostState.RETIRING.value, HostState.DEREGISTERING.value, HostState.DEPROVISIONING.value,
                HostState.CLEANING.value, HostState.GONE.value, HostState.FAILED.value}

#: states in which a host's agent may ask for its certificate
_BRINGING_UP = {HostState.REQUESTED.value, HostState.PROVISIONING.value, HostState.REGISTERING.value,
                HostState.CONFIGURING.value}


class RequestError(Exception):
    """A request that cannot be taken as asked: ``status`` is the HTTP status, ``field`` the
    offending field."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        self.status = status
        self.field = field
        super().__init__(message)


class _Refused(RequestError):
    """A release the application's rules refuse (a 409): ``rule`` names the rule."""

    def __init__(self, rule: str, status: int, message: str, *, field: str | None = None) -> None:
        self.rule = rule
        super().__init__(status, message, field=field)


@dataclass
class Plan:
    """What the rules decided for a scale request, before anything is written."""

    #: accepted, declined or pending (approval)
    decision: str
    #: the rule that decided: max_hosts, min_hosts, cooldown, placement, approval, deletion_policy
    rule: str
    reason: str | None
    #: one placement per new host
    add: list[Placement] = field(default_factory=list)
    #: hosts to release
    release: list[Row] = field(default_factory=list)


@dataclass
class Decision:
    request: Row
    #: True when the idempotency key matched an earlier request
    replayed: bool = False
    #: the request's hosts as the decision left them (its answer needs no second read)
    hosts: list[Row] | None = None
    #: the rule that decided (a scale request's Plan.rule; "release" or "cancel" for releases)
    rule: str = ""


class Governor:
    """The decisions: scale, release, tag, retire, retry.

    Each decision that reads and then writes (scale, release, approve, retire, adopt) is one
    synchronous function run by :meth:`Store.decide` on the store's writer, with the locks it
    names (its application's): decisions about one application take turns, so a count read
    under a cap still holds when the hosts are written, and a whole decision is one hop to the
    writer thread."""

    def __init__(self, store: Store, engine: Engine, config: Config, *, listeners: set[int] | None = None) -> None:
        self.store = store
        self.engine = engine
        self.config = config
        #: TCP ports governord listens on (the runtime's set): no callback_url may name them
        self.listeners = listeners if listeners is not None else set()
        #: by registrar instance (``[registrars.NAME]``), the keys of its records an application
        #: may see (its type's ``application_keys``); the runtime sets it whenever it builds the
        #: registrars. A system not in it shows applications nothing of its records.
        self.application_keys: dict[str, frozenset[str]] = {}
        #: called once a decision is committed, with (app, kind, outcome, rule): outcome is the
        #: request's state (accepted, declined, pending; denied or expired for a pending one),
        #: rule the rule that decided (see Plan.rule). A repeat of an idempotency key is none.
        self.on_decision: list[Callable[[str, str, str, str], None]] = []

    def _decided(self, app: str, kind: str, outcome: str, rule: str) -> None:
        observe(self.on_decision, app, kind, outcome, rule)

    def _app(self, app: str) -> Any:
        section = self.config.applications.get(app)
        if section is None:
            raise RequestError(404, f"no application named {app!r}", field="app")
        return section

    async def number_hosts(self) -> None:
        """Give live hosts made before names were numbered in the store their numbers (read off
        their names by each role's pattern), so finding a free name needs no scan."""
        roles = [(app, role, cfg.name_pattern) for app, section in self.config.applications.items()
                 for role, cfg in section.roles.items()]

        def number(tx: Transaction) -> int:
            return sum(tx.number_unnumbered_hosts(pattern, app, role) for app, role, pattern in roles)

        if numbered := await self.store.decide(number, locks=[app_lock(app) for app, _role, _pattern in roles]):
            log.info("numbered %d hosts made before their numbers were kept", numbered)

    # -- scaling ----------------------------------------------------------------------------

    async def scale(
        self,
        app: str,
        role: str,
        *,
        add: int | None = None,
        count: int | None = None,
        actor: str,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        component: str | None = None,
        fingerprint: str | None = None,
        trigger: dict[str, Any] | None = None,
    ) -> Decision:
        """Ask for ``add`` more hosts of ``role`` (a negative ``add``: that many fewer), or for
        ``count`` hosts in all (adding or releasing the difference), decided by the application's
        rules. ``trigger``: what made the request (the threshold autoscaler's query, value and
        rule), kept with it and in its audit event. With ``callback_url`` the
        application is sent the outcome, signed, once the request is done.

        With ``component`` (a deployed component, ``NAMESPACE/NAME``) the new hosts belong to it,
        and ``count`` counts only its hosts of the role: releases pick among them.
        ``fingerprint`` (a signed delivery's body digest) is kept with the request; a repeat of
        the idempotency key must carry the same one."""
        self._check_scale(app, role, add, count)
        self._check_callback(app, callback_url)
        params: dict[str, Any] = {"role": role, "add": add, "count": count}
        if component is not None:
            params["component"] = component
        if fingerprint is not None:
            params["fingerprint"] = fingerprint
        if trigger is not None:
            params["trigger"] = trigger

        def decide(tx: Transaction) -> Decision:
            if (earlier := _replayed(tx, app, "scale", params, idempotency_key)) is not None:
                return earlier
            plan = self.plan_scale(tx, app, role, add=add, count=count, component=component)
            request = tx.new_request(app=app, actor=actor, idempotency_key=idempotency_key, kind="scale",
                                     params=params, state=plan.decision, reason=plan.reason)
            rows = self._carry_out(tx, request, plan, actor)
            tx.insert_request(request)  # with its hosts: one write
            if callback_url is not None:
                callbacks.enqueue(tx.conn, request_id=request["id"], app=app, url=callback_url)
            return Decision(request, hosts=rows, rule=plan.rule)

        decision = await self.store.decide(decide, locks=[app_lock(app)])
        if not decision.replayed:
            self._decided(app, "scale", decision.request["state"], decision.rule)
            self.engine.wake()
            await self.announce_draining(decision.hosts)
        return decision

    async def scale_by_rule(
        self, app: str, rule: WebhookRule, *, component: str, actor: str, idempotency_key: str | None,
        fingerprint: str | None = None,
    ) -> Decision:
        """The scale request a webhook rule makes of an event from ``component`` (its deployed
        component, ``NAMESPACE/NAME``): ``add`` hosts for the component; ``count`` hosts of the
        role in all, whoever made them; ``keep`` hosts of the role for the component alone
        (a teardown rule keeps 0: the component's hosts are released). The application's caps,
        cooldown, approval, minimum and deletion policy decide it like any other request.
        ``fingerprint``: the delivery's body digest (see :meth:`scale`)."""
        common: dict[str, Any] = {"actor": actor, "idempotency_key": idempotency_key, "fingerprint": fingerprint}
        if rule.keep is not None:
            return await self.scale(app, rule.role, count=rule.keep, component=component, **common)
        if rule.add is not None:
            return await self.scale(app, rule.role, add=rule.add, component=component, **common)
        return await self.scale(app, rule.role, count=rule.count, **common)

    def _check_callback(self, app: str, url: str | None) -> None:
        if url is None:
            return
        section = self._app(app)
        if section.webhook is None:
            raise RequestError(422, f"callback_url: application {app} has no webhook secret to sign "
                               "notifications with ([applications.APP.webhook] secrets)", field="callback_url")
        # what the rules refuse without a lookup (http, a denied address literal); the
        # addresses a host name resolves to are checked at each delivery
        if (refusal := Policy.of(app, section.callbacks, self.listeners).url_refusal(url)) is not None:
            raise RequestError(422, f"callback_url: {refusal}", field="callback_url")

    def _check_scale(self, app: str, role: str, add: int | None, count: int | None) -> None:
        section = self._app(app)
        if role not in section.roles:
            raise RequestError(422, f"application {app!r} has no role {role!r}", field="role")
        if (add is None) == (count is None):
            raise RequestError(422, "give exactly one of add and count", field="add")

    def plan_scale(
        self, tx: Transaction, app: str, role: str, *, add: int | None, count: int | None, approved: bool = False,
        component: str | None = None,
    ) -> Plan:
        """Decide a scale request against the application's rules, without changing anything.
        With ``component``, ``count`` is the number of that component's hosts of the role."""
        section = self._app(app)
        on_provider = tx.live_count_by_provider(app)
        live_app = sum(on_provider.values())
        # The role's hosts (whole rows: the deletion policy picks among them) are read only when
        # the answer depends on them: an ``add`` is decided by counts, and reading every live
        # row made each request cost O(hosts).
        kept = self._kept_hosts(tx, app, role, component) if add is None or add <= 0 else []
        wanted = add if add is not None else count - len(kept)  # type: ignore[operator]
        if wanted < 0:
            kept_app = len(self._kept_hosts(tx, app, None))
            if kept_app + wanted < section.min_hosts:
                return Plan("declined", "min_hosts", f"minimum: application {app} keeps at least "
                            f"{section.min_hosts} hosts, has {kept_app}, would release {-wanted}")
            return Plan("accepted", "deletion_policy",
                        f"releasing {-wanted} ({section.deletion_policy} first)",
                        release=self._victims(kept, -wanted, section.deletion_policy))
        if wanted == 0:
            whose = f"{role} of {component}" if component is not None else role
            return Plan("accepted", "nothing", f"{whose} has {len(kept)} hosts already")
        if live_app + wanted > section.max_hosts:
            return Plan("declined", "max_hosts", f"cap reached: application {app} may have {section.max_hosts} "
                        f"hosts, has {live_app} (in flight included), asked for {wanted} more")
        if section.cooldown and not approved:
            last = tx.last_scale_up(app)
            if last is not None and time.time() - last < section.cooldown:
                wait = section.cooldown - (time.time() - last)
                return Plan("declined", "cooldown", f"cooldown: application {app} may scale up again in "
                            f"{wait:.0f}s (cooldown {section.cooldown:.0f}s)")
        placed, why = self._place(on_provider, app, role, wanted)
        if placed is None:
            return Plan("declined", "placement", why)
        if not approved and (section.approval == "always" or (
                isinstance(section.approval, int) and live_app + wanted > section.approval)):
            threshold = "every request" if section.approval == "always" else f"above {section.approval} hosts"
            return Plan("pending", "approval", f"pending approval: application {app} needs an operator's "
                        f"approval for {threshold}", add=placed)
        return Plan("accepted", "placement", why, add=placed)

    @staticmethod
    def _victims(kept: list[Row], count: int, policy: str) -> list[Row]:
        return sorted(kept, key=lambda h: h["created_at"], reverse=policy == "newest")[:count]

    def _place(self, live_on_provider: dict[str, int], app: str, role: str,
               wanted: int) -> tuple[list[Placement] | None, str]:
        """One placement per new host: the first provider in the role's order with room under
        its cap. Returns (placements, why) or (None, why not)."""
        placements = self.config.placements[(app, role)]
        on_provider = dict(live_on_provider)
        chosen: list[Placement] = []
        for _ in range(wanted):
            for placement in placements:
                used = on_provider.get(placement.provider, 0)
                if placement.cap is None or used < placement.cap:
                    on_provider[placement.provider] = used + 1
                    chosen.append(placement)
                    break
            else:
                full = ", ".join(f"{p.provider} {on_provider.get(p.provider, 0)}/{p.cap}" for p in placements)
                return None, f"cap reached on every allowed provider of {app}/{role}: {full}"
        reasons = []
        for provider in dict.fromkeys(p.provider for p in chosen):
            index = next(i for i, p in enumerate(placements) if p.provider == provider)
            cap = placements[index].cap
            ahead = [f"{p.provider} full ({p.cap})" for p in placements[:index]]
            reasons.append(f"{sum(p.provider == provider for p in chosen)} on {provider}: "
                           + ("first choice" if not ahead else "; ".join(ahead))
                           + (f", {on_provider[provider]}/{cap} after this" if cap is not None else ""))
        return chosen, "; ".join(reasons)

    def _carry_out(self, tx: Transaction, request: Row, plan: Plan, actor: str) -> list[Row]:
        """Make a decided plan real (inside the request's transaction) and audit it. Returns
        the request's hosts, the new ones and those it releases, and sets the request's
        ``host_ids`` (for the caller to write with the request)."""
        app, role = request["app"], request["params"]["role"]
        detail = {"app": app, **request["params"], "rule": plan.rule, "reason": plan.reason}
        if plan.decision != "accepted":
            tx.add_event(f"request-{plan.decision}", actor=actor, request_id=request["id"], detail=detail)
            return []
        rows = self._retire(tx, plan.release, actor, request["id"])
        if plan.add:
            role_cfg = self.config.applications[app].roles[role]
            seqs = tx.free_sequence_numbers(role_cfg.name_pattern, app, role, len(plan.add))
            new_hosts = []
            for seq, placement in zip(seqs, plan.add, strict=True):
                name = role_cfg.name_pattern.format(app=app, role=role, seq=seq)
                domain = role_cfg.domain or self._domain(placement.network)
                new_hosts.append({
                    "name": name, "seq": seq, "fqdn": f"{name}.{domain}" if domain else name, "app": app,
                    "role": role, "origin": HostOrigin.PROVISIONED, "tags": list(role_cfg.tags),
                    "provider": placement.provider, "network": placement.network,
                    "profile": placement.profile.model_dump(mode="json"),
                    "request_id": request["id"], "component": request["params"].get("component"),
                })
            rows += self._new_hosts(tx, new_hosts, actor=actor)
        request["host_ids"] = [row["id"] for row in rows]
        tx.add_event("request-accepted", actor=actor, request_id=request["id"],
                     detail={**detail, "hosts": len(plan.add), "released": len(plan.release)})
        return rows

    async def plan(self, app: str, role: str, *, add: int | None, count: int | None) -> dict[str, Any]:
        """What a scale request would do, and why, changing nothing: the rule that decides, the
        provider each new host goes to, names, addresses' network, classification, registrars."""
        self._check_scale(app, role, add, count)
        role_cfg = self.config.applications[app].roles[role]

        def decide(tx: Transaction) -> tuple[Plan, list[int]]:
            plan = self.plan_scale(tx, app, role, add=add, count=count)
            return plan, tx.free_sequence_numbers(role_cfg.name_pattern, app, role, len(plan.add))

        plan, seqs = await self.store.decide(decide, locks=[app_lock(app)])
        planned = []
        for seq, placement in zip(seqs, plan.add, strict=True):
            name = role_cfg.name_pattern.format(app=app, role=role, seq=seq)
            domain = role_cfg.domain or self._domain(placement.network)
            row = {column.name: None for column in hosts.c} | {
                "id": "planned", "name": name, "fqdn": f"{name}.{domain}" if domain else name, "app": app,
                "role": role, "origin": HostOrigin.PROVISIONED.value, "state": HostState.REQUESTED.value,
                "provider": placement.provider, "tags": list(role_cfg.tags), "addresses": [],
                "classification": {}, "registrations": {},
            }
            planned.append({"name": row["name"], "fqdn": row["fqdn"], "provider": placement.provider,
                          "network": placement.network, "profile": placement.profile.model_dump(mode="json"),
                          "tags": row["tags"], "classification": await self.engine.classify(row),
                          "registrars": sorted(self.config.registrars)})
        return {"app": app, "role": role, "decision": plan.decision, "rule": plan.rule, "reason": plan.reason,
                "hosts": planned, "release": [h["name"] for h in plan.release]}

    # -- approvals ----------------------------------------------------------------------------------

    def _expire_pending(self, tx: Transaction, app: str | None = None) -> list[Row]:
        """Expire the pending requests (of ``app``) past their application's approval expiry;
        returns those it expired."""
        expired = []
        for request in tx.pending_requests(app):
            section = self.config.applications.get(request["app"])
            expiry = section.approval_expiry if section else 0.0
            if request["created_at"] + expiry < time.time():
                tx.update_request(request["id"], state="expired", reason=f"expired after {expiry:.0f}s without approval",
                                  updated_at=time.time())
                tx.add_event("request-expired", actor="governord", request_id=request["id"],
                             detail={"app": request["app"], "after": expiry})
                expired.append(request)
        return expired

    def _count_expired(self, expired: list[Row]) -> None:
        for request in expired:
            self._decided(request["app"] or "", request["kind"], "expired", "approval_expiry")

    async def expire_pending(self) -> None:
        self._count_expired(await self.store.decide(self._expire_pending,
                                                    locks=[app_lock(app) for app in self.config.applications]))

    async def decide_pending(self, request_id: str, *, approve: bool, comment: str, actor: str) -> Row:
        """Approve (the rules are applied again, approval aside) or deny a pending request."""
        row = await self.operator_request(request_id)
        request_id = row["id"]  # (it may have been given by a prefix)
        # its own transaction: an expiry stands even when this decision is refused
        self._count_expired(await self.store.decide(lambda tx: self._expire_pending(tx, row["app"]),
                                                    locks=[app_lock(row["app"])]))
        rule = "operator"  # a denial; an approval applies the rules again, and one of them decides

        def decide(tx: Transaction) -> Row:
            nonlocal rule
            request = tx.request(request_id)
            assert request is not None
            if request["state"] != "pending":
                raise RequestError(409, f"request {request_id} is {request['state']}, not pending", field="request_id")
            now = time.time()
            if not approve:
                denial = f"denied by {actor}: {comment}"
                tx.update_request(request_id, state="denied", reason=denial, updated_at=now)
                tx.add_event("request-denied", actor=actor, request_id=request_id,
                             detail={"app": request["app"], "comment": comment})
                request.update(state="denied", reason=denial)
                return request
            params = request["params"]
            plan = self.plan_scale(tx, request["app"], params["role"], add=params["add"], count=params["count"],
                                   approved=True, component=params.get("component"))
            rule = plan.rule
            reason = f"approved by {actor}: {comment}" if plan.decision == "accepted" else plan.reason
            request.update(state=plan.decision, reason=reason)
            tx.add_event("request-approved", actor=actor, request_id=request_id,
                         detail={"app": request["app"], "comment": comment})
            self._carry_out(tx, request, plan, actor)
            tx.update_request(request_id, state=plan.decision, reason=reason, updated_at=now,
                              host_ids=request["host_ids"])
            return request

        request = await self.store.decide(decide, locks=[app_lock(row["app"])])
        self._decided(request["app"] or "", request["kind"], request["state"], rule)
        self.engine.wake()
        if approve and request["state"] == "accepted" and request["host_ids"]:
            # an approved scale-down may have moved hosts to draining: plugins hear of it
            await self.announce_draining(await self.store.list_hosts(ids=request["host_ids"]))
        return request

    async def operator_request(self, key: str) -> Row:
        """A request an operator names: by id, or a unique prefix of it."""
        return await _named(self.store.get_request(key, prefix=True), "request_id", "no such request")

    def _kept_hosts(self, tx: Transaction, app: str, role: str | None, component: str | None = None) -> list[Row]:
        """The application's live hosts (of ``role``, of ``component``) that are not on their way out."""
        return [h for h in tx.hosts(app=app, role=role, component=component, live=True)
                if h["state"] not in _LEAVING and not h["retire_requested"]]

    def _domain(self, network: str | None) -> str | None:
        if network is None:
            return None
        return self.config.networks[network].domain

    def _new_hosts(self, tx: Transaction, specs: list[dict[str, Any]], *, actor: str) -> list[Row]:
        """Insert hosts (each spec: the host's columns, ``network`` naming a configured network
        or None), leasing each an address of its network, with their ``requested`` events."""
        specs = [{**spec, "id": str(uuid.uuid4()), "address": None} for spec in specs]
        networks = sorted({spec["network"] for spec in specs if spec["network"] is not None})
        # shared by applications: leasing its addresses waits for any other decision leasing them
        tx.lock(*(network_lock(network) for network in networks))
        for network in networks:
            on_network = [spec for spec in specs if spec["network"] == network]
            net = self.config.networks[network]
            lo, hi = address_range(net.cidr, net.first, net.last)
            skip = [a for a in (net.gateway, *net.dns_servers) if a is not None]
            allocated = tx.allocate_addresses(network, lo, hi, [s["id"] for s in on_network], skip)
            if allocated is None:
                raise RequestError(409, f"network {network} has no free address", field="network")
            for spec, address in zip(on_network, allocated, strict=True):
                spec["address"] = str(address)
        rows = tx.insert_hosts([
            {**spec, "state": HostState.REQUESTED.value, "origin": spec["origin"].value} for spec in specs])
        tx.add_events([
            {"kind": "requested", "actor": actor, "host_id": row["id"], "request_id": row["request_id"],
             "detail": {"name": row["name"], "tags": row["tags"], "address": row["address"]}} for row in rows])
        return rows

    async def release(
        self, app: str, *, hosts: list[str] | None = None, role: str | None = None, count: int | None = None,
        actor: str, idempotency_key: str | None = None, drain: bool = True,
    ) -> Decision:
        """Hand hosts back: the named ones, or ``count`` of ``role`` (newest first). A ready
        host drains first where its application drains, unless ``drain`` is False (the Cluster
        Autoscaler's DeleteNodes: it drained the node itself)."""
        section = self._app(app)
        if (hosts is None) == (count is None):
            raise RequestError(422, "give exactly one of hosts and count", field="hosts")
        params = {"hosts": hosts, "role": role, "count": count}

        def decide(tx: Transaction) -> Decision:
            if (earlier := _replayed(tx, app, "release", params, idempotency_key)) is not None:
                return earlier
            live = self._kept_hosts(tx, app, role)
            if hosts is not None:
                by_name = {h["name"]: h for h in live} | {h["fqdn"]: h for h in live}
                unknown = [n for n in hosts if n not in by_name]
                if unknown:
                    raise RequestError(404, f"application {app} has no live host {unknown[0]!r}", field="hosts")
                victims = [by_name[n] for n in dict.fromkeys(hosts)]
            else:
                victims = self._victims(live, count, section.deletion_policy)  # type: ignore[arg-type]
            kept_app = len(live) if role is None else len(self._kept_hosts(tx, app, None))
            if kept_app - len(victims) < section.min_hosts:
                raise _Refused("min_hosts", 409, f"minimum: application {app} keeps at least {section.min_hosts} "
                               f"hosts, has {kept_app}, asked to release {len(victims)}", field="hosts")
            request = tx.insert_request(tx.new_request(
                app=app, actor=actor, idempotency_key=idempotency_key, kind="release", params=params,
                state="accepted", reason=None, host_ids=[h["id"] for h in victims]))
            rows = self._retire(tx, victims, actor, request["id"], drain=drain)
            tx.add_event("request-accepted", actor=actor, request_id=request["id"],
                         detail={"app": app, "release": [v["name"] for v in victims]})
            return Decision(request, hosts=rows, rule="release")

        decision = await self._decide_release(app, decide)
        if not decision.replayed:
            self.engine.wake()
            await self.announce_draining(decision.hosts)
        return decision

    async def _decide_release(self, app: str, decide: Callable[[Transaction], Decision]) -> Decision:
        """Run a release decision, counting its outcome: accepted, or declined by a rule."""
        try:
            decision = await self.store.decide(decide, locks=[app_lock(app)])
        except _Refused as refused:
            self._decided(app, "release", "declined", refused.rule)
            raise
        if not decision.replayed:
            self._decided(app, "release", "accepted", decision.rule)
        return decision

    async def cancel_unmade(self, app: str, role: str, count: int, *, actor: str) -> Decision:
        """Cancel ``count`` hosts of ``role`` that nothing outside has been asked for yet (state
        ``requested``, newest first), and never a host whose machine is being made or exists:
        declined (409) when the role has fewer such hosts. Decided on the hosts' states inside
        the application's decision, so a host the engine moved on meanwhile is not taken; one
        the engine is classifying retires before its provider is called (Engine._advance)."""
        self._app(app)
        params = {"role": role, "cancel": count}

        def decide(tx: Transaction) -> Decision:
            unmade = [h for h in self._kept_hosts(tx, app, role) if h["state"] == HostState.REQUESTED.value]
            if count > len(unmade):
                raise _Refused("unmade", 409, f"{app}/{role} has {len(unmade)} hosts not made yet, asked to cancel "
                               f"{count}: hosts that exist are released by name", field="count")
            victims = self._victims(unmade, count, "newest")
            request = tx.insert_request(tx.new_request(
                app=app, actor=actor, idempotency_key=None, kind="release", params=params,
                state="accepted", reason="cancelled before they were made", host_ids=[h["id"] for h in victims]))
            rows = self._retire(tx, victims, actor, request["id"], drain=False)
            tx.add_event("request-accepted", actor=actor, request_id=request["id"],
                         detail={"app": app, "cancel": [v["name"] for v in victims]})
            return Decision(request, hosts=rows, rule="cancel")

        decision = await self._decide_release(app, decide)
        self.engine.wake()
        return decision

    # -- operator actions on one host -----------------------------------------------------------

    def _retire(self, tx: Transaction, rows: list[Row], actor: str, request_id: str | None, *,
                drain: bool = True) -> list[Row]:
        """Retire hosts (a resting one moves on at once, one in flight after its step; decided on
        the state each has now, see Transaction.retire) and audit it. With ``drain``, a ready
        host of an application with ``[applications.APP.drain]`` drains first (Transaction.drain):
        the application is owed a signed ``draining`` notification, in this transaction.
        ``rows`` must have been read in this transaction: returns them with what changed."""
        if not rows:
            return []
        draining: dict[str, Row] = {}
        if drain:
            wanted = [r["id"] for r in rows if r["state"] == HostState.READY.value and not r["retire_requested"]
                      and self._drain_section(r["app"]) is not None]
            draining = tx.drain(wanted) if wanted else {}
        retired = [r for r in rows if r["id"] not in draining]
        changed = tx.retire([r["id"] for r in retired]) if retired else {}
        tx.add_events([
            {"kind": "retire-requested", "actor": actor, "host_id": r["id"], "request_id": request_id,
             "detail": {"state": r["state"], "now": changed[r["id"]]["state"]}} for r in retired])
        for row in rows:
            if row["id"] not in draining:
                continue
            now = {**row, **draining[row["id"]]}
            section = self._drain_section(row["app"])
            assert section is not None
            deadline = now["state_since"] + section.timeout
            detail: dict[str, Any] = {"deadline": deadline, "timeout": section.timeout,
                                      "on_timeout": section.on_timeout}
            if section.callback_url is not None:
                detail["delivery"] = callbacks.enqueue_event(
                    tx.conn, app=row["app"], url=section.callback_url, host_id=row["id"], event="draining",
                    detail={"host": callbacks.event_host(now), "deadline": deadline, "on_timeout": section.on_timeout})
            tx.add_event("drain-requested", actor=actor, host_id=row["id"], request_id=request_id, detail=detail)
        return [{**r, **changed.get(r["id"], {}), **draining.get(r["id"], {})} for r in rows]

    def _drain_section(self, app: str | None) -> DrainSection | None:
        section = self.config.applications.get(app) if app is not None else None
        return section.drain if section is not None else None

    async def announce_draining(self, rows: list[Row] | None) -> None:
        """Tell plugins of the hosts a decision just moved to draining (after its commit)."""
        for row in rows or []:
            if row["state"] == HostState.DRAINING.value and not row["retire_requested"]:
                await self.engine.dispatcher.notify("governord_host_event", host=host_view(row), event="draining",
                                                    detail={"from": HostState.READY.value})

    async def host(self, key: str) -> Row:
        """A host an operator names: by id (or a unique prefix of it), name or FQDN."""
        return await _named(self.store.get_host(key, prefix=True), "host", f"no host named {key!r}")

    async def retire(self, key: str, *, actor: str, now: bool = False) -> Row:
        """Retire a host. A ready host of an application that drains drains first, unless
        ``now``; ``now`` also cuts short a host already draining (it goes on to retiring)."""
        row = await self.host(key)
        if row["state"] == HostState.GONE.value or (row["state"] in _LEAVING and not (
                now and row["state"] == HostState.DRAINING.value)):
            return row

        def decide(tx: Transaction) -> Row:
            [current] = tx.hosts(ids=[row["id"]])
            if current["state"] == HostState.DRAINING.value and now:
                if current["retire_requested"]:
                    return current  # cut short (or confirmed) already
                changed = tx.retire([current["id"]])[current["id"]]
                tx.add_event("retire-requested", actor=actor, host_id=current["id"],
                             detail={"state": current["state"], "now": current["state"], "drain": "cut short"})
                return {**current, **changed}
            if current["state"] == HostState.GONE.value or current["state"] in _LEAVING:
                return current  # on its way out since it was read
            [retired] = self._retire(tx, [current], actor, None, drain=not now)
            return retired

        retired = await self.store.decide(decide, locks=[app_lock(row["app"])] if row["app"] is not None else [])
        self.engine.wake()
        await self.announce_draining([retired])
        return retired

    async def confirm_drained(self, app: str, key: str, *, by: str, actor: str) -> tuple[Row, bool]:
        """The application (``by``: who says so, for the audit trail) confirms that its host
        ``key`` drained: the host goes on to retiring. Returns the host and whether this
        confirmation moved it (False: a repeat, the host had moved on after a confirmation).
        404 for a host that is not the application's, 409 for one that is not draining."""
        row = await self.store.get_host(key)
        if row is None or row["app"] != app:
            raise RequestError(404, f"application {app} has no host {key!r}", field="host")

        def decide(tx: Transaction) -> tuple[Row, bool]:
            [current] = tx.hosts(ids=[row["id"]])
            if current["state"] == HostState.DRAINING.value:
                if current["retire_requested"]:
                    return current, False  # confirmed (or cut short) already; the engine moves it on
                changed = tx.retire([current["id"]])[current["id"]]
                tx.add_event("drained", actor=actor, host_id=current["id"],
                             detail={"by": by, "waited": round(time.time() - (current["state_since"] or 0), 3)})
                return {**current, **changed}, True
            if current["state"] in _AFTER_DRAIN and tx.has_event(current["id"], "drained"):
                return current, False
            raise RequestError(409, f"host {current['name']} is {current['state']}, not draining", field="host")

        confirmed, moved = await self.store.decide(decide, locks=[app_lock(app)])
        if moved:
            self.engine.wake()
        return confirmed, moved

    async def retry(self, key: str, *, actor: str) -> Row:
        row = await self.host(key)
        if row["state"] != HostState.FAILED.value:
            raise RequestError(409, f"host {row['name']} is {row['state']}, not failed", field="host")
        state = STATE_OF_STEP[row["failed_step"]]
        new = await self.store.operator_update(
            row["id"], {"state": state.value, "attempts": 0, "next_attempt_at": 0.0, "error": None,
                        "failed_step": None},
            actor=actor, kind="retry", detail={"step": row["failed_step"], "error": row["error"]},
        )
        self.engine.wake()
        return new

    async def set_tags(
        self, key: str, *, add: list[str], remove: list[str], actor: str, address: str | None = None,
        adopt: bool = False,
    ) -> Row:
        """Tag or untag a host. A host governord does not know is adopted (registered, never
        destroyed) only when ``adopt`` says so, by its fully qualified name and with its
        ``address``; otherwise an unknown name is a 404 naming the nearest known names (a typo
        never makes a host)."""
        for field_name, tags in (("add", add), ("remove", remove)):
            for tag in tags:
                if tag not in self.config.tags:
                    raise RequestError(422, f"unknown tag {tag!r} (known: {', '.join(self.config.tags)})",
                                       field=field_name)
        row = await _looked_up(self.store.get_host(key, prefix=True), "host")
        if row is None or row["state"] == HostState.GONE.value:
            if not adopt or not add:  # (nothing to adopt it with but removals: as unknown as ever)
                raise RequestError(404, await self._no_such_host(key), field="host")
            return await self._adopt(key, add, actor=actor, address=address)
        if row["state"] in _LEAVING:
            raise RequestError(409, f"host {row['name']} is being retired", field="host")
        tags = [t for t in row["tags"] if t not in remove] + [t for t in add if t not in row["tags"]]
        if tags == list(row["tags"]):
            return row
        values: dict[str, Any] = {"tags": tags, "tags_rev": row["tags_rev"] + 1}
        if row["state"] in (HostState.READY.value, HostState.CONFIGURING.value):
            values.update(state=HostState.REGISTERING.value, next_attempt_at=0.0)
        new = await self.store.operator_update(
            row["id"], values, actor=actor, kind="tags-changed", detail={"from": row["tags"], "to": tags},
        )
        self.engine.wake()
        return new

    async def _no_such_host(self, key: str) -> str:
        """A 404's message for ``key``: the nearest names governord knows, and how to adopt."""
        near = difflib.get_close_matches(key, await self.store.live_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        return (f"no host named {key!r}{hint} (a machine governord does not manage is adopted with "
                "adopt and its address: governord-ctl tag --adopt FQDN TAG --address ADDRESS)")

    async def _adopt(self, key: str, tags: list[str], *, actor: str, address: str | None) -> Row:
        if not HOSTNAME.match(key):
            raise RequestError(422, f"not a host name: {key!r}", field="host")
        if "." not in key:
            raise RequestError(422, f"adopting takes the host's fully qualified name (with its domain), not {key!r}",
                               field="host")
        if address is None:
            raise RequestError(422, "adopting a host takes its address (the registrars need it)", field="address")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise RequestError(422, f"not an IP address: {address!r}", field="address") from None
        name = key.split(".", 1)[0]

        def adopt(tx: Transaction) -> Row:
            try:
                [row] = tx.insert_hosts([dict(
                    name=name, fqdn=key, app=None, role=None, origin=HostOrigin.ADOPTED.value,
                    state=HostState.REQUESTED.value, tags=tags, addresses=[address] if address else [],
                )])
            except NameTaken:
                raise RequestError(409, f"a host named {name!r} exists already", field="host") from None
            tx.add_event("adopted", actor=actor, host_id=row["id"], detail={"fqdn": key, "tags": tags, "address": address})
            return row

        row = await self.store.decide(adopt)
        self.engine.wake()
        return row

    # -- Puppet autosign ----------------------------------------------------------------------------

    async def verify_autosign(self, certname: str, csr_pem: str, *, actor: str) -> tuple[bool, str, Row | None]:
        """Decide a certificate signing request, as Puppet's autosign policy: sign only a CSR for
        a live host governord is bringing up, carrying (as challengePassword) the one-time token
        a registrar's ``prepare`` made for it, asking for no certificate extension but those
        governord put into the host's cloud-config (see :mod:`governord.autosign`), and only
        once. The token is spent by the transaction that decides (a mark on the host, set only
        if it was not set), so two requests at once cannot both be signed, and no number of
        refusals since can hide that it was. Every decision is audited."""
        csr: x509.CertificateSigningRequest | None = None
        try:
            csr = autosign.load_request(csr_pem)
        except ValueError as exc:
            early: str | None = f"not a PEM certificate request: {exc}"
        else:
            early = _request_refusal(csr, certname)

        def decide(tx: Transaction) -> tuple[bool, str, Row | None]:
            row = tx.host_by_fqdn(certname)
            if early is not None or csr is None:
                sign, reason = False, early or "no request"
            else:
                sign, reason = self._autosign_decision(tx, row, certname, csr)
            tx.add_event("autosign-signed" if sign else "autosign-refused", actor=actor,
                         host_id=row["id"] if row else None, detail={"certname": certname, "reason": reason})
            return sign, reason, row

        return await self.store.decide(decide)

    @staticmethod
    def _autosign_decision(tx: Transaction, row: Row | None, certname: str,
                           csr: x509.CertificateSigningRequest) -> tuple[bool, str]:
        """The host's part of the decision, in the deciding transaction (spends the token)."""
        if row is None or row["fqdn"] != certname:
            return False, f"governord is bringing up no host {certname}"
        if row["state"] not in _BRINGING_UP:
            return False, f"host {certname} is {row['state']}, not being brought up"
        records = [r for r in row["registrations"].values() if isinstance(r, dict) and r.get("autosign_token")]
        if not records:
            return False, f"no registrar pre-authorised {certname}"
        given = autosign.challenge_password(csr)
        if given is None:
            return False, "the request carries no challengePassword"
        record = records[0]
        if not autosign.token_matches(given, record["autosign_token"]):
            return False, "the challengePassword is not the token issued for this host"
        if record.get("expires_at") and _timestamp(record["expires_at"]) < time.time():
            return False, "the token has expired"
        refusal = autosign.extension_refusal(csr, autosign.allowed_extensions(record))
        if refusal is not None:
            return False, refusal
        if not tx.spend_autosign_token(row["id"]):
            return False, "the token was used already"
        return True, "pre-authorised by governord"

    # -- views ------------------------------------------------------------------------------------

    def application_host(self, row: Row) -> dict[str, Any]:
        """The view of a host an application is given (see :func:`application_host_summary`)."""
        return application_host_summary(row, self.application_keys)

    async def request_status(self, request: Row, rows: list[Row] | None = None, *,
                             operator: bool = False) -> dict[str, Any]:
        """The request with its hosts (``rows``: as just read; else read now) and an overall
        status the application can act on. Its hosts as an application may see them, unless
        ``operator``: then whole (the admin API)."""
        if rows is None:
            rows = await self.store.list_hosts(ids=request["host_ids"]) if request["host_ids"] else []
        if request["state"] in ("declined", "denied", "expired"):
            status = request["state"]
        elif request["state"] == "pending":
            status = "pending-approval"
        elif request["kind"] == "release":
            status = "completed" if all(h["state"] == HostState.GONE.value for h in rows) else "in-progress"
        elif any(h["state"] == HostState.FAILED.value or (h["state"] == HostState.GONE.value and h["failed_step"])
                 for h in rows):
            status = "failed"  # failed and kept, or failed and rolled back (gone, the reason kept)
        elif all(h["state"] in (HostState.READY.value, HostState.GONE.value) for h in rows):
            status = "completed"
        else:
            status = "in-progress"
        return {
            **{k: request[k] for k in ("id", "app", "kind", "params", "reason", "actor", "idempotency_key",
                                       "created_at")},
            "decision": request["state"],
            "status": status,
            "hosts": [host_summary(h) if operator else self.application_host(h) for h in rows],
        }


def _replayed(tx: Transaction, app: str, kind: str, params: dict[str, Any], key: str | None) -> Decision | None:
    """The earlier request made under this idempotency key, as a replayed decision, or None."""
    if key is None or (earlier := tx.find_request(app, key)) is None:
        return None
    _check_replay(earlier, kind, params, key)
    return Decision(earlier, replayed=True, hosts=tx.hosts(ids=earlier["host_ids"]))


def _check_replay(earlier: Row, kind: str, params: dict[str, Any], key: str) -> None:
    """A repeated idempotency key must repeat the request; another request under a used key
    is refused, never answered with the first one's outcome (422, as the IETF
    Idempotency-Key draft says). With a fingerprint, the fingerprint decides: the same
    delivery is the same request even if the rules that turned it into a request changed."""
    before = earlier["params"]
    if "fingerprint" in params:
        same = earlier["kind"] == kind and before.get("fingerprint") == params["fingerprint"]
    else:
        same = earlier["kind"] == kind and before == params
    if not same:
        raise RequestError(422, f"idempotency_key {key!r} was used for another request ({earlier['id']})",
                           field="idempotency_key")


def _timestamp(value: Any) -> float:
    """Seconds since the epoch from a number or an ISO 8601 time (``...Z`` for UTC)."""
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _request_refusal(csr: x509.CertificateSigningRequest, certname: str) -> str | None:
    """Why a request must be refused whatever host it names (None: the host decides)."""
    if not csr.is_signature_valid:
        return "the request's signature is not valid"
    names = autosign.common_names(csr)
    if names != [certname]:
        return f"the request is for {names}, not {certname}"
    return None


def host_summary(row: Row) -> dict[str, Any]:
    """The whole view of a host row: the operators' (admin API, governord-ctl)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "fqdn": row["fqdn"],
        "app": row["app"],
        "role": row["role"],
        "component": row["component"],
        "origin": row["origin"],
        "state": row["state"],
        "failed_step": row["failed_step"],
        "error": row["error"],
        "provider": row["provider"],
        "machine_id": row["machine_id"],
        "tags": row["tags"],
        "addresses": row["addresses"],
        "classification": row["classification"],
        "registrations": row["registrations"],
        "retire_requested": bool(row["retire_requested"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def is_active(row: Row) -> bool:
    return HostState(row["state"]) in ACTIVE_STATES


def application_host_summary(row: Row, application_keys: dict[str, frozenset[str]]) -> dict[str, Any]:
    """The view of a host row an application may see: of each system's registration record and
    classification only the keys its registrar declares (``application_keys`` by system; a
    system not in it shows nothing), and for the error only :func:`application_error`."""
    summary = host_summary(row)
    for column in ("registrations", "classification"):
        summary[column] = {system: application_view(value, application_keys.get(system))
                           for system, value in (row[column] or {}).items()}
    summary["error"] = application_error(row)
    return summary


def application_error(row: Row) -> str | None:
    """What an application is told of a host's error: the step and what became of the host,
    never the message itself (a peer's own words, with its URLs, host names and ids: the
    operators' view has it)."""
    if not row["error"]:
        return None
    state = row["state"]
    step = row["failed_step"] or STEP_OF_STATE.get(HostState(state), state)
    if state == HostState.FAILED.value:
        outcome = "failed for good; the host is kept as it is until an operator retries or retires it"
    elif state == HostState.GONE.value:
        outcome = "failed for good; the host was rolled back"
    elif row["failed_step"]:
        outcome = "failed for good; the host is being rolled back"
    else:
        outcome = "failed for a passing reason; it is being tried again"
    return f"step {step} {outcome} (the detail is with governord's operators)"


async def _looked_up(lookup: Awaitable[Row | None], field_name: str) -> Row | None:
    """What an operator's lookup found (None: nothing); 409 if an id prefix matched several."""
    try:
        return await lookup
    except AmbiguousId as exc:
        raise RequestError(409, str(exc), field=field_name) from None


async def _named(lookup: Awaitable[Row | None], field_name: str, missing: str) -> Row:
    """What an operator's lookup found: 404 ``missing`` if nothing, 409 if an id prefix matched several."""
    row = await _looked_up(lookup, field_name)
    if row is None:
        raise RequestError(404, missing, field=field_name)
    return row
