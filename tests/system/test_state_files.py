"""What a real daemon leaves in its state directory, and with which modes: nothing readable by
others, the database and its -wal/-shm 0600 (also when an older version made them 0644), and no
application's private key (`apps register` hands it out once; governord keeps no copy)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lab.stack import Governord, Lab


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in sorted(root.rglob("*"))}


def test_state_files_are_private_and_no_application_key_is_kept(lab: Lab, governord: Governord) -> None:
    issued = governord.ctl_json("apps", "register", "demo")
    rotated = governord.ctl_json("apps", "rotate", "demo")
    state = governord.state_dir
    modes = _modes(state)

    # nothing for others, nothing group-writable
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o027} == {}
    for name in ("governord.db", "governord.db-wal", "governord.db-shm", "pki/ca.key", "pki/issued/server.key",
                 "governord.lock"):
        assert modes[name] == 0o600, (name, oct(modes[name]))
    assert modes["api.port"] == 0o640 and modes["pki"] == 0o700 and modes["pki/issued"] == 0o700

    # the applications' keys are not in the state directory: only the server's own key is
    assert sorted(p.name for p in state.rglob("*.key")) == ["ca.key", "server.key"]
    for pair in (issued, rotated):
        key_file, cert_file = Path(pair["key"]), Path(pair["certificate"])
        assert state not in key_file.parents and key_file.parent == governord.config.parent  # the ctl's --out (.)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert cert.public_key() == key.public_key()
        assert format(cert.serial_number, "x") == pair["serial"]
        assert Path(pair["ca"]).read_bytes() == (state / "pki" / "ca.pem").read_bytes()
    assert rotated["revoked"] == [issued["serial"]]

    # a key file is never written over: the same --out twice keeps both
    assert issued["key"] != rotated["key"]

    # a database an older version made world-readable is made private at the next start, and
    # the application keys it kept are pointed out
    assert governord.stop() == 0
    for name in ("governord.db", "governord.db-wal", "governord.db-shm"):
        if (state / name).exists():
            (state / name).chmod(0o644)
    left = state / "pki" / "issued" / "app-demo-1700000000000.key"
    left.write_text("an older version's copy\n")
    left.chmod(0o600)
    again = lab.start_governord(governord.config)
    try:
        modes = _modes(state)
        assert modes["governord.db"] == 0o600 and modes["governord.db-wal"] == 0o600, modes
        assert {name: oct(mode) for name, mode in modes.items() if mode & 0o027} == {}
        warned = [line for line in again.log.read_text().splitlines() if "application private keys kept" in line]
        assert len(warned) == 1 and str(left) in warned[0], warned
    finally:
        again.stop()


def test_a_key_that_cannot_be_written_is_reported_with_its_serial(lab: Lab, governord: Governord,
                                                                  tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    result = governord.ctl("apps", "register", "demo", "--out", str(blocked), check=False)
    assert result.returncode != 0
    [certificate] = governord.ctl_json("apps", "show", "demo")["certificates"]
    assert f"certificate {certificate['serial']} was issued, but its files cannot be written" in result.stderr
    assert f"apps revoke demo --serial {certificate['serial']}" in result.stderr


def test_apps_register_out_makes_the_directory_and_writes_the_three_files(governord: Governord,
                                                                          tmp_path: Path) -> None:
    """`apps register APP --out DIR`, as README.md's install guide says: DIR made (0700) if it is
    missing, APP-SERIAL.pem, APP-SERIAL.key (0600, the operator's) and governord-ca.pem in it."""
    out = tmp_path / "new" / "demo-cert"
    issued = governord.ctl_json("apps", "register", "demo", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    serial = issued["serial"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"demo-{serial}.pem", f"demo-{serial}.key",
                                                            "governord-ca.pem"])
    key = out / f"demo-{serial}.key"
    assert issued["key"] == str(key) and issued["certificate"] == str(out / f"demo-{serial}.pem")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == os.getuid()
    assert (out / "governord-ca.pem").read_bytes() == (governord.state_dir / "pki" / "ca.pem").read_bytes()
    # the table's text names the same files
    shown = governord.ctl("apps", "register", "demo", "--out", str(out)).stdout
    [again] = [c["serial"] for c in governord.ctl_json("apps", "show", "demo")["certificates"] if c["serial"] != serial]
    assert f"key:         {out / f'demo-{again}.key'}" in shown
