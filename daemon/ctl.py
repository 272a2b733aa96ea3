"""``governord-ctl``: the operator's command line, a thin client of the admin API on the Unix
socket. It never imports plugins or SDKs. Errors are one line on stderr and a non-zero exit:
1 for a refused or failed action, 2 for a usage error, 3 when the daemon cannot be reached.

``store move`` alone runs here rather than through the daemon, which must be stopped for it: it
exits 2 when it refuses to start (nothing written), 1 when it failed and was rolled back."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import click
import yaml
import yarl
from rich.console import Console
from rich.table import Table

from . import __version__
from .models import HostState

DEFAULT_SOCKET = os.environ.get("GOVERNORD_SOCKET", "/run/governord/admin.sock")
RESTING = {"ready", "gone", "failed"}
#: rows asked for per page of a list: the admin API's largest page (governord.api.paging.MAX_LIMIT)
PAGE_SIZE = 1000



def _console(stderr: bool = False) -> Console:
    """Text from peers and operators (a Satellite group named ``:satellite:``, a reason with
    ``[brackets]``) is shown as it is: no markup, no emoji codes, no highlighting. Where the output
    is not a terminal (a pipe, a file) nothing is wrapped or cut at a width."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=not terminal,
                   width=None if terminal else 1_000_000)


console = _console()
err_console = _console(stderr=True)
#: the formats of list commands' -o
OUTPUTS = ("table", "wide", "json", "yaml")


class CtlError(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        # one line, however long: rich would break it at the terminal's width
        err_console.print(f"governord-ctl: {self.message}", markup=False, highlight=False, soft_wrap=True)


class Unreachable(CtlError):
    exit_code = 3


#: what connecting to a socket nobody answers on raises
_UNREACHABLE = (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError, PermissionError)


def _unreachable(path: str, exc: OSError) -> str:
    """One line for a socket nobody answers on, with what to check."""
    reason = exc.strerror or str(exc)
    error = getattr(exc, "os_error", exc)  # aiohttp wraps the OSError
    if isinstance(error, PermissionError) or getattr(error, "errno", None) == errno.EACCES:
        hint = "join the group that may use it (governord), or run as root"
    elif isinstance(error, FileNotFoundError) or getattr(error, "errno", None) == errno.ENOENT:
        hint = ("is governord running (systemctl status governord)? The path is [api] admin_socket in its "
                "config; give it with --socket or GOVERNORD_SOCKET")
    else:
        hint = "is governord running (systemctl status governord)? Nothing answers on this socket"
    return f"cannot reach governord at {path}: {reason}: {hint}"


def _path(*segments: str) -> str:
    """An admin API path made of ``segments``, each percent-encoded whole, so that a host,
    application or request name given as an argument stays one segment of the path, whatever it
    holds: ``/``, ``?``, ``#`` and ``%`` are encoded, and ``.`` or ``..`` as a whole segment is
    written ``%2E`` so that nothing on the way resolves it as a step up. (An unescaped
    ``../apps/beta/rotate?`` as a host name once reached another endpoint.)"""
    parts = []
    for segment in segments:
        if not segment:
            raise click.UsageError("an empty name")
        quoted = urllib.parse.quote(segment, safe="")
        parts.append(quoted.replace(".", "%2E") if set(segment) == {"."} else quoted)
    return "/" + "/".join(parts)


class Client:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, str] | None = None, timeout: float | None = None) -> tuple[int, Any]:
        return asyncio.run(self._call(method, path, body, params, timeout))

    async def _call(self, method: str, path: str, body: dict[str, Any] | None,
                    params: dict[str, str] | None, timeout: float | None = None) -> tuple[int, Any]:
        connector = aiohttp.UnixConnector(path=self.socket_path)
        # aiohttp's own default (5 minutes) unless a command waits longer on purpose
        client_timeout = aiohttp.ClientTimeout(total=timeout) if timeout is not None else aiohttp.client.DEFAULT_TIMEOUT
        # the path is already encoded (see _path): taken as it is, never re-quoted nor normalised
        url = yarl.URL.build(scheme="http", host="governord", path=path, encoded=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
                async with session.request(method, url, json=body, params=params) as resp:
                    data = await resp.json(content_type=None)
                    return resp.status, data
        except _UNREACHABLE as exc:
            raise Unreachable(_unreachable(self.socket_path, exc)) from None

    def download(self, path: str, out: Path, timeout: float) -> dict[str, Any]:
        """GET ``path`` into the file ``out`` (made 0600, never over an existing file); the reply's
        X-Governord-Backup header, decoded."""
        return asyncio.run(self._download(path, out, timeout))

    async def _download(self, path: str, out: Path, timeout: float) -> dict[str, Any]:
        try:  # first: nothing is asked of the daemon for a file that cannot be written
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CtlError(f"cannot write {out}: {exc.strerror or exc}") from None
        connector = aiohttp.UnixConnector(path=self.socket_path)
        url = yarl.URL.build(scheme="http", host="governord", path=path, encoded=True)
        done = False
        try:
            with os.fdopen(fd, "wb") as fh:
                async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) \
                        as session, session.get(url) as resp:
                    if resp.status != 200:
                        data = await resp.json(content_type=None)
                        raise CtlError(str(data.get("error") if isinstance(data, dict) else f"HTTP {resp.status}"))
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        fh.write(chunk)
                    manifest = dict(json.loads(resp.headers.get("X-Governord-Backup", "{}")))
            done = True
            return manifest
        except _UNREACHABLE as exc:
            raise Unreachable(_unreachable(self.socket_path, exc)) from None
        finally:
            if not done:  # (an empty or partial file is no backup)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out)

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None,
           params: dict[str, str] | None = None, accept: tuple[int, ...] = (200, 201, 202),
           timeout: float | None = None) -> Any:
        status, data = self.call(method, path, body, params, timeout)
        if status not in accept:
            message = data.get("error") if isinstance(data, dict) else str(data)
            raise CtlError(message or f"HTTP {status}")
        return data


