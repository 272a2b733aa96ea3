"""A real keystone (the PyPI ``keystone`` package) for the OpenStack lab, on a free loopback port.

Run with lab/.build/openstack-venv's python (see install.sh)::

    python keystonebox.py --workdir DIR --project-id HEX32

Everything keystone-manage would do is done in this one process (each keystone-manage call would
cost two seconds of imports): ``db_sync`` into ``DIR/keystone.db``, ``fernet_setup``,
``credential_setup``, ``bootstrap`` (user ``admin`` in project ``admin``, the roles admin, manager,
member, reader and service, the identity endpoint). Then:

- project ``governord`` with the id given by ``--project-id`` (nova's in-process neutron stand-in
  owns its network in one fixed project, so the lab project must have that id), with the user
  ``governord`` as ``member``;
- project ``service`` with the user ``nova`` holding ``admin`` and ``service``: nova's
  keystonemiddleware validates tokens as that user.

Passwords come from the environment: ``KEYSTONE_ADMIN_PASSWORD``, ``KEYSTONE_USER_PASSWORD``,
``KEYSTONE_SERVICE_PASSWORD``. Prints ``LISTENING http://127.0.0.1:PORT/v3`` once it serves.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import signal
import socketserver
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

ARGV = sys.argv[:]
# oslo.config parses sys.argv on its own when keystone is imported and configured.
sys.argv = sys.argv[:1]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logging.getLogger("keystone.access").info("%s " + format, self.address_string(), *args)


def _write_config(workdir: Path) -> Path:
    config = workdir / "keystone.conf"
    config.write_text(
        "\n".join(
            [
                "[DEFAULT]",
                "debug = false",
                "[database]",
                f"connection = sqlite:///{workdir / 'keystone.db'}",
                "[identity]",
                # bcrypt at its default cost takes 0.3 s per password check: too slow for a lab
                "password_hash_rounds = 4",
                "[token]",
                "provider = fernet",
                "[fernet_tokens]",
                f"key_repository = {workdir / 'fernet-keys'}",
                "[fernet_receipts]",
                f"key_repository = {workdir / 'fernet-receipts'}",
                "[credential]",
                f"key_repository = {workdir / 'credential-keys'}",
                "",
            ]
        )
    )
    return config


def _manage(config: Path, *command: str, clear: bool = True) -> None:
    import keystone.conf
    from keystone.cmd import cli

    cli.main(argv=["keystone-manage", "--config-file", str(config), *command])
    if clear:
        # cli.main parses the command line into the global CONF; clear it for the next command.
        keystone.conf.CONF.clear()


def _ensure_role(providers: Any, name: str) -> str:
    roles = [r for r in providers.role_api.list_roles() if r["name"] == name and not r.get("domain_id")]
    if roles:
        return str(roles[0]["id"])
    import uuid

    role = providers.role_api.create_role(uuid.uuid4().hex, {"name": name})
    return str(role["id"])


def _add_project_user(
    providers: Any, *, project_id: str, project_name: str, user: str, password: str, roles: list[str]
) -> None:
    import uuid

    domain = "default"
    providers.resource_api.create_project(
        project_id,
        {"id": project_id, "name": project_name, "domain_id": domain, "enabled": True, "is_domain": False},
    )
    created = providers.identity_api.create_user(
        {"id": uuid.uuid4().hex, "name": user, "domain_id": domain, "enabled": True, "password": password}
    )
    for role in roles:
        providers.assignment_api.create_grant(_ensure_role(providers, role), user_id=created["id"], project_id=project_id)


def main() -> int:
    """Set keystone up in ``--workdir`` and serve it until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--project-id", required=True, help="id (32 hex digits) of the project 'governord'")
    parser.add_argument("--project-name", default="governord")
    parser.add_argument("--username", default="governord")
    parser.add_argument("--region", default="RegionOne")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(ARGV[1:])
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    admin_password = os.environ["KEYSTONE_ADMIN_PASSWORD"]
    user_password = os.environ["KEYSTONE_USER_PASSWORD"]
    service_password = os.environ["KEYSTONE_SERVICE_PASSWORD"]

    warnings.simplefilter("ignore")
    # Only the LISTENING line may go to stdout: the launcher stops reading it after that line,
    # and keystone's logging would fill the pipe and block the server. Everything else: stderr.
    announce = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Bind before the slow imports: the port must be known for bootstrap's identity endpoint.
    server = _ThreadingServer(("127.0.0.1", args.port), _QuietHandler)
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/v3"

    config = _write_config(workdir)
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    _manage(config, "db_sync")
    _manage(config, "fernet_setup", "--keystone-user", user, "--keystone-group", group)
    _manage(config, "credential_setup", "--keystone-user", user, "--keystone-group", group)
    os.environ["OS_BOOTSTRAP_PASSWORD"] = admin_password
    _manage(
        config,
        "bootstrap",
        "--bootstrap-public-url",
        url,
        "--bootstrap-internal-url",
        url,
        "--bootstrap-admin-url",
        url,
        "--bootstrap-region-id",
        args.region,
        clear=False,
    )
    del os.environ["OS_BOOTSTRAP_PASSWORD"]

    import keystone.conf
    from keystone.common import provider_api

    # bootstrap left its backends loaded and CONF parsed: add the lab's projects with them.
    providers = provider_api.ProviderAPIs
    _add_project_user(
        providers,
        project_id=args.project_id,
        project_name=args.project_name,
        user=args.username,
        password=user_password,
        roles=["member"],
    )
    import uuid

    _add_project_user(
        providers,
        project_id=uuid.uuid4().hex,
        project_name="service",
        user="nova",
        password=service_password,
        roles=["admin", "service"],
    )
    keystone.conf.CONF.clear()
    from keystone.cmd import cli

    # keystone-manage's required sub-command argument would make the server's parse fail.
    keystone.conf.CONF.unregister_opt(cli.command_opt)
    # The WSGI application loads every backend again and locks the registry afterwards.
    providers._clear_registry_instances()

    os.environ["OS_KEYSTONE_CONFIG_FILES"] = str(config)
    from keystone.server import wsgi

    app = wsgi.initialize_public_application()
    server.set_app(app)

    def stop(signum: int, frame: FrameType | None) -> None:
        # All state is in memory or already committed; nova's worker threads would only delay a
        # normal exit past the launcher's patience.
        server.server_close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"LISTENING {url}", file=announce, flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
