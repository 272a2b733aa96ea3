"""The OpenStack lab peer: a real keystone and a real nova API ("novabox") on loopback ports.

Both run from their own virtualenv, lab/.build/openstack-venv (``install.sh``; nova pins many
libraries the project's venv must not see), as two processes:

- ``keystonebox.py``: keystone 30.0.0 with a sqlite database and fernet keys in the work
  directory; users ``admin`` (project ``admin``), ``governord`` (``member`` of project
  ``governord``) and ``nova`` (the service user nova validates tokens with);
- ``novabox.py``: nova 34.0.0's API, conductor, scheduler, compute (fake virt driver) and
  placement from nova's own functional-test harness, with the real keystonemiddleware in front.

:func:`start_openstack` starts both and registers nova in keystone's catalogue (service type
``compute``), so a client needs nothing but the auth URL and credentials, as with a real cloud.

Fidelity gaps (see reference/peers.md): glance, neutron and cinder are nova's in-process
stand-ins, reachable only through nova (no image or network endpoint in the catalogue; images by
name only through compute's deprecated ``/images`` proxy, microversion <= 2.35); every server
builds instantly on the fake driver and is ACTIVE when the create call returns (casts run as
calls); the lab network exists only in the one project nova's neutron stand-in knows.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.process import LISTENING, PeerProcess, start_peer

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
VENV = BUILD_DIR / "openstack-venv"
PYTHON = VENV / "bin" / "python"

REGION = "RegionOne"
#: the lab's non-admin user and project (governord's provider logs in as them)
USERNAME = "governord"
PROJECT = "governord"
#: a default flavor of nova's functional tests: 1 vCPU, 512 MiB, 1 GiB disk
FLAVOR = "m1.tiny"
#: the image nova's functional tests boot by default ("fakeimage123456"; the name is not unique)
IMAGE_ID = "155d900f-4e14-4e4c-a73d-069cbf4541e6"


def install_openstack(*, timeout: float = 900.0) -> Path:
    """Run install.sh (fast when nothing changed) and return the lab venv's python."""
    result = subprocess.run(
        ["bash", str(HERE / "install.sh")], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0 or not PYTHON.exists():
        raise RuntimeError(
            f"installing the OpenStack lab failed ({result.returncode}): {(result.stdout + result.stderr)[-2000:]}"
        )
    return PYTHON


@dataclass
class OpenStackLab:
    """A running keystone + novabox pair and what a client needs to use it."""

    workdir: Path
    keystone: PeerProcess
    nova: PeerProcess
    auth_url: str
    compute_url: str
    username: str
    password: str
    project: str
    project_id: str
    admin_username: str
    admin_password: str
    admin_project: str
    region: str
    user_domain: str
    project_domain: str
    image_id: str
    flavor: str
    #: id of the lab network (nova's neutron stand-in: "private", 192.168.1.0/24)
    network: str
    network_name: str
    subnet_cidr: str
    #: every image the glance stand-in has: ``[{"id": ..., "name": ...}]``
    images: list[dict[str, str]] = field(default_factory=list)

    def cloud(self, *, admin: bool = False) -> dict[str, Any]:
        """openstacksdk ``auth`` arguments for the lab user (or the admin)."""
        return {
            "auth_url": self.auth_url,
            "username": self.admin_username if admin else self.username,
            "password": self.admin_password if admin else self.password,
            "project_name": self.admin_project if admin else self.project,
            "user_domain_name": self.user_domain,
            "project_domain_name": self.project_domain,
        }

    def connect(self, *, admin: bool = False) -> Any:
        """A new openstacksdk Connection as the lab user (or the admin), in region RegionOne."""
        import openstack.connection

        return openstack.connection.Connection(region_name=self.region, **self.cloud(admin=admin))

    def stop(self) -> None:
        """Stop nova and keystone."""
        self.nova.stop()
        self.keystone.stop()

    def __enter__(self) -> OpenStackLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _register_compute(lab_auth: dict[str, Any], compute_url: str, region: str) -> None:
    import openstack.connection

    admin = openstack.connection.Connection(region_name=region, **lab_auth)
    try:
        service = admin.identity.create_service(type="compute", name="nova", description="novabox")
        for interface in ("public", "internal"):
            admin.identity.create_endpoint(
                service_id=service.id, interface=interface, url=compute_url, region_id=region
            )
    finally:
        admin.close()


def start_openstack(workdir: Path, *, install: bool = True, timeout: float = 90.0) -> OpenStackLab:
    """Start keystone and novabox with state under ``workdir``; return once a client can use them.

    Raises RuntimeError with the peers' output if either does not come up.
    """
    python = install_openstack() if install else PYTHON
    workdir.mkdir(parents=True, exist_ok=True)
    admin_password = secrets.token_urlsafe(12)
    password = secrets.token_urlsafe(12)
    service_password = secrets.token_urlsafe(12)
    env = {
        "KEYSTONE_ADMIN_PASSWORD": admin_password,
        "KEYSTONE_USER_PASSWORD": password,
        "KEYSTONE_SERVICE_PASSWORD": service_password,
        "PYTHONWARNINGS": "ignore",
    }
    # nova's neutron stand-in owns its network in this one project; keystone creates it with this id
    project_id = "6f70656e737461636b20342065766572"
    # keystone and nova take about four seconds each to start; started side by side, nova must
    # know keystone's URL in advance. keystonebox binds the port first thing, so the window in
    # which another process could take it is a few milliseconds.
    keystone_port = _free_port()
    keystone_url = f"http://127.0.0.1:{keystone_port}/v3"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        keystone_start = pool.submit(
            start_peer,
            "keystone",
            [
                str(python), str(HERE / "keystonebox.py"), "--workdir", str(workdir / "keystone"),
                "--project-id", project_id, "--port", str(keystone_port),
            ],
            env=env,
            timeout=timeout,
            log_path=workdir / "keystone.log",
        )
        nova_start = pool.submit(
            start_peer,
            "novabox",
            [str(python), str(HERE / "novabox.py"), "--keystone-url", keystone_url],
            pattern=_NOVABOX_LISTENING,
            env={"NOVA_SERVICE_PASSWORD": service_password, "PYTHONWARNINGS": "ignore"},
            timeout=timeout,
            log_path=workdir / "novabox.log",
        )
        started: list[PeerProcess] = []
        failure: BaseException | None = None
        for future in (keystone_start, nova_start):
            try:
                started.append(future.result()[0])
            except BaseException as exc:  # noqa: BLE001 - re-raised below once both are settled
                failure = failure or exc
        if failure is not None:
            for peer in started:
                peer.stop()
            raise failure
    keystone = keystone_start.result()[0]
    nova, match = nova_start.result()
    try:
        facts = json.loads(match.group(2))
        lab = OpenStackLab(
            workdir=workdir,
            keystone=keystone,
            nova=nova,
            auth_url=keystone_url,
            compute_url=nova.url,
            username=USERNAME,
            password=password,
            project=PROJECT,
            project_id=facts["project_id"],
            admin_username="admin",
            admin_password=admin_password,
            admin_project="admin",
            region=REGION,
            user_domain="Default",
            project_domain="Default",
            image_id=IMAGE_ID,
            flavor=FLAVOR,
            network=facts["network"]["id"],
            network_name=facts["network"]["name"],
            subnet_cidr=facts["subnet"]["cidr"],
            images=facts["images"],
        )
        if lab.project_id != project_id:
            raise RuntimeError(f"novabox's network belongs to project {lab.project_id}, keystone's is {project_id}")
        _register_compute(lab.cloud(admin=True), lab.compute_url, lab.region)
    except BaseException:
        nova.stop()
        keystone.stop()
        raise
    return lab


#: novabox's ready line: ``LISTENING <url> <json facts>``
_NOVABOX_LISTENING = re.compile(LISTENING.pattern + r" (\{.*\})")


def _main() -> None:
    """``python -m lab.openstack [DIR]``: run the lab in the foreground and print how to use it."""
    import sys
    import tempfile

    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="openstack-lab-"))
    started = time.monotonic()
    with start_openstack(workdir) as lab:
        print(f"OpenStack lab up in {time.monotonic() - started:.1f}s; logs in {workdir}")
        for key, value in lab.cloud().items():
            print(f"  OS_{key.upper()}={value}")
        print(f"  compute {lab.compute_url}, image {lab.image_id}, flavor {lab.flavor}, network {lab.network}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    _main()


__all__ = ["FLAVOR", "IMAGE_ID", "OpenStackLab", "install_openstack", "start_openstack"]
