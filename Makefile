# Two entry points on a fresh Debian/Ubuntu machine:
#   make demo   installs what it needs, starts the lab and runs the whole loop once
#   make test   installs what it needs and runs every test against the real peers
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Go + govmomi sources (vcsim), OpenIPMI's ipmi_sim + ipmitool (IPMI peer), libxml2 headers
# (ovirt-engine-sdk-python builds a C extension), shellcheck + curl + openssl (the OpenShift hooks),
# BIND 9 (named, tsig-keygen, dig) and PowerDNS with its SQLite backend (lab/dns: the dns registrar's peers),
# Prometheus and promtool (lab/prometheus: the autoscaler's source of load; the alerting rules' checks and unit
# tests, a real server scraping the daemon), pg_dump and pg_restore (governord-ctl backup and restore of a
# PostgreSQL store)
APT_PACKAGES := golang-go golang-github-vmware-govmomi-dev openipmi ipmitool libxml2-dev gcc shellcheck curl openssl \
	bind9 bind9-utils bind9-dnsutils pdns-server pdns-backend-sqlite3 prometheus postgresql-client
# `make deb`: debhelper and dh-virtualenv (the package is one virtualenv; debian/rules), dpkg-dev;
# man-db: tests/system/test_package.py renders the installed man pages
DEB_APT_PACKAGES := debhelper dh-virtualenv dpkg-dev python3-dev python3-venv man-db
PYTEST_ARGS ?=
# the package's version is debian/changelog's, which tests/meta/test_debian.py holds to governord.__version__
DEB_VERSION := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
DEB_ARCH := $(shell dpkg --print-architecture)
DEB := dist/governord_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_SOURCES := $(shell find daemon plugins debian systemd etc man hooks -type f -not -name '*.pyc') \
	setup.cfg pyproject.toml constraints.txt README.md

.PHONY: all deps apt venv vcsim peers lint typecheck protos deb test demo clean

all: test

deps: apt venv vcsim peers

# Debian packages: Go and the govmomi sources vcsim is built from, the DNS servers... Installed
# only if missing, without starting their services (lab/apt-install.sh): the lab runs its own.
apt:
	@missing=""; for p in $(APT_PACKAGES) $(DEB_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  bash lab/apt-install.sh $$missing; \
	fi

# constraints.txt pins every distribution to the version the tests ran with (tests/meta/test_constraints.py)
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt | apt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

vcsim: apt
	bash lab/vcsim/build.sh

# Peers that run from their own virtualenvs under lab/.build (nova, moto, sushy-emulator, ...):
# each lab/<peer>/install.sh is idempotent and fast when nothing changed.
peers: venv
	@for script in lab/*/install.sh; do [ -f "$$script" ] || continue; echo "== $$script"; bash "$$script" || exit 1; done

# ruff's rules and mypy's config are in pyproject.toml
lint: venv
	$(PY) -m ruff check daemon plugins lab tests bench

# mypy on the package as it is imported: daemon/ is `governord`, plugins/ is `governord.plugins`
# (setup.cfg's package_dir), laid out as such in a tree of links under build/typecheck
typecheck: venv
	@rm -rf build/typecheck && mkdir -p build/typecheck/governord
	@for entry in daemon/*; do ln -s ../../../$$entry build/typecheck/governord/; done
	@ln -s ../../../plugins build/typecheck/governord/plugins
	cd build/typecheck && ../../$(PY) -m mypy --config-file ../../pyproject.toml -p governord

# the gRPC code of the Cluster Autoscaler's cloud provider, from daemon/autoscaler/externalgrpc.proto
# (tests/meta/test_protos.py fails when the committed code is not what the proto generates)
protos: venv
	$(PY) -m tests.meta.test_protos

# The Debian package (debian/, README "Installing"), built in a copy of the tree under build/deb
# (dpkg-buildpackage writes beside the source) and put in dist/. tests/system/test_package.py
# installs, runs and purges it.
deb: $(DEB)

$(DEB): $(DEB_SOURCES) | apt
	rm -rf build/deb && mkdir -p build/deb/governord dist
	tar -c --exclude=./.git --exclude=./.venv --exclude=./lab/.build --exclude=./build --exclude=./dist \
		--exclude='*.egg-info' --exclude=__pycache__ --exclude=./.state -f - . | tar -x -C build/deb/governord
	cd build/deb/governord && dpkg-buildpackage -b --no-sign
	cp build/deb/governord_$(DEB_VERSION)_$(DEB_ARCH).deb $@

test: deps deb lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) -m lab.demo

clean:
	rm -rf $(VENV) lab/.build build dist *.egg-info .pytest_cache
