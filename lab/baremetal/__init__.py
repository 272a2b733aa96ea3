"""Bare-metal lab: machines with a BMC (IPMI or Redfish) and an OS that really comes up.

Peers (see reference/peers.md sections 2 and 3):

- IPMI: OpenIPMI's ``ipmi_sim`` (Debian package ``openipmi``), one process per machine, each
  with its own directory holding a generated ``lan.conf``, ``cmd.emu`` and chassis-control
  script. The script is the machine's hardware: it keeps power and boot device in
  ``state.power`` (``0``/``1``) and ``state.boot`` (``pxe``, ``none``, ...) and appends every
  command it carries out to ``events``, so tests can read the hardware side and prove what was
  (not) done. Creating ``fault.get`` makes power/boot reads fail while the BMC still answers.
  UDP on a free port of 127.0.0.1.
- Redfish: sushy-tools' ``sushy-emulator`` with its fake driver, run by
  :mod:`lab.baremetal.sushy_launcher` (power delay removed) from the lab's own virtualenv
  (``install.sh``), one process serving several Systems, its own state directory and port.
- OS: :mod:`lab.baremetal.fake_os`, one process per machine, opens the machine's "sshd" on its
  own loopback address once it was powered on with a network boot and "installed".

:func:`start_ipmi_pool` and :func:`start_redfish_pool` start a whole pool and return a
:class:`BareMetalLab` whose :meth:`~BareMetalLab.provider_config` is the provider section.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.process import PeerProcess, start_peer

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
VENV = BUILD_DIR / "baremetal-venv"
VENV_PYTHON = VENV / "bin" / "python"

#: the lab's BMC user on every simulated BMC
USERNAME = "admin"


@dataclass(frozen=True)
class MachineFacts:
    """Hardware facts of one lab machine, as an operator declares them in the pool."""

    name: str
    cpus: int
    memory_mb: int
    rack: str
    labels: tuple[str, ...] = ()


#: The default pool: two small machines in different racks and one big GPU machine.
DEFAULT_POOL: tuple[MachineFacts, ...] = (
    MachineFacts("bm-small-1", cpus=8, memory_mb=16384, rack="r1", labels=("general",)),
    MachineFacts("bm-small-2", cpus=8, memory_mb=16384, rack="r2", labels=("general",)),
    MachineFacts("bm-big-1", cpus=32, memory_mb=131072, rack="r2", labels=("general", "gpu")),
)


def install(timeout: float = 600.0) -> Path:
    """Run ``install.sh`` (fast when done) and return the lab virtualenv's python."""
    result = subprocess.run(
        ["bash", str(HERE / "install.sh")], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0 or not VENV_PYTHON.exists():
        raise RuntimeError(f"lab/baremetal/install.sh failed ({result.returncode}): {result.stderr[-2000:]}")
    return VENV_PYTHON


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} not found: install Debian's openipmi and ipmitool (`make apt`)")
    return path


def _free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _free_tcp_port(addresses: list[str]) -> int:
    """A TCP port that can be bound on every one of ``addresses`` right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no TCP port free on all of {addresses}")


_used_blocks: set[int] = set()


def _address_block(count: int) -> list[str]:
    """``count`` loopback addresses of their own (127.0.B.101...), B unused by this process."""
    choices = [b for b in range(2, 250) if b not in _used_blocks]
    block = random.choice(choices)
    _used_blocks.add(block)
    return [f"127.0.{block}.{101 + i}" for i in range(count)]


# -- IPMI: ipmi_sim ----------------------------------------------------------------------------

_CHASSIS_SCRIPT = r"""#!/bin/sh
# Chassis control of one lab machine, run by ipmi_sim as: <dir> get PARAM... | set PARAM VALUE...
# Its files are the machine's hardware state; "events" records every command carried out.
dir=$1; op=$2; shift 2
case $op in
get)
  if [ -e "$dir/fault.get" ]; then echo "injected fault: chassis state unreadable" >&2; exit 1; fi
  for p in "$@"; do
    case $p in
      power) v=$(cat "$dir/state.power" 2>/dev/null || echo 0) ;;
      boot) v=$(cat "$dir/state.boot" 2>/dev/null || echo default) ;;
      *) echo "unsupported parameter: $p" >&2; exit 1 ;;
    esac
    echo "$p:$v"
  done ;;
