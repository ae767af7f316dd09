#!/bin/sh
# Installs those of the named Debian packages that are not installed yet, as root, on Debian 12 or 13.
# The package lists live in the Makefile; this is the one place that installs them.
#   sh tests/apt-install.sh PACKAGE...
set -eu
missing=
for package in "$@"; do
	dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $package"
done
[ -n "$missing" ] || exit 0
echo "installing Debian packages:$missing"
# A fresh machine has no package lists yet; `update` may exit non-zero on one unreachable index
# (the security archive's armhf one, for instance), and the install below says what is missing then.
apt-get update -q || echo "apt-get update failed; installing with the lists there are" >&2
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
