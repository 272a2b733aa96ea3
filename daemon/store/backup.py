"""Backups of what a governord installation cannot make again: the store (hosts, requests,
events, certificates, revocations) and the CA of its state directory (without which no
application's certificate is trusted any more), with the config that points at both.

A backup is one ``tar.gz``:

``MANIFEST.json``
    governord's version, the store's kind and schema revision, when it was made, and what follows;
``database.sqlite``
    a SQLite store, copied with SQLite's online backup (one read transaction: a consistent
    snapshot while the daemon goes on writing);
``database.pgdump``
    a PostgreSQL store, dumped by ``pg_dump --format=custom`` (one repeatable-read snapshot,
    consistent while every instance of the fleet goes on writing); its password goes to pg_dump
    in its environment, never on its command line;
``pki/``
    the CA's certificate and key and the server's pair (``STATE_DIR/pki``);
``governord.toml``
    the config file as it is (secrets are references in it, not values).

:func:`make` writes one (the daemon does, for ``governord-ctl backup``); :func:`restore` puts one
back with the daemon stopped (``governord-ctl restore``), refusing to overwrite a store or CA
that is there unless told to, and leaving the state directory's owner the owner of what it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

FORMAT = 1
MANIFEST = "MANIFEST.json"


class BackupError(Exception):
    """A backup could not be made or restored; nothing was changed by a refused restore."""


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URL for libpq's tools (no driver name, no password) and the environment
    that gives them the password."""
    parsed = make_url(url)
    env = {"PGPASSWORD": parsed.password} if parsed.password else {}
    bare = parsed.set(drivername="postgresql", password=None)
    return bare.render_as_string(hide_password=False), env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} is not installed (Debian's postgresql-client): it is what copies a "
                          "PostgreSQL store")
    return found


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
    if done.returncode != 0:
        raise BackupError(f"{Path(argv[0]).name} failed: {(done.stderr or done.stdout).strip()[-2000:]}")


def make(store_url: str, state_dir: Path, config_path: str, out: Path, *, version: str,
         revision: str | None) -> dict[str, Any]:
    """Write a backup to ``out`` (made 0600: it holds the CA's key); its manifest."""
    with tempfile.TemporaryDirectory(prefix="backup-", dir=state_dir) as tmp:
        work = Path(tmp)
        kind = "sqlite" if store_url.startswith("sqlite") else "postgresql"
        if kind == "sqlite":
            database = work / "database.sqlite"
            source = sqlite3.connect(f"file:{make_url(store_url).database}?mode=ro", uri=True)
            try:
                target = sqlite3.connect(database)
                with target:
                    source.backup(target)
                target.close()
            finally:
                source.close()
        else:
            database = work / "database.pgdump"
            url, env = _libpq(store_url)
            _run([_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(database), "--dbname", url], env)
        manifest = {"format": FORMAT, "governord": version, "store": kind, "revision": revision,
                    "made_at": time.time(), "database": database.name, "pki": "pki", "config": "governord.toml"}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(work / MANIFEST, MANIFEST)
            tar.add(database, database.name)
            tar.add(state_dir / "pki", "pki")
            tar.add(config_path, "governord.toml")
        return manifest


def read_manifest(archive: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            manifest: dict[str, Any] = json.loads(member.read())
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise BackupError(f"{archive} is not a governord backup: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: backup format {manifest.get('format')!r}, this governord reads {FORMAT}")
    return manifest


def restore(archive: Path, store_url: str, state_dir: Path, *, force: bool) -> dict[str, Any]:
    """Put a backup back: the store (the same kind as the config's), the CA. The daemon must be
    stopped. Without ``force`` a store or CA already there is a refusal, and nothing is written."""
    manifest = read_manifest(archive)
    kind = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    if manifest["store"] != kind:
        raise BackupError(f"the backup holds a {manifest['store']} store, the config names a {kind} one: "
                          "restore it where it came from, then `governord-ctl store move`")
    pki = state_dir / "pki"
    database = Path(make_url(store_url).database or "") if kind == "sqlite" else None
    present = [str(p) for p in (pki / "ca.key", database) if p is not None and p.exists()]
    if present and not force:
        raise BackupError(f"{', '.join(present)} exist: give --force to replace them (stop every instance first)")
    owner = os.stat(state_dir) if state_dir.exists() else None
    with tempfile.TemporaryDirectory(prefix="restore-") as tmp:
        work = Path(tmp)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(work, filter="data")
        if kind == "sqlite":
            assert database is not None
            database.parent.mkdir(parents=True, exist_ok=True)
            for stale in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                stale.unlink(missing_ok=True)
            shutil.copyfile(work / manifest["database"], database)
            database.chmod(0o600)
            _own(database, owner)
        else:
            url, env = _libpq(store_url)
            _run([_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
                  "--dbname", url, str(work / manifest["database"])], env)
        if pki.exists():
            shutil.rmtree(pki)
        shutil.copytree(work / manifest["pki"], pki)
        pki.chmod(0o700)
        for path in [pki, *pki.rglob("*")]:
            _own(path, owner)
    return manifest


def _own(path: Path, owner: os.stat_result | None) -> None:
    """Give ``path`` to the state directory's owner (a restore run by root for the daemon's user)."""
    if owner is not None and os.geteuid() == 0:
        os.chown(path, owner.st_uid, owner.st_gid)
