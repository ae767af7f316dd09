# factory-agent: every set-up step lives here, so a fresh Debian 12 or 13 machine
# (as root) needs only `make demo`, `make check` and `make test`.
#   make check   lint, then the unit, HTTP and D-Bus tests on the distro python: a few minutes, for every edit
#   make test    lint and both legs from a copy of the tree in a 0700 directory, then the QEMU boards: the CI gate
#   make lint    ruff, mypy --strict on agent/, shellcheck on every shell script

SHELL := /bin/bash
DISTRO_PY := /usr/bin/python3
VENV := .venv/latest

# What a device has (Debian 12's own packages), plus the test tools.
APT_PACKAGES := python3 python3-cryptography python3-requests python3-pyudev python3-dbus-next \
	python3-systemd python3-pytest python3-pytest-timeout python3-hypothesis \
	python3-venv python3-pip python3-dev gcc pkg-config libsystemd-dev gnupg \
	python3-trustme umockdev gir1.2-umockdev-1.0 python3-gi python3-dbus-fast dbus-daemon \
	dbus-system-bus-common systemd strace shellcheck python3-yaml python3-h11 python3-pytest-xdist \
	softhsm2 python3-pykcs11 opensc swtpm libtss2-tcti-swtpm0/libtss2-tcti-swtpm0t64 libtpm2-pkcs11-1/libtpm2-pkcs11-1t64
# The latest PyPI releases of the same (systemd-python builds against libsystemd-dev), and the linters.
PYPI_PACKAGES := cryptography requests pyudev dbus-next h11 systemd-python pytest pytest-timeout hypothesis mypy trustme PyKCS11 \
	dbus-fast PyYAML pytest-xdist ruff

# The one way packages get installed: those of the list that are missing, after an apt-get update.
APT_INSTALL := sh tests/apt-install.sh
# Every pytest run fails when a process it started outlives it (tests/leftover_check.py).
PYTEST_ARGS := -p tests.leftover_check
# make check runs the tests in pytest-xdist workers, more than the 2 cores so that they stay busy while
# tests wait on a daemon, a bus or a timer; then, one at a time, those that measure latency or starve
# the daemon on purpose: beside the other workers they miss their bounds (the 50 ms property read
# during a keygen, the D-Bus flood's 30 s answer).
CHECK_WORKERS ?= 4
CHECK_ALONE := tests/dbus/test_service.py::test_a_property_read_answers_within_50_ms_during_a_real_keygen \
	tests/dbus/test_flood.py

.PHONY: all deps check lint test test-clone test-distro test-latest demo bench bench-hwkey crash deb qemu-deps qemu-test clean

all: test

deps:
	@$(APT_INSTALL) $(APT_PACKAGES)

# The venv is rebuilt when setup.cfg or the package list changes, not on every edit of this Makefile
# (a rebuild empties the venv under any test running in it).
$(VENV).packages: FORCE
	@mkdir -p $(@D) && echo '$(PYPI_PACKAGES)' | cmp -s - $@ || echo '$(PYPI_PACKAGES)' >$@
$(VENV)/.stamp: setup.cfg $(VENV).packages | deps
	$(DISTRO_PY) -m venv --clear $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --upgrade $(PYPI_PACKAGES)
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@
.PHONY: FORCE
FORCE:

# Every shell script of the tree, found by its #! line (outside what git ignores).
SHELL_SCRIPTS = $(shell find . \( -name .git -o -name .venv -o -name build -o -name dist -o -name .hypothesis \
	-o -name .pytest_cache -o -name __pycache__ \) -prune -o -type f -size -256k -print0 \
	| xargs -0 awk 'FNR == 1 && /^\#! *\/(usr\/)?bin\/(env +)?(ba|da)?sh( |$$)/ { print FILENAME } { nextfile }' | sort)

lint: $(VENV)/.stamp deps
	@failed=0; \
	echo "=== ruff"; $(VENV)/bin/ruff check . || failed=1; \
	echo "=== mypy --strict agent"; $(VENV)/bin/python -m mypy --strict agent || failed=1; \
	echo "=== shellcheck" $(SHELL_SCRIPTS); shellcheck $(SHELL_SCRIPTS) || failed=1; \
	exit $$failed

