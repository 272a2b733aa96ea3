#!/usr/bin/env bash
# Install the OpenStack lab peer ("novabox": nova's own functional-test stack, plus a real
# keystone) into its own virtualenv, lab/.build/openstack-venv. Nova pins dozens of libraries
# (oslo.*, SQLAlchemy, eventlet, ...) that must never leak into the project's .venv.
#
# Idempotent and fast when nothing changed: a stamp file holds the hash of this script and of
# constraints.txt, and the install is skipped while it matches.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="$(cd "$HERE/.." && pwd)/.build"
VENV="$BUILD/openstack-venv"
STAMP="$VENV/.governord-installed"
PYTHON="${PYTHON:-python3}"

# What is installed, pinned. constraints.txt pins every transitive dependency too (a pip freeze
# of a working install), so the lab is the same on every machine.
PACKAGES=(
  "nova==34.0.0"
  "openstack-placement==16.0.0"
  "keystone==30.0.0"
  "keystonemiddleware==13.0.1"
  "oslotest==6.1.1"
  "wsgi-intercept==1.13.1"
  "SQLAlchemy==2.1.9"
)

want="$(cat "$0" "$HERE/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  echo "openstack lab venv up to date: $VENV"
  exit 0
fi

mkdir -p "$BUILD"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
# pip's config on this machine lists some index directories that may be absent; its warnings
# about them are noise, errors still fail the script through pipefail.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  -c "$HERE/constraints.txt" "${PACKAGES[@]}" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }

# (nova's harness would look for api-paste.ini under <site-packages>/etc/nova; novabox.py points
# it at <venv>/etc/nova/api-paste.ini, where the wheel installs it, so nothing is copied.)
test -f "$VENV/etc/nova/api-paste.ini" || { echo "openstack lab venv: no etc/nova/api-paste.ini" >&2; exit 1; }
"$VENV/bin/python" -c 'import nova.tests.functional.integrated_helpers, keystone.server.wsgi, keystonemiddleware.auth_token' \
  >/dev/null 2>&1 || { echo "openstack lab venv: imports failed" >&2; exit 1; }

echo "$want" > "$STAMP"
echo "openstack lab venv installed: $VENV"
