"""README.md's install guide (its "Installing" section) names the code's own extras, paths,
config keys and commands: each is checked here against setup.cfg, the unit and the snippets in
systemd/, the config's schema, the CA and governord-ctl, so the guide cannot drift from them."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import click
import pytest
from packaging.requirements import Requirement
from pydantic import BaseModel

from governord import config as cfg
from governord.ctl import cli
from governord.pki import LEAF_VALIDITY, CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
GUIDE = README.split("\n## Installing\n", 1)[1].split("\n## ", 1)[0]
UNIT = (ROOT / "systemd" / "governord.service").read_text()
TMPFILES = (ROOT / "systemd" / "governord.tmpfiles.conf").read_text()
AUTOSIGN_TMPFILES = (ROOT / "systemd" / "governord-autosign.tmpfiles.conf").read_text()


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _extras() -> dict[str, set[str]]:
    """setup.cfg's extras: each one's distributions, by their names."""
    section = _setup_cfg()["options.extras_require"]
    return {name: {Requirement(line).name.lower() for line in value.splitlines()
                   if line.strip() and not line.strip().startswith("#")} for name, value in section.items()}


def _plugin_types() -> set[str]:
    entry_points = _setup_cfg()["options.entry_points"]["governord"]
    return {line.split("=")[0].strip() for line in entry_points.splitlines() if line.strip()}


def _subsection(title: str) -> str:
    return GUIDE.split(f"\n### {title}\n", 1)[1].split("\n### ", 1)[0]


def _table(text: str) -> list[list[str]]:
    """The rows of the first markdown table in ``text``, below its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _sh_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```sh\n")[1:]]


def test_the_extras_table_is_setup_cfgs() -> None:
    extras = _extras()
    rows = _table(_subsection("With pip, without the package"))
    named: dict[str, str] = {}
    for what, extra, sdk in rows:
        kind = what.split()[0]
        if kind in ("provider", "registrar"):
            plugin_type = re.fullmatch(r"(?:provider|registrar) `([a-z0-9]+)`", what)
            assert plugin_type, what
            named[plugin_type[1]] = extra
        if extra == "none":
            continue
        name = extra.strip("`")
        assert name in extras, f"the guide names the extra {name!r}, which setup.cfg does not have"
        if name != "all":
            for distribution in extras[name]:
                assert distribution in sdk.lower(), f"extra {name}: {distribution} is not in the guide's {sdk!r}"
    # every provider and registrar type is in the table, with the extra its plugin needs
    assert set(named) == _plugin_types()
    for plugin_type, extra in named.items():
        if extra == "none":  # nothing beyond Python: the plugin declares no requirement
            assert "requires=" not in (ROOT / "plugins" / plugin_type / "__init__.py").read_text()
        else:
            assert extra == f"`{plugin_type}`"
    # every extra but the project's own tools is in the table, and "all" is all of them
    listed = {extra.strip("`") for _, extra, _ in rows if extra != "none"}
    assert listed == set(extras) - {"bench", "test"}
    assert extras["all"] == set().union(*(extras[name] for name in listed - {"all"}))


def test_the_pip_install_uses_the_projects_own_files() -> None:
    [commands] = _sh_blocks(_subsection("With pip, without the package"))
    for path in re.findall(r"(?<![/\w])((?:systemd|etc)/[\w./-]+)", commands):
        assert (ROOT / path).is_file(), path
    extras = re.search(r"'\.\[([a-z,]+)\]'", commands)
    assert extras and set(extras[1].split(",")) <= set(_extras())
    assert "-c constraints.txt" in commands
    scripts = {line.split("=")[0].strip()
               for line in _setup_cfg()["options.entry_points"]["console_scripts"].splitlines() if line.strip()}
    linked = set(re.findall(r"/opt/governord/bin/([\w-]+)", commands.split("ln -s", 1)[1].splitlines()[0]))
    assert linked == scripts
    # the sed rewrites the unit's every command (which name the package's links)
    assert "sed 's|/usr/bin/governord|/usr/local/bin/governord|g' systemd/governord.service" in commands
    execs = [line for line in UNIT.splitlines() if line.startswith("Exec")]
    assert execs and all(line.split("=", 1)[1].startswith("/usr/bin/governord") for line in execs)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (through ``X | None``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _model_of(arg)) is not None:
            return model
    return None


def _resolve(section: str) -> type[BaseModel]:
    model: type[BaseModel] = cfg.CoreConfig
    for part in section.split("."):
        if part.isupper():  # a name the reader picks: [applications.APP.webhook]
            continue
        assert part in model.model_fields, f"the guide's [{section}]: no {part!r} in {model.__name__}"
        found = _model_of(model.model_fields[part].annotation)
        assert found is not None, f"[{section}] is not a section"
        model = found
    return model


#: the hooks' README's part for governord's operator: the URL, the secret and the CA
HOOKS_GUIDE = (ROOT / "hooks" / "openshift" / "README.md").read_text().split("\n## governord's side", 1)[1] \
    .split("\n## ", 1)[0]


@pytest.mark.parametrize("guide", [GUIDE, HOOKS_GUIDE], ids=["README.md", "hooks/openshift/README.md"])
def test_every_config_key_the_guide_names_is_in_the_schema(guide: str) -> None:
    mentions = re.findall(r"`\[([A-Za-z_.]+)\](?:\s+([a-z_]+))?`((?:(?:,| and)\s+`[a-z_]+`)*)", guide)
    assert len(mentions) >= 5, mentions
    for section, key, more in mentions:
        model = _resolve(section)
        for name in [key, *re.findall(r"`([a-z_]+)`", more)]:
            assert not name or name in model.model_fields, f"the guide names [{section}] {name}, which is not a key"


