#!/usr/bin/env bash
# Live-migrates a running container between two "hosts" (network namespaces
# on this machine) and shows that it goes on from where it was.
#
# The container plays a tiny game: every second it advances a counter held in
# a shell variable (memory), records the score in its rootfs, and serves the
# score over HTTP on its own loopback. After the migration the score goes on
# from where it was, not from zero, the file changes are there, and the
# server answers on the destination.
#
#   scripts/demo.sh [--mode auto|stop-and-copy|post-copy|pre-copy|hybrid]
#
# The mode goes to migrate (default auto: pre-copy where this kernel tracks
# dirty memory, else stop-and-copy); post-copy shows the container running
# on the destination before its memory has arrived.
set -euo pipefail

mode=auto
case "${1:-}" in
    --mode) mode=${2:?--mode needs a value}; shift 2 ;;
    "") ;;
    *) echo "usage: scripts/demo.sh [--mode MODE]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=scripts/hosts.sh
. scripts/hosts.sh
# shellcheck source=scripts/lib/cleanup.sh
. scripts/lib/cleanup.sh

[ "$(id -u)" -eq 0 ] || { echo "demo.sh must run as root (CRIU, runc, namespaces)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what the demo needs (scripts/setup.sh)"
scripts/setup.sh
say "building migrate"
cargo build --release --quiet
bin=$repo/target/release

prefix=mdemo$$
demo=$(mktemp -d /tmp/migrate-demo.XXXXXX)
# The destination holds received images in memory, on a tmpfs of its own.
images=/dev/shm/migrate-demo-$$
id=game-$$
dst_pid=

cleanup() {
    set +e
    stop_child "$dst_pid"
    runc_remove "$demo/runc-src" "$id"
    runc_remove "$demo/runc-dst" "$id"
    unmount_under "$demo"
    hosts_down "$prefix"
    cgroup_remove "migrate-demo-src-$$"
    cgroup_remove "migrate-demo-dst-$$"
    rm -rf "$demo" "$images"
}
trap cleanup EXIT

say "two hosts: network namespaces $prefix-src ($SRC_ADDR) and $prefix-dst ($DST_ADDR)"
hosts_up "$prefix"

say "certificates: one CA, one certificate per host"
"$bin/migrate" certs ca --out "$demo/ca"
"$bin/migrate" certs issue --ca "$demo/ca" --name "$DST_ADDR" --role destination --out "$demo/tls-dst"
"$bin/migrate" certs issue --ca "$demo/ca" --name "$SRC_ADDR" --role source --out "$demo/tls-src"

say "destination daemon on $DST_ADDR:7070"
nsenter --net="/run/netns/$prefix-dst" "$bin/migrate-dst" --listen "$DST_ADDR:7070" --tls-dir "$demo/tls-dst" \
    --state-dir "$demo/dst-state" --image-dir "$images" --runc-root "$demo/runc-dst" --allow "$SRC_ADDR" \
    --cgroup-parent "/migrate-demo-dst-$$" 2>"$demo/migrate-dst.log" &
dst_pid=$!

say "container $id on the source: busybox rootfs as an overlay lower layer"
make_busybox_rootfs "$demo/layer"
mkdir -p "$demo/src/upper" "$demo/src/work" "$demo/src/rootfs"
mount -t overlay overlay \
    -o "lowerdir=$demo/layer,upperdir=$demo/src/upper,workdir=$demo/src/work" "$demo/src/rootfs"
make_bundle "$demo/src/bundle" "$demo/src/rootfs" "/migrate-demo-src-$$/$id" /bin/sh -c '
    mkdir -p /var/game
    httpd -p 127.0.0.1:8080 -h /var/game
    score=0
    while true; do
        score=$((score + 1))
        echo "$score" > /var/game/score
        echo "score $score"
        sleep 1
    done'
# The container's stdout is a pipe to this reader, as under a logging shim.
on_host "$prefix-src" runc --root "$demo/runc-src" run --detach --bundle "$demo/src/bundle" "$id" \
    </dev/null > >(sed -u 's/^/    [container on source] /') 2>&1
sleep 4
say "on the source, the game runs:"
runc --root "$demo/runc-src" list
echo "score over HTTP inside the container: $(runc --root "$demo/runc-src" exec "$id" wget -qO- http://127.0.0.1:8080/score)"

say "migrate $id --to $DST_ADDR:7070 --mode $mode"
on_host "$prefix-src" "$bin/migrate" "$id" --to "$DST_ADDR:7070" --tls-dir "$demo/tls-src" \
    --runc-root "$demo/runc-src" --mode "$mode"

say "after the migration"
echo "source runc root:"
runc --root "$demo/runc-src" list
echo "destination runc root:"
runc --root "$demo/runc-dst" list
sleep 2
echo "score file in the container's rootfs on the destination: $(runc --root "$demo/runc-dst" exec "$id" cat /var/game/score)"
echo "score over HTTP inside the container on the destination: $(runc --root "$demo/runc-dst" exec "$id" wget -qO- http://127.0.0.1:8080/score)"
echo "the container's output on the destination ($demo/dst-state/containers/$id/stdio.log):"
sed 's/^/    [container on destination] /' "$demo/dst-state/containers/$id/stdio.log"
say "the score went on from where it was: the game was moved, not restarted"
