"""An oVirt/RHV engine simulator owned by governord's lab (engine 4.5, REST API v4, a subset).

No real engine can run here (it needs ovirt-engine RPMs, WildFly, Java and PostgreSQL), so the
provider is proven against this simulator, and the simulator is held to the engine's behaviour:

* SSO: ``POST /ovirt-engine/sso/oauth/token`` (password grant, form-encoded, JSON answer with
  ``access_token``); a wrong password is HTTP 400 with the engine's JSON error body. For REST API
  clients (scope ``ovirt-app-api``) SsoUtils puts the code in ``error_code`` and the message in
  ``error``, for other scopes the code in ``error`` and the message in ``error_description``;
  ovirtsdk4 reads both. Tokens are revoked by ``POST /ovirt-engine/services/sso-logout`` (what
  ovirtsdk4 4.6 calls on ``Connection.close()``) and ``/ovirt-engine/sso/oauth/revoke``.
* The API under ``/ovirt-engine/api`` needs ``Authorization: Bearer <token>`` (or Basic with the
  user's password); without it: 401 with an empty body, which ovirtsdk4 turns into a token
  refresh and, if that fails, an ``AuthError``. Tokens expire: after ``token_idle_timeout``
  seconds unused (the engine's SSO_TOKEN_TIMEOUT), or all at once by :func:`expire_tokens`.
* ``GET /api`` (product info, summary), ``/clusters``, ``/templates`` (with ``search=``),
  ``/vms`` (``search=`` with ``name``, ``comment``, ``description``, ``status``, ``cluster``,
  ``id``, ``fqdn``, ``ip``; ``*`` wildcards; ``and``/``or``; ``sortby FIELD [asc|desc]``;
  ``page N``; ``case_sensitive``, false unless given, as the REST layer reads it; ``max``;
  results always in name order unless sorted otherwise),
  ``GET /vms/{id}`` (``follow=reported_devices``, ``all_content``), ``POST /vms`` (from a
  template by id or name, in a cluster by id or name; name, memory, memory policy, CPU topology,
  description, comment, initialization), ``POST /vms/{id}/start`` (with ``use_cloud_init`` /
  ``use_initialization`` and a ``<vm><initialization>`` for a run-once start), ``/stop``,
  ``/shutdown``, ``DELETE /vms/{id}``, ``GET /vms/{id}/reporteddevices``.
* Status sequences with timing: a VM from a template with disks is ``image_locked`` and then
  ``down``; start goes ``wait_for_launch`` → ``powering_up`` → ``up``; the guest agent reports
  the NIC's IPv6 link-local address a little after ``up``, then its IPv4 address (the static
  one from the cloud-init NIC configuration, else one from a DHCP range), a global IPv6 one
  (SLAAC, when the seed has an ``ipv6_network``) and the FQDN; tests add devices with more
  addresses (:meth:`EngineState.report_nic`); stop and shutdown go ``powering_down`` → ``down``; a removed
  VM is ``image_locked`` while its disks are removed and then gone (404).
* Faults are written by the SDK's FaultWriter the way the engine's REST layer renders failed
  validations: 409 (400 for a bad name), reason ``Operation Failed``, the message in brackets,
  e.g. ``[Cannot remove VM. VM is running.]``, ``[Cannot add VM. The VM name is already in use,
  please choose a unique name and try again.]``, ``[Cannot run VM because the VM is in Up
  status.]`` (the run's status matrix, for every status but down, paused and suspended); a name
  reference to nothing is 404 ``Entity not found: Template: name=...``; an unknown id is a bare
  404 (no body) where the REST layer looks the VM up itself (get, remove, run once), and the
  command's 400 ``[Cannot stop VM. VM is not found.]`` where it does not (stop, shutdown, a
  plain start); missing required attributes are 400 ``Incomplete parameters``.
* Races as on a real engine: stopping or shutting down a VM that is already down succeeds (the
  engine skips the command); a shutdown of a VM that is not up stops it instead; a VM removed
  between the REST layer's lookup and the command is the command's 400. Tests make races with
  :meth:`EngineState.before` (a hook run just before the next action), :meth:`EngineState.forget`
  (another client removed the VM) and :meth:`EngineState.set_status` (what the host reports).
* Statuses no request makes, set by tests with :meth:`EngineState.set_status`: ``not_responding``
  (stoppable, not runnable or removable), ``unknown`` (not even stoppable), ``paused`` (a run
  resumes it), ``migrating``; and launches that fail on every host
  (:meth:`EngineState.fail_next_launch`: ``wait_for_launch``, then ``down`` again).

What this simulator does not cover
----------------------------------
* Hosts, storage domains, disks, disk attachments, networks, vNIC profiles and VM NICs: a VM has
  no ``/nics`` or ``/diskattachments``; the guest's network devices are only visible through
  ``reporteddevices``, and a static IPv6 address from cloud-init is not applied. Scheduling (which host runs a VM), memory over-commit and quota are not
  modelled: a start always succeeds unless a test makes it fail.
* Tags, permissions, affinity, pools, snapshots, instance types, template versions beyond the
  base one, VM update (``PUT``), migration and suspend as requests (their statuses only come
  from a test), reboot, consoles, events and jobs.
* ``<link rel=...>`` and ``<actions>`` elements in representations (ovirtsdk4's writers do not
  produce them), so ``follow_link`` works only through ``href`` attributes; ``follow=`` only
  knows ``reported_devices``.
* The search language beyond ``=``/``!=`` conditions joined by ``and``/``or`` on the fields
  listed above (no ``<``/``>``, no free text, no cross-object conditions such as
  ``Vms: cluster.name=``, no sorting by more than one field), its syntax-error text, which is the
  simulator's own, and PostgreSQL's collation beyond "letters before case".
* The engine's validation of names per data center (names are unique engine-wide here), of
  templates from another data center, of OS types, and of most VM attributes the request may
  carry (they are ignored). Custom properties need engine configuration and are ignored.
* Kerberos/HTTP-auth SSO grants, the engine's own session timeout, ``Prefer: persistent-auth``
  sessions, API version 2/3 paths, JSON representations (``Accept: application/json``), gzip, and ``async`` actions
  (everything answers ``complete`` at once).
* The cloud-init payload is recorded, never executed: only the first static NIC address and the
  host name are "applied" by the simulated guest.

Run it with ``python -m lab.ovirt_sim --port 0 --username admin@internal --password=PW``; it
prints ``LISTENING <url>`` (the API URL) once it accepts connections. In-process use:
:func:`create_app` (an aiohttp application) or :class:`OVirtSimServer` (a server in a thread).
"""

from __future__ import annotations

from .app import AUTH_KEY, STATE_KEY, create_app, expire_tokens
from .seed import default_seed, load_seed
from .server import OVirtSimServer
from .state import EngineState, Timing

__all__ = [
    "AUTH_KEY",
    "EngineState",
    "OVirtSimServer",
    "STATE_KEY",
    "Timing",
    "create_app",
    "default_seed",
    "expire_tokens",
    "load_seed",
]
