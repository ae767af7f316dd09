#!/bin/sh
# make demo: a lab vault on a free loopback port, then the agent registering this machine with it.
# Everything lives in a temporary directory that is removed at the end.
set -eu
PY=${PY:-/usr/bin/python3}
cd "$(dirname "$0")/.."
demo=$(mktemp -d /tmp/factory-agent-demo.XXXXXX)
vault_pid=
bus_pid=
cleanup() {
    for pid in $vault_pid $bus_pid; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    rm -rf "$demo"
}
trap cleanup EXIT INT TERM

step() { printf '\n=== %s\n' "$*"; }

step "1. a lab Serial Vault on loopback (brand acme, model acme-gw; it creates its keys and trust chain)"
$PY -m agent lab-vault --dir "$demo/vault" --listen 127.0.0.1:0 &
vault_pid=$!
i=0
until [ -s "$demo/vault/url" ]; do
    i=$((i + 1))
    [ $i -le 600 ] || { echo "the lab vault did not start" >&2; exit 1; }
    kill -0 "$vault_pid" 2>/dev/null || { echo "the lab vault exited" >&2; exit 1; }
    sleep 0.1
done
url=$(cat "$demo/vault/url")

cat > "$demo/agent.toml" <<TOML
model-assertion = "$demo/vault/model.assert"

[vault]
url = "$url"
allow-insecure-http = true          # the lab vault speaks plain HTTP on loopback
api-key-file = "$demo/vault/api-key"
trusted-account-keys = ["$demo/vault/brand.account-key"]

[serial]
# the first identity this machine has; a VM or a build box may only have /etc/machine-id
template = "DEMO-{soc_serial|mmc_cid|mac|dmi_product_serial|machine_id}"

[identity]
allow-weak = true                   # let machine-id serve where there is no hardware identity
wait-seconds = 0
TOML
step "2. the agent's configuration ($demo/agent.toml)"
cat "$demo/agent.toml"

step "3. this machine's identity, as the agent sees it through udev"
$PY -m agent identity --config "$demo/agent.toml"

step "4. the daemon on a private D-Bus: generate the device key (RSA-4096), get a request-id, send the signed serial-request, verify and store the serial; factory-agent status --wait follows it"
dbus-daemon --session --nofork --print-address=1 --address="unix:dir=$demo" > "$demo/bus" 2>/dev/null &
bus_pid=$!
until [ -s "$demo/bus" ]; do sleep 0.05; done
DBUS_SESSION_BUS_ADDRESS=$(head -n 1 "$demo/bus")
export DBUS_SESSION_BUS_ADDRESS
start=$(date +%s.%N)
$PY -m agent run --bus session --config "$demo/agent.toml" --state-dir "$demo/state" 2> "$demo/daemon.log" &
daemon_pid=$!
$PY -m agent status --bus session --wait --timeout 300
end=$(date +%s.%N)
echo "registered in $(awk -v start="$start" -v end="$end" 'BEGIN { printf "%.1f", end - start }') s"  # awk: bc is not in every Debian
echo; echo "factory-agent status:"
$PY -m agent status --bus session
kill "$daemon_pid"; wait "$daemon_pid" || true
echo; echo "the daemon's log:"; cat "$demo/daemon.log"

step "5. the serial assertion, verified against the brand's account-key"
cat "$demo/state/serial.assertion"
$PY -m agent verify "$demo/state/serial.assertion" --account-key "$demo/vault/brand.account-key"

step "6. the durable state ($demo/state)"
ls -l "$demo/state"
cat "$demo/state/state.json"

step "7. run again: already registered, no request to the vault"
$PY -m agent run --once --bus none --config "$demo/agent.toml" --state-dir "$demo/state"
