"""Broken configuration files (tests/data/broken-configs/*.toml) against the real executable:
``governord --check --config FILE`` and ``governord --config FILE`` each exit 2 with one line
naming the file and the key (or, for a file that is no TOML at all, the file and what is wrong
with it), print no traceback, and write nothing: not the state directory, not the admin socket,
not anything else beside the file.

Each data file says in its header what is broken, the key the message must name (``-`` for the
file as a whole), words the message must hold and, optionally, text it must never repeat
(``# never:``, e.g. a password in a URL). ``@DIR@`` (a directory of the file's own),
``@STATE_DIR@`` and ``@SOCKET@`` (inside it) are filled in before the run. The runs are made
in parallel (each one is a fresh interpreter loading every plugin), then checked one by one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "broken-configs"
FILES = sorted(DATA.glob("*.toml"))
#: the console script installed beside this interpreter, as systemd would run it
GOVERNORD = shutil.which("governord", path=str(Path(sys.executable).parent)) or "governord"
MODES = {"check": ["--check"], "start": []}
ENV = {"GOVERNORD_BROKEN_PASSWORD": "a-lab-password", "GOVERNORD_BROKEN_EMPTY": ""}

# each run is a fresh interpreter that loads every plugin; all of them may take minutes on a busy machine
pytestmark = pytest.mark.timeout(1800)


@dataclass
class Expectation:
    key: str
    message: str
    #: text the output must not hold (a password written where it does not belong)
    never: list[str]


def expectation(path: Path) -> Expectation:
    header = path.read_bytes().decode("utf-8", errors="replace")
    key = re.search(r"^# key: (.+)$", header, re.MULTILINE)
    message = re.search(r"^# message: (.+)$", header, re.MULTILINE)
    assert key and message, f"{path.name}: the header must give '# key:' and '# message:'"
    never = [text.strip() for text in re.findall(r"^# never: (.+)$", header, re.MULTILINE)]
    return Expectation(key.group(1).strip(), message.group(1).strip(), never)


@dataclass
class Outcome:
    config: Path
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def _tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``, with a digest of each file's content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _run(case_dir: Path, source: Path, args: list[str]) -> Outcome:
    case_dir.mkdir(parents=True)
    config = case_dir / "governord.toml"
    text = source.read_bytes()
    for placeholder, value in ((b"@STATE_DIR@", case_dir / "state"), (b"@SOCKET@", case_dir / "admin.sock"),
                               (b"@DIR@", case_dir)):
        text = text.replace(placeholder, os.fsencode(value))
    config.write_bytes(text)
    before = _tree(case_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNORD_BROKEN_")} | ENV
    try:
        proc = subprocess.run([GOVERNORD, *args, "--config", str(config)], capture_output=True, text=True, env=env,
                              timeout=600, cwd=case_dir)
    except subprocess.TimeoutExpired as exc:  # a config that was taken: the daemon runs until killed
        raise AssertionError(f"governord {' '.join(args)} did not stop on {source}: {exc.stderr!r}") from None
    return Outcome(config, proc.returncode, proc.stdout, proc.stderr, before, _tree(case_dir))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Outcome]:
    root = tmp_path_factory.mktemp("broken-configs")
    jobs = {(path.stem, mode): (root / mode / path.stem, path, args) for path in FILES for mode, args in MODES.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_run, *job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def test_there_is_a_broken_file_for_every_section() -> None:
    """Every section of etc/governord.toml has broken files, and the kinds of mistake asked for
    are all there."""
    names = {path.stem for path in FILES}
    for section in ("syntax", "top", "daemon", "api", "api-tls", "engine", "network", "provider", "secret",
                    "registrar", "tag", "app", "webhook", "role", "autoscaler"):
        assert any(name.startswith(f"{section}-") for name in names), section
    for kind in ("unknown-key", "missing-required", "missing-type", "unknown-type", "out-of-range", "wrong-type",
                 "unreadable", "missing-provider", "missing-network", "duplicate", "not-utf8", "env-unset"):
        assert any(kind in name for name in names), kind
    assert len(names) == len(FILES) >= 60


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_broken_config_stops_the_daemon_naming_file_and_key(
    path: Path, outcomes: dict[tuple[str, str], Outcome]
) -> None:
    expected = expectation(path)
    for mode in MODES:
        outcome = outcomes[(path.stem, mode)]
        what = f"governord {' '.join(MODES[mode])} on {path.name}"
        assert outcome.returncode == 2, f"{what} exited {outcome.returncode}: {outcome.stderr}{outcome.stdout}"
        assert "Traceback" not in outcome.stderr, f"{what}: {outcome.stderr}"
        where = f"{outcome.config}: " if expected.key == "-" else f"{outcome.config}: {expected.key}: "
        assert where in outcome.stderr, f"{what} does not name {where!r}: {outcome.stderr}"
        assert expected.message in outcome.stderr, f"{what} does not say {expected.message!r}: {outcome.stderr}"
        for text in expected.never:
            assert text not in outcome.stderr + outcome.stdout, f"{what} repeats {text!r}: {outcome.stderr}"
        assert outcome.after == outcome.before, f"{what} wrote {set(outcome.after) ^ set(outcome.before)}"


@pytest.mark.parametrize("mode", list(MODES))
def test_a_config_that_cannot_be_read_stops_the_daemon(tmp_path: Path, mode: str) -> None:
    """No such file, a directory, and a file the user may not read (as root: run as nobody, in a
    directory of its own under /tmp that nobody may enter, so only the file is refused)."""
    (tmp_path / "a-directory.toml").mkdir()
    outcomes = {"no such file": _run_on(tmp_path / "missing.toml", MODES[mode]),
                "cannot read: Is a directory": _run_on(tmp_path / "a-directory.toml", MODES[mode])}
    home = Path(tempfile.mkdtemp(prefix="governord-unreadable-"))
    try:
        home.chmod(0o711)
        config = home / "governord.toml"
        config.write_text(f'[daemon]\nstate_dir = "{home / "state"}"\n')
        config.chmod(0o000)
        outcomes["permission denied"] = _run_on(config, MODES[mode], as_nobody=os.geteuid() == 0)
        assert sorted(p.name for p in home.iterdir()) == ["governord.toml"]  # nothing written
    finally:
        shutil.rmtree(home)
    for words, outcome in outcomes.items():
        assert outcome.returncode == 2, outcome.stderr
        assert f"{outcome.config}: {words}" in outcome.stderr
        assert "Traceback" not in outcome.stderr


def _run_on(config: Path, args: list[str], *, as_nobody: bool = False) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOVERNORD_BROKEN_")} | ENV
    # root reads any file: the unreadable case runs as nobody, without root's capabilities
    # (util-linux's setpriv; subprocess's own user= cannot exec this interpreter here)
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    proc = subprocess.run([*prefix, GOVERNORD, *args, "--config", str(config)], capture_output=True, text=True,
                          env=env, timeout=600)
    return Outcome(config, proc.returncode, proc.stdout, proc.stderr, {}, {})