def _client(ctx: click.Context) -> Client:
    return ctx.obj


def _all_pages(client: Client, path: str, key: str, params: dict[str, str] | None = None,
               limit: int | None = None) -> list[Any]:
    """Every row of a paged list (or the first ``limit``), following ``next_cursor`` page by page."""
    rows: list[Any] = []
    cursor: str | None = None
    while limit is None or len(rows) < limit:
        size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(rows))
        page = client.ok("GET", path, params={**(params or {}), "limit": str(size),
                                              **({"cursor": cursor} if cursor else {})})
        rows += page[key]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return rows


def _limit_option(func: Any) -> Any:
    return click.option("--limit", type=click.IntRange(min=1), default=None,
                        help="show at most this many (default: all, fetched a page at a time)")(func)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _output_options(func: Any) -> Any:
    """``-o table|wide|json|yaml`` (and ``--json``, the same as ``-o json``) for a list command."""
    func = click.option("--json", "as_json", is_flag=True, help="the same as -o json")(func)
    return click.option("-o", "--output", type=click.Choice(OUTPUTS), default="table", show_default=True,
                        help="table, wide (more columns), json or yaml")(func)


def _emit(rows: Any, output: str, as_json: bool, table: Any) -> None:
    """Print ``rows`` as ``output`` asks: json or yaml as they are, else ``table(rows, wide)``."""
    output = "json" if as_json else output
    if output == "json":
        _print_json(rows)
    elif output == "yaml":
        click.echo(yaml.safe_dump(rows, sort_keys=True, default_flow_style=False, allow_unicode=True), nl=False)
    else:
        console.print(table(rows, output == "wide"))


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _host_table(hosts: list[dict[str, Any]], wide: bool = False) -> Table:
    table = Table(box=None, header_style="bold")
    columns = ["NAME", "APP", "ROLE", "STATE", "TAGS", "ADDRESS", "PROVIDER", "MACHINE"]
    if wide:
        columns += ["ID", "ORIGIN", "ADDRESSES", "CREATED", "ERROR"]
    for column in columns:
        table.add_column(column)
    for h in hosts:
        state = h["state"] + (f" ({h['failed_step']})" if h.get("failed_step") else "")
        row = [h["fqdn"], h["app"] or "-", h["role"] or "-", state, ",".join(h["tags"]) or "-",
               (h["addresses"] or ["-"])[0], h["provider"] or "-", h["machine_id"] or "-"]
        if wide:
            row += [h["id"], h.get("origin") or "-", ",".join(h["addresses"]) or "-", _when(h.get("created_at")),
                    h.get("error") or "-"]
        table.add_row(*row)
    return table


