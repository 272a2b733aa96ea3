"""Start-up failures an operator can cause end in one line that says what and where, exit 1,
with no traceback and nothing left listening: a port already in use, a socket or state
directory that cannot be made; and governord-ctl on a socket nobody answers says what to check."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lab.stack import Governord, Lab


@pytest.fixture
def lab(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Lab(tmp_path / "lab") as the_lab:
        the_lab.start_foreman()
        the_lab.start_satellite()
        the_lab.start_vcsim()
        the_lab.start_platform("vsphere")
        yield the_lab


def _failed(lab: Lab, config: Path) -> tuple[Governord, str]:
    daemon = lab.start_governord(config, wait_ready=False)
    assert daemon.process.wait(timeout=120) == 1
    log = daemon.log.read_text()
    assert "Traceback" not in log, log
    assert not daemon.socket.exists()
    return daemon, log


def test_a_port_in_use_is_one_line_naming_the_keys_and_what_to_check(lab: Lab) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = lab.write_config()
        config.write_text(config.read_text().replace("[api]\nlisten = \"127.0.0.1\"\nport = 0\n",
                                                     f"[api]\nlisten = \"127.0.0.1\"\nport = {port}\n", 1))
        _daemon, log = _failed(lab, config)
    [line] = [x for x in log.splitlines() if x.startswith("governord: ")]
    assert line == (f"governord: cannot listen on api.listen and api.port 127.0.0.1:{port}: something listens "
                    f"there already (another governord, or another service: ss -ltnp 'sport = :{port}'); choose "
                    "another port or stop it")


def test_an_admin_socket_that_cannot_be_made_is_one_line(lab: Lab, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    config = lab.write_config()
    home = config.parent
    config.write_text(config.read_text().replace(f'admin_socket = "{home / "admin.sock"}"',
                                                 f'admin_socket = "{not_a_directory / "admin.sock"}"'))
    _daemon, log = _failed(lab, config)
    assert f"governord: cannot serve api.admin_socket {not_a_directory / 'admin.sock'}: " in log


def test_a_state_directory_that_cannot_be_made_is_one_line(lab: Lab, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    config = lab.write_config()
    home = config.parent
    config.write_text(config.read_text().replace(f'state_dir = "{home / "state"}"',
                                                 f'state_dir = "{not_a_directory / "state"}"'))
    _daemon, log = _failed(lab, config)
    assert f"governord: cannot use daemon.state_dir {not_a_directory / 'state'}: Not a directory" in log


@pytest.mark.parametrize(("make", "hint"), [
    (lambda path: None, "is governord running (systemctl status governord)? The path is [api] admin_socket"),
    (lambda path: path.write_text(""), "Nothing answers on this socket"),
])
def test_ctl_on_a_socket_nobody_answers_says_what_to_check(tmp_path: Path, make, hint: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "admin.sock"
    make(path)
    result = subprocess.run([sys.executable, "-m", "governord.ctl", "--socket", str(path), "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"governord-ctl: cannot reach governord at {path}: ") and hint in line


def test_a_store_a_newer_governord_migrated_is_refused_in_one_line_exit_2(lab: Lab) -> None:
    """An older governord started on a store a newer one migrated (a rolled-back package) must
    not write to a schema it does not know: one line, exit 2 (systemd does not start it again),
    the database untouched."""
    config = lab.write_config()
    daemon = lab.start_governord(config)
    daemon.stop()
    database = daemon.state_dir / "governord.db"
    def dump() -> list[str]:
        with sqlite3.connect(database) as conn:
            return list(conn.iterdump())

    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    before = dump()
    again = lab.start_governord(config, wait_ready=False)
    assert again.process.wait(timeout=120) == 2
    log = again.log.read_text()
    assert "Traceback" not in log, log
    [line] = [x for x in log.splitlines() if x.startswith("governord: ")]
    assert line.startswith("governord: cannot use the store: the store's schema is revision 9999_from_the_future, "
                           "which a newer governord made; this one (")
    assert "governord-ctl restore" in line
    assert dump() == before
    assert not again.socket.exists()
