#!/bin/sh
# Install Debian's real Puppet stack for the lab: puppetserver, puppetdb (+ the puppet terminus
# that sends facts, catalogs and reports to it), the puppet agent and PostgreSQL.
# Idempotent: when every package is installed it only asks dpkg and exits.
#
# The machines this runs on have no systemd as PID 1, so the packages' postinst scripts would try
# to start services through /etc/init.d. A policy-rc.d that answers 101 ("action not allowed")
# stops that: the lab starts its own private instances (lab/puppet/__init__.py). An existing
# policy-rc.d is put back afterwards.
set -eu

packages="puppetserver puppetdb puppet-agent puppet-terminus-puppetdb postgresql dbconfig-no-thanks"

missing=""
for p in $packages; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "puppet lab: up to date"
    exit 0
fi

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

echo "puppet lab: installing$missing"
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
# shellcheck disable=SC2086  # the list is meant to split into words
$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends $missing
echo "puppet lab: installed$missing"
