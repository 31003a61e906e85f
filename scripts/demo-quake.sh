#!/usr/bin/env bash
# The DockerCon 2015 demo, replayed: a Quake 3 server (ioquake3 with
# OpenArena's data) with bots playing a deathmatch runs in a container on
# host a; a player's machine on the same network segment watches its
# scoreboard; the container moves live to host b with post-copy, its
# address with it, and the game goes on: same map, same bots, scores going
# on from where they were, a value set over rcon before the move still
# there (only the same process can have it).
#
#   scripts/demo-quake.sh
#
# Everything happens on this machine, as root: the hosts are network
# namespaces (scripts/hosts.sh), their container bridges on one switch, the
# player's machine a third namespace on it. Ctrl-C stops it and cleans up.
set -euo pipefail

[ $# -eq 0 ] || { echo "usage: scripts/demo-quake.sh" >&2; exit 2; }
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=scripts/hosts.sh
. scripts/hosts.sh
# shellcheck source=scripts/lib/cleanup.sh
. scripts/lib/cleanup.sh
# shellcheck source=scripts/lib/quake.sh
. scripts/lib/quake.sh

[ "$(id -u)" -eq 0 ] || { echo "demo-quake.sh must run as root (CRIU, runc, namespaces)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what the demo needs (scripts/setup.sh, ioquake3-server, openarena-server)"
scripts/setup.sh
install_quake
say "building migrate and quake-status"
cargo build --release --quiet -p migrate-src -p migrate-dst -p quake-status
bin=$repo/target/release

prefix=mq$$
demo=$(mktemp -d /tmp/migrate-demo-quake.XXXXXX)
images=/dev/shm/migrate-demo-quake-$$
id=quake-$$
dst_pid=
watcher_pid=
server=$CONTAINER_ADDR:$QUAKE_PORT

cleanup() {
    set +e
    trap - INT TERM
    stop_child "$watcher_pid"
    stop_child "$dst_pid"
    runc_remove "$demo/runc-src" "$id"
    runc_remove "$demo/runc-dst" "$id"
    unmount_under "$demo"
    segment_down "$prefix"
    hosts_down "$prefix"
    cgroup_remove "migrate-demo-quake-src-$$"
    cgroup_remove "migrate-demo-quake-dst-$$"
    rm -rf "$demo" "$images"
}
trap cleanup EXIT
trap 'echo; echo "interrupted: cleaning up" >&2; exit 130' INT TERM

player() { nsenter --net="/run/netns/$prefix-cl" "$bin/quake-status" "$@"; }

say "two hosts, a ($SRC_ADDR) and b ($DST_ADDR), their bridges $SEGMENT_BRIDGE on one switch; a player's machine ($CLIENT_ADDR) on it"
hosts_up "$prefix"
segment_up "$prefix"
# ioquake3 answers one address's status query once a second (after a burst
# of ten): the player's machine asks from ten more addresses in turn, to
# see the game every 100 ms.
watch_from=()
for i in $(seq 101 110); do
    ip -n "$prefix-cl" addr add "10.77.0.$i/$SEGMENT_PREFIX_LEN" dev eth0
    watch_from+=(--from "10.77.0.$i")
done

say "certificates: one CA, one certificate per host"
"$bin/migrate" certs ca --out "$demo/ca" >/dev/null
"$bin/migrate" certs issue --ca "$demo/ca" --name "$DST_ADDR" --role destination --out "$demo/tls-dst" >/dev/null
"$bin/migrate" certs issue --ca "$demo/ca" --name "$SRC_ADDR" --role source --out "$demo/tls-src" >/dev/null

say "destination daemon on host b, $DST_ADDR:7070"
nsenter --net="/run/netns/$prefix-dst" "$bin/migrate-dst" --listen "$DST_ADDR:7070" --tls-dir "$demo/tls-dst" \
    --state-dir "$demo/dst-state" --image-dir "$images" --runc-root "$demo/runc-dst" --allow "$SRC_ADDR" \
    --allow-bridge "$SEGMENT_BRIDGE" --cgroup-parent "/migrate-demo-quake-dst-$$" 2>"$demo/migrate-dst.log" &
dst_pid=$!

say "the game server's layer: ioq3ded, its libraries, OpenArena's game library and one pk3 with $QUAKE_MAP and the bots"
make_quake_layer "$demo/layer"
du -sh "$demo/layer" | awk '{print "    " $1 " (OpenArena'"'"'s full data: '"$(du -shL "$QUAKE_DATA" | cut -f1)"')"}'
mkdir -p "$demo/src/upper" "$demo/src/work" "$demo/src/rootfs"
mount -t overlay overlay \
    -o "lowerdir=$demo/layer,upperdir=$demo/src/upper,workdir=$demo/src/work" "$demo/src/rootfs"
mapfile -t args < <(quake_server_args)
make_bundle "$demo/src/bundle" "$demo/src/rootfs" "/migrate-demo-quake-src-$$/$id" "${args[@]}"

say "container $id on host a: ${QUAKE_BOTS[*]} playing $QUAKE_MAP, no frag or time limit"
# The server's console output goes to a pipe, as under a logging shim.
on_host "$prefix-src" runc --root "$demo/runc-src" run --detach --bundle "$demo/src/bundle" "$id" \
    </dev/null > >(cat >"$demo/server-on-a.log") 2>&1
pid=$(runc --root "$demo/runc-src" state "$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
attach_container "$prefix" "$pid"
echo "    its eth0: $CONTAINER_ADDR/$SEGMENT_PREFIX_LEN, $CONTAINER_MAC, a port of host a's $SEGMENT_BRIDGE"
for _ in $(seq 100); do
    player cvar "$server" --password "$QUAKE_RCON_PASSWORD" sv_hostname >/dev/null 2>&1 && break
    sleep 0.2
done

token=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
say "over rcon, a value only this server process has: migrate_token = $token"
player cvar "$server" --password "$QUAKE_RCON_PASSWORD" --set "$token" migrate_token | sed 's/^/    the server says: migrate_token = /'

say "the player's scoreboard (asked every 100 ms, shown every second)"
# Not through player(): a function in the background is a subshell, and
# its pid is not the watcher's.
nsenter --net="/run/netns/$prefix-cl" "$bin/quake-status" watch "$server" --poll 100ms --show 1s \
    --stop-file "$demo/stop-watching" "${watch_from[@]}" > >(sed -u 's/^/    /') &
watcher_pid=$!
sleep 8

say "migrate $id --to $DST_ADDR:7070 --mode post-copy (the scoreboard goes on)"
on_host "$prefix-src" "$bin/migrate" "$id" --to "$DST_ADDR:7070" --tls-dir "$demo/tls-src" \
    --runc-root "$demo/runc-src" --mode post-copy 2>&1 | sed 's/^/    [migrate] /'
sleep 8
touch "$demo/stop-watching"
wait "$watcher_pid" || true
watcher_pid=

say "after the move"
echo "    host a runs: $(runc --root "$demo/runc-src" list -q | tr '\n' ' ')(nothing of $id)"
echo "    host b runs: $(runc --root "$demo/runc-dst" list -q | tr '\n' ' ')"
echo "    host b's $SEGMENT_BRIDGE ports: $(ip -n "$prefix-dst" -br link show master "$SEGMENT_BRIDGE" | awk '{sub(/@.*/, "", $1); print $1}' | tr '\n' ' ')"
echo "    host a's $SEGMENT_BRIDGE ports: $(ip -n "$prefix-src" -br link show master "$SEGMENT_BRIDGE" | awk '{sub(/@.*/, "", $1); print $1}' | tr '\n' ' ')(its uplink only)"
now=$(player cvar "$server" --password "$QUAKE_RCON_PASSWORD" migrate_token)
echo "    over rcon, migrate_token = $now (set to $token before the move)"
[ "$now" = "$token" ] || { echo "the server lost the value set before the move" >&2; exit 1; }
say "the game went on: same server process, same map and bots, the scores went on from where they were"
