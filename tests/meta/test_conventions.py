"""Conventions that keep the plugin API honest: every hook is documented (arguments, return,
dispatch mode), only the dispatcher calls hooks, and no module blocks on a vendor SDK outside
a provider's or registrar's thread helper."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from governord import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name in dir(hookspecs) if name.startswith("governord_")]
MODES = ("collect", "first", "broadcast", "notify", "called once at start-up")


def test_hookspecs_exist() -> None:
    assert {"governord_tag_host", "governord_classify_host", "governord_provision_host",
            "governord_deprovision_host", "governord_register_host", "governord_deregister_host",
            "governord_host_event"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_is_typed_and_documented(name: str) -> None:
    func = getattr(hookspecs, name)
    doc = inspect.getdoc(func) or ""
    signature = inspect.signature(func)
    for param in signature.parameters:
        assert f":param {param}:" in doc, f"{name} does not document {param}"
        assert signature.parameters[param].annotation is not inspect.Parameter.empty
    assert ":returns:" in doc
    assert signature.return_annotation is not inspect.Signature.empty
    assert "Dispatch:" in doc and any(mode in doc for mode in MODES), f"{name} does not name its dispatch mode"
    assert "versionadded" in doc


def test_only_the_dispatcher_calls_hooks() -> None:
    offenders = []
    for path in [*ROOT.glob("daemon/**/*.py"), *ROOT.glob("plugins/**/*.py")]:
        if path.relative_to(ROOT).as_posix() == "daemon/dispatch/__init__.py":
            continue
        if re.search(r"\.hook\.governord_|pm\.hook\b", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_no_firstresult_or_wrappers_in_hookspecs() -> None:
    source = (ROOT / "daemon" / "hookspecs.py").read_text()
    assert "firstresult=True" not in source and "wrapper=True" not in source


def test_action_hooks_are_executable_in_git() -> None:
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-s", "hooks"], cwd=ROOT, capture_output=True, text=True).stdout
    for line in listed.splitlines():
        mode, _, _, path = line.split(maxsplit=3)
        if not path.endswith(".md"):
            assert mode == "100755", f"{path} is not executable in git"
