"""constraints.txt pins what a site installs to what was tested: every distribution that
``governord[all,test]`` needs (its requirements, theirs, and so on, as installed here) has one
exact pin, the pin is the version installed here, and it meets setup.cfg's floors, which are above
the releases with known vulnerabilities."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("all", "test")


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert match, f"constraints.txt:{number}: not an exact pin NAME==VERSION: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def _setup_requirements() -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    for extra in [e for e in parser["options.extras_require"] if e != "bench"]:  # bench: not installed
        lines += parser["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def _closure() -> dict[str, str]:
    """Every distribution governord[all,test] needs, by requirement, as installed: name -> who needs it."""
    needed: dict[str, str] = {}
    todo: list[tuple[Requirement, tuple[str, ...], str]] = [
        (Requirement(r), EXTRAS, "governord") for r in metadata.requires("governord") or []]
    while todo:
        requirement, extras, parent = todo.pop()
        environments = [{**default_environment(), "extra": extra} for extra in (extras or ("",))]
        if requirement.marker is not None and not any(requirement.marker.evaluate(e) for e in environments):
            continue
        name = canonicalize_name(requirement.name)
        seen = name in needed
        needed.setdefault(name, parent)
        if seen and not requirement.extras:
            continue
        for inner in metadata.requires(requirement.name) or []:
            todo.append((Requirement(inner), tuple(requirement.extras), name))
    return needed


def test_every_needed_distribution_is_pinned_to_the_version_tested() -> None:
    pins = _pins()
    needed = _closure()
    assert len(needed) > 40, needed  # the SDKs and the test tools, with theirs
    missing = sorted(f"{name} (for {parent})" for name, parent in needed.items() if name not in pins)
    assert missing == [], f"not in constraints.txt: {missing}"
    differs = {name: (str(pins[name]), metadata.version(name)) for name in needed
               if Version(metadata.version(name)) != pins[name]}
    assert differs == {}, f"installed here is not what constraints.txt pins (pinned, installed): {differs}"
    # nothing pinned that nothing needs (a stale pin would hide a removed dependency)
    assert sorted(set(pins) - set(needed)) == []


def test_the_pins_meet_setup_cfgs_floors() -> None:
    pins = _pins()
    for requirement in _setup_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {requirement}"


def test_the_floors_exclude_releases_with_known_vulnerabilities() -> None:
    floors = {canonicalize_name(r.name): r.specifier for r in _setup_requirements()}
    for name, vulnerable in {"aiohttp": ["3.9.0", "3.12.13"], "requests": ["2.28.0", "2.32.3"],
                             "cryptography": ["42.0.0", "42.0.3", "44.0.0"], "orjson": ["3.9.14"]}.items():
        for version in vulnerable:
            assert not floors[name].contains(version), f"setup.cfg allows {name} {version}"


def test_make_and_the_readme_install_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e '\.\[all,test\]'", makefile), makefile
    assert re.search(r"\.installed: .*constraints\.txt", makefile)
    assert "-c constraints.txt" in (ROOT / "README.md").read_text()
