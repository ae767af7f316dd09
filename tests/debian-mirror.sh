#!/bin/sh
# Prints the Debian archive to debootstrap from: FACTORY_AGENT_MIRROR if set, else the first
# main-archive URI (not -security) of the host's deb822 or one-line apt sources. Used by
# tests/debian-root.sh and tests/qemu/build-image.sh: the host's mirror serves every suite.
set -eu
if [ -n "${FACTORY_AGENT_MIRROR:-}" ]; then echo "$FACTORY_AGENT_MIRROR"; exit 0; fi
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri=$(sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
                 -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]*\)\{0,1\}\([^[:space:]]*\).*/\2/p' "$f" \
          | grep -v -e security -e '^$' | grep -i debian | head -n 1)
    if [ -n "$uri" ]; then echo "$uri"; exit 0; fi
done
echo "no Debian mirror in the host's apt sources: set FACTORY_AGENT_MIRROR" >&2
exit 1
