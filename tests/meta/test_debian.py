"""The Debian package's sources (debian/, man/, the generated man pages and completions): one
version, the console scripts it links, every key of the documented config in governord.toml(5),
every governord-ctl command in governord-ctl(1), and `--version` on each program.
tests/system/test_package.py builds, installs, runs and purges the package itself."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

import governord
from governord import manpages
from governord.ctl import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("governord", "governord-ctl", "governord-autosign")


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_one_version_the_package_and_the_code() -> None:
    # setup.cfg takes the version from the code; the package's is debian/changelog's latest entry
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: governord.__version__"
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"governord \(([^)]+)\) \S+; urgency=\w+", first)
    assert match, first
    assert match.group(1) == governord.__version__
    # a native package (this repository is its upstream): no Debian revision to drift
    assert (ROOT / "debian" / "source" / "format").read_text().strip() == "3.0 (native)"


def test_every_console_script_is_linked_into_usr_bin() -> None:
    scripts = [line.split("=")[0].strip() for line in
               _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert sorted(scripts) == sorted(SCRIPTS)
    links = (ROOT / "debian" / "governord.links").read_text().split("\n")
    for script in scripts:
        assert f"opt/venvs/governord/bin/{script} usr/bin/{script}" in links


def test_each_program_answers_version() -> None:
    bin_dir = Path(sys.executable).parent
    for script in SCRIPTS:
        result = subprocess.run([str(bin_dir / script), "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{script} {governord.__version__}"


def test_the_packaged_unit_snippets_and_config_are_the_repositorys() -> None:
    debian = ROOT / "debian"
    for name, target in (("governord.service", "governord.service"), ("governord.sysusers", "governord.sysusers.conf"),
                         ("governord.tmpfiles", "governord.tmpfiles.conf")):
        assert (debian / name).resolve() == (ROOT / "systemd" / target).resolve()
    # what systemd-tmpfiles reads at every boot names no group a host may lack (puppet's line is
    # a separate, opt-in snippet)
    assert "puppet" not in "\n".join(line for line in (ROOT / "systemd" / "governord.tmpfiles.conf").read_text()
                                     .splitlines() if not line.startswith("#"))


def test_the_installed_config_is_valid_as_it_is() -> None:
    result = subprocess.run([sys.executable, "-m", "governord", "--check", "--config",
                             str(ROOT / "etc" / "installed" / "governord.toml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _unroff(text: str) -> str:
    return text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def _sections_and_keys(table: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """(section, key) for every key of ``table`` and of the tables inside it, inline or not."""
    found = []
    for key, value in table.items():
        found.append((path, key))
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                found += _sections_and_keys(item, f"{path}.{key}" if path else key)
    return found


def test_the_config_page_lists_every_section_and_key_of_the_example() -> None:
    example = (ROOT / "etc" / "governord.toml").read_text()
    page = _unroff(manpages.config_page(example))
    headers = re.findall(r'^\.SS "(.*)"$', page, flags=re.M)
    tables = []
    for header in re.findall(r"^\[\[?[^\]]+\]\]?$", example, flags=re.M):
        assert header in headers
        tables.append(header.strip("[]"))
    for section, key in _sections_and_keys(tomllib.loads(example), ""):
        full = f"{section}.{key}" if section else key
        if any(table == full or table.startswith(full + ".") for table in tables):
            continue  # a [section] of its own (or the parent of some), found among the headers
        assert re.search(rf"(^\\fB|[{{,] )\"?{re.escape(key)}\"? = ", page, flags=re.M), f"{section}: {key}"
    # the keys left commented out, as examples, are there too, marked as such
    assert '\\fBautosign_socket = "/run/governord-autosign/autosign.sock"\\fR (example, unset by default)' in page
    assert page.startswith(".TH GOVERNORD.TOML 5")


def _leaves(group: click.Group, path: str) -> list[str]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _leaves(command, f"{path} {name}")
        elif not command.hidden:
            out.append(f"{path} {name}")
    return out


def test_the_ctl_page_documents_every_command_and_option() -> None:
    page = _unroff(manpages.ctl_page())
    for command in _leaves(cli, "governord-ctl"):
        assert f'.SS "{command} ' in page, command
    assert "\\fB--socket TEXT\\fR" in page and "\\fB--version\\fR" in page
    assert "\\fB--wait\\fR" in page


def test_completions_are_clicks_own(tmp_path: Path) -> None:
    written = manpages.write_all(ROOT / "etc" / "governord.toml", tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "completions/_governord-ctl", "completions/governord-ctl", "governord-ctl.1", "governord.toml.5"]
    bash = (tmp_path / "completions" / "governord-ctl").read_text()
    assert "_GOVERNORD_CTL_COMPLETE=bash_complete" in bash and "complete -o nosort -F" in bash
    zsh = (tmp_path / "completions" / "_governord-ctl").read_text()
    assert zsh.startswith("#compdef governord-ctl") and "_GOVERNORD_CTL_COMPLETE=zsh_complete" in zsh
    # what the completion asks the program for answers with its commands
    result = subprocess.run([str(Path(sys.executable).parent / "governord-ctl")], capture_output=True, text=True,
                            env={"_GOVERNORD_CTL_COMPLETE": "bash_complete", "COMP_WORDS": "governord-ctl ho",
                                 "COMP_CWORD": "1", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert "plain,hosts" in result.stdout.split()
