#!/bin/sh
# Installs those of the named Debian packages that are not installed yet, as root, on Debian 12 or 13.
# The package lists live in the Makefile; this is the one place that installs them.
#   sh tests/apt-install.sh PACKAGE...
# A PACKAGE may be alternatives, A/B (no package name holds a /): the first installed one counts; if none is, the first the
# archive has is installed (Debian 13 renamed some libraries in its 64-bit time_t transition,
# libfoo0 -> libfoo0t64).
set -eu
installed() {
	dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed'
}
missing=
for spec in "$@"; do
	found=
	for package in $(printf '%s\n' "$spec" | tr '/' ' '); do
		if installed "$package"; then found=$package; break; fi
	done
	[ -n "$found" ] || missing="$missing $spec"
done
[ -n "$missing" ] || exit 0
# A fresh machine has no package lists yet; `update` may exit non-zero on one unreachable index
# (the security archive's armhf one, for instance), and the install below says what is missing then.
apt-get update -q || echo "apt-get update failed; installing with the lists there are" >&2
chosen=
for spec in $missing; do
	pick=
	for package in $(printf '%s\n' "$spec" | tr '/' ' '); do
		if apt-cache policy "$package" 2>/dev/null | grep -q 'Candidate: [^(]'; then pick=$package; break; fi
	done
	chosen="$chosen ${pick:-${spec%%/*}}"  # none has a candidate: the first, and apt says why it fails
done
echo "installing Debian packages:$chosen"
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $chosen
