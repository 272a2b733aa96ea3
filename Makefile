# Two entry points on a fresh Debian/Ubuntu machine:
#   make demo   installs what it needs, starts the lab and runs the whole loop once
#   make test   installs what it needs and runs every test against the real peers
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := golang-go golang-github-vmware-govmomi-dev
PYTEST_ARGS ?=

.PHONY: all deps apt venv vcsim test demo check clean

all: test

deps: apt venv vcsim

# Debian packages: Go and the govmomi sources vcsim is built from. Installed only if missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

venv: $(VENV)/.installed

vcsim: apt
	bash lab/vcsim/build.sh

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) -m lab.demo

check: venv
	$(VENV)/bin/governord --check --config etc/governord.toml

clean:
	rm -rf $(VENV) lab/.build build dist *.egg-info .pytest_cache
