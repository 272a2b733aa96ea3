"""A real Prometheus for the lab: Debian's ``prometheus`` package, started by hand on a loopback port.

:func:`start_prometheus` writes a configuration (scrape jobs, rule files, a short scrape and
evaluation interval) into a directory of its own and runs ``prometheus`` in the foreground, in its
own process group, with its TSDB in that directory and ``--web.enable-lifecycle`` (so
:meth:`Prometheus.reload` can make it read a changed configuration). It returns once
``/-/ready`` answers. The package's own service is never started (``lab/apt-install.sh``).

:class:`Exporter` is a scrape target a test controls: gauges it sets by name and labels, served
in Prometheus' text format by prometheus_client's own HTTP server on a free loopback port.

The package (``prometheus``, which also ships ``promtool``) is in the Makefile's APT_PACKAGES.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import requests
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from ..postgres import free_port
from ..process import stop_group

#: how often the lab's Prometheus scrapes and evaluates its rules, unless told otherwise
INTERVAL = "1s"


class PrometheusLabError(RuntimeError):
    """Prometheus is missing, would not start, or answered a query with an error."""


def check_installed() -> None:
    """Raise :class:`PrometheusLabError` if ``prometheus`` or ``promtool`` is missing."""
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        raise PrometheusLabError(f"Prometheus is not installed (missing {', '.join(missing)}): "
                                 "install Debian's prometheus package (`make apt`)")


@dataclass
class Prometheus:
    """A running lab Prometheus: its URL, directory and process."""

    url: str
    directory: Path
    config_file: Path
    process: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        stop_group(self.process, signal.SIGTERM, timeout)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/PATH``: its ``data``, or :class:`PrometheusLabError` with Prometheus' error."""
        response = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        try:
            body = response.json()
        except ValueError:
            raise PrometheusLabError(f"{path}: HTTP {response.status_code}: {response.text[:300]}") from None
        if body.get("status") != "success":
            raise PrometheusLabError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples; a scalar as one sample without labels)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now (``/api/v1/alerts``)."""
        return list(self.api("alerts")["alerts"])

    def targets_up(self) -> dict[str, bool]:
        """Each active target's scrape URL and whether its last scrape succeeded."""
        return {t["scrapeUrl"]: t["health"] == "up" for t in self.api("targets")["activeTargets"]}

    def wait_for(self, expr: str, predicate: Any = bool, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Query ``expr`` until ``predicate(result)`` holds; its last result, or TimeoutError."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{expr!r} did not hold within {timeout:.0f}s; last result {result!r}")

    def reconfigure(self, scrape_configs: Sequence[Mapping[str, Any]], rule_files: Iterable[Path] = ()) -> None:
        """Write a new configuration and have Prometheus load it (``POST /-/reload``)."""
        _write_config(self.config_file, scrape_configs, rule_files, INTERVAL)
        response = requests.post(f"{self.url}/-/reload", timeout=10)
        if response.status_code != 200:
            raise PrometheusLabError(f"reload refused: HTTP {response.status_code}: {response.text[:300]}")


def _write_config(path: Path, scrape_configs: Sequence[Mapping[str, Any]], rule_files: Iterable[Path],
                  interval: str) -> None:
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [dict(job) for job in scrape_configs],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


def static_job(name: str, *targets: str, **settings: Any) -> dict[str, Any]:
    """A scrape job of fixed ``HOST:PORT`` targets (``settings``: scheme, metrics_path, tls_config...)."""
    return {"job_name": name, "static_configs": [{"targets": list(targets)}], **settings}


def start_prometheus(
    directory: Path, scrape_configs: Sequence[Mapping[str, Any]] = (), rule_files: Iterable[Path] = (),
    *, interval: str = INTERVAL, timeout: float = 60.0,
) -> Prometheus:
    """Start Prometheus under ``directory`` (made if missing) on a free port of 127.0.0.1."""
    check_installed()
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "prometheus.yml"
    _write_config(config_file, scrape_configs, rule_files, interval)
    check = subprocess.run(["promtool", "check", "config", str(config_file)], capture_output=True, text=True)
    if check.returncode != 0:
        raise PrometheusLabError(f"promtool refused the configuration: {check.stdout}{check.stderr}")
    port = free_port()
    log = directory / "prometheus.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            ["prometheus", f"--config.file={config_file}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", directory, config_file, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrometheusLabError(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    server.stop()
    raise PrometheusLabError(f"prometheus was not ready within {timeout:.0f}s:\n{server.log_tail()}")


class Exporter:
    """A scrape target whose gauges the caller sets: ``set("load", 0.7, app="shop")``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._lock = threading.Lock()
        self.port = free_port()
        server, thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self._server: WSGIServer = server
        self._thread = thread

    @property
    def target(self) -> str:
        """``HOST:PORT``, as a scrape job names it."""
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(name, f"lab gauge {name}", sorted(labels), registry=self.registry)
        (gauge.labels(**labels) if labels else gauge).set(value)

    def remove(self, name: str, **labels: str) -> None:
        """Stop exporting one series (a query on it then has no data)."""
        gauge = self._gauges.get(name)
        if gauge is not None:
            if labels:
                gauge.remove(*(labels[k] for k in sorted(labels)))
            else:
                self.registry.unregister(gauge)
                del self._gauges[name]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
