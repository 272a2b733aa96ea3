"""vcsim, govmomi's vCenter simulator, as a lab peer.

Debian ships govmomi's ``simulator`` library but no vcsim command, so ``main.go`` here is the
project's own small main package, built offline by ``build.sh`` into ``lab/.build/vcsim``.

- :func:`build_vcsim` builds it (once; skipped while the binary is newer than every .go file here),
- :func:`start_vcsim` runs one instance on a free port of 127.0.0.1,
- :func:`prepare_lab` gives a fresh instance the inventory governord's lab config expects:
  the VM template ``rhel9-template``, the VM folder ``governord`` and the resource pool
  ``governord`` in cluster ``DC0_C0``.

Fidelity gaps of vcsim 0.24.2 that matter to governord (see reference/peers.md):
``CloneSpec.customization`` is ignored (use ``CustomizeVM_Task`` and power on), the clone's
``config`` only keeps ``extraConfig`` (CPU, memory and annotation come from the template), VM
names are not unique per folder, and there is no DHCP: a guest gets an IP address only from a
fixed-IP customization or from the test hook ``extraConfig["SET.guest.ipAddress"]``.
"""

from __future__ import annotations

import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.process import PeerProcess, start_peer

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
BINARY = BUILD_DIR / "vcsim"

#: Names prepare_lab creates; governord's example and lab configs use them.
TEMPLATE = "rhel9-template"
FOLDER = "governord"
RESOURCE_POOL = "governord"
DATACENTER = "DC0"
CLUSTER = "DC0_C0"