def _wait_hosts(client: Client, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """Show progress until every host rests (ready, gone or failed)."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    hosts: list[dict[str, Any]] = []
    while True:
        hosts = [client.ok("GET", _path("v1", "hosts", i)) for i in ids]
        for h in hosts:
            if last.get(h["id"]) != h["state"]:
                last[h["id"]] = h["state"]
                extra = f": {h['error']}" if h.get("error") else ""
                err_console.print(f"  {h['fqdn']}: {h['state']}{extra}", markup=False, highlight=False)
        if all(h["state"] in RESTING for h in hosts):
            return hosts
        if time.monotonic() > deadline:
            raise CtlError(f"still working after {timeout:.0f}s (the work goes on; see 'hosts list')")
        time.sleep(0.5)


def _rolled_back(host: dict[str, Any]) -> bool:
    """Gone because bringing it up failed for good (the engine keeps the reason on the host)."""
    return host["state"] == "gone" and bool(host.get("failed_step"))


def _finish(client: Client, request: dict[str, Any], wait: bool, timeout: float, as_json: bool, *,
            shown: bool = False) -> None:
    """Show a decided request; with ``wait``, once its hosts rest. A declined or pending one is an
    error (exit 1) of a command that asked, not of one that only ``shown`` it."""
    if shown and request["decision"] in ("declined", "pending", "denied", "expired"):
        return _show_request(request, as_json)
    if request["decision"] == "declined":
        raise CtlError(f"declined: {request['reason']}")
    if request["decision"] == "pending":
        _show_request(request, as_json)
        raise CtlError(f"{request['reason']}: governord-ctl requests approve {request['id']} -m '...'")
    if wait and request["hosts"]:
        hosts = _wait_hosts(client, [h["id"] for h in request["hosts"]], timeout)
        request = client.ok("GET", _path("v1", "requests", request["id"]))
        if any(h["state"] == "failed" for h in hosts):
            _show_request(request, as_json)
            raise CtlError("some hosts failed; see 'governord-ctl hosts show NAME', then 'retry NAME'")
        if any(_rolled_back(h) for h in hosts):
            _show_request(request, as_json)
            raise CtlError("some hosts could not be brought up and were rolled back (nothing of them is left); "
                           "see 'governord-ctl hosts show NAME' for why")
    _show_request(request, as_json)


def _finish_host(client: Client, host: dict[str, Any], wait: bool, timeout: float, as_json: bool) -> None:
    if wait:
        host = _wait_hosts(client, [host["id"]], timeout)[0]
        if host["state"] == "failed":
            raise CtlError(f"{host['fqdn']} failed at {host['failed_step']}: {host['error']}")
        if _rolled_back(host):
            raise CtlError(f"{host['fqdn']} failed at {host['failed_step']} and was rolled back: {host['error']}")
    if as_json:
        _print_json(host)
    else:
        console.print(_host_table([host]))


def _show_request(request: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(request)
        return
    console.print(f"request {request['id']} ({request['kind']}, {request['decision']}, {request['status']})",
                  markup=False, highlight=False)
    if request.get("reason"):
        console.print(f"  {request['reason']}", markup=False, highlight=False)
    if request["hosts"]:
        console.print(_host_table(request["hosts"]))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="governord-ctl", message="%(prog)s %(version)s")
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, envvar="GOVERNORD_SOCKET",
              help="the daemon's admin socket")
@click.pass_context
def cli(ctx: click.Context, socket_path: str) -> None:
    """Drive governord by hand: hosts, tags, scaling, retirement."""
    ctx.obj = Client(socket_path)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Daemon status, host counts, and the instances sharing the store (the one answering is
    marked *)."""
    data = _client(ctx).ok("GET", "/v1/status")
    if as_json:
        return _print_json(data)
    console.print(f"governord {data['version']} on {data['node']}, config {data['config']}", markup=False)
    reload = data.get("last_reload")
    if reload:
        when = _when(reload["at"])
        console.print(f"last reload: {when}, REFUSED: {reload['refused']}" if reload["refused"]
                      else f"last reload: {when}, taken")
    console.print(f"steps in flight: {data['in_flight']}", markup=False)
    console.print("hosts: " + (", ".join(f"{k}={v}" for k, v in sorted(data["hosts"].items())) or "none"),
                  markup=False)
    not_ready = data.get("not_ready") or []
    console.print("ready" if not not_ready else f"NOT READY: {'; '.join(not_ready)}", markup=False)
    console.print(_peer_table(data.get("peers") or []))
    mappings = data.get("mappings")
    for problem in (mappings or {}).get("problems", []):
        console.print(f"tag mapping MISSING at its registrar: {problem}", markup=False)
    for registrar in (mappings or {}).get("unchecked", []):
        console.print(f"tag mappings not checked: {registrar}", markup=False)
    console.print(_instance_table(data["instances"]))


def _peer_table(peers: list[dict[str, Any]]) -> Table:
    """Each provider and registrar instance as the answering instance last probed it."""
    table = Table(box=None, header_style="bold", title="peers", title_justify="left")
    for column in ("KIND", "NAME", "TYPE", "STATE", "SINCE", "PROBE", "ERROR"):
        table.add_column(column, overflow="fold")
    for peer in peers:
        table.add_row(peer["kind"], peer["name"], peer["type"], peer["state"].upper() if peer["state"] == "down"
                      else peer["state"], _when(peer["since"]),
                      f"{peer['seconds']:.2f}s" if peer["seconds"] is not None else "-", peer["error"] or "")
    return table


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def autoscale(ctx: click.Context, as_json: bool) -> None:
    """The roles' autoscale rules: the query's last value against the thresholds, the outcome, and
    since when a threshold holds (as the answering instance saw it: the fleet's leader evaluates)."""
    data = _client(ctx).ok("GET", "/v1/autoscale")
    if as_json:
        return _print_json(data)
    table = Table(box=None, header_style="bold")
    for column in ("APP/ROLE", "VALUE", "DOWN < . < UP", "OUTCOME", "HOLDING", "LAST ASK", "QUERY"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for r in data["rules"]:
        since = r["above_since"] or r["below_since"]
        holding = f"{'above' if r['above_since'] else 'below'} {now - since:.0f}s" if since else "-"
        outcome = (r["outcome"] or "-") + (" (dry run)" if r["dry_run"] else "")
        if r["error"]:
            outcome += f": {r['error']}"
        if not r["evaluating"]:
            outcome = "not evaluated here (another instance leads)"
        table.add_row(f"{r['app']}/{r['role']}", "-" if r["value"] is None else f"{r['value']:g}",
                      f"{r['scale_down_below']:g} < . < {r['scale_up_above']:g}", outcome, holding,
                      time.strftime("%H:%M:%S", time.localtime(r["last_action"])) if r["last_action"] else "-",
                      r["query"])
    console.print(table)


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write it to this file (0644) instead of printing it")
@click.pass_context
def ca(ctx: click.Context, out: Path | None) -> None:
    """governord's CA certificate (public, PEM): what an application verifies governord's server
    certificate with (GOVERNORD_CA_FILE of the hooks), unless api.tls.certificate is the site's."""
    data = _client(ctx).ok("GET", "/v1/ca")
    if not data["signs_server_certificate"]:
        err_console.print("note: api.tls.certificate is set: the applications verify the server with the CA "
                          "that issued that certificate, not this one (this one issues their client certificates)",
                          markup=False, highlight=False)
    if out is None:
        click.echo(data["ca_pem"], nl=False)
        return
    fresh = out.with_name(out.name + ".new")
    try:
        fresh.write_text(data["ca_pem"])
        fresh.chmod(0o644)
        os.replace(fresh, out)
    except OSError as exc:
        raise CtlError(f"cannot write {out}: {exc.strerror or exc}") from None
    console.print(f"{out}: {data['subject']}, expires {_when(data['not_after'])}", markup=False)


@cli.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Have the daemon read its config again (what `systemctl reload governord` runs): exits 1,
    naming every error, if the config is refused (the running one stays)."""
    data = _client(ctx).ok("POST", "/v1/reload", timeout=300)
    console.print(f"reloaded {data['config']}")


def _instance_table(instances: list[dict[str, Any]]) -> Table:
    """The fleet's instances: one row each, the answering one marked *; a stopped or lost
    instance's in-flight count is its last heartbeat's."""
    table = Table(box=None, header_style="bold", title="instances", title_justify="left")
    for column in ("NAME", "STATUS", "LEADER", "HEARTBEAT", "VERSION", "IN FLIGHT", "HOST/PID"):
        table.add_column(column)
    for i in instances:
        table.add_row(("* " if i["this"] else "") + i["name"], i["status"], "yes" if i["leader"] else "-",
                      f"{i['heartbeat_age']:.1f}s ago", i["version"], str(i["in_flight"]),
                      f"{i['hostname']}/{i['pid']}")
    return table


@cli.command()
@_output_options
@click.pass_context
def plugins(ctx: click.Context, output: str, as_json: bool) -> None:
    """Plugins, whether they loaded, and the hooks they implement."""
    def table(rows: list[dict[str, Any]], wide: bool) -> Table:
        shown = Table(box=None, header_style="bold")
        for column in ("PLUGIN", "VERSION", "STATUS", "HOOKS", *(["DISTRIBUTION"] if wide else [])):
            shown.add_column(column)
        for p in rows:
            state = "loaded" if p["loaded"] else f"NOT LOADED: {p['error']}"
            shown.add_row(p["name"], p["version"] or "-", state,
                          ", ".join(h.removeprefix("governord_") for h in p["hooks"]),
                          *([p["distribution"] or "-"] if wide else []))
        return shown

    _emit(_all_pages(_client(ctx), "/v1/plugins", "plugins"), output, as_json, table)


@cli.group()
def hosts() -> None:
    """List and show hosts."""


@hosts.command("list")
@click.option("--app")
@click.option("--state", type=click.Choice([s.value for s in HostState]))
@click.option("--all", "show_all", is_flag=True, help="include gone hosts")
@_limit_option
@_output_options
@click.pass_context
def hosts_list(ctx: click.Context, app: str | None, state: str | None, show_all: bool, limit: int | None,
               output: str, as_json: bool) -> None:
    """All hosts, oldest first."""
    params = {k: v for k, v in {"app": app, "state": state, "all": "true" if show_all else None}.items() if v}
    _emit(_all_pages(_client(ctx), "/v1/hosts", "hosts", params, limit), output, as_json, _host_table)


@hosts.command("show")
@click.argument("host")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hosts_show(ctx: click.Context, host: str, as_json: bool) -> None:
    """One host, its registrations and its audit trail."""
    client = _client(ctx)
    data = client.ok("GET", _path("v1", "hosts", host))
    events = _all_pages(client, _path("v1", "hosts", host, "events"), "events")
    if as_json:
        return _print_json({**data, "events": events})
    for key in ("fqdn", "id", "app", "role", "origin", "state", "failed_step", "error", "provider", "machine_id"):
        if data.get(key) is not None:
            console.print(f"{key + ':':13} {data[key]}", markup=False, highlight=False)
    console.print(f"{'tags:':13} {', '.join(data['tags'])}", markup=False)
    console.print(f"{'addresses:':13} {', '.join(data['addresses']) or '-'}", markup=False)
    for system, value in data["classification"].items():
        console.print(f"{'class ' + system + ':':13} {json.dumps(value, sort_keys=True)}", markup=False)
    for system, value in data["registrations"].items():
        console.print(f"{'in ' + system + ':':13} {json.dumps(value, sort_keys=True)}", markup=False)
    console.print("events:", markup=False)
    for e in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        console.print(f"  {stamp} {e['kind']:16} {e['actor'] or '-':10} {json.dumps(e['detail'], sort_keys=True)}",
                      markup=False, highlight=False)


def _wait_options(func: Any) -> Any:
    func = click.option("--timeout", default=1800.0, show_default=True, help="seconds --wait waits")(func)
    func = click.option("--wait", is_flag=True, help="show progress until the work is done")(func)
    return click.option("--json", "as_json", is_flag=True)(func)


@cli.command()
@click.argument("app")
@click.argument("role")
@click.option("--count", type=click.IntRange(min=0), help="hosts of this role in all")
@click.option("--add", type=click.IntRange(min=1), help="hosts to add")
@click.option("--key", "idempotency_key", help="idempotency key (a repeat returns the first result)")
@_wait_options
@click.pass_context
def scale(ctx: click.Context, app: str, role: str, count: int | None, add: int | None, idempotency_key: str | None,
          wait: bool, timeout: float, as_json: bool) -> None:
    """Scale APP's ROLE to --count hosts, or by --add hosts."""
    if (count is None) == (add is None):
        raise click.UsageError("give exactly one of --count and --add")
    body = {"role": role, "count": count, "add": add, "idempotency_key": idempotency_key}
    client = _client(ctx)
    request = client.ok("POST", _path("v1", "apps", app, "scale"), {k: v for k, v in body.items() if v is not None},
                        accept=(200, 202, 409))
    _finish(client, request, wait, timeout, as_json)


def _tag_command(name: str, field: str, help_text: str, *, adopting: bool) -> None:
    @click.argument("host")
    @click.argument("tags", nargs=-1, required=True)
    @_wait_options
    @click.pass_context
    def command(ctx: click.Context, host: str, tags: tuple[str, ...], wait: bool, timeout: float, as_json: bool,
                address: str | None = None, adopt: bool = False) -> None:
        client = _client(ctx)
        body: dict[str, Any] = {field: list(tags)}
        if address:
            body["address"] = address
        if adopt:
            body["adopt"] = True
        _finish_host(client, client.ok("POST", _path("v1", "hosts", host, "tags"), body), wait, timeout, as_json)

    if adopting:
        command = click.option("--address", help="IP address of the host being adopted (--adopt)")(command)
        command = click.option("--adopt", is_flag=True, help="HOST is a machine governord does not manage yet: "
                               "adopt it by its fully qualified name and --address (registered, never destroyed)")(command)
    cli.command(name=name, help=help_text)(command)


_tag_command("tag", "add", "Tag HOST (re-classifies and updates its registrations). An unknown HOST is an error "
             "naming the nearest known ones, unless --adopt.", adopting=True)
_tag_command("untag", "remove", "Remove tags from HOST (re-classifies and updates its registrations).", adopting=False)


def _host_action(name: str, help_text: str) -> None:
    @cli.command(name=name, help=help_text)
    @click.argument("host")
    @_wait_options
    @click.pass_context
    def command(ctx: click.Context, host: str, wait: bool, timeout: float, as_json: bool) -> None:
        client = _client(ctx)
        _finish_host(client, client.ok("POST", _path("v1", "hosts", host, name)), wait, timeout, as_json)


@cli.command(name="retire")
@click.argument("host")
@click.option("--now", is_flag=True, help="skip draining (and cut short a drain under way): retire at once")
@_wait_options
@click.pass_context
def retire(ctx: click.Context, host: str, now: bool, wait: bool, timeout: float, as_json: bool) -> None:
    """Retire HOST: deregister it everywhere and destroy its machine, each verified. A ready
    host of an application with [applications.APP.drain] drains first (its application is
    told and confirms), unless --now."""
    client = _client(ctx)
    params = {"now": "true"} if now else None
    _finish_host(client, client.ok("POST", _path("v1", "hosts", host, "retire"), params=params), wait, timeout,
                 as_json)


_host_action("retry", "Resume a failed HOST at the step that failed.")


@cli.group()
def requests() -> None:
    """List and show requests."""


@requests.command("list")
@click.option("--app")
@_limit_option
@_output_options
@click.pass_context
def requests_list(ctx: click.Context, app: str | None, limit: int | None, output: str, as_json: bool) -> None:
    """Requests, newest first."""
    def table(rows: list[dict[str, Any]], wide: bool) -> Table:
        shown = Table(box=None, header_style="bold")
        for column in ("ID", "APP", "KIND", "ACTOR", "DECISION", "STATUS", "HOSTS", "REASON",
                       *(["CREATED", "HOST NAMES"] if wide else [])):
            shown.add_column(column)
        for r in rows:
            shown.add_row(r["id"], r["app"] or "-", r["kind"], r["actor"], r["decision"], r["status"],
                          str(len(r["hosts"])), r["reason"] or "",
                          *([_when(r.get("created_at")), ",".join(h["name"] for h in r["hosts"]) or "-"] if wide else []))
        return shown

    _emit(_all_pages(_client(ctx), "/v1/requests", "requests", {"app": app} if app else None, limit), output,
          as_json, table)


@requests.command("show")
@click.argument("request_id")
@_wait_options
@click.pass_context
def requests_show(ctx: click.Context, request_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """One request (by id, or a unique prefix of it) with its hosts; --wait: until its hosts rest."""
    client = _client(ctx)
    _finish(client, client.ok("GET", _path("v1", "requests", request_id)), wait, timeout, as_json, shown=True)


def _request_decision(name: str, approve: bool) -> None:
    @requests.command(name, help=f"{name.capitalize()} a pending request (by id, or a unique prefix of it), with a "
                      "comment." + (" --wait: until its hosts rest." if approve else ""))
    @click.argument("request_id")
    @click.option("--comment", "-m", required=True, help="why (kept in the audit log)")
    @_wait_options
    @click.pass_context
    def command(ctx: click.Context, request_id: str, comment: str, wait: bool, timeout: float, as_json: bool) -> None:
        client = _client(ctx)
        data = client.ok("POST", _path("v1", "requests", request_id, name), {"comment": comment})
        if approve and data["decision"] == "declined":
            raise CtlError(f"approved, but the rules decline it now: {data['reason']}")
        if not approve:
            return _show_request(data, as_json)
        _finish(client, data, wait, timeout, as_json)


_request_decision("approve", True)
_request_decision("deny", False)


@cli.command()
@click.argument("app")
@click.argument("role")
@click.option("--count", type=click.IntRange(min=0), help="hosts of this role in all")
@click.option("--add", type=click.IntRange(min=1), help="hosts to add")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan(ctx: click.Context, app: str, role: str, count: int | None, add: int | None, as_json: bool) -> None:
    """What `scale APP ROLE` would do and why, without doing it."""
    if (count is None) == (add is None):
        raise click.UsageError("give exactly one of --count and --add")
    body = {k: v for k, v in {"role": role, "count": count, "add": add}.items() if v is not None}
    data = _client(ctx).ok("POST", _path("v1", "apps", app, "plan"), body)
    if as_json:
        _print_json(data)
    else:
        console.print(f"{data['decision']} (rule: {data['rule']}): {data['reason'] or ''}")
        for host in data["hosts"]:
            foreman = host["classification"].get("foreman", {})
            console.print(f"  {host['fqdn']} on {host['provider']}"
                          + (f", network {host['network']}" if host["network"] else "")
                          + (f", hostgroup {foreman.get('hostgroup')}" if foreman else "")
                          + f", registered in {', '.join(host['registrars']) or 'nothing'}")
        for name in data["release"]:
            console.print(f"  release {name}")
    if data["decision"] == "declined":  # as `scale` would be: exit 1, after showing why
        ctx.exit(1)


def _moment(value: str | None) -> str | None:
    """A --since/--until: ``30m``, ``2h``, ``7d`` ago, or a local date and time (``2026-12-04``,
    ``2026-12-04T15:30``), as the Unix time the API takes."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].replace(".", "", 1).isdigit() and value[-1:] in units:
        return str(time.time() - float(value[:-1]) * units[value[-1]])
    try:
        return str(datetime.datetime.fromisoformat(value).timestamp())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give 30m, 2h, 7d (ago) or a date and time, e.g. 2026-12-04T15:30") \
            from None


@cli.command()
@click.option("--kind", help="only events whose kind starts with this (e.g. request-, autosign-)")
@click.option("--host", help="only events of this host (name, FQDN or id; gone hosts too)")
@click.option("--app", help="only events of this application's hosts and requests")
@click.option("--actor", help="only events whose actor starts with this (operator: every operator; operator:alice)")
@click.option("--since", help="only events since: 30m, 2h, 7d ago, or a date and time (2026-12-04T15:30)")
@click.option("--until", help="only events before: the same forms as --since")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="only the newest this many (default: all, fetched a page at a time)")
@_output_options
@click.pass_context
def audit(ctx: click.Context, kind: str | None, host: str | None, app: str | None, actor: str | None,
          since: str | None, until: str | None, limit: int | None, output: str, as_json: bool) -> None:
    """The audit log, oldest first: who did what to which host, which rule decided, and why."""
    def table(rows: list[dict[str, Any]], wide: bool) -> Table:
        shown = Table(box=None, header_style="bold")
        for column in ("TIME", "KIND", "ACTOR", "HOST", "RULE", "DETAIL", *(["HOST ID", "REQUEST ID"] if wide else [])):
            shown.add_column(column)
        for e in rows:
            detail = {k: v for k, v in e["detail"].items() if k != "rule"}
            shown.add_row(_when(e["ts"]), e["kind"], e["actor"] or "-", e.get("host") or "-",
                          str(e["detail"].get("rule", "")), json.dumps(detail, sort_keys=True),
                          *([e.get("host_id") or "-", e.get("request_id") or "-"] if wide else []))
        return shown

    filters = {"kind": kind, "host": host, "app": app, "actor": actor, "since": _moment(since), "until": _moment(until)}
    # the API pages newest first; shown in the order it happened
    events = _all_pages(_client(ctx), "/v1/audit", "events", {k: v for k, v in filters.items() if v}, limit)[::-1]
    _emit(events, output, as_json, table)


@cli.command()
@click.option("--dry-run", is_flag=True, help="list what the sweep finds; change nothing")
@click.option("--timeout", default=1800.0, show_default=True, help="seconds to wait for the sweep")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sweep(ctx: click.Context, dry_run: bool, timeout: float, as_json: bool) -> None:
    """Compare the records with what exists: leaked machines, vanished machines, orphaned
    registrations. Acts as [sweep.policy] says (each action is in `audit --kind sweep`);
    exits 1 if a listing or an action failed."""
    data = _client(ctx).ok("POST", "/v1/sweep", {"dry_run": dry_run}, timeout=timeout)
    if as_json:
        _print_json(data)
    else:
        title = "dry run: nothing changed" if data["dry_run"] else "policy " + ", ".join(
            f"{kind}={action}" for kind, action in data["policy"].items())
        checked = ", ".join(f"{name} {n}" for group in data["checked"].values() for name, n in group.items())
        console.print(f"sweep ({title}); marked items listed: {checked or 'none'}", markup=False, highlight=False)
        if data["findings"]:
            table = Table(box=None, header_style="bold")
            for column in ("KIND", "WHERE", "NAME", "ID", "HOST ID", "RECORD", "ACTION", "REASON"):
                table.add_column(column)
            for f in data["findings"]:
                table.add_row(f["kind"], f["where"], f["name"], f["ident"], f["host_id"], f["record"], f["action"],
                              f["reason"])
            console.print(table)
        else:
            console.print("nothing found", markup=False)
    for error in data["errors"]:
        err_console.print(f"governord-ctl: sweep: {error['where']}: {error['error']}", markup=False, highlight=False)
    if data["errors"]:
        ctx.exit(1)


@cli.group()
def apps() -> None:
    """Applications and their certificates."""


def _write_issued(data: dict[str, Any], out: str) -> dict[str, Any]:
    """Write the certificate, its private key (0600, never over an existing file) and the CA to
    ``out``: the reply holds the only copy of the key, governord keeps none."""
    directory = os.path.abspath(out)
    stem = os.path.join(directory, f"{data['app']}-{data['serial']}")
    files = {"certificate": f"{stem}.pem", "key": f"{stem}.key", "ca": os.path.join(directory, "governord-ca.pem")}
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(files["key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data["key_pem"])
        with open(files["certificate"], "x") as fh:
            fh.write(data["certificate_pem"])
        fresh = files["ca"] + ".new"
        with open(fresh, "w") as fh:
            fh.write(data["ca_pem"])
        os.replace(fresh, files["ca"])
    except OSError as exc:
        raise CtlError(f"certificate {data['serial']} was issued, but its files cannot be written in {directory}: "
                       f"{exc.strerror or exc}; revoke it (apps revoke {data['app']} --serial {data['serial']}) "
                       "and issue another") from None
    return {"app": data["app"], "common_name": data["common_name"], "serial": data["serial"],
            "issuer": data["issuer"], "revoked": data["revoked"], **files}


def _print_issued(data: dict[str, Any], out: str, as_json: bool) -> None:
    written = _write_issued(data, out)
    if as_json:
        return _print_json(written)
    console.print(f"certificate: {written['certificate']}\nkey:         {written['key']}\n"
                  f"CA:          {written['ca']}\nserial:      {written['serial']}", markup=False, highlight=False)
    if written["revoked"]:
        console.print(f"revoked:     {', '.join(written['revoked'])}", markup=False, highlight=False)
    err_console.print("governord keeps no copy of the key: hand it to the application, then delete it here",
                      markup=False, highlight=False)


_OUT_HELP = "directory the certificate, its key (0600) and the CA are written to; governord keeps no copy of the key"


@apps.command("register")
@click.argument("app")
@click.option("--out", default=".", show_default=True, help=_OUT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def apps_register(ctx: click.Context, app: str, out: str, as_json: bool) -> None:
    """Issue a client certificate for APP (configured under [applications.APP])."""
    _print_issued(_client(ctx).ok("POST", _path("v1", "apps", app, "certificate")), out, as_json)


@apps.command("rotate")
@click.argument("app")
@click.option("--out", default=".", show_default=True, help=_OUT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def apps_rotate(ctx: click.Context, app: str, out: str, as_json: bool) -> None:
    """Issue APP a new certificate and revoke its others."""
    _print_issued(_client(ctx).ok("POST", _path("v1", "apps", app, "rotate")), out, as_json)


@apps.command("revoke")
@click.argument("app")
@click.option("--serial", help="one certificate, in hex (default: all governord issued to APP); with a site CA "
              "(api.tls.client_ca) also one of the site CA's")
@click.option("--issuer", help="the site CA that issued --serial (RFC 4514 name, e.g. 'CN=Site CA,O=Example'); "
              "needed only when client_ca holds several CAs")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def apps_revoke(ctx: click.Context, app: str, serial: str | None, issuer: str | None, as_json: bool) -> None:
    """Revoke APP's certificates: refused from the next request on, no restart needed."""
    body = {k: v for k, v in {"serial": serial, "issuer": issuer}.items() if v is not None}
    data = _client(ctx).ok("POST", _path("v1", "apps", app, "revoke"), body)
    if as_json:
        return _print_json(data)
    issued_by = f" (issuer {data['issuer']})" if data.get("issuer") else ""
    console.print(f"revoked: {', '.join(data['revoked']) or 'nothing (none unrevoked)'}{issued_by}", markup=False,
                  highlight=False)


@apps.command("list")
@_limit_option
@_output_options
@click.pass_context
def apps_list(ctx: click.Context, limit: int | None, output: str, as_json: bool) -> None:
    """Configured applications, their hosts and certificates."""
    def table(rows: list[dict[str, Any]], wide: bool) -> Table:
        shown = Table(box=None, header_style="bold")
        for column in ("APP", "CN", "HOSTS", "MAX", "APPROVAL", "ROLES", "CERTIFICATES",
                       *(["MIN", "FIRST EXPIRY"] if wide else [])):
            shown.add_column(column)
        for a in rows:
            valid = [c for c in a["certificates"] if c["revoked_at"] is None]
            soonest = min((c["not_after"] for c in valid), default=None)
            shown.add_row(a["name"], a["common_name"], str(a["hosts"]), str(a["max_hosts"]), str(a["approval"]),
                          ",".join(a["roles"]), f"{len(valid)} valid, {len(a['certificates']) - len(valid)} revoked",
                          *([str(a.get("min_hosts", "-")), _when(soonest)] if wide else []))
        return shown

    _emit(_all_pages(_client(ctx), "/v1/apps", "applications", limit=limit), output, as_json, table)


@apps.command("show")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def apps_show(ctx: click.Context, app: str, as_json: bool) -> None:
    """One application and its certificates."""
    data = _client(ctx).ok("GET", _path("v1", "apps", app))
    if as_json:
        return _print_json(data)
    for key in ("name", "description", "common_name", "hosts", "max_hosts", "min_hosts", "approval", "roles"):
        console.print(f"{key + ':':13} {data[key]}", markup=False, highlight=False)
    now = time.time()
    for c in data["certificates"]:
        expiry = time.strftime("%Y-%m-%d %H:%M", time.localtime(c["not_after"]))
        if c["revoked_at"]:
            state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.localtime(c['revoked_at']))}"
        elif c["not_after"] < now:
            state = f"EXPIRED {expiry}"
        else:
            state = f"valid, expires {expiry} (in {(c['not_after'] - now) / 86400:.0f} days)"
        console.print(f"  certificate {c['serial']}: {state}", markup=False, highlight=False)
    for r in data.get("site_revocations", []):
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["revoked_at"]))
        console.print(f"  site CA certificate {r['serial']} of {r['issuer']}: revoked {stamp}", markup=False,
                      highlight=False)


