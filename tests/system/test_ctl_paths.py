"""governord-ctl against the real daemon with host, application and request names that hold
URL syntax: each name reaches the daemon whole, as one path segment, and is answered as the
unknown name it is. None of them reaches another endpoint (``governord-ctl tag
'../apps/demo/rotate?' node`` once rotated demo's certificate)."""

from __future__ import annotations

import ast
from pathlib import Path

from lab.stack import Governord

#: names with the characters a URL gives a meaning to: '/', '..', '?', '%' and '#'
NASTY = [
    "../apps/demo/rotate?",
    "..",
    ".",
    "demo/../../apps/demo/revoke",
    "..%2Fapps%2Fdemo%2Frotate",
    "%2e%2e",
    "x?role=node#fragment",
]


def _state(daemon: Governord) -> dict[str, object]:
    """What an endpoint reached by mistake would change: certificates, hosts, requests, events."""
    return {
        "certificates": daemon.db_rows("app_certificates"),
        "hosts": daemon.db_rows("hosts"),
        "requests": daemon.db_rows("requests"),
        "events": [(e["kind"], e["actor"]) for e in daemon.db_rows("events")],
    }


def _refused(daemon: Governord, *args: str) -> str:
    result = daemon.ctl(*args, check=False)
    assert result.returncode == 1, (args, result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("governord-ctl: "), (args, result.stderr)
    return lines[0]


def test_names_with_url_syntax_stay_one_path_segment(governord: Governord) -> None:
    issued = governord.ctl_json("apps", "register", "demo")
    before = _state(governord)
    assert [c["serial"] for c in before["certificates"]] == [issued["serial"]]  # type: ignore[index]

    for name in NASTY:
        # the daemon's answer quotes the name it received: the whole argument, nothing resolved
        shown = repr(name)
        for args in (["hosts", "show", name], ["retire", name]):
            assert _refused(governord, *args) == f"governord-ctl: no host named {shown}", args
        # `tag` adopts an unknown host only when told to, and not under a name that is no host name
        assert _refused(governord, "tag", name, "node").startswith(f"governord-ctl: no host named {shown}")
        assert _refused(governord, "tag", "--adopt", name, "node", "--address", "198.51.100.9") == \
            f"governord-ctl: not a host name: {shown}"
        for args in (["apps", "rotate", name], ["apps", "revoke", name], ["scale", name, "node", "--add", "1"]):
            assert _refused(governord, *args) == f"governord-ctl: no application named {shown}", args
        for args in (["requests", "approve", name, "-m", "why"],):
            assert _refused(governord, *args) == "governord-ctl: no such request", args

    # nothing happened anywhere: demo's certificate is the one it had, unrevoked, and no host,
    # request or event was made
    assert _state(governord) == before
    assert governord.ctl_json("apps", "show", "demo")["certificates"][0]["revoked_at"] is None

    # and the ordinary names still work
    assert governord.ctl_json("apps", "show", "demo")["name"] == "demo"


def test_an_empty_name_is_a_usage_error(governord: Governord) -> None:
    result = governord.ctl("hosts", "show", "", check=False)
    assert result.returncode == 2 and "an empty name" in result.stderr


def test_every_path_with_an_argument_goes_through_the_one_quoting_helper() -> None:
    """No f-string or concatenation builds an admin API path in governord-ctl: only _path does."""
    source = (Path(__file__).resolve().parents[2] / "daemon" / "ctl.py").read_text()
    offenders = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and isinstance(v.value, str) and "/v1" in v.value for v in node.values):
            offenders.append(node.lineno)
        if isinstance(node, ast.BinOp) and any(
                isinstance(side, ast.Constant) and isinstance(side.value, str) and side.value.startswith("/v1")
                for side in (node.left, node.right)):
            offenders.append(node.lineno)
    assert offenders == [], f"ctl.py builds paths by hand at lines {offenders}: use _path(...)"