def build_vcsim(*, timeout: float = 600.0) -> Path:
    """Build the vcsim binary from Debian's govmomi sources (offline) and return its path.

    Raises RuntimeError with the build output if go or the govmomi sources are missing.
    """
    result = subprocess.run(
        ["sh", str(HERE / "build.sh")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0 or not BINARY.exists():
        raise RuntimeError(f"building vcsim failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return BINARY


def start_vcsim(
    binary: Path | None = None,
    *,
    username: str | None = "user",
    password: str | None = "pass",
    port: int = 0,
    datacenters: int = 1,
    clusters: int = 1,
    hosts_per_cluster: int = 3,
    vms_per_pool: int = 2,
    pools: int = 0,
    tls: bool = True,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    extra_args: list[str] | None = None,
    log_path: Path | None = None,
    timeout: float = 30.0,
) -> PeerProcess:
    """Start one vcsim on 127.0.0.1 (``port=0``: a free port) and return it once it listens.

    With ``username``/``password`` set, only those credentials log in (without them vcsim accepts
    any). Without ``tls_cert``/``tls_key`` vcsim serves its built-in localhost certificate, whose
    1024-bit key a verifying OpenSSL client rejects (see :func:`make_tls_files`).
    ``PeerProcess.url`` is ``https://127.0.0.1:PORT/sdk``; ``extra`` holds ``username`` and
    ``password``.
    """
    argv = [
        str(binary or build_vcsim()),
        "-l",
        f"127.0.0.1:{port}",
        "-dc",
        str(datacenters),
        "-cluster",
        str(clusters),
        "-host",
        str(hosts_per_cluster),
        "-vm",
        str(vms_per_pool),
        "-pool",
        str(pools),
        f"-tls={'true' if tls else 'false'}",
    ]
    if tls_cert is not None and tls_key is not None:
        argv += ["-tlscert", str(tls_cert), "-tlskey", str(tls_key)]
    if username is not None and password is not None:
        argv += [f"-username={username}", f"-password={password}"]
    argv += extra_args or []
    peer, _ = start_peer("vcsim", argv, timeout=timeout, log_path=log_path)
    peer.extra.update({"username": username or "", "password": password or ""})
    return peer


@dataclass(frozen=True)
class TLSFiles:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Write a CA and a server certificate/key for 127.0.0.1 and localhost into ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "governord lab CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcsim")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.pem", directory / "vcsim.pem", directory / "vcsim.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


@dataclass(frozen=True)
class LabInventory:
    """Managed object ids of what :func:`prepare_lab` made (or found)."""

    datacenter: str
    cluster: str
    template: str
    template_id: str
    folder: str
    folder_id: str
    resource_pool: str
    resource_pool_id: str


def connect(url: str, username: str, password: str, *, verify_tls: bool = False) -> Any:
    """Open a pyvmomi connection (a ``vim.ServiceInstance``) to ``url`` (``https://host:port/sdk``)."""
    from pyVim.connect import SmartConnect

    parts = urllib.parse.urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    kwargs: dict[str, Any] = {}
    if parts.scheme == "https" and not verify_tls:
        kwargs["disableSslCertValidation"] = True
    return SmartConnect(
        protocol=parts.scheme,
        host=parts.hostname or "127.0.0.1",
        port=parts.port or default_port,
        user=username,
        pwd=password,
        path=parts.path or "/sdk",
        **kwargs,
    )


def disconnect(si: Any) -> None:
    """Log out of a connection made by :func:`connect`."""
    from pyVim.connect import Disconnect

    Disconnect(si)


def wait_for_task(task: Any, timeout: float = 60.0) -> Any:
    """Wait for a vSphere task by polling its ``info``; return its result or raise its fault."""
    deadline = time.monotonic() + timeout
    while True:
        info = task.info
        if info.state == "success":
            return info.result
        if info.state == "error":
            raise info.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task._moId} still {info.state} after {timeout}s")
        time.sleep(0.05)


def _child(children: Any, name: str) -> Any | None:
    for child in children:
        if child.name == name:
            return child
    return None


def prepare_lab(
    url: str,
    username: str,
    password: str,
    *,
    datacenter: str = DATACENTER,
    cluster: str = CLUSTER,
    source_vm: str = "DC0_C0_RP0_VM0",
    template: str = TEMPLATE,
    folder: str = FOLDER,
    resource_pool: str = RESOURCE_POOL,
) -> LabInventory:
    """Make the inventory governord's lab expects on a vcsim at ``url``; idempotent.

    The template is one of the model's VMs, powered off, renamed and marked as a template.
    """
    from pyVmomi import vim

    si = connect(url, username, password)
    try:
        content = si.RetrieveContent()
        index = content.searchIndex
        dc = index.FindByInventoryPath(datacenter)
        if not isinstance(dc, vim.Datacenter):
            raise RuntimeError(f"no datacenter {datacenter!r} on {url}")
        compute = index.FindByInventoryPath(f"{datacenter}/host/{cluster}")
        if not isinstance(compute, vim.ClusterComputeResource):
            raise RuntimeError(f"no cluster {cluster!r} in {datacenter}")

        vm_folder = _child(dc.vmFolder.childEntity, folder)
        if vm_folder is None:
            vm_folder = dc.vmFolder.CreateFolder(folder)

        root_pool: Any = compute.resourcePool
        pool = _child(root_pool.resourcePool, resource_pool)
        if pool is None:

            def allocation() -> Any:
                return vim.ResourceAllocationInfo(
                    reservation=0,
                    limit=-1,
                    expandableReservation=True,
                    shares=vim.SharesInfo(level="normal", shares=0),
                )

            pool = root_pool.CreateResourcePool(
                resource_pool,
                vim.ResourceConfigSpec(cpuAllocation=allocation(), memoryAllocation=allocation()),
            )

        tmpl = index.FindChild(dc.vmFolder, template)
        if tmpl is None:
            tmpl = index.FindChild(dc.vmFolder, source_vm)
            if tmpl is None:
                raise RuntimeError(f"neither {template!r} nor {source_vm!r} exists in {datacenter}")
            if tmpl.runtime.powerState != "poweredOff":
                wait_for_task(tmpl.PowerOffVM_Task())
            wait_for_task(tmpl.ReconfigVM_Task(spec=vim.vm.ConfigSpec(name=template)))
        if not tmpl.config.template:
            if tmpl.runtime.powerState != "poweredOff":
                wait_for_task(tmpl.PowerOffVM_Task())
            tmpl.MarkAsTemplate()

        return LabInventory(
            datacenter=dc._moId,
            cluster=compute._moId,
            template=template,
            template_id=tmpl._moId,
            folder=folder,
            folder_id=vm_folder._moId,
            resource_pool=resource_pool,
            resource_pool_id=pool._moId,
        )
    finally:
        disconnect(si)


__all__ = [
    "BINARY",
    "CLUSTER",
    "DATACENTER",
    "FOLDER",
    "RESOURCE_POOL",
    "TEMPLATE",
    "LabInventory",
    "TLSFiles",
    "build_vcsim",
    "connect",
    "disconnect",
    "make_tls_files",
    "prepare_lab",
    "start_vcsim",
    "wait_for_task",
]