# The target for every edit: lint, then the unit, HTTP and D-Bus tests on Debian's python3.
check: lint
	$(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -q -n $(CHECK_WORKERS) \
		$(addprefix --deselect ,$(CHECK_ALONE)) tests/unit tests/http tests/dbus
	$(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -q $(CHECK_ALONE)

# The CI gate. Lint and both legs run from a copy of the tree (what git would clone, with the
# uncommitted edits) in a 0700 directory, as a clone under a home directory or in a mktemp -d is: no
# test may depend on the permissions of the directories above the checkout. The copy builds its own
# venv there, and is removed at the end.
test: test-clone qemu-test

test-clone:
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && chmod 700 "$$dir" && mkdir "$$dir/factory-agent" \
		&& $(call copy_tree,"$$dir/factory-agent") \
		&& echo "=== lint and both legs from a copy of the tree in $$dir (mode 0700)" \
		&& $(MAKE) -C "$$dir/factory-agent" lint test-distro test-latest

# Copies the working tree as a developer has it (tracked and untracked files, not the ignored ones) into $(1).
copy_tree = git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done \
	| xargs -0 cp --parents -t $(1)

# Leg 1: Debian's python3 with its distro packages, as on a device.
test-distro: deps
	@echo "=== leg 1/2: Debian python3 + distro packages, in $(CURDIR)"
	$(DISTRO_PY) -m pytest $(PYTEST_ARGS)

# Leg 2: a venv with the latest PyPI releases of every dependency.
test-latest: $(VENV)/.stamp
	@echo "=== leg 2/2: venv with the latest PyPI releases, in $(CURDIR)"
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# A lab vault on a free loopback port and the agent registering this machine with it.
demo: deps
	PY=$(DISTRO_PY) sh tests/demo.sh

# Time-to-serial against the lab vault on loopback, then the hardware identity key's signing time on
# each backend, as JSON (see tests/bench.py, tests/bench_hwkey.py).
bench: deps
	$(DISTRO_PY) tests/bench.py
	$(DISTRO_PY) tests/bench_hwkey.py

bench-hwkey: deps
	$(DISTRO_PY) tests/bench_hwkey.py

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
	@$(APT_INSTALL) $(QEMU_PACKAGES)
	@if ! dpkg --print-foreign-architectures | grep -qx armhf || ! apt-cache show linux-image-armmp:armhf >/dev/null 2>&1; then \
		dpkg --add-architecture armhf; apt-get update -q || true; fi

# The package on emulated armhf boards (Debian 12, systemd as PID 1, qemu-system-arm -M virt): first
# boot, a second board, power cuts, a refusing vault. The image is cached in
# $${FACTORY_AGENT_QEMU_CACHE:-/var/cache/factory-agent-qemu}; figures land in build/qemu-timings.json.
qemu-test: qemu-deps deb
	@echo "=== qemu: the .deb on emulated armhf boards"
	FACTORY_AGENT_QEMU=1 $(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -v tests/qemu

# The Debian package (arch: all) into dist/, from a copy of the tree with packaging/debian as debian/.
DEB_BUILD_PACKAGES := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-build python3-installer python3-wheel fakeroot dpkg-dev lintian
deb:
	@$(APT_INSTALL) $(DEB_BUILD_PACKAGES)
	rm -rf build/deb && mkdir -p build/deb/factory-agent dist
	$(call copy_tree,build/deb/factory-agent)  # the working tree, as a developer has it
	cp -r packaging/debian build/deb/factory-agent/debian
	# The unit as debian/factory-agent.service: dh_installsystemd installs and enables it where each suite wants
	# it (Debian 12: lib/systemd/system; 13: usr/lib/systemd/system, which lintian's aliased-location demands).
	cp systemd/factory-agent.service build/deb/factory-agent/debian/factory-agent.service
	cd build/deb/factory-agent && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b  # Debian's python3, not a pyenv one
	cp build/deb/factory-agent_*_all.deb dist/
	lintian --fail-on error,warning --info dist/factory-agent_*_all.deb
	@ls -l dist/*.deb

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .hypothesis