class Refused(CtlError):
    """A command that works here, not through the daemon, refused before it changed anything."""

    exit_code = 2


@cli.command()
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the file to write (default: governord-backup-DATE-TIME.tar.gz here); never overwritten")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds the backup may take")
@click.pass_context
def backup(ctx: click.Context, out: Path | None, timeout: float) -> None:
    """Back up the store and the CA while governord runs (a consistent snapshot of the store:
    SQLite's online backup, or pg_dump's), with the config. The file holds the CA's private
    key: it is written 0600; keep it as you keep that key. `governord-ctl restore` puts it back."""
    out = out or Path(time.strftime("governord-backup-%Y%m%d-%H%M%S.tar.gz"))
    manifest = _client(ctx).download("/v1/backup", out, timeout)
    console.print(f"{out}: {manifest.get('store')} store at revision {manifest.get('revision')}, the CA and the "
                  f"config, governord {manifest.get('governord')}")


@cli.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="/etc/governord/governord.toml",
              show_default=True, help="the daemon's config: where the store and the state directory are")
@click.option("--force", is_flag=True, help="replace the store and the CA that are there")
def restore(archive: Path, config_path: str, force: bool) -> None:
    """Put a backup back, with governord stopped (every instance of a fleet): the store (into the
    config's SQLite file, or its PostgreSQL database by pg_restore) and the CA. Exit 2: refused,
    nothing written (governord running, a store or CA there without --force, another kind of
    store); 1: failed."""
    import fcntl

    from .config import load_store_section
    from .errors import ConfigError
    from .store.backup import BackupError
    from .store.backup import restore as put_back

    try:
        state_dir, section = load_store_section(config_path)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    lock = state_dir / "governord.lock"
    if lock.exists():
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Refused(f"governord is running on {state_dir}: stop it first (systemctl stop governord)") \
                    from None
    try:
        manifest = put_back(archive, section.effective_url(state_dir), state_dir, force=force)
    except BackupError as exc:
        raise Refused(str(exc)) from None
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest["made_at"]))
    console.print(f"restored the {manifest['store']} store and the CA of {made} (governord {manifest['governord']}); "
                  "start governord: it migrates the store if it is newer")


