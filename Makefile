# factory-agent: every set-up step lives here, so a fresh Debian 12 or 13 machine
# (as root) needs only `make demo`, `make check` and `make test`.
#   make check   lint, then the unit, HTTP and D-Bus tests on the distro python: a few minutes, for every edit
#   make test    lint and the three legs from a copy of the tree in a 0700 directory, then the QEMU boards: the CI gate
#   make lint    ruff, mypy --strict on agent/ (Python 3.11 and 3.13), shellcheck on every shell script

SHELL := /bin/bash
DISTRO_PY := /usr/bin/python3
VENV := .venv/latest

# What a device has (the host Debian's own packages), plus the test tools; the same list makes the other
# Debian's root (tests/debian-root.sh).
APT_PACKAGES := python3 python3-cryptography python3-requests python3-pyudev python3-dbus-next \
	python3-systemd python3-pytest python3-pytest-timeout python3-hypothesis \
	python3-venv python3-pip python3-dev gcc pkg-config libsystemd-dev gnupg openssl \
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

.PHONY: all deps check lint test test-clone test-distro test-other test-latest deb-other test-on-other-host demo bench bench-hwkey fleet-sim crowd crash deb qemu-deps qemu-test clean

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

# The oldest and newest Python a device runs (Debian 12, Debian 13; Ubuntu Core 24's 3.12 lies between).
MYPY_PYTHONS := 3.11 3.13
lint: $(VENV)/.stamp deps
	@failed=0; \
	echo "=== ruff"; $(VENV)/bin/ruff check . || failed=1; \
	for version in $(MYPY_PYTHONS); do echo "=== mypy --strict --python-version $$version agent"; \
		$(VENV)/bin/python -m mypy --strict --python-version $$version agent || failed=1; done; \
	echo "=== shellcheck" $(SHELL_SCRIPTS); shellcheck $(SHELL_SCRIPTS) || failed=1; \
	exit $$failed

