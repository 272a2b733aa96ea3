"""End to end on the lab: N hosts (default 50) cloned on vcsim, registered in the Foreman and
Satellite simulators, and torn down again, through the real governord daemon, against the floor
(bench/floor.py: the same pyvmomi, apypie and XML-RPC calls from a plain asyncio script, with
the same concurrency, no governord).

    .venv/bin/python -m bench.e2e --hosts 50 --concurrency 10 --rounds 3 [--record]

What is measured, for both:
- up: from the scale request (governord: the admin API's POST /v1/apps/demo/scale add=N; the
  floor: the start of its gather) until the last host is registered everywhere (governord: the
  newest ``ready`` event in its audit log, so the clock is the daemon's own);
- down: from the release (governord: scale count=0) until the last host is gone everywhere
  (Foreman, Satellite deleted and verified, the VM powered off, destroyed and verified).
Connections (vCenter login, Foreman's apidoc, the Satellite session) are made before the clock
starts on both sides, as governord makes them at start-up. Each round uses a fresh daemon (own
state directory) and checks the other side after each phase: N VMs powered on with their
address, N Foreman hosts in the host group, N Satellite systems in the group; then none.

Rounds alternate floor and governord on the same peers; the table shows the median.

At a peer's real pace (``--realistic``, or the single delays): vcsim's tasks take time as a
vCenter's do (lab/vcsim/taskdelay.go: the clone, the power-on up to the guest's address, the
power-off and the destroy answer at once and end that many seconds later) and every SOAP call
takes ``--call-ms``. ``--shipped-limits`` leaves the engine's workers and every instance's
``max_concurrency`` at their shipped defaults instead of ``--concurrency``; ``--instances N``
runs N daemons on one private PostgreSQL database (lab/postgres.py), the scale request sent to
the first. ``--no-floor`` skips the floor (it has no fleet to compare with).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lab import vcsim
from lab.stack import Governord, Lab

from .common import PrivatePostgres, admin, query, start_daemon
from .floor import Floor, FloorHost, FloorSettings
from .record import append_row, machine_label

NETWORK_FIRST = "198.51.100.10"


#: what --realistic sets: seconds per vCenter task (a full clone on fast shared storage, a
#: power-on until the guest has booted, run its customization and reports its address, a
#: power-off, a destroy) and milliseconds per SOAP call
REALISTIC = {"clone_seconds": 20.0, "power_on_seconds": 15.0, "power_off_seconds": 2.0, "destroy_seconds": 2.0,
             "call_ms": 20}

def configure(lab: Lab, instance: str, hosts: int, concurrency: int, *, lab_limits: bool = False,
              shipped: bool = False, workers: int | None = None) -> Path:
    """The lab's own config, with the engine's workers and every instance's concurrency limit
    set to ``concurrency`` (the floor runs that many hosts at once, one thread each); with
    ``lab_limits`` the instances keep the lab's limits (vSphere 8, registrars 4 by default);
    with ``shipped`` the engine's workers and every instance's limit are left to governord's
    shipped defaults; ``workers`` sets the engine's workers alone."""
    from governord.config import EngineSection

    path = lab.write_config(instance, workers=workers or (EngineSection().workers if shipped else concurrency),
                            max_hosts=hosts)
    if lab_limits:
        return path
    text = path.read_text()
    assert "max_concurrency = 8\n" in text, "the lab's vSphere section changed; update bench/e2e.py"
    if shipped:
        path.write_text(text.replace("max_concurrency = 8\n", ""))
        return path
    text = text.replace("max_concurrency = 8\n", f"max_concurrency = {concurrency}\n")
    for registrar in ("foreman", "satellite"):
        header = f'[registrars.{registrar}]\ntype = "{registrar}"\n'
        text = text.replace(header, header + f"max_concurrency = {concurrency}\n")
    path.write_text(text)
    return path


Database = Path | str  # the SQLite file of one daemon, or the PostgreSQL URL of a fleet


