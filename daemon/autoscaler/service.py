"""The Cluster Autoscaler's ``CloudProvider`` service, and its gRPC listener.

Every call comes over mutual TLS: the server certificate and the client CA are the HTTPS API's
(``[api.tls]``: governord's own CA, or a site CA), a client without a certificate that chains to
that CA fails the handshake, and the certificate's identity (``api.tls.identity``) names the
application whose node groups the client sees, exactly as on the HTTPS API; a certificate
governord revoked, or the site CA's CRL revokes, is refused at each call.

A node group is one application role (``[autoscaler] node_groups``, ``APP/ROLE``). Its instances
are the role's live hosts, each known to Kubernetes by the providerID ``governord://HOST-ID``
(the node's ``spec.providerID``). What the calls do, in terms of the Governor's decisions:

- ``NodeGroupIncreaseSize``: a scale request (``add = delta``) decided by the application's rules;
  accepted, the new hosts count in the target size at once. Declined, the autoscaler gets an
  error with the rule's reason. Held for an operator's approval, it gets an error saying so, and
  the request stays pending (no second one is made while it waits): once approved, its hosts
  count in the target size, and the autoscaler sees them as its own upcoming nodes.
- ``NodeGroupDeleteNodes``: a release of exactly the named hosts; none is released if one of
  them is not a live host of the group. A host already on its way out is left as it is. The
  autoscaler drained the nodes itself before it asks, so they are retired at once, never
  drained again (``[applications.APP.drain]`` applies to the application's own scale-downs);
  one that was draining already (picked by another scale-down) has its drain confirmed.
- ``NodeGroupDecreaseTargetSize``: cancels hosts not made yet (state ``requested``); never a host
  whose machine is being made or exists.
- ``NodeGroupTemplateNodeInfo``: the node the group adds (:mod:`.template`), so that a group with
  no node can scale up from zero; UNIMPLEMENTED when the config does not give its size.
- ``NodeGroupGetOptions``: UNIMPLEMENTED, so the autoscaler's own options apply to every group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import any_pb2

from ..api.app_api import presented
from ..config import AutoscalerSection, identity_of
from ..engine import BRING_UP_STEPS
from ..models import LIVE_STATES, PROVIDER_ID_PREFIX, HostState, provider_id
from ..rules import RequestError
from ..store import unavailable
from . import externalgrpc_pb2 as pb
from . import externalgrpc_pb2_grpc as pb_grpc
from .template import TemplateUnknown, template_node

if TYPE_CHECKING:
    from ..api.tls import ApplicationTLS
    from ..runtime import Runtime

log = logging.getLogger(__name__)

#: the actor the audit trail names for the autoscaler's requests
ACTOR = "autoscaler"
#: the autoscaler's cloudprovider.OtherErrorClass (its InstanceErrorClass for "not out of resources")
OTHER_ERROR_CLASS = 99

_CREATING = {HostState.REQUESTED.value, HostState.PROVISIONING.value, HostState.REGISTERING.value,
             HostState.CONFIGURING.value}
_DELETING = {HostState.DRAINING.value, HostState.RETIRING.value, HostState.DEREGISTERING.value, HostState.DEPROVISIONING.value,
             HostState.CLEANING.value}
_LIVE = sorted(state.value for state in LIVE_STATES)
#: a RequestError's HTTP status -> the gRPC status the autoscaler gets
_CODES = {404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
          422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED}


def host_id_of(value: str) -> str | None:
    """The host id in a governord providerID; None for any other (a node governord did not make)."""
    if not value.startswith(PROVIDER_ID_PREFIX):
        return None
    host_id = value[len(PROVIDER_ID_PREFIX):]
    return host_id if host_id and "/" not in host_id else None


def group_id(app: str, role: str) -> str:
    return f"{app}/{role}"


def is_leaving(row: dict[str, Any]) -> bool:
    return bool(row["state"] in _DELETING or row["retire_requested"])


def instance_status(row: dict[str, Any]) -> pb.InstanceStatus:
    """What the autoscaler is told about one host: creating, running or deleting, and for a host
    that failed for good the step that failed and why (an instance in error while being created
    is one the autoscaler gives up on and deletes)."""
    state = row["state"]
    if is_leaving(row):
        phase = pb.InstanceStatus.instanceDeleting
    elif state == HostState.READY.value:
        phase = pb.InstanceStatus.instanceRunning
    elif state in _CREATING:
        phase = pb.InstanceStatus.instanceCreating
    elif state == HostState.FAILED.value:
        failed_step = row["failed_step"] or "unknown"
        phase = (pb.InstanceStatus.instanceCreating if failed_step in BRING_UP_STEPS
                 else pb.InstanceStatus.instanceDeleting)
        error = pb.InstanceErrorInfo(errorCode=f"governord-{failed_step}-failed",
                                     errorMessage=row["error"] or f"step {failed_step} failed",
                                     instanceErrorClass=OTHER_ERROR_CLASS)
        return pb.InstanceStatus(instanceState=phase, errorInfo=error)
    else:
        phase = pb.InstanceStatus.unspecified
    return pb.InstanceStatus(instanceState=phase)


@functools.lru_cache(maxsize=1024)
def _not_after(der: bytes) -> float:
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


@dataclass(frozen=True)
class Caller:
    """The application a call is from."""

    app: str
    serial: str


class CloudProvider(pb_grpc.CloudProviderServicer):
    """The service: each call identifies its application, then answers from the store or asks
    the Governor."""

    def __init__(self, runtime: Runtime, tls: ApplicationTLS | None) -> None:
        self.runtime = runtime
        self.tls = tls

    @property
    def section(self) -> AutoscalerSection:
        section = self.runtime.config.core.autoscaler
        assert section is not None  # the listener runs only when configured
        return section

    # -- who is calling, and about what ---------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.runtime.config.core.autoscaler is None:  # taken out of the config by a reload
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "[autoscaler] is no longer configured: "
                         "the listener closes at the next restart")
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:  # the handshake requires one; never reached over TLS
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        der = x509.load_pem_x509_certificate(pems[0]).public_bytes(Encoding.DER)
        cert = presented(der)
        mode = self.runtime.config.api.tls.identity
        values = cert.identity(mode)
        if _not_after(der) < time.time():
            await self._refuse(context, "expired", f"certificate {cert.serial} has expired")
        if self.tls is not None and self.tls.client_crl is not None and self.tls.revoked_by_crl(der):
            await self._refuse(context, "revoked_by_crl", f"certificate {cert.serial} is revoked by its CA's CRL")
        if await self.runtime.certificates.revoked(cert.issuer, cert.serial):
            await self._refuse(context, "revoked", f"certificate {cert.serial} is revoked")
        if len(values) != 1:
            await self._refuse(context, "no_identity" if not values else "ambiguous_identity",
                               f"certificate {cert.serial} has {len(values)} identities (api.tls.identity = {mode}); "
                               "one identifies the application")
        apps = {identity_of(name, section, mode): name for name, section in self.runtime.config.applications.items()}
        if values[0] not in apps:
            await self._refuse(context, "unknown_application",
                               f"certificate {values[0]!r} does not belong to a configured application")
        return Caller(apps[values[0]], cert.serial)

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: str, message: str) -> NoReturn:
        self.runtime.metrics.refused(reason, "autoscaler")
        log.warning("autoscaler call refused: %s", message, extra={"reason": reason, "peer": context.peer()})
        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, message)

    def _groups_of(self, app: str) -> list[tuple[str, str]]:
        return [(a, role) for a, role in self.section.groups() if a == app]

    async def _group(self, context: grpc.aio.ServicerContext, caller: Caller, group: str) -> tuple[str, str]:
        for app, role in self._groups_of(caller.app):
            if group_id(app, role) == group:
                return app, role
        await _abort(context, grpc.StatusCode.NOT_FOUND,
                     f"no node group {group!r} for application {caller.app} ([autoscaler] node_groups)")

    def _node_group(self, app: str, role: str) -> pb.NodeGroup:
        """The group's bounds from the application's rules: at most max_hosts, and no more than
        the role's placements' caps add up to when every one has a cap; at least the
        application's min_hosts when the role is its only one (min_hosts counts every role)."""
        section = self.runtime.config.applications[app]
        placements = self.runtime.config.placements[(app, role)]
        most = section.max_hosts
        caps = [p.cap for p in placements]
        if all(cap is not None for cap in caps):
            most = min(most, sum(cap for cap in caps if cap is not None))
        least = min(section.min_hosts, most) if len(section.roles) == 1 else 0
        where = ", ".join(p.provider + (f" (cap {p.cap})" if p.cap is not None else "") for p in placements)
        return pb.NodeGroup(id=group_id(app, role), minSize=least, maxSize=most,
                            debug=f"governord {app}/{role}: max_hosts {section.max_hosts}, min_hosts "
                                  f"{section.min_hosts}, placements {where}")

    async def _live(self, app: str, role: str) -> list[dict[str, Any]]:
        return await self.runtime.store.list_hosts(app=app, role=role, states=_LIVE)

    # -- the provider as a whole -----------------------------------------------------------------

    async def NodeGroups(self, request: pb.NodeGroupsRequest, context: grpc.aio.ServicerContext) -> pb.NodeGroupsResponse:
        caller = await self._caller(context)
        return pb.NodeGroupsResponse(nodeGroups=[self._node_group(app, role) for app, role in self._groups_of(caller.app)])

    async def NodeGroupForNode(self, request: pb.NodeGroupForNodeRequest,
                               context: grpc.aio.ServicerContext) -> pb.NodeGroupForNodeResponse:
        caller = await self._caller(context)
        host_id = host_id_of(request.node.providerID)
        row = await self.runtime.store.get_host(host_id) if host_id else None
        if row is None or row["id"] != host_id or row["state"] == HostState.GONE.value \
                or (row["app"], row["role"]) not in self._groups_of(caller.app):
            return pb.NodeGroupForNodeResponse(nodeGroup=pb.NodeGroup(id=""))
        return pb.NodeGroupForNodeResponse(nodeGroup=self._node_group(row["app"], row["role"]))

    async def PricingNodePrice(self, request: pb.PricingNodePriceRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._caller(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "governord keeps no prices")

    async def PricingPodPrice(self, request: pb.PricingPodPriceRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._caller(context)
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "governord keeps no prices")

    async def GPULabel(self, request: pb.GPULabelRequest, context: grpc.aio.ServicerContext) -> pb.GPULabelResponse:
        await self._caller(context)
        return pb.GPULabelResponse(label=self.section.gpu_label)

    async def GetAvailableGPUTypes(self, request: pb.GetAvailableGPUTypesRequest,
                                   context: grpc.aio.ServicerContext) -> pb.GetAvailableGPUTypesResponse:
        await self._caller(context)
        return pb.GetAvailableGPUTypesResponse(gpuTypes={name: any_pb2.Any() for name in self.section.gpu_types})

    async def Cleanup(self, request: pb.CleanupRequest, context: grpc.aio.ServicerContext) -> pb.CleanupResponse:
        await self._caller(context)  # nothing is kept per client
        return pb.CleanupResponse()

    async def Refresh(self, request: pb.RefreshRequest, context: grpc.aio.ServicerContext) -> pb.RefreshResponse:
        await self._caller(context)  # every answer is read from the store when asked: nothing to refresh
        return pb.RefreshResponse()

    # -- one node group --------------------------------------------------------------------------

    async def NodeGroupTargetSize(self, request: pb.NodeGroupTargetSizeRequest,
                                  context: grpc.aio.ServicerContext) -> pb.NodeGroupTargetSizeResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        size = sum(not is_leaving(row) for row in await self._live(app, role))
        return pb.NodeGroupTargetSizeResponse(targetSize=size)

    async def NodeGroupIncreaseSize(self, request: pb.NodeGroupIncreaseSizeRequest,
                                    context: grpc.aio.ServicerContext) -> pb.NodeGroupIncreaseSizeResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        if request.delta <= 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"delta must be positive, got {request.delta}")
        waiting = [r for r in await self.runtime.store.pending_requests(app, actor=ACTOR)
                   if r["kind"] == "scale" and r["params"].get("role") == role]
        if waiting:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"request {waiting[0]['id']} for {request.id} waits for an operator's approval: "
                         "its hosts count in the target size once approved")
        try:
            decision = await self.runtime.governor.scale(app, role, add=request.delta, actor=ACTOR)
        except RequestError as exc:
            await _abort(context, _CODES.get(exc.status, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
        row = decision.request
        log.info("autoscaler asked for %d more %s: %s", request.delta, request.id, row["state"],
                 extra={"app": app, "role": role, "request": row["id"], "reason": row["reason"]})
        if row["state"] == "declined":
            # a cap (max_hosts, every placement's) is "no room"; a cooldown or minimum is "not now"
            no_room = (row["reason"] or "").startswith("cap reached")
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if no_room else grpc.StatusCode.FAILED_PRECONDITION
            await _abort(context, code, f"declined: {row['reason']} (request {row['id']})")
        if row["state"] == "pending":
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"{row['reason']}: request {row['id']} waits; its hosts count in the target size once approved")
        return pb.NodeGroupIncreaseSizeResponse()

    async def NodeGroupDeleteNodes(self, request: pb.NodeGroupDeleteNodesRequest,
                                   context: grpc.aio.ServicerContext) -> pb.NodeGroupDeleteNodesResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        ids: list[str] = []
        for node in request.nodes:
            host_id = host_id_of(node.providerID)
            if host_id is None:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"node {node.name!r} has providerID {node.providerID!r}, which is no governord host's")
            ids.append(host_id)
        rows = {row["id"]: row for row in await self.runtime.store.list_hosts(ids=ids, states=_LIVE)}
        for node, host_id in zip(request.nodes, ids, strict=True):
            row = rows.get(host_id)
            if row is None or (row["app"], row["role"]) != (app, role):
                await _abort(context, grpc.StatusCode.NOT_FOUND,
                             f"node {node.name!r} ({node.providerID}) is not in node group {request.id}")
        names = [rows[i]["name"] for i in dict.fromkeys(ids) if not is_leaving(rows[i])]
        for host_id in dict.fromkeys(ids):
            if rows[host_id]["state"] == HostState.DRAINING.value and not rows[host_id]["retire_requested"]:
                with contextlib.suppress(RequestError):  # it moved on meanwhile: nothing left to confirm
                    await self.runtime.governor.confirm_drained(app, host_id, by="autoscaler", actor=ACTOR)
        if names:
            try:
                decision = await self.runtime.governor.release(app, hosts=names, role=role, actor=ACTOR,
                                                               drain=False)
            except RequestError as exc:
                await _abort(context, _CODES.get(exc.status, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
            log.info("autoscaler deleted %s from %s", ", ".join(names), request.id,
                     extra={"app": app, "role": role, "request": decision.request["id"]})
        return pb.NodeGroupDeleteNodesResponse()

    async def NodeGroupDecreaseTargetSize(self, request: pb.NodeGroupDecreaseTargetSizeRequest,
                                          context: grpc.aio.ServicerContext) -> pb.NodeGroupDecreaseTargetSizeResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        if request.delta >= 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"delta must be negative, got {request.delta}")
        try:
            decision = await self.runtime.governor.cancel_unmade(app, role, -request.delta, actor=ACTOR)
        except RequestError as exc:
            await _abort(context, _CODES.get(exc.status, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
        log.info("autoscaler cancelled %d hosts of %s not made yet", -request.delta, request.id,
                 extra={"app": app, "role": role, "request": decision.request["id"]})
        return pb.NodeGroupDecreaseTargetSizeResponse()

    async def NodeGroupNodes(self, request: pb.NodeGroupNodesRequest,
                             context: grpc.aio.ServicerContext) -> pb.NodeGroupNodesResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        return pb.NodeGroupNodesResponse(instances=[
            pb.Instance(id=provider_id(row["id"]), status=instance_status(row)) for row in await self._live(app, role)])

    async def NodeGroupTemplateNodeInfo(self, request: pb.NodeGroupTemplateNodeInfoRequest,
                                        context: grpc.aio.ServicerContext) -> pb.NodeGroupTemplateNodeInfoResponse:
        caller = await self._caller(context)
        app, role = await self._group(context, caller, request.id)
        try:
            node = template_node(self.runtime.config, app, role)
        except TemplateUnknown as exc:
            # the autoscaler's "not implemented": the group scales up only from a node it has
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, str(exc))
        data = node.SerializeToString(deterministic=True)
        # field 1 for releases up to 1.34 (a structured Node there: the same bytes on the wire), 2 for 1.35 on
        return pb.NodeGroupTemplateNodeInfoResponse(nodeInfo=data, nodeBytes=data)

    async def NodeGroupGetOptions(self, request: pb.NodeGroupAutoscalingOptionsRequest,
                                  context: grpc.aio.ServicerContext) -> Any:
        await self._caller(context)
        # Answering with zeroes where the autoscaler has defaults would make it act on them (a
        # provisioning time of 0 deletes the nodes it just asked for): its own defaults apply.
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "the autoscaler's own options apply to every group")


def _guarded(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A call's errors as the autoscaler should get them: a refusal of the rules with its own
    code and words, UNAVAILABLE while the store cannot be reached (the autoscaler tries again
    next loop), and anything else INTERNAL, logged here, never a traceback on the wire."""

    @functools.wraps(method)
    async def call(self: CloudProvider, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except RequestError as exc:
            await _abort(context, _CODES.get(exc.status, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
        except Exception as exc:  # noqa: BLE001 - the wire gets a status, the log the traceback
            reason = unavailable(exc)
            if reason is not None:
                log.warning("autoscaler call %s failed, the store is unreachable: %s", method.__name__, reason)
                await _abort(context, grpc.StatusCode.UNAVAILABLE, "governord cannot reach its database: try again shortly")
            log.exception("autoscaler call %s failed", method.__name__)
            await _abort(context, grpc.StatusCode.INTERNAL, "internal error (logged)")

    return call


for _name in [name for name in vars(CloudProvider) if name[:1].isupper()]:
    setattr(CloudProvider, _name, _guarded(getattr(CloudProvider, _name)))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - grpc raises


class AutoscalerListener:
    """The gRPC server: started and stopped by the daemon beside the HTTPS API."""

    def __init__(self, runtime: Runtime, tls: ApplicationTLS | None, *, certificate: str, key: str,
                 client_ca: str) -> None:
        self.runtime = runtime
        self.service = CloudProvider(runtime, tls)
        #: PEM bytes, read now: the listener starts from what was there when the daemon checked it
        self._pems = tuple(Path(f).read_bytes() for f in (certificate, key, client_ca))
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; returns the port (written to STATE_DIR/autoscaler.port).

        :raises OSError: the address cannot be bound."""
        section = self.runtime.config.core.autoscaler
        assert section is not None
        certificate, key, client_ca = self._pems
        credentials = grpc.ssl_server_credentials([(key, certificate)], root_certificates=client_ca,
                                                  require_client_auth=True)
        server = grpc.aio.server(maximum_concurrent_rpcs=section.max_concurrent_calls,
                                 options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_CloudProviderServicer_to_server(self.service, server)
        host = f"[{section.listen}]" if ":" in section.listen else section.listen
        try:
            port = server.add_secure_port(f"{host}:{section.port}", credentials)
        except RuntimeError as exc:  # grpc's way of saying the address is taken or not ours
            raise OSError(f"cannot listen on {host}:{section.port}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {host}:{section.port}")
        await server.start()
        self._server, self.port = server, port
        (self.runtime.state_dir / "autoscaler.port").write_text(f"{port}\n")
        return port

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.runtime.state_dir / "autoscaler.port")
