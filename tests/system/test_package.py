"""The Debian package as a site gets it: `make deb` builds it (`make test` has built it already),
`dpkg -i` installs it on this machine, the installed sysusers and tmpfiles snippets are applied
(as systemd does at install and boot; no systemd runs here as PID 1), `systemd-analyze verify`
takes the installed unit, `governord --check` the installed config, and the installed daemon runs
as the governord user against the lab, driven by the installed governord-ctl; `dpkg --purge`
then leaves nothing of it but the governord user and group, which Debian keeps."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import governord
from lab.stack import Lab

from .conftest import wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/var/lib/governord")
SOCKET = Path("/run/governord/admin.sock")


def _as_root(env: dict[str, str] | None = None) -> list[str]:
    """The prefix that runs a command as root (keeping ``env``'s variables): none as root, else
    sudo without a password."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"] + ([f"--preserve-env={','.join(env)}"] if env else [])
    pytest.skip("installing a package needs root or password-less sudo (CI runs as root)")


def root(*args: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    # the environment is passed as such (sudo told to keep it), never on a command line
    result = subprocess.run([*_as_root(env), *args], capture_output=True, text=True, timeout=timeout, input=input,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting out another dpkg or apt run holding the lock (other jobs share the machine)."""
    deadline = time.monotonic() + 600
    while True:
        result = root("dpkg", *args, check=False)
        if result.returncode == 0 or "lock" not in result.stderr or time.monotonic() > deadline:
            assert result.returncode == 0, f"dpkg {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
            return result
        time.sleep(5)


def installed() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "governord"], capture_output=True, text=True)
    return result.stdout.strip() not in ("", "not-installed", "config-files")


@pytest.fixture(scope="module")
def deb() -> Path:
    subprocess.run(["make", "-C", str(ROOT), "deb"], check=True, capture_output=True, timeout=1800)
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    path = ROOT / "dist" / f"governord_{governord.__version__}_{arch}.deb"
    assert path.is_file()
    return path


@pytest.fixture
def package(deb: Path) -> Iterator[list[str]]:
    """The package installed with dpkg -i (purged afterwards whatever happened); its file list."""
    _as_root()
    if installed():
        pytest.fail("governord is installed on this machine already: not touching a site's install")
    try:
        dpkg("-i", str(deb))
        yield dpkg("-L", "governord").stdout.split("\n")
    finally:
        if installed() or subprocess.run(["dpkg-query", "-W", "governord"], capture_output=True).returncode == 0:
            dpkg("--purge", "governord")


def _lab_config(lab: Lab, home: Path) -> Path:
    """The lab's config, laid out as the package does: the state in /var/lib/governord, the admin
    socket in /run/governord (both made by the installed tmpfiles snippet)."""
    text = lab.write_config().read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("state_dir = "):
            line = f'state_dir = "{STATE}"'
        elif line.startswith("admin_socket = "):
            line = f'admin_socket = "{SOCKET}"'
        elif line.startswith("admin_socket_mode = "):
            line = 'admin_socket_mode = "0660"'
        elif line.startswith("autosign_socket"):
            continue  # no puppetserver in this test: no autosign socket
        lines.append(line)
    config = home / "governord.toml"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o644)  # secrets are references: the values come from the environment
    return config


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed governord-ctl, as root, on the installed default socket."""
    result = root("/usr/bin/governord-ctl", *args, check=False, env={"COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"governord-ctl {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def test_install_run_and_purge(lab: Lab, package: list[str]) -> None:
    files = set(package)
    # what lands where
    for path in ("/usr/bin/governord", "/usr/bin/governord-ctl", "/usr/bin/governord-autosign",
                 "/opt/venvs/governord/bin/python", "/etc/governord/governord.toml",
                 "/usr/lib/sysusers.d/governord.conf", "/usr/lib/tmpfiles.d/governord.conf",
                 "/usr/share/governord/hooks/openshift/deploy", "/usr/share/governord/hooks/openshift/lib/governord-hook.sh",
                 "/usr/share/governord/tmpfiles.d/governord-autosign.conf",
                 "/usr/share/man/man8/governord.8.gz", "/usr/share/man/man1/governord-ctl.1.gz",
                 "/usr/share/man/man5/governord.toml.5.gz", "/usr/share/man/man8/governord-autosign.8.gz",
                 "/usr/share/bash-completion/completions/governord-ctl", "/usr/share/zsh/vendor-completions/_governord-ctl",
                 "/usr/share/doc/governord/README.md", "/usr/share/doc/governord/examples/governord.toml"):
        assert path in files, path
    [unit] = [f for f in files if f.endswith("/systemd/system/governord.service")]
    assert os.access("/usr/share/governord/hooks/openshift/deploy", os.X_OK)
    conffiles = root("dpkg-query", "-W", "-f=${Conffiles}", "governord").stdout
    assert "/etc/governord/governord.toml" in conffiles
    # every program answers --version, run through the links in /usr/bin
    for program in ("governord", "governord-ctl", "governord-autosign"):
        result = subprocess.run([f"/usr/bin/{program}", "--version"], capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == f"{program} {governord.__version__}", result.stderr
    # the man pages render
    for page in ("/usr/share/man/man8/governord.8.gz", "/usr/share/man/man1/governord-ctl.1.gz",
                 "/usr/share/man/man5/governord.toml.5.gz", "/usr/share/man/man8/governord-autosign.8.gz"):
        rendered = subprocess.run(["man", "-l", page], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "100"})
        assert rendered.returncode == 0 and "SEE ALSO" in rendered.stdout, page

    # bash completion: the installed script registers itself and the installed program answers it
    registered = subprocess.run(["bash", "-c", ". /usr/share/bash-completion/completions/governord-ctl && "
                                 "complete -p governord-ctl"], capture_output=True, text=True, timeout=60)
    assert registered.returncode == 0 and "governord-ctl" in registered.stdout, registered.stderr
    answer = subprocess.run(["/usr/bin/governord-ctl"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "_GOVERNORD_CTL_COMPLETE": "bash_complete",
                                 "COMP_WORDS": "governord-ctl hosts l", "COMP_CWORD": "2"})
    assert answer.stdout.split() == ["plain,list"], answer

    # postinst ran sysusers and tmpfiles; applying the installed snippets again changes nothing
    root("systemd-sysusers", "governord.conf")
    root("systemd-tmpfiles", "--create", "governord.conf")
    assert subprocess.run(["getent", "passwd", "governord"], capture_output=True).returncode == 0
    for directory, mode, owner in ((STATE, 0o750, "governord:governord"), (Path("/run/governord"), 0o750, "governord:governord"),
                                   (Path("/etc/governord"), 0o750, "root:governord")):
        assert directory.is_dir() and directory.stat().st_mode & 0o7777 == mode, directory
        assert f"{directory.owner()}:{directory.group()}" == owner, directory
    secrets_env = Path("/etc/governord/secrets.env")
    assert secrets_env.stat().st_mode & 0o7777 == 0o640
    assert f"{secrets_env.owner()}:{secrets_env.group()}" == "root:governord"
    # a reinstall (dpkg's configure again) never overwrites it
    root("sh", "-c", f"echo 'GOVERNORD_KEPT=1' >> {secrets_env}")
    dpkg("-i", str(next((ROOT / "dist").glob(f"governord_{governord.__version__}_*.deb"))))
    assert "GOVERNORD_KEPT=1" in root("cat", str(secrets_env)).stdout
    assert secrets_env.stat().st_mode & 0o7777 == 0o640

    # the installed unit and config
    verify = root("systemd-analyze", "verify", unit, check=False)
    assert verify.returncode == 0, verify.stderr
    check = root("/usr/bin/governord", "--check", "--config", "/etc/governord/governord.toml", check=False)
    assert check.returncode == 0, check.stderr

    # the installed daemon, as the governord user, on the lab; driven by the installed governord-ctl
    home = Path(tempfile.mkdtemp(prefix="governord-package-"))
    home.chmod(0o755)
    daemon = None
    try:
        config = _lab_config(lab, home)
        # the lab's secrets go where a site's go, read as the unit's EnvironmentFile= reads them
        lines = "".join(f"{name}={value}\n" for name, value in lab.passwords.items())
        root("sh", "-c", f"cat >> {secrets_env}", input=lines)
        assert secrets_env.stat().st_mode & 0o7777 == 0o640
        secrets = dict(line.split("=", 1) for line in root("cat", str(secrets_env)).stdout.splitlines()
                       if line and not line.startswith("#"))
        assert secrets["LAB_FOREMAN_PASSWORD"] == lab.passwords["LAB_FOREMAN_PASSWORD"]
        check = root("/usr/bin/governord", "--check", "--config", str(config), check=False, env=secrets)
        assert check.returncode == 0, check.stderr
        log = home / "governord.log"
        # the unit's Environment= lines, and its EnvironmentFile=
        env = {"PATH": "/usr/bin:/bin", "HOME": str(STATE), "XDG_CACHE_HOME": "/var/cache/governord",
               "MALLOC_ARENA_MAX": "2", **secrets}
        with open(log, "ab") as log_file:
            daemon = subprocess.Popen(
                [*_as_root(env), "setpriv", "--reuid=governord", "--regid=governord", "--init-groups", "--",
                 "/usr/bin/governord", "--config", str(config)],
                stdout=log_file, stderr=log_file, start_new_session=True, env=env)
        wait_until(lambda: daemon.poll() is not None or ctl("status", check=False).returncode == 0, 90,
                   what="the installed governord answering governord-ctl status")
        assert daemon.poll() is None, log.read_text()
        # it runs as governord, and what it writes is governord's
        pid = subprocess.run(["pgrep", "-u", "governord", "-f", f"/usr/bin/governord --config {config}"],
                             capture_output=True, text=True).stdout.split()
        assert pid, "no governord process of the governord user"
        assert (STATE / "governord.db").owner() == "governord"
        assert SOCKET.owner() == "governord" and SOCKET.group() == "governord"

        status = ctl("status").stdout
        assert f"governord {governord.__version__}" in status and str(config) in status
        scaled = ctl("scale", "demo", "node", "--add", "1", "--wait", "--json")
        assert "ready" in scaled.stdout, scaled.stdout
        hosts = ctl("hosts", "list").stdout
        assert "demo-node-01" in hosts and "ready" in hosts
        # the other side: the VM exists in vSphere, the host in Foreman
        assert "demo-node-01" in lab.vsphere_vms()
        assert "demo-node-01.lab.example" in lab.foreman_hosts()

        root("kill", "-TERM", pid[0])
        assert daemon.wait(60) == 0, log.read_text()
        daemon = None
        unreachable = ctl("status", check=False)
        assert unreachable.returncode == 3
    finally:
        if daemon is not None and daemon.poll() is None:
            root("pkill", "-TERM", "-u", "governord", "-f", f"/usr/bin/governord --config {home}", check=False)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)

    # purge: the package's files, its config and secrets, the state and runtime directories go;
    # the governord user and group stay (Debian does not remove system users: files may be theirs)
    dpkg("--purge", "governord")
    assert not installed()
    assert subprocess.run(["dpkg-query", "-W", "governord"], capture_output=True).returncode != 0
    left = [f for f in files if f and f != "/." and Path(f).exists() and not Path(f).is_dir()]
    assert left == []
    for gone in ("/etc/governord", "/var/lib/governord", "/var/cache/governord", "/run/governord",
                 "/opt/venvs/governord", "/usr/share/governord", "/usr/share/doc/governord"):
        assert not Path(gone).exists(), gone
    assert subprocess.run(["getent", "passwd", "governord"], capture_output=True).returncode == 0
