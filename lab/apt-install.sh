#!/bin/sh
# Install Debian packages for the lab without starting their services: the lab runs its own
# private instances of the servers (lab/dns: named and pdns_server on loopback ports), and a
# system BIND on port 53 would keep PowerDNS's package from starting (and configuring) its own.
# A policy-rc.d that answers 101 ("action not allowed") stops invoke-rc.d and deb-systemd-invoke;
# an existing policy-rc.d is put back afterwards. Used by the Makefile's `apt` target.
set -eu
[ $# -gt 0 ] || exit 0

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

policy=/usr/sbin/policy-rc.d
saved=""
if [ -e "$policy" ]; then
    saved=$(mktemp)
    $sudo cp -p "$policy" "$saved"
fi
restore() {
    if [ -n "$saved" ]; then
        $sudo mv "$saved" "$policy"
    else
        $sudo rm -f "$policy"
    fi
}
trap restore EXIT
printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
$sudo chmod 755 "$policy"

$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "$@"