# The target for every edit: lint, then the unit, HTTP and D-Bus tests on Debian's python3.
check: lint
	$(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -q -n $(CHECK_WORKERS) \
		$(addprefix --deselect ,$(CHECK_ALONE)) tests/unit tests/http tests/dbus
	$(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -q $(CHECK_ALONE)

# The CI gate. Lint and the three legs run from a copy of the tree (what git would clone, with the
# uncommitted edits) in a 0700 directory, as a clone under a home directory or in a mktemp -d is: no
# test may depend on the permissions of the directories above the checkout. The copy builds its own
# venv there, and is removed at the end.
test: test-clone deb-other qemu-test

test-clone:
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && chmod 700 "$$dir" && mkdir "$$dir/factory-agent" \
		&& $(call copy_tree,"$$dir/factory-agent") \
		&& echo "=== lint and the three legs from a copy of the tree in $$dir (mode 0700)" \
		&& $(MAKE) -C "$$dir/factory-agent" lint test-distro test-other test-latest

# Copies the working tree as a developer has it (tracked and untracked files, not the ignored ones) into $(1).
copy_tree = git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done \
	| xargs -0 cp --parents -t $(1)

# The legs: the host's Debian (its python3 and python3-* packages, as on a device), the other Debian
# of the two a device runs (12 "bookworm", 13 "trixie") in a root of its own made by debootstrap and
# cached in /var/cache/factory-agent-roots, and a venv with the latest PyPI releases. Each prints what
# it runs on (tests/versions.py), then runs the suite as make check does: in xdist workers, then the
# timing-bound tests alone (make check's, and those of the wider suite: a uevent's 0.5 s lower bound,
# the vault started 2 s after the agent, a 202 answered within the client's timeout); two pytest
# summary lines.
LEG_ALONE := $(CHECK_ALONE) tests/system/test_identity_umockdev.py::test_hotplugged_nic_is_found_by_its_uevent \
	tests/system/test_run.py::test_vault_down_then_up \
	"tests/faults/test_fault_matrix.py::test_202_three_times_then_200_reposts_the_same_request[202-three-times]"
HOST_SUITE := $(shell . /etc/os-release 2>/dev/null; echo "$$VERSION_CODENAME")
OTHER_SUITE := $(if $(filter trixie,$(HOST_SUITE)),bookworm,trixie)
suite_name = $(if $(filter trixie,$(1)),Debian 13,$(if $(filter bookworm,$(1)),Debian 12,$(1)))
# A deprecation is an error, in pytest, its workers and every agent the tests start (the environment
# passes it on): the project's own code must raise none, on 3.13 too. Except these, raised by a
# library's own code (a later entry wins; a module is named exactly, a message by its start):
#   dbus_next.service: dbus-next 0.2.3 (its last release, 2021) decorates with
#   typing.no_type_check_decorator, deprecated in Python 3.13; the agent prefers dbus-fast, and every
#   D-Bus test runs on dbus-next too.
#   "builtin type swig...": PyKCS11's SWIG wrapper (Debian 13's 1.5.17) declares types without a
#   __module__, which Python 3.12+ warns of while importing it; made an error, it crashes the
#   interpreter (SIGSEGV in SWIG's module init).
STRICT_WARNINGS := error::DeprecationWarning,ignore::DeprecationWarning:dbus_next.service,ignore:builtin type swig:DeprecationWarning
LEG_PYTEST = $(PYTEST_ARGS) -p no:cacheprovider
# leg PYTHON, NAME: the shell commands of one leg.
leg = export PYTHONWARNINGS="$(STRICT_WARNINGS)" && $(1) -m tests.versions "$(2)" \
	&& $(1) -m pytest $(LEG_PYTEST) -q -n $(CHECK_WORKERS) $(addprefix --deselect ,$(LEG_ALONE)) \
	&& $(1) -m pytest $(LEG_PYTEST) -q $(LEG_ALONE)

# Leg 1: the host's python3 with its Debian packages.
test-distro: deps
	@echo "=== leg 1/3: $(call suite_name,$(HOST_SUITE)) python3 + its packages, in $(CURDIR)"
	$(call leg,$(DISTRO_PY),leg 1/3)

# Leg 2: the other Debian's python3 and packages, in its root (the tree bind-mounted at its own path).
# The root has what the host gets: the test tools, what builds and checks the package, make and git
# (enough to run the whole `make test` in it, as on a host of that suite: see README).
OTHER_ROOT = sh tests/debian-root.sh build $(OTHER_SUITE) $(APT_PACKAGES) $(DEB_BUILD_PACKAGES) make git
test-other: deps
	@$(APT_INSTALL) debootstrap
	@echo "=== leg 2/3: $(call suite_name,$(OTHER_SUITE)) python3 + its packages, in a $(OTHER_SUITE) root"
	@root=$$($(OTHER_ROOT)) && sh tests/debian-root.sh run "$$root" $(CURDIR) sh -c '$(call leg,/usr/bin/python3,leg 2/3)'

# `make demo` and the whole `make test` as on a host of the other Debian: a clone of HEAD in a 0700
# directory, run in that suite's root. Not part of make test (it runs make test). Its QEMU cache is kept
# beside this host's (not shared: each deletes the images of older packages) and reused by the next run.
test-on-other-host: deps
	@$(APT_INSTALL) debootstrap
	@echo "=== make test on a $(call suite_name,$(OTHER_SUITE)) host: a clone of HEAD in a $(OTHER_SUITE) root"
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && chmod 700 "$$dir" && git clone -q . "$$dir/factory-agent" \
		&& root=$$($(OTHER_ROOT)) \
		&& FACTORY_AGENT_ROOT_SHARE="/var/cache/factory-agent-qemu-on-$(OTHER_SUITE):/var/cache/factory-agent-qemu" \
		sh tests/debian-root.sh run "$$root" "$$dir/factory-agent" sh -c 'make demo && make test'

# Leg 3: a venv with the latest PyPI releases of every dependency.
test-latest: $(VENV)/.stamp
	@echo "=== leg 3/3: venv with the latest PyPI releases, in $(CURDIR)"
	$(call leg,$(VENV)/bin/python,leg 3/3)

# A factory line in simulated time: 10,000 and 100,000 devices running agent/registration.py, and a model of
# snapd's policy, against a vault capped at 50 registrations a second; figures as JSON, a table and a plot
# (build/fleet-sim/). matplotlib draws the plot.
fleet-sim: deps
	@$(APT_INSTALL) python3-matplotlib
	$(DISTRO_PY) tests/fleet_sim.py

# 200 real agents (run --once, each its own RSA-4096 key, made once into /var/cache/factory-agent-crowd) at once
# against one lab vault capped at 5 registrations a second and down for 60 s in the middle of the wave.
crowd: deps
	$(DISTRO_PY) tests/crowd.py

# A lab vault on a free loopback port and the agent registering this machine with it.
demo: deps
	PY=$(DISTRO_PY) sh tests/demo.sh

# Time-to-serial against the lab vault on loopback, then the hardware identity key's signing time on
# each backend, as JSON (see tests/bench.py, tests/bench_hwkey.py).
bench: deps
	@$(APT_INSTALL) openssh-client  # ssh-keygen: snapd's way to make the device key, measured beside ours
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

# Host tools for the emulated boards (tests/qemu), on a Debian 12 or 13 host: qemu-system-arm holds
# qemu-system-arm and qemu-system-aarch64 on both (on 13 qemu-user-static is the transitional package
# for qemu-user and qemu-user-binfmt). The guests' kernel and busybox come from their own suite's
# archive (build-image.sh), not from the host's apt lists.
QEMU_PACKAGES := qemu-system-arm qemu-user-static debootstrap kmod cpio device-tree-compiler \
	qemu-utils zstd xz-utils e2fsprogs
qemu-deps: deps
	@$(APT_INSTALL) $(QEMU_PACKAGES)

# The package on emulated boards, systemd as PID 1: Debian 12 armhf (qemu-system-arm -M virt) for the
# first boot, a second board, power cuts and a refusing vault; Debian 13 arm64 (qemu-system-aarch64
# -M virt) for the first boot. The images are cached in
# $${FACTORY_AGENT_QEMU_CACHE:-/var/cache/factory-agent-qemu}; figures land in build/qemu-timings.json.
qemu-test: qemu-deps deb
	@echo "=== qemu: the .deb on emulated armhf and arm64 boards"
	FACTORY_AGENT_QEMU=1 $(DISTRO_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider -v tests/qemu

# The Debian package (arch: all) into dist/, from a copy of the tree with packaging/debian as debian/.
DEB_BUILD_PACKAGES := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-build python3-installer python3-wheel fakeroot dpkg-dev lintian
deb:
	@$(APT_INSTALL) $(DEB_BUILD_PACKAGES)
	rm -rf build/deb && mkdir -p build/deb/factory-agent dist
	$(call copy_tree,build/deb/factory-agent)  # the working tree, as a developer has it
	cp -r packaging/debian build/deb/factory-agent/debian
	# The unit as debian/factory-agent.service: dh_installsystemd installs and enables it (rules moves it to
	# usr/lib/systemd/system, which Debian 13's lintian demands, when Debian 12's debhelper puts it in lib/).
	cp systemd/factory-agent.service build/deb/factory-agent/debian/factory-agent.service
	cd build/deb/factory-agent && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b  # Debian's python3, not a pyenv one
	cp build/deb/factory-agent_*_all.deb dist/
	lintian --fail-on error,warning --info dist/factory-agent_*_all.deb
	@ls -l dist/*.deb

# The same package on the other Debian, in its root (a throwaway overlay): that suite's lintian, then
# installed from the file by apt (dpkg; Depends resolved from that suite's archive), the unit enabled.
deb-other: deb
	@$(APT_INSTALL) debootstrap
	@echo "=== the package on $(call suite_name,$(OTHER_SUITE)): its lintian, installed by dpkg, the unit enabled"
	@root=$$($(OTHER_ROOT)) && sh tests/debian-root.sh run "$$root" $(CURDIR) sh -c '\
		lintian --version && lintian --fail-on error,warning --info dist/factory-agent_*_all.deb \
		&& { apt-get update -qq || true; } && apt-get install -q -y --no-install-recommends ./dist/factory-agent_*_all.deb \
		&& test -L /etc/systemd/system/multi-user.target.wants/factory-agent.service \
		&& echo "enabled: $$(readlink /etc/systemd/system/multi-user.target.wants/factory-agent.service)" \
		&& factory-agent --version'

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .hypothesis