@cli.group()
def store() -> None:
    """The store itself: run here, on its databases, without the daemon (which must be stopped)."""


#: a [store] key -> the option of `store move` that gives it
_STORE_OPTIONS = {"url": "--to", "username": "--username", "password": "--password-file/--password-env"}


def _target_of_options(target: str, username: str | None, password_file: str | None,
                       password_env: str | None) -> str:
    """The target's URL from --to, --username and the password by reference, validated as a
    ``[store]`` section with these keys would be (the same refusals, e.g. of a password in the URL)."""
    from pydantic import ValidationError

    from .config import StoreSection

    if password_file is not None and password_env is not None:
        raise click.UsageError("give at most one of --password-file and --password-env")
    section: dict[str, Any] = {"url": target, "username": username}
    if password_file is not None:
        section["password"] = {"file": password_file}
    elif password_env is not None:
        section["password"] = {"env": password_env}
    try:
        parsed = StoreSection.model_validate({k: v for k, v in section.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        option = _STORE_OPTIONS.get(str(error["loc"][0]) if error["loc"] else "url", "--to")
        raise Refused(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None
    if parsed.url is None or parsed.url.startswith("sqlite"):
        raise Refused("--to: the target must be a PostgreSQL database (postgresql+psycopg://HOST:PORT/DB)")
    return parsed.effective_url(Path("/"))


def _target_of_config(config_path: str) -> tuple[str, Path]:
    """The target's URL (the config's ``[store]``, which must name PostgreSQL) and the state
    directory, from the daemon's config."""
    from .config import load_store_section
    from .errors import ConfigError

    try:
        state_dir, section = load_store_section(config_path)
    except ConfigError as exc:
        raise Refused(f"configuration error: {exc}") from None
    if section.url is None or section.url.startswith("sqlite"):
        raise Refused(f"{config_path}: store.url: names no PostgreSQL database; point [store] at the new "
                      "database first (url, username, password by reference), then move")
    return section.effective_url(state_dir), state_dir


class _Progress:
    """One line per table, and for a long one a line every tenth of it."""

    def __init__(self) -> None:
        self._shown: dict[str, int] = {}

    def __call__(self, table: str, copied: int, total: int) -> None:
        tenth = copied * 10 // total if total else 10
        if copied == total or (copied and tenth > self._shown.get(table, 0)):
            self._shown[table] = tenth
            click.echo(f"  {table}: {copied}/{total} rows")


@store.command("move")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="the daemon's config: its [store] (already pointed at PostgreSQL) is the target, "
                   "governord.db in its state directory the source")
@click.option("--from", "source", help="the SQLite store (a path or sqlite:///PATH); default with --config: "
              "governord.db in the state directory")
@click.option("--to", "target", help="instead of --config: the PostgreSQL database, postgresql+psycopg://HOST:PORT/DB "
              "(no user or password in it)")
@click.option("--username", help="with --to: the database user")
@click.option("--password-file", type=click.Path(dir_okay=False), help="with --to: a file holding the password")
@click.option("--password-env", metavar="NAME", help="with --to: the environment variable holding the password")
@click.option("--batch", type=click.IntRange(min=1, max=100_000), default=1000, show_default=True,
              help="rows copied at a time")
def store_move(config_path: str | None, source: str | None, target: str | None, username: str | None,
               password_file: str | None, password_env: str | None, batch: int) -> None:
    """Move a SQLite store into an empty PostgreSQL database: hosts, requests, events,
    callbacks, certificates and revocations, in one transaction. The daemon must be stopped;
    the source is never changed. Exit 0: moved; 2: refused, nothing written (the source in use or
    on an older schema, the target not empty, a bad URL or config); 1: failed and rolled back."""
    from sqlalchemy.engine import make_url

    from .store.move import MoveFailed, MoveRefused, move

    if (config_path is None) == (target is None):
        raise click.UsageError("give either --config (the daemon's config) or --to (the PostgreSQL URL)")
    state_dir: Path | None = None
    if config_path is not None:
        if username is not None or password_file is not None or password_env is not None:
            raise click.UsageError("--username, --password-file and --password-env go with --to; with --config "
                                   "they come from its [store] section")
        url, state_dir = _target_of_config(config_path)
        source = source or str(state_dir / "governord.db")
    else:
        assert target is not None
        if source is None:
            raise click.UsageError("--to needs --from (the SQLite store to move)")
        url = _target_of_options(target, username, password_file, password_env)
    assert source is not None
    click.echo(f"moving {source} into {make_url(url).render_as_string(hide_password=True)}")
    try:
        moved = move(source, url, state_dir=state_dir, batch=batch, progress=_Progress())
    except MoveRefused as exc:
        raise Refused(str(exc)) from None
    except MoveFailed as exc:
        raise CtlError(str(exc)) from None
    table = Table(box=None, header_style="bold")
    for column in ("TABLE", "ROWS", "HOW"):
        table.add_column(column)
    for entry in moved.tables:
        how = "copied"
        if entry.derived:
            how = "counted by the triggers" + (
                f": {entry.differing} counts differ from the source's, which were off" if entry.differing else
                ": as the source's")
        table.add_row(entry.name, str(entry.rows), how)
    console.print(table)
    console.print(f"moved {moved.rows} rows (schema {moved.revision}) into {moved.target}; the source is "
                  f"unchanged. Start governord with [store] pointing there.", markup=False, highlight=False,
                  soft_wrap=True)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
