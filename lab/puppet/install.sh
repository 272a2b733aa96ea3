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

echo "puppet lab: installing$missing"
# shellcheck disable=SC2086  # the list is meant to split into words
bash "$(dirname "$0")/../apt-install.sh" $missing
echo "puppet lab: installed$missing"
