"""The EC2 provider: launch, find, stop and terminate instances through boto3.

A machine is one instance launched from the role's AMI. Ownership is marked by the instance tag
``governord:host-id`` (with ``Name`` = host name), given in ``TagSpecifications`` of the
``RunInstances`` call itself, so the instance carries the marker from the moment it exists (its
root volumes are tagged the same way, for whoever hunts for leftovers).

Idempotency has two layers. ``create_or_find`` always looks for the marker first; and
``RunInstances`` carries a ``ClientToken`` derived from the host id, which is EC2's own guard for
the window that tags cannot cover: a call whose answer was lost (timeout, crash) and whose
instance ``DescribeInstances`` does not show yet (EC2 is eventually consistent). Repeating the call
with the same token returns that same instance instead of launching another. A token stays
bound to its instance after termination (``IdempotentInstanceTerminated``), so a host id
launched again after its first machine was destroyed moves on to the next of a fixed sequence
of tokens derived from it; the sequence is deterministic, so a retry still repeats the very
call that launched.

boto3 is synchronous; every call runs in a worker thread through
:meth:`~governord.providers.ConfiguredInstance.call_sync`, and waiting (for ``running``, for
``terminated``) is done on the event loop with ``asyncio.sleep`` between short calls. One boto3
client serves the provider instance: clients are thread-safe, sessions are not, so the session is
made once, in :meth:`EC2Provider.start`, and never touched again.

Errors keep EC2's code and message (``InvalidAMIID.NotFound: The image id ...``). Throttling,
5xx and connection failures are retryable, and so is ``InsufficientInstanceCapacity``: AWS
documents it as a passing shortage ("try again in a few minutes") and the engine's backoff bounds
the retries; ``IncorrectInstanceState`` (an instance still between states) is retryable too.
Quotas (``InstanceLimitExceeded``, ``VcpuLimitExceeded``), authentication (``AuthFailure``,
``UnauthorizedOperation``) and every other client error are permanent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers
from pydantic import ValidationError

from governord.errors import PermanentError, RetryableError, StepError
from governord.models import OWNERSHIP_KEY, Machine, MachineSpec, PowerState
from governord.providers import Provider, ProviderConfig

from .config import EC2Config, EC2Profile

log = logging.getLogger(__name__)

#: instance states in which the machine exists for governord (find, list_owned)
LIVE_STATES = ("pending", "running", "stopping", "stopped")
#: instance states of a machine on its way out or gone
GONE_STATES = frozenset({"shutting-down", "terminated"})

_POWER = {
    "pending": PowerState.ON,
    "running": PowerState.ON,
    # stopping and shutting-down machines never come back by themselves: nothing may treat them as up
    "stopping": PowerState.OFF,
    "stopped": PowerState.OFF,
    "shutting-down": PowerState.OFF,
    "terminated": PowerState.OFF,
}
#: the state reason of a stopped instance that was hibernated (its RAM is on its root volume)
_HIBERNATED = "Client.UserInitiatedHibernate"

#: EC2 error codes of passing failures; every other 4xx is permanent, every 5xx retryable
_RETRYABLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequestsException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "RequestExpired",
        "RequestTimeout",
        "IncorrectInstanceState",
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientAddressCapacity",
        "InsufficientCapacity",
    }
)
#: the answers of EC2 for an instance id it does not know (also shortly after RunInstances)
_NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
#: EC2's answer to a ClientToken whose instance has been terminated
_TOKEN_SPENT = frozenset({"IdempotentInstanceTerminated"})
#: ClientToken generations tried for one host id (each destroyed machine spends one)
TOKEN_GENERATIONS = 16


def client_token(host_id: str, generation: int = 0) -> str:
    """The ``ClientToken`` of ``RunInstances`` for a host's ``generation``-th machine (ASCII, at
    most 64 characters, the same on every attempt)."""
    seed = host_id if generation == 0 else f"{host_id}/{generation}"
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return f"governord-{digest[:48]}"


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags") or ()}


def _state(instance: dict[str, Any]) -> str:
    return str((instance.get("State") or {}).get("Name", ""))


def _power(instance: dict[str, Any]) -> PowerState:
    state = _state(instance)
    if state == "stopped" and (instance.get("StateReason") or {}).get("Code") == _HIBERNATED:
        return PowerState.SUSPENDED
    return _POWER.get(state, PowerState.UNKNOWN)


def _addresses(instance: dict[str, Any]) -> tuple[str, ...]:
    """Private address first (how governord's peers reach the host), then the others."""
    candidates: list[str | None] = [instance.get("PrivateIpAddress")]
    interfaces = sorted(
        instance.get("NetworkInterfaces") or (),
        key=lambda nic: (nic.get("Attachment") or {}).get("DeviceIndex", 0),
    )
    for nic in interfaces:
        candidates.append(nic.get("PrivateIpAddress"))
        candidates.extend(ip.get("PrivateIpAddress") for ip in nic.get("PrivateIpAddresses") or ())
    candidates.append(instance.get("PublicIpAddress"))
    for nic in interfaces:
        candidates.extend(ip.get("Ipv6Address") for ip in nic.get("Ipv6Addresses") or ())
    seen: list[str] = []
    for candidate in candidates:
        if candidate and candidate not in seen:
            seen.append(candidate)
    return tuple(seen)


def _oldest_first(instances: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(instances, key=lambda i: (str(i.get("LaunchTime", "")), i["InstanceId"]))


class EC2Provider(Provider):
    """Machines on EC2: instances launched from an AMI, tagged with governord's marker."""

    type_name = "ec2"
    Config = EC2Config
    Profile = EC2Profile

    def __init__(self, name: str, config: ProviderConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, EC2Config):
            raise TypeError(f"{type(self).__name__} needs an EC2Config, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.cfg: EC2Config = config
        self._client: Any | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self.cfg.endpoint_url or f"EC2 {self.cfg.region}"

    def _make_client(self) -> Any:
        session = boto3.session.Session(
            aws_access_key_id=self.cfg.access_key_id,
            aws_secret_access_key=(
                self.cfg.secret_access_key.reveal() if self.cfg.secret_access_key is not None else None
            ),
            region_name=self.cfg.region,
        )
        verify: bool | str = str(self.cfg.ca_file) if self.cfg.ca_file is not None else self.cfg.verify_tls
        settings = botocore.config.Config(
            # sockets must give up on their own: a thread cannot be cancelled
            connect_timeout=min(10.0, self.cfg.call_timeout),
            read_timeout=self.cfg.call_timeout,
            # few quick retries of botocore's own; the engine's backoff handles longer outages
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=max(10, self.cfg.max_concurrency),
            user_agent_extra="governord",
        )
        return session.client("ec2", endpoint_url=self.cfg.endpoint_url, verify=verify, config=settings)

    async def start(self) -> None:
        """Make the boto3 client. Nothing is sent yet: an unreachable EC2 fails the first call."""
        if self._client is not None:
            return

        def make() -> Any:
            try:
                return self._make_client()
            except Exception as exc:
                raise self._translate(exc, "create EC2 client") from exc

        make.__name__ = "create EC2 client"
        self._client = await self.call_sync(make)

    async def close(self) -> None:
        """Close the client's connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    async def _ec2(self) -> Any:
        await self.ensure_started()
        if self._client is None:  # closed, and used again
            await self.start()
        return self._client

    def _translate(self, exc: BaseException, what: str) -> StepError:
        if isinstance(exc, StepError):
            return exc
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error") or {}
            code = str(error.get("Code") or "Unknown")
            message = str(error.get("Message") or exc)
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            retryable = code in _RETRYABLE_CODES or status >= 500 or status == 429
            kind = RetryableError if retryable else PermanentError
            return kind(f"{what}: {code}: {message}", source=self.name)
        if isinstance(exc, botocore.exceptions.SSLError):
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                return PermanentError(
                    f"{what}: TLS certificate of {self._where} not trusted ({exc}); set ca_file, or verify_tls = false",
                    source=self.name,
                )
            return RetryableError(f"{what}: TLS with {self._where} failed: {exc}", source=self.name)
        if isinstance(
            exc,
            (
                botocore.exceptions.ConnectionError,
                botocore.exceptions.HTTPClientError,
                botocore.exceptions.CredentialRetrievalError,
                botocore.parsers.ResponseParserError,
                OSError,
                TimeoutError,
            ),
        ):
            return RetryableError(f"{what}: cannot talk to {self._where}: {exc}", source=self.name)
        if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
            return PermanentError(
                f"{what}: no AWS credentials ({exc}); set access_key_id and secret_access_key, "
                "or give the daemon's user a credential source boto3 knows",
                source=self.name,
            )
        return PermanentError(f"{what}: {type(exc).__name__}: {exc}", source=self.name)

    async def _call(
        self, what: str, operation: str, *, none_on: frozenset[str] = frozenset(), **params: Any
    ) -> Any:
        """Call ``client.<operation>(**params)`` in a worker thread; failures become StepErrors.

        An EC2 error whose code is in ``none_on`` gives None instead.
        """
        client = await self._ec2()
        method: Callable[..., Any] = getattr(client, operation)

        def run() -> Any:
            try:
                return method(**params)
            except botocore.exceptions.ClientError as exc:
                if (exc.response.get("Error") or {}).get("Code") in none_on:
                    return None
                raise self._translate(exc, what) from exc
            except Exception as exc:
                raise self._translate(exc, what) from exc

        run.__name__ = what  # call_sync names the call in its timeout message
        return await self.call_sync(run)

    async def _describe(self, what: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every instance matching ``filters``, all pages, in one worker thread."""
        client = await self._ec2()

        def run() -> list[dict[str, Any]]:
            try:
                found: list[dict[str, Any]] = []
                for page in client.get_paginator("describe_instances").paginate(Filters=filters):
                    for reservation in page.get("Reservations") or ():
                        found.extend(reservation.get("Instances") or ())
                return found
            except Exception as exc:
                raise self._translate(exc, what) from exc

        run.__name__ = what
        return await self.call_sync(run)

    async def _instance(self, what: str, instance_id: str) -> dict[str, Any] | None:
        """One instance by id (terminated ones included), or None if EC2 does not know it."""
        answer = await self._call(what, "describe_instances", none_on=_NOT_FOUND, InstanceIds=[instance_id])
        for reservation in (answer or {}).get("Reservations") or ():
            for instance in reservation.get("Instances") or ():
                if instance.get("InstanceId") == instance_id:
                    return dict(instance)
        return None

    # -- finding ---------------------------------------------------------------------------

    async def _owned(self, host_id: str, states: Iterable[str] = LIVE_STATES) -> list[dict[str, Any]]:
        return _oldest_first(
            await self._describe(
                "find",
                [
                    {"Name": f"tag:{OWNERSHIP_KEY}", "Values": [host_id]},
                    {"Name": "instance-state-name", "Values": list(states)},
                ],
            )
        )

    async def _find_one(self, host_id: str) -> dict[str, Any] | None:
        instances = await self._owned(host_id)
        if len(instances) > 1:
            log.warning(
                "%s: %d instances carry %s=%s: %s; using %s",
                self.name,
                len(instances),
                OWNERSHIP_KEY,
                host_id,
                [i["InstanceId"] for i in instances],
                instances[0]["InstanceId"],
            )
        return instances[0] if instances else None

    def _machine(self, instance: dict[str, Any]) -> Machine:
        tags = _tags(instance)
        placement = instance.get("Placement") or {}
        return Machine(
            provider=self.name,
            machine_id=instance["InstanceId"],
            name=tags.get("Name") or instance["InstanceId"],
            host_id=tags.get(OWNERSHIP_KEY),
            power=_power(instance),
            addresses=_addresses(instance),
            details={
                "state": _state(instance),
                "region": self.cfg.region,
                "availability_zone": placement.get("AvailabilityZone"),
                "instance_type": instance.get("InstanceType"),
                "image_id": instance.get("ImageId"),
                "subnet_id": instance.get("SubnetId"),
                "vpc_id": instance.get("VpcId"),
                "private_dns_name": instance.get("PrivateDnsName") or None,
                "public_dns_name": instance.get("PublicDnsName") or None,
            },
        )

    # -- the contract ----------------------------------------------------------------------

    async def find(self, host_id: str) -> Machine | None:
        """The live (not shutting-down or terminated) instance tagged with ``host_id``, or None."""
        instance = await self._find_one(host_id)
        return self._machine(instance) if instance else None

    async def list_owned(self) -> list[Machine]:
        """Every live instance of the region that carries governord's tag."""
        instances = await self._describe(
            "list owned",
            [
                {"Name": "tag-key", "Values": [OWNERSHIP_KEY]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ],
        )
        return [self._machine(i) for i in _oldest_first(instances)]

    async def power_state(self, machine_id: str) -> PowerState:
        """The instance's state as a power state; an instance EC2 does not know is a PermanentError."""
        instance = await self._instance("power state", machine_id)
        if instance is None:
            raise PermanentError(f"power state: no instance {machine_id} in {self._where}", source=self.name)
        return _power(instance)

    async def create_or_find(self, spec: MachineSpec) -> Machine:
        """Find the instance tagged with ``spec.host_id`` (starting it if stopped) or launch it."""
        try:
            profile = EC2Profile.model_validate(spec.profile)
        except ValidationError as exc:
            raise PermanentError(f"invalid EC2 profile: {exc}", source=self.name) from None
        instance = await self._find_one(spec.host_id)
        if instance is None:
            instance = await self._launch_once(spec, profile)
        elif _state(instance) == "stopped":
            await self._call("start instance", "start_instances", InstanceIds=[instance["InstanceId"]])
            instance = await self._instance("read instance", instance["InstanceId"]) or instance
        return self._machine(instance)

    async def _launch_once(self, spec: MachineSpec, profile: EC2Profile) -> dict[str, Any]:
        """Launch with the first ClientToken generation not spent on a terminated instance.

        Tokens are deterministic, so a retry after a crash repeats exactly the calls made before
        and EC2 answers the one that launched with that same instance.
        """
        for generation in range(TOKEN_GENERATIONS):
            instance = await self._launch(spec, profile, client_token(spec.host_id, generation))
            if instance is not None and _state(instance) not in GONE_STATES:
                return instance
            log.info(
                "%s: ClientToken generation %d of %s belongs to a terminated instance; trying the next",
                self.name,
                generation,
                spec.host_id,
            )
        raise PermanentError(
            f"launch {spec.hostname}: all {TOKEN_GENERATIONS} ClientTokens of host {spec.host_id} "
            "belong to terminated instances",
            source=self.name,
        )

    async def _launch(self, spec: MachineSpec, profile: EC2Profile, token: str) -> dict[str, Any] | None:
        """One RunInstances with ``token``; None if EC2 says the token's instance is terminated."""
        tags = [
            *({"Key": key, "Value": value} for key, value in profile.tags.items()),
            {"Key": "Name", "Value": spec.hostname},
            {"Key": OWNERSHIP_KEY, "Value": spec.host_id},
        ]
        params: dict[str, Any] = {
            "ImageId": profile.image_id,
            "InstanceType": profile.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": token,
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if profile.subnet_id:
            params["SubnetId"] = profile.subnet_id
            if spec.network.address:
                params["PrivateIpAddress"] = spec.network.address
        elif spec.network.address:
            log.warning(
                "%s: %s has the static address %s, but its profile names no subnet_id: EC2 assigns one",
                self.name,
                spec.hostname,
                spec.network.address,
            )
        if profile.security_group_ids:
            params["SecurityGroupIds"] = list(profile.security_group_ids)
        if profile.key_name:
            params["KeyName"] = profile.key_name
        user_data = spec.user_data or profile.user_data
        if user_data:
            params["UserData"] = user_data  # boto3 base64-encodes it
        if profile.iam_instance_profile:
            kind = "Arn" if profile.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {kind: profile.iam_instance_profile}
        answer = await self._call(f"launch {spec.hostname}", "run_instances", none_on=_TOKEN_SPENT, **params)
        if answer is None:
            return None
        instances = answer.get("Instances") or []
        if not instances:
            raise RetryableError(f"launch {spec.hostname}: RunInstances returned no instance", source=self.name)
        return dict(instances[0])

    async def wait_ready(self, machine: Machine, timeout: float) -> Machine:
        """Poll until the instance is ``running`` with an address.

        An instance EC2 does not know yet (eventual consistency after launch) is waited for; one
        that ends instead (``terminated``) fails: retryable when EC2 names a server-side reason
        (``Server.InsufficientInstanceCapacity``), else permanent, as is one that was stopped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.2
        last = "not visible yet"
        while True:
            instance = await self._instance("wait ready", machine.machine_id)
            if instance is not None:
                state = _state(instance)
                last = state
                if state == "running" and _addresses(instance):
                    return self._machine(instance)
                if state in GONE_STATES or state in ("stopping", "stopped"):
                    reason = (instance.get("StateReason") or {}).get("Message") or "no reason given"
                    code = (instance.get("StateReason") or {}).get("Code") or ""
                    kind = RetryableError if code.startswith("Server.") else PermanentError
                    raise kind(
                        f"wait ready: instance {machine.machine_id} is {state} ({reason})", source=self.name
                    )
            if loop.time() >= deadline:
                raise RetryableError(
                    f"wait ready: instance {machine.machine_id} still {last} after {timeout}s", source=self.name
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 5.0)

    async def destroy(self, host_id: str) -> None:
        """Terminate every instance tagged with ``host_id`` and wait until each is ``terminated``.

        Nothing tagged, already terminated, or unknown to EC2: success. Waits at most
        ``ready_timeout`` seconds (a RetryableError after that; calling again resumes).
        """
        instances = await self._owned(host_id, states=[*LIVE_STATES, "shutting-down"])
        ids = [i["InstanceId"] for i in instances]
        for instance in instances:
            if _state(instance) != "shutting-down":
                # one call per instance: a batch fails whole when any one id is unknown
                await self._call(
                    f"terminate {instance['InstanceId']}",
                    "terminate_instances",
                    none_on=_NOT_FOUND,
                    InstanceIds=[instance["InstanceId"]],
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.ready_timeout
        delay = 0.2
        while ids:
            remaining = []
            for instance_id in ids:
                current = await self._instance("verify terminated", instance_id)
                if current is not None and _state(current) != "terminated":
                    remaining.append(instance_id)
            ids = remaining
            if not ids:
                break
            if loop.time() >= deadline:
                raise RetryableError(
                    f"destroy: {', '.join(ids)} not terminated after {self.cfg.ready_timeout}s", source=self.name
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
