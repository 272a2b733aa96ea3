"""The fault proxy (lab.faultproxy) as a client meets it, in front of the Foreman simulator and
vcsim: transparent without faults, and each fault what it claims to be, with the "after" ones
having really reached the peer (checked at the peer, past the proxy)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from lab import vcsim
from lab.faultproxy import FaultProxy, FaultRates, FaultSettings, main, proxy_stats, set_proxy_rates
from lab.process import PeerProcess
from lab.stack import Lab

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    settings = FaultSettings(rates=FaultRates(), seed=11, slow_seconds=2.0, client_timeout=1.0)
    with Lab(tmp_path / "lab", faults=settings) as the_lab:
        the_lab.start_foreman()
        yield the_lab


def _proxy(lab: Lab) -> PeerProcess:
    assert lab.foreman
    return lab.fronts[lab.foreman.url]


def _set_rates(proxy: PeerProcess, **rates: float) -> None:
    set_proxy_rates(proxy, FaultRates(**rates))
    assert proxy_stats(proxy)["rates"] == {"error": 0.0, "slow": 0.0, "drop": 0.0, **rates}


def _create(lab: Lab, url: str, timeout: float = 10) -> requests.Response:
    body = {"host": {"name": f"f-{uuid.uuid4().hex[:8]}.lab.example", "location_id": 1, "organization_id": 1,
                     "managed": False}}
    return requests.post(url + "/api/hosts", json=body, auth=("admin", lab.passwords["LAB_FOREMAN_PASSWORD"]),
                         timeout=timeout)


def _counts(proxy: PeerProcess) -> dict[str, int]:
    return proxy_stats(proxy)["counts"]  # type: ignore[no-any-return]


def test_without_faults_it_is_transparent(lab: Lab) -> None:
    assert lab.foreman
    proxy = _proxy(lab)
    auth = ("admin", lab.passwords["LAB_FOREMAN_PASSWORD"])
    direct = requests.get(lab.foreman.url + "/api/status", auth=auth, timeout=10)
    through = requests.get(proxy.url + "/api/status", auth=auth, timeout=10)
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())
    assert through.headers["Content-Type"] == direct.headers["Content-Type"]
    assert through.headers["Foreman_api_version"] == "2"
    # the peer's refusals pass through unchanged too
    refused = requests.get(proxy.url + "/api/status", auth=("admin", "wrong"), timeout=10)
    assert refused.status_code == 401 and refused.json() == requests.get(
        lab.foreman.url + "/api/status", auth=("admin", "wrong"), timeout=10).json()
    created = _create(lab, proxy.url)
    assert created.status_code == 201
    assert created.json()["name"] in lab.foreman_hosts()
    assert _counts(proxy) == {"pass": 3}


def test_errors_answer_5xx_and_the_after_ones_reached_the_peer(lab: Lab) -> None:
    proxy = _proxy(lab)
    _set_rates(proxy, error=1.0)
    statuses = [_create(lab, proxy.url).status_code for _ in range(12)]
    assert set(statuses) <= {502, 503, 504}
    counts = _counts(proxy)
    assert counts["error-before"] + counts["error-after"] == 12 and counts["error-before"] and counts["error-after"]
    # every client saw a failure; the peer acted on exactly the "after" ones
    assert len(lab.foreman_hosts()) == counts["error-after"]


def test_drops_cut_the_connection_and_the_after_ones_reached_the_peer(lab: Lab) -> None:
    proxy = _proxy(lab)
    _set_rates(proxy, drop=1.0)
    for _ in range(12):
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):  # reset, or cut
            _create(lab, proxy.url)
    counts = _counts(proxy)
    assert counts["drop-before"] + counts["drop-after"] == 12 and counts["drop-before"] and counts["drop-after"]
    assert len(lab.foreman_hosts()) == counts["drop-after"]


def test_slow_answers_come_after_the_client_gave_up_on_a_request_that_took_effect(lab: Lab) -> None:
    proxy = _proxy(lab)
    _set_rates(proxy, slow=1.0)
    for _ in range(3):
        with pytest.raises(requests.ReadTimeout):
            _create(lab, proxy.url, timeout=1.0)
    assert len(lab.foreman_hosts()) == 3
    assert _counts(proxy) == {"slow": 3}


def test_a_tls_peer_is_fronted_by_tls_and_a_vsphere_session_works_through_it(tmp_path: Path) -> None:
    settings = FaultSettings(rates=FaultRates(), seed=1, slow_seconds=2.0, client_timeout=1.0)
    with Lab(tmp_path / "lab", faults=settings) as lab:
        peer = lab.start_vcsim()
        proxy = lab.fronts[peer.url]
        assert proxy.url.startswith("https://") and proxy.url.endswith("/sdk")
        si = vcsim.connect(proxy.url, "governord", lab.passwords["LAB_VCSIM_PASSWORD"])
        try:
            # calls after the login need its session cookie, which must pass through both ways
            names = [child.name for child in si.RetrieveContent().rootFolder.childEntity]
        finally:
            vcsim.disconnect(si)
        assert names == [vcsim.DATACENTER]
        assert set(_counts(proxy)) == {"pass"}


def _decisions(seed: int, rates: FaultRates) -> list[Any]:
    proxy = FaultProxy("http://127.0.0.1:9", FaultSettings(rates=rates, seed=seed))
    return [proxy.decide() for _ in range(200)]


def test_the_same_seed_gives_the_same_faults_at_the_set_rates() -> None:
    rates = FaultRates.spread(0.3)
    first, again, other = _decisions(4, rates), _decisions(4, rates), _decisions(5, rates)
    assert first == again and first != other
    faulted = [d for d in first if d.kind is not None]
    # 30% of 200, give or take what a seeded draw gives: the rate is a rate, not a schedule
    assert 35 <= len(faulted) <= 85
    assert {d.kind for d in faulted} == {"error", "slow", "drop"} and {d.phase for d in faulted} == {"before", "after"}


def test_bad_settings_are_refused(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--upstream", "http://127.0.0.1:9", "--error-rate", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["--upstream", "http://127.0.0.1:9", "--rate", "1.5"]) == 2
    assert "add up to 1.500" in capsys.readouterr().err
    assert main(["--upstream", "http://127.0.0.1:9", "--slow-rate", "0.1", "--slow-seconds", "1",
                 "--client-timeout", "2"]) == 2
    assert "must exceed client_timeout" in capsys.readouterr().err
    request = urllib.request.Request(_proxy(lab).url + "/_faultproxy/rates", method="PUT",
                                     data=json.dumps({"error": 0.7, "drop": 0.7}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback lab peer
    assert refused.value.code == 422 and "add up to" in json.loads(refused.value.read())["error"]
