#!/usr/bin/env bash
# Installs the Redfish peer (sushy-emulator with its fake driver) into its own virtualenv,
# lab/.build/baremetal-venv. Idempotent: when the pins below are installed already it only
# checks a stamp and exits. The IPMI peer (ipmi_sim, ipmitool) comes from Debian's openipmi and
# ipmitool packages, which `make apt` installs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="$(cd "$here/.." && pwd)/.build"
venv="$build/baremetal-venv"
python="${PYTHON:-python3}"

# sushy-tools and everything its emulator imports, pinned together (the fake driver needs no
# libvirt or openstacksdk).
pins=(
  sushy-tools==2.2.0
  Flask==3.1.3
  Werkzeug==3.1.9
  Jinja2==3.1.6
  MarkupSafe==3.0.4
  itsdangerous==2.2.0
  click==8.5.1
  blinker==1.9.0
  WebOb==1.8.11
  bcrypt==5.0.0
  tenacity==9.2.1
  pbr==7.1.3
  requests==2.34.2
  urllib3==2.8.0
  idna==3.20
  charset-normalizer==3.5.2
  certifi==2026.10.18
)
stamp="$venv/.governord-pins"
want="$(printf '%s\n' "${pins[@]}")"

for tool in ipmi_sim ipmitool; do
  command -v "$tool" >/dev/null || echo "baremetal lab: warning: $tool missing (apt-get install openipmi ipmitool)" >&2
done

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "baremetal lab: up to date ($venv)"
  exit 0
fi

mkdir -p "$build"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -c 'import sushy_tools.emulator.main, bcrypt' >/dev/null
printf '%s\n' "${pins[@]}" > "$stamp"
echo "baremetal lab: installed sushy-tools into $venv"