set)
  while [ $# -ge 2 ]; do
    case $1 in
      power|boot)
        if [ "$1" = power ] && [ "$2" = 1 ] && [ "$(cat "$dir/state.power" 2>/dev/null)" != 1 ]; then
          # count power-ons: a machine off and on again between two looks of its OS is still rebooted
          echo $(( $(cat "$dir/state.boots" 2>/dev/null || echo 0) + 1 )) > "$dir/state.boots"
        fi
        printf '%s\n' "$2" > "$dir/state.$1.new" && mv "$dir/state.$1.new" "$dir/state.$1" ;;
      identify) shift ;;
    esac
    echo "$(date +%s.%N) set $1 $2" >> "$dir/events"
    shift 2
  done ;;
*) exit 1 ;;
esac
"""


@dataclass
class IpmiSim:
    """One running ipmi_sim: a machine's BMC, and its hardware side for tests."""

    name: str
    port: int
    username: str
    password: str
    directory: Path
    process: PeerProcess
    address: str = "127.0.0.1"

    # -- hardware side --

    def power(self) -> str:
        """``on`` or ``off``, as the chassis (not the BMC) has it."""
        try:
            return "on" if (self.directory / "state.power").read_text().strip() == "1" else "off"
        except FileNotFoundError:
            return "off"

    def boot(self) -> str:
        """The boot device the chassis was last told (``pxe``, ``none``, ``default``, ...)."""
        try:
            return (self.directory / "state.boot").read_text().strip()
        except FileNotFoundError:
            return "default"

    def events(self) -> list[str]:
        """Commands the chassis carried out, e.g. ``set power 1`` (timestamps dropped)."""
        try:
            lines = (self.directory / "events").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split(" ", 1)[1] for line in lines if " " in line]

    def press_power_button(self, on: bool) -> None:
        """Change power behind the BMC's back, as a person at the machine would."""
        (self.directory / "state.power").write_text("1\n" if on else "0\n")

    def break_sensor_reads(self, broken: bool = True) -> None:
        """Make the BMC fail every power/boot read (it still answers and still obeys sets)."""
        fault = self.directory / "fault.get"
        if broken:
            fault.touch()
        else:
            fault.unlink(missing_ok=True)

    def ipmitool(self, *args: str, timeout: float = 10.0) -> str:
        """Run ipmitool against this BMC (lanplus, cipher suite 3: ipmi_sim has no SHA-256)."""
        result = subprocess.run(
            [_require("ipmitool"), "-I", "lanplus", "-C", "3", "-H", self.address, "-p", str(self.port),
             "-U", self.username, "-E", "-N", "1", "-R", "2", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
            env={**os.environ, "IPMI_PASSWORD": self.password},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ipmitool {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        self.process.stop()


def _write_ipmi_instance(directory: Path, name: str, port: int, username: str, password: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sim-state").mkdir(exist_ok=True)
    chassis = directory / "chassis"
    chassis.write_text(_CHASSIS_SCRIPT)
    chassis.chmod(0o755)
    auths = "none md2 md5 straight"
    guid = uuid.uuid5(uuid.NAMESPACE_URL, f"governord-lab:{name}:{port}").hex
    (directory / "lan.conf").write_text(
        "\n".join(
            [
                f'name "{name}"',
                "set_working_mc 0x20",
                "  startlan 1",
                f"    addr 127.0.0.1 {port}",
                "    priv_limit admin",
                f"    allowed_auths_callback {auths}",
                f"    allowed_auths_user {auths}",
                f"    allowed_auths_operator {auths}",
                f"    allowed_auths_admin {auths}",
                f"    guid {guid}",
                "  endlan",
                f'  chassis_control "{chassis} {directory}"',
                f'  user 2 true "{username}" "{password}" admin 10 {auths}',
                "",
            ]
        )
    )
    (directory / "cmd.emu").write_text(
        "\n".join(
            [
                "mc_setbmc 0x20",
                "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr",
                "sel_enable 0x20 1000 0x0a",
                "mc_enable 0x20",
                "",
            ]
        )
    )


def start_ipmi_sim(
    directory: Path, name: str, *, username: str = USERNAME, password: str | None = None, timeout: float = 10.0
) -> IpmiSim:
    """Start one ipmi_sim on a free UDP port of 127.0.0.1 and return once it answers ipmitool."""
    binary = _require("ipmi_sim")
    _require("ipmitool")
    password = password or secrets.token_hex(8)  # IPMI passwords are at most 16 bytes here
    last_error = ""
    for _ in range(3):
        port = _free_udp_port()
        _write_ipmi_instance(directory, name, port, username, password)
        log = open(directory / "ipmi_sim.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [binary, "-n", "-c", "lan.conf", "-f", "cmd.emu", "-s", "sim-state"],
            cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        sim = IpmiSim(name, port, username, password, directory, PeerProcess(name, f"ipmi://127.0.0.1:{port}", proc))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                sim.ipmitool("chassis", "power", "status", timeout=5)
                return sim
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                last_error = str(exc)
                time.sleep(0.02)
        sim.stop()  # exited (port taken meanwhile) or silent: try another port
        last_error = (directory / "ipmi_sim.log").read_text(errors="replace")[-1000:] or last_error
    raise RuntimeError(f"ipmi_sim {name} did not start: {last_error}")


# -- Redfish: sushy-emulator -------------------------------------------------------------------


@dataclass
class SushyEmulator:
    """One running sushy-emulator (fake driver) serving several Systems."""

    url: str
    port: int
    username: str
    password: str
    directory: Path
    #: machine name -> System id (the fake system's UUID)
    systems: dict[str, str]
    process: PeerProcess

    def get(self, path: str) -> dict[str, Any]:
        """GET a resource over plain HTTP (no client library, no cache)."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}{path}", headers={"Authorization": f"Basic {token}", "Accept": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.load(response)
            return result

    def post(self, path: str, body: dict[str, Any]) -> int:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    def system(self, system_id: str) -> dict[str, Any]:
        return self.get(f"/redfish/v1/Systems/{system_id}")

    def stop(self) -> None:
        self.process.stop()


def start_sushy_emulator(
    directory: Path,
    systems: list[dict[str, Any]],
    *,
    username: str = USERNAME,
    password: str | None = None,
    power_delay: int = 0,
    timeout: float = 30.0,
) -> SushyEmulator:
    """Start sushy-emulator with the fake driver and ``systems`` (sushy's fake-system dicts:
    ``uuid``, ``name``, ``power_state``, ``nics``) on a free port of 127.0.0.1."""
    python = install()
    directory.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_urlsafe(12)
    systems_file = directory / "systems.json"
    systems_file.write_text(json.dumps(systems))
    argv = [
        str(python), str(HERE / "sushy_launcher.py"), "--state-dir", str(directory), "--systems", str(systems_file),
        "--port", "0", "--username", username, "--power-delay", str(power_delay),
    ]  # fmt: skip
    peer, _ = start_peer(
        "sushy-emulator",
        argv,
        env={"SUSHY_LAB_PASSWORD": password},
        log_path=directory / "sushy-emulator.log",
        timeout=timeout,
    )
    port = int(peer.url.rsplit(":", 1)[1])
    return SushyEmulator(
        peer.url, port, username, password, directory, {s["name"]: s["uuid"] for s in systems}, peer
    )


# -- the simulated OS --------------------------------------------------------------------------


@dataclass
class FakeOs:
    """One machine's simulated OS process."""

    address: str
    port: int
    directory: Path
    process: PeerProcess

    def status(self) -> dict[str, str]:
        """``{"power": "on"|"off", "os": "off"|"installing"|"booting"|"up"|"no-os"}``."""
        try:
            result: dict[str, str] = json.loads((self.directory / "status.json").read_text())
            return result
        except (FileNotFoundError, ValueError):
            return {"power": "unknown", "os": "unknown"}

    def stop(self) -> None:
        self.process.stop()


def start_fake_os(
    directory: Path,
    address: str,
    port: int,
    *,
    ipmi: IpmiSim | None = None,
    redfish: SushyEmulator | None = None,
    system_id: str | None = None,
    install_delay: float = 0.3,
    boot_delay: float = 0.2,
    poll: float = 0.1,
) -> FakeOs:
    """Start the OS of one machine watching ``ipmi`` (its chassis files) or ``redfish`` (HTTP)."""
    argv = [
        sys.executable, str(HERE / "fake_os.py"), "--address", address, "--port", str(port),
        "--state-dir", str(directory), "--install-delay", str(install_delay), "--boot-delay", str(boot_delay),
        "--poll", str(poll),
    ]  # fmt: skip
    env: dict[str, str] = {}
    if ipmi is not None:
        argv += ["--ipmi-chassis-dir", str(ipmi.directory)]
    elif redfish is not None and system_id is not None:
        argv += ["--redfish-url", redfish.url, "--system-id", system_id, "--username", redfish.username]
        env["FAKE_OS_BMC_PASSWORD"] = redfish.password
    else:
        raise ValueError("start_fake_os needs ipmi=, or redfish= and system_id=")
    directory.mkdir(parents=True, exist_ok=True)
    peer, _ = start_peer("fake-os", argv, env=env, log_path=directory / "fake_os.log", timeout=10)
    return FakeOs(address, port, directory, peer)


# -- whole pools -------------------------------------------------------------------------------


@dataclass
class LabMachine:
    """A lab machine: facts, BMC, OS, and read access to its hardware side."""

    facts: MachineFacts
    #: the ``bmc`` table of the machine's pool entry, without the password
    bmc: dict[str, Any]
    address: str
    mac: str
    os: FakeOs
    ipmi: IpmiSim | None = None
    redfish: SushyEmulator | None = None
    system_id: str | None = None

    @property
    def name(self) -> str:
        return self.facts.name

    def power(self) -> str:
        """``on``/``off`` as the hardware has it (chassis file, or the System over plain HTTP)."""
        if self.ipmi is not None:
            return self.ipmi.power()
        assert self.redfish is not None and self.system_id is not None
        return str(self.redfish.system(self.system_id)["PowerState"]).lower()

    def boot_device(self) -> str:
        """The boot device the BMC was told: ``pxe`` for a network boot (normalised)."""
        if self.ipmi is not None:
            return self.ipmi.boot()
        assert self.redfish is not None and self.system_id is not None
        boot = self.redfish.system(self.system_id).get("Boot") or {}
        return str(boot.get("BootSourceOverrideTarget") or "none").lower()

    def wait_os(self, state: str, timeout: float = 10.0) -> None:
        """Wait until the simulated OS reports ``state`` (``off``, ``up``, ...) in its status."""
        deadline = time.monotonic() + timeout
        while self.os.status().get("os") != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: OS is {self.os.status()}, not {state!r} after {timeout}s")
            time.sleep(0.02)

    def pool_entry(self, password_env: str) -> dict[str, Any]:
        """This machine's entry in the provider's ``machines`` list."""
        return {
            "name": self.name,
            "bmc": {**self.bmc, "password": {"env": password_env}},
            "mac": self.mac,
            "address": self.address,
            "cpus": self.facts.cpus,
            "memory_mb": self.facts.memory_mb,
            "rack": self.facts.rack,
            "labels": list(self.facts.labels),
        }


@dataclass
class BareMetalLab:
    """A running pool: BMCs, OS processes, and the provider section that drives them."""

    protocol: str
    machines: list[LabMachine]
    ready_port: int
    username: str
    password: str
    directory: Path
    emulator: SushyEmulator | None = None
    _stoppers: list[Any] = field(default_factory=list)

    def machine(self, name: str) -> LabMachine:
        return next(m for m in self.machines if m.name == name)

    def provider_config(self, password_env: str = "BAREMETAL_BMC_PASSWORD", **overrides: Any) -> dict[str, Any]:
        """A ``[providers.NAME]`` table for this pool; BMC passwords are read from ``password_env``."""
        config: dict[str, Any] = {
            "type": "baremetal",
            "machines": [m.pool_entry(password_env) for m in self.machines],
            "ready_port": self.ready_port,
            "boot_timeout": 60.0,
            "call_timeout": 30.0,
            "ready_timeout": 30.0,
        }
        config.update(overrides)
        return config

    def reset(self) -> None:
        """Power every machine off behind governord's back and forget recorded BMC events and
        injected faults (between tests sharing one lab)."""
        for machine in self.machines:
            if machine.ipmi is not None:
                machine.ipmi.press_power_button(False)
                machine.ipmi.break_sensor_reads(False)
                (machine.ipmi.directory / "state.boot").write_text("default\n")
                (machine.ipmi.directory / "events").unlink(missing_ok=True)
            elif machine.redfish is not None and machine.power() != "off":
                machine.redfish.post(
                    f"/redfish/v1/Systems/{machine.system_id}/Actions/ComputerSystem.Reset", {"ResetType": "ForceOff"}
                )
        for machine in self.machines:
            machine.wait_os("off")


    def stop(self) -> None:
        for stop in reversed(self._stoppers):
            with contextlib.suppress(Exception):
                stop()
        self._stoppers.clear()


def _mac(index: int, block: str) -> str:
    octet = int(block.split(".")[2])
    return f"52:54:00:{octet:02x}:00:{index:02x}"


def start_ipmi_pool(
    directory: Path, facts: tuple[MachineFacts, ...] = DEFAULT_POOL, *, install_delay: float = 0.3
) -> BareMetalLab:
    """One ipmi_sim and one fake OS per machine, all sharing one BMC password."""
    password = secrets.token_hex(8)
    addresses = _address_block(len(facts))
    ready_port = _free_tcp_port(addresses)
    lab = BareMetalLab("ipmi", [], ready_port, USERNAME, password, directory)
    try:
        for index, (fact, address) in enumerate(zip(facts, addresses, strict=True)):
            sim = start_ipmi_sim(directory / fact.name / "bmc", fact.name, password=password)
            lab._stoppers.append(sim.stop)
            fake = start_fake_os(
                directory / fact.name / "os", address, ready_port, ipmi=sim, install_delay=install_delay
            )
            lab._stoppers.append(fake.stop)
            bmc = {"protocol": "ipmi", "address": sim.address, "port": sim.port, "username": USERNAME}
            lab.machines.append(LabMachine(fact, bmc, address, _mac(index, address), fake, ipmi=sim))
    except BaseException:
        lab.stop()
        raise
    return lab


def start_redfish_pool(
    directory: Path, facts: tuple[MachineFacts, ...] = DEFAULT_POOL, *, install_delay: float = 0.3
) -> BareMetalLab:
    """One sushy-emulator with a System per machine, and one fake OS per machine."""
    password = secrets.token_urlsafe(12)
    addresses = _address_block(len(facts))
    ready_port = _free_tcp_port(addresses)
    systems = [
        {
            "uuid": str(uuid.uuid4()),
            "name": fact.name,
            "power_state": "Off",
            "nics": [{"mac": _mac(index, address), "ip": address}],
        }
        for index, (fact, address) in enumerate(zip(facts, addresses, strict=True))
    ]
    emulator = start_sushy_emulator(directory / "sushy", systems, password=password)
    lab = BareMetalLab("redfish", [], ready_port, USERNAME, password, directory, emulator=emulator)
    lab._stoppers.append(emulator.stop)
    try:
        for system, fact, address in zip(systems, facts, addresses, strict=True):
            system_id = system["uuid"]
            fake = start_fake_os(
                directory / fact.name / "os",
                address,
                ready_port,
                redfish=emulator,
                system_id=system_id,
                install_delay=install_delay,
                poll=0.15,
            )
            lab._stoppers.append(fake.stop)
            bmc = {
                "protocol": "redfish",
                "scheme": "http",
                "address": "127.0.0.1",
                "port": emulator.port,
                "username": USERNAME,
                "system_id": system_id,
                "verify_tls": False,
            }
            lab.machines.append(
                LabMachine(
                    fact, bmc, address, system["nics"][0]["mac"], fake, redfish=emulator, system_id=system_id
                )
            )
    except BaseException:
        lab.stop()
        raise
    return lab


__all__ = [
    "DEFAULT_POOL",
    "BareMetalLab",
    "FakeOs",
    "IpmiSim",
    "LabMachine",
    "MachineFacts",
    "SushyEmulator",
    "install",
    "start_fake_os",
    "start_ipmi_pool",
    "start_ipmi_sim",
    "start_redfish_pool",
    "start_sushy_emulator",
]
