#!/usr/bin/env python3
"""External node classifier for the lab: asks Foreman which classes a node gets, as Foreman's own ENC does.

Puppet Server runs it as ``external_nodes`` with the certname as last argument and reads the
node's YAML classification (``classes``, ``parameters``, ``environment``) from stdout; a non-zero
exit makes the catalog request fail. It asks ``GET <foreman>/node/<certname>?format=yml``
(HostsController#externalNodes), authenticated with Basic auth, and prints Foreman's answer.

Where Foreman is, and the credentials, come from a JSON file (``--config PATH`` or
``$GOVERNORD_ENC_CONFIG``: ``{"url", "username", "password", "ca_file"?, "timeout"?}``) or from
``$FOREMAN_URL``, ``$FOREMAN_USER``, ``$FOREMAN_PASSWORD``; never from the command line, which
every local user can read. Standard library only: it runs under whatever python3 the server has.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def load_settings(config: str | None) -> dict[str, Any]:
    """The Foreman URL, credentials and options, from the config file or the environment."""
    path = config or os.environ.get("GOVERNORD_ENC_CONFIG")
    if path:
        with open(path, encoding="utf-8") as fh:
            settings: dict[str, Any] = json.load(fh)
    else:
        settings = {
            "url": os.environ.get("FOREMAN_URL", ""),
            "username": os.environ.get("FOREMAN_USER", ""),
            "password": os.environ.get("FOREMAN_PASSWORD", ""),
        }
    if not settings.get("url"):
        raise ValueError("no Foreman URL: give --config, $GOVERNORD_ENC_CONFIG or $FOREMAN_URL")
    return settings


def classify(certname: str, settings: dict[str, Any]) -> str:
    """Foreman's YAML for ``certname``; raises LookupError for a node Foreman does not know."""
    url = f"{settings['url'].rstrip('/')}/node/{urllib.parse.quote(certname, safe='')}?format=yml"
    request = urllib.request.Request(url, headers={"Accept": "application/x-yaml, text/plain"})
    if settings.get("username"):
        credentials = f"{settings['username']}:{settings.get('password', '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    context = ssl.create_default_context(cafile=settings["ca_file"]) if settings.get("ca_file") else None
    try:
        with urllib.request.urlopen(request, timeout=float(settings.get("timeout", 10)), context=context) as response:  # noqa: S310
            return str(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise LookupError(f"Foreman does not know {certname}") from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Print the classification of the certname given as last argument; 1 if unknown or on error."""
    parser = argparse.ArgumentParser(description="Foreman ENC for the governord lab")
    parser.add_argument("--config", help="JSON file with url, username, password")
    parser.add_argument("certname")
    args = parser.parse_args(argv)
    try:
        yaml_text = classify(args.certname, load_settings(args.config))
    except LookupError as exc:
        print(f"enc: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, urllib.error.URLError) as exc:
        print(f"enc: cannot classify {args.certname}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
