"""The running daemon serves Puppet's autosign decision on its own socket ([api]
autosign_socket), with its own mode and group, and nowhere else: the admin socket no longer
decides it, and the autosign socket answers nothing but it. ``governord-autosign`` signs nothing
once the daemon is gone, whatever it is asked (before, ``-h`` and ``--help`` exited 0)."""

from __future__ import annotations

import grp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from lab.stack import Lab

AUTOSIGN = Path(sys.executable).parent / "governord-autosign"


def _csr(certname: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
               .add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"a-guess"))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _autosign(socket_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOVERNORD_AUTOSIGN_SOCKET": str(socket_path)}
    return subprocess.run([str(AUTOSIGN), *args], input=stdin, env=env, capture_output=True, text=True, timeout=60)


def _with_autosign(config: Path, socket_path: Path, extra: str = "") -> None:
    text, count = re.subn(r'(?m)^autosign_socket = .*\nautosign_socket_mode = .*$',
                          f'autosign_socket = "{socket_path}"\nautosign_socket_mode = "0660"{extra}', config.read_text())
    assert count == 1
    config.write_text(text)


def _other_group() -> grp.struct_group:
    """A group this process is not in (as puppet's is not governord's)."""
    return next(g for g in grp.getgrall() if g.gr_gid not in (os.getgid(), *os.getgroups()))


async def test_the_daemon_decides_autosign_on_its_own_socket_only(lab: Lab, tmp_path: Path) -> None:
    group = _other_group()
    # as governord-autosign.tmpfiles.conf makes /run/governord-autosign: the group is puppet's, setgid
    directory = tmp_path / "as"
    directory.mkdir()
    os.chown(directory, -1, group.gr_gid)
    directory.chmod(0o2750)
    socket_path = directory / "autosign.sock"
    config = lab.write_config()
    _with_autosign(config, socket_path)
    daemon = lab.start_governord(config)
    try:
        done = os.stat(socket_path)
        assert done.st_gid == group.gr_gid and done.st_mode & 0o7777 == 0o660
        # the admin socket does not decide it (nor describe it)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(daemon.socket))) as session:
            async with session.post("http://governord/v1/autosign",
                                    json={"certname": "demo-node-01.lab.example", "csr": _csr("x")}) as resp:
                assert resp.status == 404
            async with session.get("http://governord/openapi.json") as resp:
                assert "/v1/autosign" not in json.loads(await resp.read())["paths"]
        # the autosign socket: the decision, nothing else
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session:
            for path in ("/v1/hosts", "/v1/status", "/openapi.json", "/metrics", "/v1/audit"):
                async with session.get(f"http://governord{path}") as resp:
                    assert resp.status == 404, path
            async with session.post("http://governord/v1/hosts/demo-node-01/retire") as resp:
                assert resp.status == 404
        refused = _autosign(socket_path, "demo-node-01.lab.example", stdin=_csr("demo-node-01.lab.example"))
        assert refused.returncode == 1
        assert "governord is bringing up no host demo-node-01.lab.example" in refused.stderr
        audit = daemon.ctl_json("audit", "--kind", "autosign-")
        assert [(e["kind"], e["actor"]) for e in audit] == [("autosign-refused", "puppet-autosign")]
    finally:
        daemon.stop()
    assert not socket_path.exists()
    # the daemon gone, nothing is signed, whatever the policy is asked
    for args in (["-h"], ["--help"], ["--", "-h"], ["demo-node-01.lab.example"], ["--", "demo-node-01.lab.example"]):
        assert _autosign(socket_path, *args, stdin=_csr("-h")).returncode != 0, args

    # a socket outside such a directory is given the group the config names
    plain = tmp_path / "plain"
    plain.mkdir()
    _with_autosign(config, plain / "autosign.sock", f'\nautosign_socket_group = "{group.gr_name}"')
    daemon = lab.start_governord(config)
    try:
        assert os.stat(plain / "autosign.sock").st_gid == group.gr_gid
    finally:
        daemon.stop()


def test_an_autosign_socket_that_cannot_be_made_stops_the_start_saying_why(lab: Lab, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    config = lab.write_config()
    _with_autosign(config, not_a_directory / "autosign.sock")
    daemon = lab.start_governord(config, wait_ready=False)
    assert daemon.process.wait(timeout=60) == 1
    log = daemon.log.read_text()
    assert f"cannot serve api.autosign_socket {not_a_directory / 'autosign.sock'}" in log
    assert "Traceback" not in log
    assert not daemon.socket.exists()
