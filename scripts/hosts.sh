# shellcheck shell=bash
# Two "hosts" on one machine, for the demo and by hand: network namespaces
# joined by a veth pair, with addresses only inside them. Sourced by demo.sh
# and demo-quake.sh.
#
#   hosts_up NAME_PREFIX     creates ${NAME_PREFIX}-src (198.18.0.1) and
#                            ${NAME_PREFIX}-dst (198.18.0.2)
#   hosts_down NAME_PREFIX   removes both (idempotent)

SRC_ADDR=198.18.0.1
DST_ADDR=198.18.0.2

hosts_up() {
    local p=$1
    ip netns add "$p-src"
    ip netns add "$p-dst"
    ip link add "$p-s" type veth peer name "$p-d"
    ip link set "$p-s" netns "$p-src"
    ip link set "$p-d" netns "$p-dst"
    ip -n "$p-src" addr add "$SRC_ADDR/24" dev "$p-s"
    ip -n "$p-dst" addr add "$DST_ADDR/24" dev "$p-d"
    for side in src dst; do
        ip -n "$p-$side" link set lo up
    done
    ip -n "$p-src" link set "$p-s" up
    ip -n "$p-dst" link set "$p-d" up
}

# A layer-2 segment across both hosts, the network test bed's
# (tests/src/segment.rs) in shell: a switch namespace ${NAME_PREFIX}-sw
# with bridge sw0; on each host a container bridge mbr0 with an uplink to
# the switch; and a client namespace ${NAME_PREFIX}-cl (a player's or a
# user's machine, 10.77.0.100) on it.
#
#   segment_up NAME_PREFIX             after hosts_up
#   attach_container NAME_PREFIX PID   the CNI bridge plugin's part on the
#                                      source: eth0 (10.77.0.10/24,
#                                      02:77:00:00:00:0a) in PID's network
#                                      namespace, its peer a port of mbr0
#   segment_down NAME_PREFIX           removes the switch and the client
#                                      (the hosts' bridges go with them)

SEGMENT_BRIDGE=mbr0
CONTAINER_ADDR=10.77.0.10
CONTAINER_MAC=02:77:00:00:00:0a
CLIENT_ADDR=10.77.0.100
SEGMENT_PREFIX_LEN=24

segment_up() {
    local p=$1 side
    ip netns add "$p-sw"
    ip netns add "$p-cl"
    ip -n "$p-sw" link set lo up
    ip -n "$p-cl" link set lo up
    ip -n "$p-sw" link add sw0 type bridge
    ip -n "$p-sw" link set sw0 up
    for side in src dst; do
        ip -n "$p-$side" link add "$SEGMENT_BRIDGE" type bridge
        ip -n "$p-$side" link set "$SEGMENT_BRIDGE" up
        ip -n "$p-$side" link add "$p-u" type veth peer name "$p-w${side:0:1}" netns "$p-sw"
        ip -n "$p-$side" link set "$p-u" master "$SEGMENT_BRIDGE" up
        ip -n "$p-sw" link set "$p-w${side:0:1}" master sw0 up
    done
    ip -n "$p-cl" link add eth0 type veth peer name "$p-wc" netns "$p-sw"
    ip -n "$p-sw" link set "$p-wc" master sw0 up
    ip -n "$p-cl" addr add "$CLIENT_ADDR/$SEGMENT_PREFIX_LEN" dev eth0
    ip -n "$p-cl" link set eth0 up
}

attach_container() {
    local p=$1 pid=$2
    ip -n "$p-src" link add "$p-h" type veth peer name eth0 netns "/proc/$pid/ns/net"
    nsenter --net="/proc/$pid/ns/net" ip link set eth0 address "$CONTAINER_MAC"
    nsenter --net="/proc/$pid/ns/net" ip addr add "$CONTAINER_ADDR/$SEGMENT_PREFIX_LEN" dev eth0
    nsenter --net="/proc/$pid/ns/net" ip link set eth0 up
    ip -n "$p-src" link set "$p-h" master "$SEGMENT_BRIDGE" up
}

segment_down() {
    local p=$1
    ip netns del "$p-sw" 2>/dev/null || true
    ip netns del "$p-cl" 2>/dev/null || true
}

hosts_down() {
    local p=$1
    ip netns del "$p-src" 2>/dev/null || true
    ip netns del "$p-dst" 2>/dev/null || true
}

# Runs a command "on" a host: in its network namespace only. Not `ip netns
# exec`, which also gives the command a private mount namespace and so hides
# the agents' overlay mounts from the host and from cleanup.
on_host() {
    local ns=$1
    shift
    nsenter --net="/run/netns/$ns" "$@"
}

# A busybox-static root filesystem in DIR, to serve as an overlay lower layer.
make_busybox_rootfs() {
    local dir=$1
    mkdir -p "$dir"/{bin,dev,proc,sys,tmp,etc,root,var,www}
    cp /bin/busybox "$dir/bin/busybox"
    local applet
    for applet in $("$dir/bin/busybox" --list); do
        [ -e "$dir/bin/$applet" ] || ln -s busybox "$dir/bin/$applet"
    done
    echo "root:x:0:0:root:/root:/bin/sh" >"$dir/etc/passwd"
    echo "root:x:0:" >"$dir/etc/group"
}

# An OCI bundle in BUNDLE whose rootfs is ROOTFS, running ARGS..., with its
# own network namespace and cgroup CGROUP_PATH.
make_bundle() {
    local bundle=$1 rootfs=$2 cgroup=$3
    shift 3
    mkdir -p "$bundle"
    (cd "$bundle" && rm -f config.json && runc spec)
    python3 - "$bundle/config.json" "$rootfs" "$cgroup" "$@" <<'PY'
import json, sys
path, rootfs, cgroup, *args = sys.argv[1:]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = args
c["root"] = {"path": rootfs, "readonly": False}
c["linux"]["cgroupsPath"] = cgroup
json.dump(c, open(path, "w"), indent=2)
PY
}
