# factory-agent: every set-up step lives here, so a fresh Debian 12 machine
# (as root) needs only `make demo` and `make test`.

SHELL := /bin/bash
DISTRO_PY := /usr/bin/python3
VENV := .venv/latest

# What a device has (Debian 12's own packages), plus the test tools.
APT_PACKAGES := python3 python3-cryptography python3-requests python3-pyudev python3-dbus-next \
	python3-systemd python3-pytest python3-pytest-timeout python3-hypothesis \
	python3-venv python3-pip python3-dev gcc pkg-config libsystemd-dev gnupg \
	python3-trustme umockdev gir1.2-umockdev-1.0 python3-gi python3-dbus-fast dbus-daemon \
	dbus-system-bus-common systemd strace shellcheck python3-yaml python3-h11
# The latest PyPI releases of the same (systemd-python builds against libsystemd-dev).
PYPI_PACKAGES := cryptography requests pyudev dbus-next h11 systemd-python pytest pytest-timeout hypothesis mypy trustme dbus-fast PyYAML

.PHONY: all deps test test-distro test-latest demo bench crash deb qemu-deps qemu-test clean

all: test

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp: setup.cfg pyproject.toml Makefile | deps
	$(DISTRO_PY) -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --upgrade $(PYPI_PACKAGES)
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: test-distro test-latest qemu-test

# Leg 1: Debian 12's python3 with its distro packages, as on a device.
test-distro: deps
	@echo "=== leg 1/2: Debian 12 python3 + distro packages"
	$(DISTRO_PY) -m pytest

# Leg 2: a venv with the latest PyPI releases of every dependency.
test-latest: $(VENV)/.stamp
	@echo "=== leg 2/2: venv with the latest PyPI releases"
	$(VENV)/bin/python -m pytest

# A lab vault on a free loopback port and the agent registering this machine with it.
demo: deps
	PY=$(DISTRO_PY) sh tests/demo.sh

# Time-to-serial against the lab vault on loopback, as JSON (see tests/bench.py).
bench: deps
	$(DISTRO_PY) tests/bench.py

# Crash injection: the real daemon SIGKILLed at every named point of a registration, then at 200
# random instants; every restart must finish with the same key and one verified serial. Figures as JSON.
crash: deps
	$(DISTRO_PY) tests/crash/run_crash.py --kills 200

# The long fuzzing run: each hypothesis target of tests/fuzz (the assertion decoder, the vault's
# answers, the config loader) with $$FACTORY_AGENT_FUZZ_EXAMPLES examples; the default suite runs
# 300 each. Not part of `make test`; pytest's per-test timeout is off for it. One process per
# target, so that each prints its statistics and wall time as it ends (the whole run takes hours)
# and hands its memory back before the next.
FACTORY_AGENT_FUZZ_EXAMPLES ?= 100000
.PHONY: fuzz
fuzz: deps
	@failed=0; for test in $$($(DISTRO_PY) -m pytest -p no:cacheprovider -q --collect-only tests/fuzz | grep '::'); do \
		echo "=== $$test"; start=$$(date +%s); \
		FACTORY_AGENT_FUZZ_EXAMPLES=$(FACTORY_AGENT_FUZZ_EXAMPLES) $(DISTRO_PY) -m pytest -p no:cacheprovider -q \
			--timeout=0 --hypothesis-show-statistics "$$test" || failed=1; \
		echo "=== $$test: $$(( $$(date +%s) - start )) s"; \
	done; exit $$failed

# Host tools for the emulated armhf boards (tests/qemu), and armhf in apt's lists for the kernel
# and busybox packages. `apt-get update` may exit non-zero on the security archive's armhf index.
QEMU_PACKAGES := qemu-system-arm qemu-user-static debootstrap kmod cpio device-tree-compiler \
	qemu-utils zstd e2fsprogs
qemu-deps: deps
	@missing=$$(for p in $(QEMU_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	@if ! dpkg --print-foreign-architectures | grep -qx armhf || ! apt-cache show linux-image-armmp:armhf >/dev/null 2>&1; then \
		dpkg --add-architecture armhf; apt-get update -q || true; fi

# The package on emulated armhf boards (Debian 12, systemd as PID 1, qemu-system-arm -M virt): first
# boot, a second board, power cuts, a refusing vault. The image is cached in
# $${FACTORY_AGENT_QEMU_CACHE:-/var/cache/factory-agent-qemu}; figures land in build/qemu-timings.json.
qemu-test: qemu-deps deb
	@echo "=== qemu: the .deb on emulated armhf boards"
	FACTORY_AGENT_QEMU=1 $(DISTRO_PY) -m pytest -p no:cacheprovider -v tests/qemu

# The Debian package (arch: all) into dist/, from a copy of the tree with packaging/debian as debian/.
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-build python3-installer python3-wheel fakeroot dpkg-dev lintian
deb:
	@missing=$$(for p in $(DEB_BUILD_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	rm -rf build/deb && mkdir -p build/deb/factory-agent dist
	git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done \
		| xargs -0 cp --parents -t build/deb/factory-agent  # the working tree, as a developer has it
	cp -r packaging/debian build/deb/factory-agent/debian
	cd build/deb/factory-agent && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b  # Debian's python3, not a pyenv one
	cp build/deb/factory-agent_*_all.deb dist/
	lintian --fail-on error,warning --info dist/factory-agent_*_all.deb
	@ls -l dist/*.deb

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .hypothesis
