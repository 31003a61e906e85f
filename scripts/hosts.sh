# shellcheck shell=bash
# Two "hosts" on one machine, for the demo and by hand: network namespaces
# joined by a veth pair, with addresses only inside them. Sourced by demo.sh.
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