def test_where_things_live_is_where_the_code_puts_them(tmp_path: Path) -> None:
    table = {row[0]: row[1] for row in _table(_subsection("Where things live"))}
    where = "\n".join(table.values())
    # the unit's config, secrets and directories
    assert "ExecStart=/usr/bin/governord --config /etc/governord/governord.toml" in UNIT
    assert "/etc/governord/governord.toml" in table["the config"]
    assert "EnvironmentFile=-/etc/governord/secrets.env" in UNIT and "/etc/governord/secrets.env" in where
    assert "d /etc/governord 0750 root governord -" in TMPFILES and "0750 root:governord" in table["the config"]
    for directive in ("StateDirectory=governord", "RuntimeDirectory=governord", "CacheDirectory=governord"):
        assert directive in UNIT
    # the state directory: the config's default is the unit's StateDirectory
    daemon = cfg.DaemonSection()
    assert str(daemon.state_dir) == "/var/lib/governord" and "d /var/lib/governord 0750 governord governord -" in TMPFILES
    # the CA and the server certificate, where governord's CA writes them
    authority = CertificateAuthority(tmp_path / "pki")
    authority.ensure()
    server = authority.issue("localhost", server_names=["localhost"], stem="server")
    assert server.key is not None
    for written in (authority.cert_path, authority.key_path, server.certificate, server.key):
        assert f"/var/lib/governord/{written.relative_to(tmp_path)}" in where, written
    daemon_source = (ROOT / "daemon" / "daemon.py").read_text()
    assert 'stem="server"' in daemon_source
    assert 'stem=f"app-{app}-' in (ROOT / "daemon" / "api" / "admin_api.py").read_text()
    assert "/var/lib/governord/pki/issued/app-APP-*.pem" in where
    # the sockets: the config's defaults, the unit's runtime directory, the autosign snippet
    api = cfg.ApiSection()
    assert str(api.admin_socket) == "/run/governord/admin.sock" and api.admin_socket_mode == "0660"
    assert "`/run/governord/admin.sock`, mode 0660" in where
    assert "d /run/governord 0750 governord governord -" in TMPFILES
    assert api.autosign_socket is None and "none by default" in where
    assert "d /run/governord-autosign 2750 governord puppet -" in AUTOSIGN_TMPFILES
    assert "2750 governord:puppet" in where
    assert "d /var/cache/governord 0750 governord governord -" in TMPFILES and "/var/cache/governord" in where
    # the log: stderr, under the unit into the journal
    assert "journalctl -u governord" in where and "StandardError" not in UNIT
    # who may use governord-ctl: the sysusers line's group; the socket's mode
    assert "u governord -" in (ROOT / "systemd" / "governord.sysusers.conf").read_text()
    assert "usermod -aG governord" in _subsection("Who may use governord-ctl")
    # an application's certificate lives as long as the guide says
    assert f"valid {LEAF_VALIDITY.days} days" in _subsection("Handing an application its certificate")


def _command(words: list[str]) -> tuple[click.Command, list[str]]:
    """The governord-ctl command ``words`` start with, and the words after it."""
    command: click.Command = cli
    while words and isinstance(command, click.Group) and not words[0].startswith("-"):
        assert words[0] in command.commands, f"governord-ctl has no {words[0]!r} under {command.name!r}"
        command, words = command.commands[words[0]], words[1:]
    return command, words


def test_every_governord_ctl_command_and_option_the_guide_names_exists() -> None:
    uses = re.findall(r"governord-ctl((?: [\w|.-]+)*)", GUIDE)
    checked = 0
    for use in uses:
        words = use.split()
        if not words:
            continue
        command, rest = _command(words)
        assert not isinstance(command, click.Group), f"governord-ctl{use}: names a group, not a command"
        options = {opt for param in command.params for opt in param.opts}
        for word in rest:
            if word.startswith("-"):
                assert word in options, f"governord-ctl{use}: {command.name} has no {word}"
        checked += 1
    assert checked >= 6
    # and those named without the program's name
    for use in re.findall(r"`(apps [a-z]+)[` ]", GUIDE):
        assert not isinstance(_command(use.split())[0], click.Group), use
    register = _command(["apps", "register"])[0]
    assert "--out" in {opt for param in register.params for opt in param.opts}


def test_governords_own_commands_in_the_guide() -> None:
    assert "governord --check --config /etc/governord/governord.toml" in GUIDE
    usage = subprocess.run([sys.executable, "-m", "governord", "--help"], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    assert "--check" in usage and "--config" in usage


@pytest.mark.parametrize("paragraph", ["**Backup and restore.**", "**Upgrades**"])
def test_the_guide_links_the_backup_and_upgrade_notes(paragraph: str) -> None:
    assert "[Using it](#using-it)" in GUIDE
    assert paragraph in README.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]


def test_the_hooks_guides_webhook_section_is_valid_config(tmp_path: Path) -> None:
    """The [applications.shop.webhook] the hooks' README shows is a section governord takes,
    with the secret file its commands make."""
    import tomllib

    [block] = [b.split("```", 1)[0] for b in HOOKS_GUIDE.split("```toml\n")[1:]]
    section = tomllib.loads(block)["applications"]["shop"]["webhook"]
    [reference] = section["secrets"]
    assert reference == {"file": "/etc/governord/shop-webhook-secret"}
    assert "/etc/governord/shop-webhook-secret" in _sh_blocks(HOOKS_GUIDE)[0]
    secret = tmp_path / "shop-webhook-secret"
    secret.write_text("0123abcd\n")
    webhook = cfg.WebhookSection.model_validate({**section, "secrets": [{"file": str(secret)}]})
    assert webhook.secrets[0].reveal() == "0123abcd" and webhook.rule_for("deploy", None) is not None
