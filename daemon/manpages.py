"""Man pages and shell completions made from the code when the Debian package is built
(debian/rules, ``make deb``), so that they say what this version does:

- governord-ctl(1) from governord-ctl's click commands, their arguments and options;
- governord.toml(5) from the documented example config (etc/governord.toml, which documents
  every key; tests/meta/test_manpages.py checks every section and key of it is in the page);
- bash and zsh completion of governord-ctl, click's own (what ``_GOVERNORD_CTL_COMPLETE=bash_source
  governord-ctl`` prints).

governord(8) and governord-autosign(8) are written by hand (man/): signals, files and exit
statuses are not in any parser. ``python -m governord.manpages --example etc/governord.toml --out DIR``
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from . import __version__, ctl
from .ctl import cli

CTL = "governord-ctl"
COMPLETE_VAR = "_GOVERNORD_CTL_COMPLETE"
#: where each shell's completion goes (relative to DIR) and where the package installs it
COMPLETIONS = {
    "bash": ("completions/governord-ctl", "usr/share/bash-completion/completions"),
    "zsh": ("completions/_governord-ctl", "usr/share/zsh/vendor-completions"),
}


def roff(text: str) -> str:
    """``text`` as roff source: backslashes and hyphens escaped, no line taken for a request."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _header(name: str, section: int, summary: str) -> list[str]:
    title = roff(name.upper())
    return [f'.TH {title} {section} "" "governord {__version__}" "governord"',
            ".SH NAME", f"{roff(name)} \\- {roff(summary)}"]


def _leaf_commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[click.Context, click.Command]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, sub)
        else:
            yield sub, command


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or isinstance(param, click.Argument) or "--help" in getattr(param, "opts", ()):
            continue
        flags, help_text = record
        out += [".TP", f"\\fB{roff(flags)}\\fR", roff(help_text or "")]
    return out


def ctl_page() -> str:
    """governord-ctl(1), from the click commands."""
    root = click.Context(cli, info_name=CTL)
    about = inspect.cleandoc(ctl.__doc__ or "")
    lines = _header(CTL, 1, "the operator's command line of governord")
    lines += [".SH SYNOPSIS", f"\\fB{CTL}\\fR [\\fB\\-\\-socket\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
              ".SH DESCRIPTION", roff(inspect.cleandoc(cli.help or "")), ".PP",
              roff(about.replace("``", "")),
              ".SH OPTIONS"]
    lines += _options(cli, root)
    lines += [".SH COMMANDS"]
    for ctx, command in _leaf_commands(cli, root):
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [f'.SS "{roff(ctx.command_path)} {roff(usage)}"']
        help_text = inspect.cleandoc(command.help or command.short_help or "").replace("\b\n", "")
        if help_text:
            lines += [roff(help_text)]
        lines += _options(command, ctx)
    lines += [
        ".SH EXIT STATUS",
        ".TP", "0", "done",
        ".TP", "1", "the daemon refused the action, or it failed",
        ".TP", "2", "a usage error (or, for store move, a refusal before anything was written)",
        ".TP", "3", "the daemon cannot be reached on its socket",
        ".SH ENVIRONMENT",
        ".TP", "\\fBGOVERNORD_SOCKET\\fR", "the admin socket, as \\fB\\-\\-socket\\fR",
        ".SH FILES",
        ".TP", "\\fI/run/governord/admin.sock\\fR",
        "the daemon's admin socket; whoever can open it (root and the governord group) is an administrator",
        ".SH SEE ALSO", "\\fBgovernord\\fR(8), \\fBgovernord.toml\\fR(5)", ""]
    return "\n".join(lines)


_SECTION = re.compile(r"^(\[\[?)([A-Za-z0-9_.\-]+)(\]\]?)\s*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*\s*=")
#: an example left commented out: "# key = value" (one space at most: indented lines are prose)
_COMMENTED_KEY = re.compile(r"^# ?([A-Za-z_][A-Za-z0-9_\-]*\s*=.*)$")


def config_page(example: str) -> str:
    """governord.toml(5), from the documented example config: its sections in order, each key
    with its example value and the comment above it; keys left commented out are marked so."""
    lines = _header("governord.toml", 5, "the configuration of governord")
    lines += [".SH SYNOPSIS", "\\fI/etc/governord/governord.toml\\fR", ".SH DESCRIPTION",
              "This page is the documented example configuration, "
              "\\fI/usr/share/doc/governord/examples/governord.toml\\fR, section by section. The file the "
              "package installs is a minimal one, valid as it is; add to it from here.", ".PP"]
    prose: list[str] = []
    started = False

    def flush() -> None:
        if prose:
            lines.extend([roff(" ".join(prose)), ".PP"] if started else [".nf", roff("\n".join(prose)), ".fi"])
            prose.clear()

    for raw in example.splitlines():
        line = raw.rstrip()
        section = _SECTION.match(line)
        commented = _COMMENTED_KEY.match(line) if started else None
        if section:
            if not started:
                flush()
                lines += [".SH SECTIONS AND KEYS",
                          "Each section below is one of the example file's, in its order; each key is shown "
                          "with its example value. A key shown as an example (commented out) is unset by "
                          "default.", ".PP"]
                started = True
            pending = list(prose)
            prose.clear()
            lines += [f'.SS "{roff(line)}"']
            if pending:
                lines += [roff(" ".join(pending))]
        elif _KEY.match(line) or commented:
            shown = commented.group(1) if commented else line
            lines += [".TP", f"\\fB{roff(shown)}\\fR" + (" (example, unset by default)" if commented else "")]
            lines += [roff(" ".join(prose))] if prose else ["\\&"]
            prose.clear()
        elif line.startswith("#"):
            prose.append(line[1:].strip() if started else line[1:].removeprefix(" "))
        elif not line.strip():
            flush()
    flush()
    lines += [".SH SEE ALSO", "\\fBgovernord\\fR(8), \\fBgovernord\\-ctl\\fR(1)", ""]
    return "\n".join(lines)


def completion(shell: str) -> str:
    """click's own completion script of governord-ctl for ``shell``."""
    complete = get_completion_class(shell)
    if complete is None:
        raise ValueError(f"click has no completion for {shell}")
    return complete(cli, {}, CTL, COMPLETE_VAR).source()


def write_all(example: Path, out: Path) -> list[Path]:
    """Write the generated pages and completions under ``out``; the paths written."""
    files = {
        out / "governord-ctl.1": ctl_page(),
        out / "governord.toml.5": config_page(example.read_text()),
        **{out / COMPLETIONS[shell][0]: completion(shell) for shell in COMPLETIONS},
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m governord.manpages", description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, required=True, help="the documented example config")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    args = parser.parse_args(argv)
    for path in write_all(args.example, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