async def wait_state(db: Database, state: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = dict(query(db, "SELECT state, count(*) FROM hosts GROUP BY state"))
        if rows.get(state, 0) >= count:
            return
        if rows.get("failed"):
            failed = query(db, "SELECT name, failed_step, error FROM hosts WHERE state = 'failed'")
            raise RuntimeError(f"hosts failed: {failed[:3]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {count} {state}: {rows}")
        await asyncio.sleep(0.1)


def last_event(db: Database, kind: str) -> float:
    return float(query(db, "SELECT max(ts) FROM events WHERE kind = :kind", {"kind": kind})[0][0])


def intervals(db: Database) -> dict[str, float]:
    """Mean seconds per host between consecutive audit events, labelled ``a -> b``
    (``step-started`` carries its step): where each host's time went, by the daemon's clock."""
    by_host: dict[str, list[tuple[float, str]]] = {}
    for host_id, kind, detail, ts in query(
            db, "SELECT host_id, kind, detail, ts FROM events WHERE host_id IS NOT NULL ORDER BY id"):
        if isinstance(detail, str):  # SQLite gives the JSON's text, psycopg the value
            detail = json.loads(detail)
        label = f"start {detail['step']}" if kind == "step-started" else kind
        by_host.setdefault(host_id, []).append((ts, label))
    sums: dict[str, float] = {}
    for timeline in by_host.values():
        for (t0, a), (t1, b) in itertools.pairwise(timeline):
            sums[f"{a} -> {b}"] = sums.get(f"{a} -> {b}", 0.0) + (t1 - t0)
    return {label: total / len(by_host) for label, total in sums.items()}


def check_up(lab: Lab, hosts: int, prefix: str) -> None:
    vms = {n: v for n, v in lab.vsphere_vms().items() if n.startswith(prefix)}
    foreman = {n: h for n, h in lab.foreman_hosts().items() if n.startswith(prefix)}
    satellite = {n: s for n, s in lab.satellite_systems().items() if n.startswith(prefix)}
    assert len(vms) == hosts and all(v["power"] == "poweredOn" and v["ip"] for v in vms.values()), vms
    assert len(foreman) == hosts and all(h["hostgroup"] == "openshift/node" for h in foreman.values()), foreman
    assert len(satellite) == hosts and all(s["groups"] == ["openshift-nodes"] for s in satellite.values()), satellite


def check_gone(lab: Lab) -> None:
    assert not lab.vsphere_vms(), lab.vsphere_vms()
    assert not lab.foreman_hosts(), lab.foreman_hosts()
    assert not lab.satellite_systems(), lab.satellite_systems()


def py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """Sample a process with py-spy (installed with the ``bench`` extra) into a flame graph."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print("py-spy is not installed (pip install governord[bench]); not profiling", file=sys.stderr)
        return None
    return subprocess.Popen([str(exe), "record", "--pid", str(pid), "--duration", str(int(seconds) + 1),
                             "--rate", "200", "--threads", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_lab_daemon(lab: Lab, config: Path, daemon_args: list[str], env: dict[str, str] | None = None) -> Governord:
    """Lab.start_governord, but through bench.daemon when ``daemon_args`` ask for tracing or
    experiments (``python -m governord`` itself otherwise)."""
    if not daemon_args:
        return lab.start_governord(config, extra_env=env)
    daemon = start_daemon(config, module="bench.daemon", args=daemon_args,
                          env={**lab.passwords, "XDG_CACHE_HOME": str(lab.workdir / "cache"), **(env or {})})
    lab.daemons.append(daemon)
    return daemon


async def run_governord(lab: Lab, round_no: int, hosts: int, concurrency: int, timeout: float,
                        profile: Path | None, daemon_args: list[str], lab_limits: bool = False, *,
                        shipped: bool = False, instances: int = 1, postgres: PrivatePostgres | None = None,
                        workers: int | None = None) -> dict[str, Any]:
    args = [a.replace("{round}", str(round_no)) for a in daemon_args]
    daemons: list[Governord] = []
    url = postgres.new_database() if postgres is not None else None
    spy = None
    try:
        for index in range(instances):
            name = f"governord-{round_no}" if url is None else f"governord-{round_no}-{index + 1}"
            config = configure(lab, name, hosts, concurrency, lab_limits=lab_limits, shipped=shipped, workers=workers)
            env: dict[str, str] = {}
            if url is not None:
                sections, env = PrivatePostgres.store_sections(url, name)
                config.write_text(config.read_text() + sections)
            daemons.append(start_lab_daemon(lab, config, args, env))  # the first migrates alone
        daemon = daemons[0]
        db: Database = url if url is not None else daemon.state_dir / "governord.db"
        spy = py_spy(daemon.process.pid, profile / f"governord-{round_no}.txt", timeout) if profile else None
        started = time.time()
        await admin(daemon, "POST", "/v1/apps/demo/scale", {"role": "node", "add": hosts})
        await wait_state(db, "ready", hosts, timeout)
        up = last_event(db, "ready") - started
        check_up(lab, hosts, "demo-node-")
        released = time.time()
        await admin(daemon, "POST", "/v1/apps/demo/scale", {"role": "node", "count": 0})
        await wait_state(db, "gone", hosts, timeout)
        down = last_event(db, "gone") - released
        check_gone(lab)
        steps = intervals(db)
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        codes = [d.stop() for d in daemons]
    assert codes == [0] * len(daemons), f"governord exited {codes}"
    return {"up": up, "down": down, "steps": steps}


def floor_settings(lab: Lab) -> FloorSettings:
    assert lab.vcsim and lab.foreman and lab.satellite
    return FloorSettings(
        vcenter_url=lab.vcsim.url, vcenter_user="governord", vcenter_password=lab.passwords["LAB_VCSIM_PASSWORD"],
        datacenter=vcsim.DATACENTER, cluster=vcsim.CLUSTER, resource_pool=vcsim.RESOURCE_POOL, folder=vcsim.FOLDER,
        template=vcsim.TEMPLATE, cpus=2, memory_mb=4096,
        foreman_url=lab.foreman.url, foreman_user="admin", foreman_password=lab.passwords["LAB_FOREMAN_PASSWORD"],
        organization="Governor Lab", location="Lab", puppet_environment="production", hostgroup="openshift/node",
        puppet_classes=["profile::base", "openshift::node"], parameters={"openshift_role": "node"},
        satellite_url=lab.satellite.url, satellite_user="admin",
        satellite_password=lab.passwords["LAB_SATELLITE_PASSWORD"],
        system_group="openshift-nodes", activation_key="1-openshift-node",
        cache_dir=lab.workdir / "floor-cache",
    )


async def run_floor(lab: Lab, hosts: int, concurrency: int) -> dict[str, float]:
    import ipaddress

    first = ipaddress.ip_address(NETWORK_FIRST)
    floor = Floor(floor_settings(lab), concurrency)
    await floor.connect()
    batch = [
        FloorHost(host_id=str(uuid.uuid4()), hostname=f"floor-node-{i:02d}", fqdn=f"floor-node-{i:02d}.lab.example",
                  address=str(first + i - 1), prefix_length=24, gateway="198.51.100.1", dns_servers=["198.51.100.2"],
                  domain="lab.example")
        for i in range(1, hosts + 1)
    ]
    try:
        up = await floor.bring_up(batch)
        check_up(lab, hosts, "floor-node-")
        down = await floor.tear_down(batch)
        check_gone(lab)
    finally:
        await floor.close()
    steps: dict[str, float] = {}
    for host in batch:
        marks = sorted(host.timings.items(), key=lambda kv: kv[1])
        for (a, t0), (b, t1) in itertools.pairwise(marks):
            steps[f"{a} -> {b}"] = steps.get(f"{a} -> {b}", 0.0) + (t1 - t0) / len(batch)
    return {"up": up, "down": down, "steps": steps}


def task_delays(args: argparse.Namespace) -> dict[str, int]:
    """vcsim's -task-delay flags from the options (milliseconds per task method)."""
    seconds = {"CloneVM_Task": args.clone_seconds, "PowerOnVM_Task": args.power_on_seconds,
               "PowerOffVM_Task": args.power_off_seconds, "Destroy_Task": args.destroy_seconds}
    return {method: int(1000 * value) for method, value in seconds.items() if value}


async def main_async(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"floor": [], "governord": []}
    postgres = PrivatePostgres() if args.store == "postgres" else None
    try:
        with Lab(workdir) as lab:
            lab.start_foreman()
            lab.start_satellite()
            lab.start_vcsim(delay_ms=args.call_ms, task_delays=task_delays(args))
            lab.start_platform("vsphere")
            for round_no in range(1, args.rounds + 1):
                load = os.getloadavg()[0]
                if not args.no_floor:
                    floor = await run_floor(lab, args.hosts, args.concurrency)
                    results["floor"].append(floor)
                    print(f"round {round_no} floor     up {floor['up']:6.2f} s  down {floor['down']:6.2f} s",
                          flush=True)
                gov = await run_governord(lab, round_no, args.hosts, args.concurrency, args.timeout, args.profile,
                                          daemon_args(args), args.lab_limits, shipped=args.shipped_limits,
                                          instances=args.instances, postgres=postgres, workers=args.workers)
                gov["load"] = load
                results["governord"].append(gov)
                if args.steps:
                    for who, run in (("floor", None if args.no_floor else floor), ("governord", gov)):
                        if run is None:
                            continue
                        print(f"  {who}: mean seconds per host between events")
                        for label, seconds in run["steps"].items():
                            print(f"    {seconds:7.3f}  {label}")
                ratio = ("" if args.no_floor else
                         f"  ratio up {gov['up'] / floor['up']:.2f} down {gov['down'] / floor['down']:.2f}")
                print(f"round {round_no} governord up {gov['up']:6.2f} s  down {gov['down']:6.2f} s  "
                      f"(load average {load:.1f}){ratio}", flush=True)
    finally:
        if postgres is not None:
            postgres.stop()
    summary: dict[str, Any] = {"hosts": args.hosts, "concurrency": args.concurrency, "rounds": args.rounds,
                               "instances": args.instances, "shipped_limits": args.shipped_limits,
                               "task_delays_ms": task_delays(args), "call_ms": args.call_ms}
    for who, runs in results.items():
        if not runs:
            continue
        for phase in ("up", "down"):
            summary[f"{who}_{phase}_s"] = statistics.median(float(r[phase]) for r in runs)
        summary[f"{who}_total_s"] = statistics.median(float(r["up"]) + float(r["down"]) for r in runs)
    if results["floor"]:
        for phase in ("up", "down", "total"):
            summary[f"ratio_{phase}"] = summary[f"governord_{phase}_s"] / summary[f"floor_{phase}_s"]
    summary["load_averages"] = [round(float(r["load"]), 1) for r in results["governord"]]
    summary["runs"] = [{k: v for k, v in r.items() if k != "steps"} for who in results for r in results[who]]
    return summary


def in_flight(args: argparse.Namespace) -> str:
    """The limits a fleet row ran with: the engine's workers and the instances' max_concurrency."""
    from governord.config import EngineSection
    from governord.providers import ProviderConfig

    if args.shipped_limits:
        workers = args.workers or EngineSection().workers
        limit = f"max_concurrency {ProviderConfig.model_fields['max_concurrency'].default} (shipped)"
    else:
        workers = args.workers or args.concurrency
        limit = f"max_concurrency {args.concurrency}"
    return f"{workers} workers{'' if args.workers else ' (shipped)' if args.shipped_limits else ''}; {limit}"


def daemon_args(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.trace_store:
        extra.append(f"--trace-store={args.trace_store / 'store-{round}.json'}")
    if args.switch_interval:
        extra.append(f"--switch-interval={args.switch_interval}")
    if args.shared_executor:
        extra.append("--shared-executor")
    if args.slow_callback:
        extra.append(f"--slow-callback={args.slow_callback}")
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10,
                        help="hosts in flight at once: governord's [engine] workers and every instance's "
                             "max_concurrency; the floor's hosts at once and its threads")
    parser.add_argument("--lab-limits", action="store_true",
                        help="keep the lab's per-instance limits (vSphere 8, Foreman and Satellite 4) instead of "
                             "--concurrency for every instance")
    parser.add_argument("--rounds", type=int, default=3, help="floor/governord pairs; medians are reported")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each phase may take")
    parser.add_argument("--workdir", type=Path, help="keep the lab's files (logs, state) here")
    parser.add_argument("--profile", type=Path, help="py-spy the daemon during each round into this directory")
    parser.add_argument("--trace-store", type=Path,
                        help="run the daemon through bench.daemon, timing every store call, into this directory")
    parser.add_argument("--switch-interval", type=float, help="the daemon's GIL switch interval (experiment)")
    parser.add_argument("--shared-executor", action="store_true",
                        help="as before the fix: SDK calls in asyncio's shared default executor (bench.daemon)")
    parser.add_argument("--slow-callback", type=float,
                        help="asyncio debug mode in the daemon: log callbacks holding the loop longer than this")
    parser.add_argument("--steps", action="store_true", help="print where each host's time went, per round")
    parser.add_argument("--instances", type=int, default=1,
                        help="governord daemons on one database (more than one: PostgreSQL)")
    parser.add_argument("--store", choices=["sqlite", "postgres"],
                        help="governord's store (default: SQLite for one instance, PostgreSQL for more)")
    parser.add_argument("--shipped-limits", action="store_true",
                        help="governord's shipped [engine] workers and max_concurrency, not --concurrency")
    parser.add_argument("--no-floor", action="store_true", help="governord only")
    parser.add_argument("--workers", type=int, help="governord's [engine] workers alone (after the other limits)")
    parser.add_argument("--realistic", action="store_true",
                        help="vCenter's pace: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in REALISTIC.items())
                        + " (each overridden by its own option)")
    parser.add_argument("--clone-seconds", type=float, help="seconds vcsim's clone task takes")
    parser.add_argument("--power-on-seconds", type=float,
                        help="seconds vcsim's power-on task takes (the guest's address is there when it ends)")
    parser.add_argument("--power-off-seconds", type=float, help="seconds vcsim's power-off task takes")
    parser.add_argument("--destroy-seconds", type=float, help="seconds vcsim's destroy task takes")
    parser.add_argument("--call-ms", type=int, help="milliseconds every SOAP call to vcsim takes")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a note for the recorded row")
    args = parser.parse_args(argv)
    for key, value in REALISTIC.items():
        if getattr(args, key) is None:
            setattr(args, key, value if args.realistic else 0)
    if args.store is None:
        args.store = "postgres" if args.instances > 1 else "sqlite"
    if args.store == "sqlite" and args.instances != 1:
        parser.error("--instances: SQLite has one instance; use --store postgres")
    for directory in (args.profile, args.trace_store):
        if directory:
            directory.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        summary = asyncio.run(main_async(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="governord-bench-e2e-") as tmp:
            summary = asyncio.run(main_async(args, Path(tmp)))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.record and args.no_floor:
        append_row("e2e-fleet", [
            time.strftime("%Y-%m-%d"), machine_label(), str(args.hosts), str(args.instances), args.store,
            in_flight(args),
            ", ".join(f"{m.removesuffix('VM_Task').removesuffix('_Task')} {ms / 1000:g}"
                      for m, ms in summary["task_delays_ms"].items()) + f"; {args.call_ms} ms/call",
            str(args.rounds), f"{summary['governord_up_s']:.1f}", f"{summary['governord_down_s']:.1f}",
            "/".join(f"{x:.1f}" for x in summary["load_averages"]), args.note,
        ])
    elif args.record:
        append_row("e2e", [
            time.strftime("%Y-%m-%d"), machine_label(), str(args.hosts), str(args.concurrency), str(args.rounds),
            f"{summary['floor_up_s']:.1f}", f"{summary['governord_up_s']:.1f}", f"{summary['ratio_up']:.2f}",
            f"{summary['floor_down_s']:.1f}", f"{summary['governord_down_s']:.1f}", f"{summary['ratio_down']:.2f}",
            f"{summary['ratio_total']:.2f}", args.note,
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
