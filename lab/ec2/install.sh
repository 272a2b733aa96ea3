#!/bin/sh
# Install moto's server into its own venv: lab/.build/ec2-venv (never the project's venv:
# moto pins and pulls in much that governord itself must not depend on).
# Idempotent: a stamp holding this script's checksum skips the work when nothing changed.
# Prints the path of moto_server.
set -eu
MOTO_VERSION=5.2.5
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "$here/.." && pwd)/.build
venv=$build/ec2-venv
stamp=$venv/.governord-stamp
python=${PYTHON:-python3}
want=$(cksum < "$0")
if [ -x "$venv/bin/moto_server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "$venv/bin/moto_server"
    exit 0
fi
mkdir -p "$build"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# The machine's pip configuration names the package index; this script never does.
"$venv/bin/pip" install --quiet "moto[server]==$MOTO_VERSION"
"$venv/bin/python" -c 'import moto.server' >/dev/null
printf '%s\n' "$want" > "$stamp"
echo "$venv/bin/moto_server"
